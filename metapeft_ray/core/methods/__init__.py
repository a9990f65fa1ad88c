"""PEFT methods whose initial state is meta-learned; one module each, declared in one line of
`metapeft_ray.core.registry` and imported from there when first asked for (`method`).

Each provides how to wrap the frozen backbone (default init = the fine-tuning baseline), how to
meta-initialise its tensors, and how the encoder reads hidden states with and without it
(`metapeft_ray.core.methods.base.PeftMethod`).
"""

from __future__ import annotations

from functools import cache

from metapeft_ray.core import registry
from metapeft_ray.core.methods.base import AdapterSpec, PeftMethod


@cache
def method(name: str) -> PeftMethod:
    """The registered PEFT method ``name`` (`registry.METHODS`)."""
    return registry.load(registry.METHODS[name].implementation)()


__all__ = ["AdapterSpec", "PeftMethod", "method"]

"""PEFT methods whose initial state is meta-learned; one module each, registered below.

Each provides how to wrap the frozen backbone (default init = the fine-tuning baseline), how to
meta-initialise its tensors, and how the encoder reads hidden states with and without it
(`metapeft_ray.core.methods.base.PeftMethod`). Adding a method: one module, one line here.
"""

from __future__ import annotations

from metapeft_ray.core.methods.base import AdapterSpec, PeftMethod
from metapeft_ray.core.methods.bottleneck import Bottleneck
from metapeft_ray.core.methods.ia3 import IA3
from metapeft_ray.core.methods.lora import DoRA, LoRA
from metapeft_ray.core.methods.prompt import PrefixTuning, PromptTuning

METHODS: dict[str, PeftMethod] = {
    m.name: m for m in (LoRA(), DoRA(), IA3(), PromptTuning(), PrefixTuning(), Bottleneck())
}

__all__ = ["METHODS", "AdapterSpec", "PeftMethod"]

"""Meta-algorithms over the adapter init; one module each, declared in one line of
`metapeft_ray.core.registry` and imported from there when first asked for (`algorithm`).

Each turns one episode into its contribution to the outer update of the meta-parameters
(`metapeft_ray.core.algorithms.base.MetaAlgorithm`), so the learner's flat-vector all-reduce and
optimiser step are one code path for all.
"""

from __future__ import annotations

from metapeft_ray.core import registry
from metapeft_ray.core.algorithms.base import MetaAlgorithm


def algorithm(name: str) -> type[MetaAlgorithm]:
    """The registered meta-algorithm ``name`` (`registry.ALGORITHMS`)."""
    return registry.load(registry.ALGORITHMS[name].implementation)


__all__ = ["MetaAlgorithm", "algorithm"]

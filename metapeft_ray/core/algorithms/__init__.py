"""Meta-algorithms over the adapter init; one module each, registered below.

Each turns one episode into its contribution to the outer update of the meta-parameters
(`metapeft_ray.core.algorithms.base.MetaAlgorithm`), so the learner's flat-vector all-reduce and
optimiser step are one code path for all. Adding an algorithm: one module, one line here.
"""

from __future__ import annotations

from metapeft_ray.core.algorithms.base import MetaAlgorithm
from metapeft_ray.core.algorithms.maml import MAML
from metapeft_ray.core.algorithms.metasgd import LOG_LR_PREFIX, MetaSGD
from metapeft_ray.core.algorithms.protonet import ProtoNet
from metapeft_ray.core.algorithms.reptile import Reptile

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {a.name: a for a in (MAML, MetaSGD, Reptile, ProtoNet)}

__all__ = ["ALGORITHMS", "LOG_LR_PREFIX", "MetaAlgorithm"]

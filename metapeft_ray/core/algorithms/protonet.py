"""ProtoNet (Snell et al. 2017) on a PEFT-adapted encoder.

Training: no inner steps; the query loss is the prototypical loss, since the Proto-MAML head
gives ``logits_k(x) = s (2 c_k.x - |c_k|^2) = -s |x - c_k|^2 + const(x)``, a softmax over scaled
negative squared distances to the support prototypes. The contribution is its gradient w.r.t.
the adapter, through both the prototypes and the query embeddings — the Proto-MAML path with
``steps = 0`` (the config requires ``meta.inner_steps=0``). Meta-test: prototypes of the
adapted encoder, optionally after ``eval.inner_steps`` steps on the support set.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from metapeft_ray.core.algorithms.base import MetaAlgorithm
from metapeft_ray.core.episodes import Episode
from metapeft_ray.core.meta import EpisodeResult, InnerLoop
from metapeft_ray.core.model import Encoder


class ProtoNet(MetaAlgorithm):
    name = "protonet"

    def episode(
        self,
        encoder: Encoder,
        params: Mapping[str, Tensor],
        extra: Mapping[str, Tensor],
        episode: Episode,
        inner: InnerLoop,
        *,
        meta_gradient: bool,
    ) -> EpisodeResult:
        if meta_gradient and inner.steps:
            raise ValueError(f"protonet trains with 0 inner steps, got {inner.steps}; set meta.inner_steps=0")
        return super().episode(encoder, params, extra, episode, inner, meta_gradient=meta_gradient)

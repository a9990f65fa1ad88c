"""Reptile (Nichol et al. 2018): first-order, no query gradient; the outer update moves the init
towards the weights adapted on each task.

The contribution of an episode is the pseudo-gradient ``phi_0 - phi_K`` (K inner steps on the
support set, the same `adapt` as every algorithm, never differentiated). The learner averages it
over the meta-batch and feeds it to the outer optimiser in place of a gradient:

- ``meta.outer_optimizer=sgd``: ``phi_0 <- phi_0 - eps (phi_0 - mean phi_K)`` — classic (batched)
  Reptile with step size ``eps = meta.outer_lr``;
- ``meta.outer_optimizer=adam`` (default, the same outer path as MAML): "Reptile with Adam",
  the common variant in which Adam normalises the pseudo-gradient per coordinate.

The query set is still scored (no gradient) so the training curves compare with MAML's.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from metapeft_ray.core.algorithms.base import MetaAlgorithm
from metapeft_ray.core.episodes import Episode
from metapeft_ray.core.meta import EpisodeResult, InnerLoop
from metapeft_ray.core.model import Encoder


class Reptile(MetaAlgorithm):
    name = "reptile"

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
        # Adapt without a query gradient; keep the adapted tensors for the pseudo-gradient.
        result = self.run(
            encoder,
            params,
            episode,
            inner,
            meta_gradient=False,
            track_support_after=not meta_gradient,
            keep_adapted=meta_gradient,
        )
        if meta_gradient:
            adapted = result.adapted or {}
            result.grads = {k: v.detach() - adapted[k] for k, v in params.items()}
            result.adapted = None
        return result

"""What every meta-algorithm provides: its extra meta-parameters (if any), and how one episode
becomes that episode's contribution to the outer update of the meta-parameters.

The `MetaLearner` sums the contributions of a meta-batch in one flat vector (one all-reduce on
Ray), divides by the meta-batch size and takes one optimiser step, whatever the algorithm: the
contribution is a gradient (MAML, Meta-SGD, ProtoNet) or a pseudo-gradient (Reptile).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from metapeft_ray.core.episodes import Episode
from metapeft_ray.core.meta import EpisodeResult, InnerLoop, run_episode
from metapeft_ray.core.model import Encoder

Params = dict[str, Tensor]


class MetaAlgorithm:
    """Base of the meta-algorithms (declared in `metapeft_ray.core.registry`, looked up with
    `metapeft_ray.core.algorithms.algorithm`)."""

    name: ClassVar[str]

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> MetaAlgorithm:
        """Build from the flat ``meta.*`` settings (an algorithm reads only its own keys)."""
        return cls()

    def extra_meta_params(self, adapter: Mapping[str, Tensor], *, lr: float) -> Params:
        """Meta-parameters besides the adapter init (fresh leaf tensors); none by default."""
        return {}

    def inner_lrs(self, extra: Mapping[str, Tensor]) -> Params | None:
        """Per-adapter-tensor inner learning rates the adaptation uses (None: the scalar lr)."""
        return None

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
        """Adapt to ``episode`` and score its query set. With ``meta_gradient``, ``grads`` holds
        the episode's contribution for every meta-parameter: ``params`` names, then ``extra``
        (here: the learned head values, `InnerLoop.with_learned`)."""
        return self.run(
            encoder,
            params,
            episode,
            inner.with_learned(extra),
            meta_gradient=meta_gradient,
            grad_wrt={**params, **extra} if extra else None,
        )

    @staticmethod
    def run(
        encoder: Encoder,
        params: Mapping[str, Tensor],
        episode: Episode,
        inner: InnerLoop,
        *,
        meta_gradient: bool,
        **options: Any,
    ) -> EpisodeResult:
        """`run_episode` with the inner loop's settings, the one call every algorithm makes. An
        episode without a meta-gradient is a validation one: it also measures the support loss
        after adaptation (a training episode would pay a forward for it). ``options``: further
        `run_episode` keywords, overriding these (Meta-SGD's rates, Reptile's adapted tensors)."""
        settings = {"meta_gradient": meta_gradient, "track_support_after": not meta_gradient}
        return run_episode(encoder, params, episode, inner, **(settings | options))

"""What every meta-algorithm provides: its extra meta-parameters (if any), and how one episode
becomes that episode's contribution to the outer update of the meta-parameters.

The `MetaLearner` sums the contributions of a meta-batch in one flat vector (one all-reduce on
Ray), divides by the meta-batch size and takes one optimiser step, whatever the algorithm: the
contribution is a gradient (MAML, Meta-SGD, ProtoNet) or a pseudo-gradient (Reptile).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from metapeft_ray.core.episodes import Episode
from metapeft_ray.core.meta import EpisodeResult, Scalar, run_episode
from metapeft_ray.core.model import Encoder

Params = dict[str, Tensor]


HEAD_PREFIX = "head/log_"
"""Meta-parameter names of the learned head values: ``head/log_scale``, ``head/log_name_weight``..."""


@dataclass(frozen=True)
class InnerLoop:
    """The inner loop's settings (flat values from ``meta.*`` / ``head.*``). ``name_weight`` None:
    the head does not use the class names."""

    steps: int
    lr: float
    scale: Scalar
    first_order: bool
    inner_scale: Scalar | None = None
    name_weight: Scalar | None = None
    views: int = 0
    view_drop: float = 0.3

    def head_meta_params(self, learn: Sequence[str], device: torch.device | None = None) -> Params:
        """Fresh log-parametrised leaves for the head values in ``learn``, at their set values
        (an unset inner scale starts at the scale), on ``device`` (the adapter's)."""
        start = {"inner_scale": self.scale if self.inner_scale is None else self.inner_scale}
        return {
            HEAD_PREFIX + k: torch.tensor(
                math.log(start.get(k, getattr(self, k))), device=device, requires_grad=True
            )
            for k in learn
        }

    def with_learned(self, extra: Mapping[str, Tensor]) -> InnerLoop:
        """These settings with the learned head values of ``extra`` (``exp`` of the leaves, so the
        query loss is differentiable w.r.t. them) in place of the set ones."""
        learned = {
            k.removeprefix(HEAD_PREFIX): v.exp() for k, v in extra.items() if k.startswith(HEAD_PREFIX)
        }
        return replace(self, **learned) if learned else self


class MetaAlgorithm:
    """Base of the registered algorithms (``metapeft_ray.core.algorithms.ALGORITHMS``)."""

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
        settings = {
            "steps": inner.steps,
            "lr": inner.lr,
            "scale": inner.scale,
            "first_order": inner.first_order,
            "inner_scale": inner.inner_scale,
            "name_weight": inner.name_weight,
            "views": inner.views,
            "view_drop": inner.view_drop,
            "meta_gradient": meta_gradient,
            "track_support_after": not meta_gradient,
        }
        return run_episode(encoder, params, episode, **(settings | options))

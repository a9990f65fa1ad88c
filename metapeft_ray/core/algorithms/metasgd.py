"""Meta-SGD (Li et al. 2017): MAML whose inner learning rates are meta-learned.

Each adapter tensor ``phi^i`` gets a learned ``log alpha^i`` (a scalar with
``meta.metasgd_granularity=tensor``, one per element with ``parameter``, or one per inner step with
``step``: MAML++'s per-layer per-step rates, "LSLR"), and inner step t is
``phi^i <- phi^i - exp(log alpha^i_t) * dL_support/dphi^i`` (the head keeps ``meta.inner_lr``).
Per-step rates are stored with a leading step axis (``[steps, 1, ..., 1]``, `meta.adapt`); an
adaptation longer than the meta-training's inner loop keeps the last step's rate.
The log-rates are meta-parameters: the contribution holds ``d L_query / d log alpha`` beside the
adapter's gradient (also first-order: the update is linear in alpha). Log-space keeps every rate
positive. They are checkpointed, exported as ``metasgd_lrs.safetensors`` (the rates, named by
adapter tensor) and used at meta-test and by ``metapeft adapt``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from metapeft_ray.core.algorithms.base import MetaAlgorithm, Params
from metapeft_ray.core.episodes import Episode
from metapeft_ray.core.meta import EpisodeResult, InnerLoop
from metapeft_ray.core.model import Encoder

LOG_LR_PREFIX = "log_lr/"
"""Meta-parameter names of the log learning rates: ``log_lr/<adapter tensor name>``."""


class MetaSGD(MetaAlgorithm):
    name = "metasgd"

    def __init__(self, granularity: str = "tensor", lr_init: float | None = None, steps: int = 1) -> None:
        if granularity not in ("tensor", "parameter", "step"):
            raise ValueError(f"meta.metasgd_granularity={granularity!r}; use tensor, parameter or step")
        self.granularity, self.lr_init, self.steps = granularity, lr_init, steps

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> MetaSGD:
        return cls(
            settings.get("metasgd_granularity", "tensor"),
            settings.get("metasgd_lr_init"),
            settings.get("inner_steps", 1),
        )

    def _shape(self, p: Tensor) -> tuple[int, ...]:
        return {
            "tensor": (),
            "parameter": tuple(p.shape),
            "step": (self.steps,) + (1,) * p.dim(),
        }[self.granularity]

    def extra_meta_params(self, adapter: Mapping[str, Tensor], *, lr: float) -> Params:
        log_lr = math.log(self.lr_init or lr)
        return {
            LOG_LR_PREFIX + name: torch.full(
                self._shape(p), log_lr, dtype=p.dtype, device=p.device
            ).requires_grad_()
            for name, p in adapter.items()
        }

    def inner_lrs(self, extra: Mapping[str, Tensor]) -> Params:
        return {
            k.removeprefix(LOG_LR_PREFIX): v.exp() for k, v in extra.items() if k.startswith(LOG_LR_PREFIX)
        }

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
        with torch.set_grad_enabled(meta_gradient):
            lrs = self.inner_lrs(extra)
        return self.run(
            encoder,
            params,
            episode,
            inner.with_learned(extra),
            meta_gradient=meta_gradient,
            param_lrs=lrs,
            grad_wrt={**params, **extra},
        )

"""Meta-training of the adapter init: `MetaLearner` (one meta-step, Ray-free) and its setup.

A meta-step draws ``meta_batch_size`` episode specs, lets each rank run its share
(``specs[rank::world]``) through `run_episode`, sums the meta-gradients and the statistics in one
flat vector through ``reduce`` (identity in one process, an all-reduce on Ray), and applies one
Adam update to the adapter init: ``phi_0 <- Adam(phi_0, (1/B) sum_i dL_query_i/dphi_0)``.
Every rank applies the same update to the same vector, so all ranks stay in exact agreement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metapeft_ray.config import Config, ConfigError
from metapeft_ray.data import load_dataset
from metapeft_ray.episodes import ClassSplits, EpisodeSampler, EpisodeSpec, check_labels
from metapeft_ray.meta import run_episode
from metapeft_ray.model import Encoder, encoder_from_config, meta_init_lora

Reduce = Callable[[Tensor], Tensor]
_STATS = ("query_loss", "query_accuracy", "support_loss_before", "support_loss_after")


def _no_reduce(t: Tensor) -> Tensor:
    return t


def prepare_sampler(cfg: Config) -> EpisodeSampler:
    """Load the data, cut the class splits and check every episode shape the run will draw —
    all before any model is loaded or any cluster resource is taken."""
    d = cfg.data
    data = load_dataset(d.dataset, d.text_column, d.label_column)
    check_labels(data)
    splits = ClassSplits.make(
        data.labels, folds=d.folds, fold=d.fold, split_seed=d.split_seed, val_fraction=d.val_fraction
    )
    sampler = EpisodeSampler(data, splits)
    e, ev = cfg.episode, cfg.eval
    problems = [
        *sampler.check_shape("train", e.n_way, [e.k_shot], e.q_query),
        *sampler.check_shape("val", e.n_way, [e.k_shot], e.q_query),
        *sampler.check_shape("test", ev.n_way, ev.shots, ev.q_query),
    ]
    if problems:
        raise ConfigError(f"episodes cannot be drawn from {d.dataset!r}:\n  " + "\n  ".join(problems))
    return sampler


@dataclass(frozen=True)
class InnerLoop:
    steps: int
    lr: float
    scale: float
    first_order: bool


class MetaLearner:
    """The adapter init (``phi_0``), its outer optimiser, and how to take one meta-step."""

    def __init__(
        self,
        encoder: Encoder,
        sampler: EpisodeSampler,
        *,
        inner: InnerLoop,
        seed: int,
        n_way: int,
        k_shot: int,
        q_query: int,
        meta_batch_size: int,
        outer_lr: float,
        val_episodes: int,
        b_std: float,
    ) -> None:
        self.encoder, self.sampler, self.inner = encoder, sampler, inner
        self.seed, self.meta_batch_size, self.val_episodes = seed, meta_batch_size, val_episodes
        self.shape = {"n_way": n_way, "k_shot": k_shot, "q_query": q_query}
        self.params = encoder.adapter_params()
        # peft's own init (B = 0) is kept for the fine-tuning baseline before B is meta-initialised.
        self.default_init = {k: v.detach().clone() for k, v in self.params.items()}
        meta_init_lora(self.params, b_std=b_std, seed=seed)
        self.optimizer = torch.optim.Adam(self.params.values(), lr=outer_lr)
        self.step = 0

    @classmethod
    def from_config(
        cls, cfg: Config, sampler: EpisodeSampler, device: torch.device | None = None
    ) -> MetaLearner:
        torch.manual_seed(cfg.run.seed)  # peft's Kaiming init of A
        m = cfg.meta
        return cls(
            encoder_from_config(cfg, device=device),
            sampler,
            inner=InnerLoop(m.inner_steps, m.inner_lr, cfg.model.head_scale, m.first_order),
            seed=cfg.run.seed,
            n_way=cfg.episode.n_way,
            k_shot=cfg.episode.k_shot,
            q_query=cfg.episode.q_query,
            meta_batch_size=m.meta_batch_size,
            outer_lr=m.outer_lr,
            val_episodes=m.val_episodes,
            b_std=cfg.peft.init_b_std,
        )

    def train_specs(self, step: int) -> list[EpisodeSpec]:
        return self.sampler.specs("train", self.meta_batch_size, seed=self.seed, step=step, **self.shape)

    def val_specs(self) -> list[EpisodeSpec]:
        # The same validation episodes at every evaluation, so the curve compares like with like.
        return self.sampler.specs("val", self.val_episodes, seed=self.seed, step=0, **self.shape)

    def _episode(self, spec: EpisodeSpec, meta_gradient: bool):  # noqa: ANN202
        i = self.inner
        return run_episode(
            self.encoder,
            self.params,
            self.sampler.build(spec),
            steps=i.steps,
            lr=i.lr,
            scale=i.scale,
            first_order=i.first_order,
            meta_gradient=meta_gradient,
        )

    def meta_step(self, *, rank: int = 0, world: int = 1, reduce: Reduce = _no_reduce) -> dict[str, float]:
        """One outer update from this rank's share of the meta-batch of episodes at ``self.step``."""
        params = list(self.params.values())
        dev = params[0].device
        grad = torch.zeros(sum(p.numel() for p in params), device=dev)
        stats = torch.zeros(len(_STATS), device=dev, dtype=torch.float64)
        for spec in self.train_specs(self.step)[rank::world]:
            r = self._episode(spec, meta_gradient=True)
            grad += torch.cat([g.reshape(-1) for g in r.grads.values()])
            stats += torch.tensor([getattr(r, s) for s in _STATS], device=dev, dtype=torch.float64)
        total = reduce(torch.cat([grad.double(), stats]))
        grad, stats = (
            total[: grad.numel()] / self.meta_batch_size,
            total[grad.numel() :] / self.meta_batch_size,
        )
        offset = 0
        for p in params:
            p.grad = grad[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = dict(zip(_STATS, stats.tolist(), strict=True))
        metrics["adaptation_gain"] = metrics["support_loss_before"] - metrics["support_loss_after"]
        return {"meta_step": self.step, "meta_loss": metrics.pop("query_loss"), **metrics}

    def validate(self, *, rank: int = 0, world: int = 1, reduce: Reduce = _no_reduce) -> float:
        """Mean query accuracy after adaptation on the meta-validation classes."""
        correct = torch.zeros(2, dtype=torch.float64, device=next(iter(self.params.values())).device)
        for spec in self.val_specs()[rank::world]:
            correct += torch.tensor(
                [self._episode(spec, meta_gradient=False).query_accuracy, 1.0],
                dtype=torch.float64,
                device=correct.device,
            )
        total = reduce(correct)
        return float(total[0] / total[1])

    def iterate(
        self, meta_steps: int, *, val_every: int, rank: int = 0, world: int = 1, reduce: Reduce = _no_reduce
    ) -> Iterator[dict[str, float]]:
        """Meta-steps from the current step up to ``meta_steps``; validation every ``val_every``."""
        while self.step < meta_steps:
            metrics = self.meta_step(rank=rank, world=world, reduce=reduce)
            if self.step % val_every == 0 or self.step == meta_steps:
                metrics["meta_val_accuracy"] = self.validate(rank=rank, world=world, reduce=reduce)
            yield metrics

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-for-bit (episodes are rebuilt from specs)."""
        return {
            "adapter": {k: v.detach().cpu() for k, v in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "meta_step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in state["adapter"].items():
                self.params[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["meta_step"])

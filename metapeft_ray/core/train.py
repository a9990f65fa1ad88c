"""Meta-training of the adapter init: `MetaLearner` (one meta-step, Ray-free) and its setup.

A meta-step draws ``meta_batch_size`` episode specs, lets each rank run its share (`shard`: dealt
by cost, so the ranks finish together) through the algorithm's per-episode function
(`metapeft_ray.core.algorithms`), sums the contributions and the statistics in one flat vector
through ``reduce`` (identity in one process, an all-reduce on Ray), and applies one optimiser
update to the meta-parameters: ``theta <- Adam(theta, (1/B) sum_i g_i)`` with ``theta`` the
adapter init (plus Meta-SGD's log learning rates) and ``g_i`` episode i's contribution (MAML:
``dL_query_i/dtheta``; Reptile: ``phi_0 - phi_K,i``). Every rank applies the same update to the
same vector, so all ranks stay in exact agreement.

With ``meta.pretrain_steps = P`` the first P meta-steps are supervised instead (`_supervised`):
a batch of labelled meta-train texts, split over the ranks, scored against every meta-train
class name; the same reduce, optimiser, step counter and checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from math import nan
from typing import Any

import torch
from torch import Tensor

from metapeft_ray.core.algorithms import MetaAlgorithm, algorithm
from metapeft_ray.core.algorithms.maml import MAML
from metapeft_ray.core.config import Config, ConfigError
from metapeft_ray.core.data import load_dataset
from metapeft_ray.core.episodes import ClassSplits, Episode, EpisodeSampler, EpisodeSpec, check_labels
from metapeft_ray.core.meta import HEAD_PREFIX, EpisodeResult, InnerLoop, names_head_loss
from metapeft_ray.core.methods import method
from metapeft_ray.core.model import Encoder, encoder_from_config
from metapeft_ray.core.splits import match_patterns

Reduce = Callable[[Tensor], Tensor]
EpisodeObserver = Callable[[EpisodeSpec, EpisodeResult, float], None]
"""Called after every episode the learner adapts (meta-train and meta-validation) with its spec,
its result and its wall time in seconds; see `MetaLearner.episode_observers`."""
_STATS = ("query_loss", "query_accuracy")
# Measured at validation, on the meta-val classes: a training episode would pay one more support
# forward for `support_loss_after`.
_VAL_STATS = ("query_accuracy", "support_loss_before", "support_loss_after")
BEST_VAL_ACCURACY = "best_meta_val_accuracy"
"""The best validation so far, in the metrics a checkpoint is reported with (`MetaLearner.reported`)."""


def _no_reduce(t: Tensor) -> Tensor:
    return t


def prepare_sampler(cfg: Config) -> EpisodeSampler:
    """Load the data, cut the class splits and check every episode shape the run will draw —
    all before any model is loaded or any cluster resource is taken."""
    d, e, ev = cfg.data, cfg.episode, cfg.eval
    data = load_dataset(d.dataset, d.text_column, d.label_column)
    check_labels(data)
    # With eval.dataset the test classes come from that dataset (checked by the evaluation):
    # no fold of the training data is held out, and its own test split is not drawn from.
    own_test = ev.dataset is None
    if d.splits:
        splits = ClassSplits.from_file(d.splits, data.labels, exclude=d.exclude_classes, need_test=own_test)
    else:
        splits = ClassSplits.make(
            data.labels,
            folds=d.folds,
            fold=d.fold,
            split_seed=d.split_seed,
            val_fraction=d.val_fraction,
            hold_out_test=own_test,
            exclude=d.exclude_classes,
            name=data.name,
        )
    sampler = EpisodeSampler(data, splits)
    problems = [
        *sampler.check_shape("train", e.n_way, e.train_shots or [e.k_shot], e.q_query),
        *sampler.check_shape("val", e.n_way, [e.k_shot], e.q_query),
        *(sampler.check_shape("test", max(ev.ways), ev.shots, ev.q_query) if own_test else []),
    ]
    if problems:
        raise ConfigError(f"episodes cannot be drawn from {d.dataset!r}:\n  " + "\n  ".join(problems))
    if not own_test:
        prepare_test_sampler(cfg, sampler)  # the other dataset's classes and shapes, just as early
    return sampler


def prepare_test_sampler(cfg: Config, sampler: EpisodeSampler) -> EpisodeSampler:
    """The sampler of the meta-test episodes: ``sampler`` itself (its held-out test classes), or
    with ``eval.dataset`` one over that dataset's ``eval.classes`` (all by default), every meta-test
    shape checked."""
    d, ev = cfg.data, cfg.eval
    if ev.dataset is None:
        return sampler
    data = load_dataset(ev.dataset, d.text_column, d.label_column)
    check_labels(data)
    classes = sorted(set(data.labels))
    if ev.classes is not None:
        chosen, problems = match_patterns(ev.classes, classes, setting="eval.classes")
        if problems:
            raise ConfigError(f"eval.classes does not fit {ev.dataset!r}:\n  " + "\n  ".join(problems))
        classes = list(chosen)
    test = EpisodeSampler(data, ClassSplits.test_only(classes, source=ev.dataset))
    problems = test.check_shape("test", max(ev.ways), ev.shots, ev.q_query)
    if problems:
        raise ConfigError(
            f"meta-test episodes cannot be drawn from {ev.dataset!r}:\n  " + "\n  ".join(problems)
        )
    return test


def inner_loop(cfg: Config, steps: int | None = None, lr: float | None = None) -> InnerLoop:
    """The inner loop of a config (``steps`` / ``lr`` override ``meta.*``, e.g. at meta-test).
    Reptile and ProtoNet never differentiate the inner loop: first order for them."""
    m, h = cfg.meta, cfg.head
    return InnerLoop(
        m.inner_steps if steps is None else steps,
        m.inner_lr if lr is None else lr,
        h.scale,
        not m.second_order,
        h.inner_scale,
        h.name_weight if h.label_names else None,
        h.views,
        h.view_drop,
        leave_one_out=h.support_loss == "leave_one_out",
        test_head=h.test_head,
        query_refine=h.query_refine,
        refine_prior=h.refine_prior_counts if h.refine_prior else None,
        train_refined=h.train_refined,
    )


def shard(
    specs: Sequence[EpisodeSpec], rank: int, world: int, cost: Callable[[EpisodeSpec], float]
) -> list[EpisodeSpec]:
    """Rank ``rank``'s share of ``specs`` out of ``world``: the longest-processing-time deal, the
    most costly episode first, each to the rank with the least cost so far (ties: the lowest
    rank; equal costs give ``specs[rank::world]``), so the ranks reach the all-reduce together
    instead of waiting for the one that drew the long texts. Every rank computes the same deal
    from the same specs; the sum over all ranks is the same whatever the deal."""
    if world == 1:
        return list(specs)
    costs = [cost(s) for s in specs]
    loads, mine = [0.0] * world, []
    for i in sorted(range(len(specs)), key=lambda i: -costs[i]):  # stable: ties keep spec order
        least = loads.index(min(loads))
        loads[least] += costs[i]
        if least == rank:
            mine.append(specs[i])
    return mine


class MetaLearner:
    """The meta-parameters (adapter init ``phi_0``, plus the algorithm's own, e.g. Meta-SGD's
    log learning rates), their outer optimiser, and how to take one meta-step."""

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
        algorithm: MetaAlgorithm | None = None,
        outer_optimizer: str = "adam",
        extra_outer_lr: float | None = None,
        learn_head: Sequence[str] = (),
        head_outer_lr: float = 0.01,
        patience: int | None = None,
        pretrain_steps: int = 0,
        pretrain_batch: int = 64,
        train_shots: Sequence[int] = (),
        query_alpha: float = 0.0,
    ) -> None:
        self.encoder, self.sampler, self.inner = encoder, sampler, inner
        self.seed, self.meta_batch_size, self.val_episodes = seed, meta_batch_size, val_episodes
        self.patience, self.pretrain_steps, self.pretrain_batch = patience, pretrain_steps, pretrain_batch
        self.shape = {"n_way": n_way, "k_shot": k_shot, "q_query": q_query, "query_alpha": query_alpha}
        self.train_shots = list(train_shots)
        self.algorithm = algorithm or MAML()
        self.params = encoder.adapter_params()
        # The method's default init (LoRA: B = 0) is kept for the fine-tuning baseline.
        self.default_init = {k: v.detach().clone() for k, v in self.params.items()}
        method(encoder.spec.method).meta_init(self.params, encoder.spec, seed)
        algorithm_extra = self.algorithm.extra_meta_params(self.params, lr=inner.lr)
        head = inner.head_meta_params(learn_head, device=encoder.device)
        self.extra = {**algorithm_extra, **head}
        self.meta_params: dict[str, Tensor] = {**self.params, **self.extra}
        groups: list[dict[str, Any]] = [{"params": list(self.params.values())}]
        if algorithm_extra:
            groups.append({"params": list(algorithm_extra.values()), "lr": extra_outer_lr or outer_lr})
        if head:
            groups.append({"params": list(head.values()), "lr": head_outer_lr})
        if outer_optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(groups, lr=outer_lr)
        elif outer_optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=outer_lr)
        else:
            raise ValueError(f"meta.outer_optimizer={outer_optimizer!r}; use adam or sgd")
        self.step = 0
        # The meta-parameters of the best validation so far (`keep_best`): its meta_step and
        # meta_val_accuracy with CPU copies of "adapter" and "extra_meta_params".
        self.best: dict[str, Any] | None = None
        # Metrics and benchmarks watch episodes here (`EpisodeObserver`); they never change them.
        self.episode_observers: list[EpisodeObserver] = []

    @classmethod
    def from_config(
        cls, cfg: Config, sampler: EpisodeSampler, device: torch.device | None = None
    ) -> MetaLearner:
        torch.manual_seed(cfg.run.seed)  # the method's default init (peft's Kaiming init of A, ...)
        m = cfg.meta
        return cls(
            encoder_from_config(cfg, device=device),
            sampler,
            inner=inner_loop(cfg),
            seed=cfg.run.seed,
            n_way=cfg.episode.n_way,
            k_shot=cfg.episode.k_shot,
            q_query=cfg.episode.q_query,
            meta_batch_size=m.meta_batch_size,
            outer_lr=m.outer_lr,
            val_episodes=m.val_episodes,
            algorithm=algorithm(m.algorithm).from_settings(m.model_dump()),
            outer_optimizer=m.outer_optimizer,
            extra_outer_lr=m.metasgd_outer_lr,
            learn_head=cfg.head.learn,
            head_outer_lr=cfg.head.outer_lr,
            patience=m.patience,
            pretrain_steps=m.pretrain_steps,
            pretrain_batch=m.pretrain_batch,
            train_shots=cfg.episode.train_shots,
            query_alpha=cfg.episode.query_alpha,
        )

    def train_specs(self, step: int) -> list[EpisodeSpec]:
        specs = self.sampler.specs("train", self.meta_batch_size, seed=self.seed, step=step, **self.shape)
        if not self.train_shots:
            return specs
        # mixed shots, dealt in turn across the meta-batches (an odd batch still alternates)
        shots, first = self.train_shots, step * self.meta_batch_size
        return [replace(s, k_shot=shots[(first + s.index) % len(shots)]) for s in specs]

    def val_specs(self) -> list[EpisodeSpec]:
        # The same validation episodes at every evaluation, so the curve compares like with like.
        return self.sampler.specs("val", self.val_episodes, seed=self.seed, step=0, **self.shape)

    def episode_cost(self, spec: EpisodeSpec) -> int:
        """What `shard` deals a meta-batch by: the episode's padded characters."""
        return self.sampler.build(spec).padded_chars

    def _episode(self, spec: EpisodeSpec, meta_gradient: bool) -> EpisodeResult:
        t0 = time.perf_counter()
        result = self.algorithm.episode(
            self.encoder,
            self.params,
            self.extra,
            self.sampler.build(spec),
            self.inner,
            meta_gradient=meta_gradient,
        )
        seconds = time.perf_counter() - t0
        for observe in self.episode_observers:
            observe(spec, result, seconds)
        return result

    def _supervised(self, batch: Episode, rank: int, world: int) -> EpisodeResult:
        """This rank's share of a supervised step's batch (every ``world``-th text): the gradient of
        its summed `names_head_loss`, with the summed loss and the count right as its statistics."""
        mine = replace(
            batch, query_texts=batch.query_texts[rank::world], query_labels=batch.query_labels[rank::world]
        )
        wrt = self.meta_params
        if not mine.query_texts:  # more ranks than texts
            return EpisodeResult({k: torch.zeros_like(v) for k, v in wrt.items()}, 0.0, 0.0, nan, nan)
        scale = self.inner.with_learned(self.extra).scale
        loss, right = names_head_loss(self.encoder, self.params, mine, scale)
        grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
        return EpisodeResult(
            {
                k: torch.zeros_like(v) if g is None else g
                for (k, v), g in zip(wrt.items(), grads, strict=True)
            },
            loss.item(),
            float(right),
            nan,
            nan,
        )

    def learned_head(self) -> dict[str, float]:
        """The meta-learned head values, ``{"scale": 8.3, ...}`` (empty when none is learned)."""
        return {
            k.removeprefix(HEAD_PREFIX): v.exp().item()
            for k, v in self.extra.items()
            if k.startswith(HEAD_PREFIX)
        }

    def inner_lrs(self) -> dict[str, Tensor] | None:
        """The learned per-tensor inner learning rates (Meta-SGD), detached; None otherwise."""
        with torch.no_grad():
            lrs = self.algorithm.inner_lrs(self.extra)
        return None if lrs is None else {k: v.detach().clone() for k, v in lrs.items()}

    def meta_step(self, *, rank: int = 0, world: int = 1, reduce: Reduce = _no_reduce) -> dict[str, float]:
        """One outer update from this rank's share of the meta-batch of episodes at ``self.step``,
        or in the first ``pretrain_steps`` of the step's supervised batch (`_supervised`)."""
        names, params = list(self.meta_params), list(self.meta_params.values())
        dev = params[0].device
        grad = torch.zeros(sum(p.numel() for p in params), device=dev)
        stats = torch.zeros(len(_STATS), device=dev, dtype=torch.float64)
        if self.step < self.pretrain_steps:
            batch = self.sampler.labelled_batch("train", self.pretrain_batch, seed=self.seed, step=self.step)
            results: Iterable[EpisodeResult] = [self._supervised(batch, rank, world)]
            count = len(batch.query_texts)
        else:
            specs = shard(self.train_specs(self.step), rank, world, self.episode_cost)
            results, count = (self._episode(spec, meta_gradient=True) for spec in specs), self.meta_batch_size
        for r in results:
            grad += torch.cat([r.grads[k].reshape(-1) for k in names])
            stats += torch.tensor([getattr(r, s) for s in _STATS], device=dev, dtype=torch.float64)
        total = reduce(torch.cat([grad.double(), stats]))
        grad, stats = total[: grad.numel()] / count, total[grad.numel() :] / count
        offset = 0
        for p in params:
            p.grad = grad[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = dict(zip(_STATS, stats.tolist(), strict=True))
        return {"meta_step": self.step, "meta_loss": metrics.pop("query_loss"), **metrics}

    def validate(self, *, rank: int = 0, world: int = 1, reduce: Reduce = _no_reduce) -> dict[str, float]:
        """On the meta-validation classes, means over the episodes: ``meta_val_accuracy`` (query
        accuracy after adaptation) and what the inner loop achieved on the support sets,
        ``support_loss_before`` / ``support_loss_after`` / ``adaptation_gain``."""
        sums = torch.zeros(
            len(_VAL_STATS) + 1, dtype=torch.float64, device=next(iter(self.params.values())).device
        )
        for spec in shard(self.val_specs(), rank, world, self.episode_cost):
            r = self._episode(spec, meta_gradient=False)
            sums += torch.tensor(
                [*(getattr(r, s) for s in _VAL_STATS), 1.0], dtype=torch.float64, device=sums.device
            )
        total = reduce(sums)
        means = dict(zip(_VAL_STATS, (total[:-1] / total[-1]).tolist(), strict=True))
        means["adaptation_gain"] = means["support_loss_before"] - means["support_loss_after"]
        return {"meta_val_accuracy": means.pop("query_accuracy"), **means}

    def iterate(
        self, meta_steps: int, *, val_every: int, rank: int = 0, world: int = 1, reduce: Reduce = _no_reduce
    ) -> Iterator[dict[str, float]]:
        """Meta-steps from the current step up to ``meta_steps``; validation every ``val_every``;
        with ``patience``, the last step is the validation ``patience`` validations after the best."""
        while self.step < meta_steps and not self.stopped_early(val_every):
            metrics = self.meta_step(rank=rank, world=world, reduce=reduce)
            if self.step % val_every == 0 or self.step == meta_steps:
                t0 = time.perf_counter()
                metrics |= self.validate(rank=rank, world=world, reduce=reduce)
                # wall time to adapt to and score one validation task (Tune's second objective)
                metrics["adapt_ms"] = 1000 * (time.perf_counter() - t0) * world / len(self.val_specs())
                # every rank sees the same reduced accuracy, so every rank keeps the same best
                if self.best is None or metrics["meta_val_accuracy"] > self.best["meta_val_accuracy"]:
                    acc = metrics["meta_val_accuracy"]
                    self.best = {"meta_step": self.step, "meta_val_accuracy": acc, **self._meta_params_copy()}
            yield metrics

    def reported(self, metrics: dict[str, float]) -> dict[str, float]:
        """A step's metrics as its checkpoint is reported (Ray Train, Tune): with the number of
        trainable parameters and, once there is a validation, the best one so far
        (`BEST_VAL_ACCURACY`: what ``meta.keep: best`` exports, and what a Tune search then ranks
        its trials by)."""
        out = {**metrics, "trainable_params": sum(p.numel() for p in self.params.values())}
        if self.best is not None:
            out[BEST_VAL_ACCURACY] = self.best["meta_val_accuracy"]
        return out

    def stopped_early(self, val_every: int) -> bool:
        """Whether ``patience`` validations (every ``val_every`` steps) have passed since the best
        one. Derived from the best's step, so a run resumed from a checkpoint stops where it would
        have; every rank holds the same best, so all ranks stop at the same step."""
        return (
            self.patience is not None
            and self.best is not None
            and self.step - self.best["meta_step"] >= self.patience * val_every
        )

    def keep_best(self) -> dict[str, float] | None:
        """Load the meta-parameters of the best validation into the learner (the optimiser state
        and ``step`` stay the last step's: the learner is for exporting now, not for training on).
        Returns ``{"meta_step", "meta_val_accuracy"}`` of what it loaded; None without a validation."""
        if self.best is None:
            return None
        with torch.no_grad():
            for k, v in self.best["adapter"].items():
                self.params[k].copy_(v)
            for k, v in self.best.get("extra_meta_params", {}).items():
                self.extra[k].copy_(v)
        return {k: self.best[k] for k in ("meta_step", "meta_val_accuracy")}

    def _meta_params_copy(self) -> dict[str, dict[str, Tensor]]:
        """CPU copies (never aliases) of the adapter init and, when there are any, the extra
        meta-parameters (Meta-SGD's log learning rates, the learned head values)."""
        copy = {"adapter": {k: v.detach().cpu().clone() for k, v in self.params.items()}}
        if self.extra:
            copy["extra_meta_params"] = {k: v.detach().cpu().clone() for k, v in self.extra.items()}
        return copy

    def run(
        self,
        meta_steps: int,
        *,
        val_every: int,
        history: list[dict[str, float]],
        on_step: Callable[[dict[str, float]], None] = lambda metrics: None,
        checkpoint_every: int | None = None,
        on_checkpoint: Callable[[dict[str, Any]], None] = lambda state: None,
        rank: int = 0,
        world: int = 1,
        reduce: Reduce = _no_reduce,
    ) -> list[dict[str, float]]:
        """The training loop that every path drives with its own callbacks (the local run, each
        Ray Train worker, a Tune trial): `iterate` up to ``meta_steps``, each step's metrics
        appended to ``history``; every ``checkpoint_every`` steps and at the last,
        ``on_checkpoint(state)`` with ``state`` = `state_dict` + ``history`` + ``world_size``
        (what `runstore.save_state` stores and a resumed run loads); then ``on_step(metrics)``."""
        for metrics in self.iterate(meta_steps, val_every=val_every, rank=rank, world=world, reduce=reduce):
            history.append(metrics)
            last = self.step == meta_steps or self.stopped_early(val_every)
            if checkpoint_every and (self.step % checkpoint_every == 0 or last):
                on_checkpoint({**self.state_dict(), "history": history, "world_size": world})
            on_step(metrics)
        return history

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-for-bit (episodes are rebuilt from specs),
        as CPU copies: a checkpoint, a Ray object or a task's result holds no device tensor and no
        alias of the live optimizer state (`load_state_dict` moves it back to the parameters' device)."""
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {
            i: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for i, s in optimizer["state"].items()
        }
        state: dict[str, Any] = {**self._meta_params_copy(), "optimizer": optimizer, "meta_step": self.step}
        if self.best is not None:
            state["best"] = self.best
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        extra = state.get("extra_meta_params", {})
        if extra.keys() != self.extra.keys():
            raise ValueError(
                f"checkpoint meta-parameters {sorted(extra)[:2]} do not match meta.algorithm="
                f"{self.algorithm.name} ({sorted(self.extra)[:2]}); was it trained with another algorithm?"
            )
        with torch.no_grad():
            for k, v in state["adapter"].items():
                self.params[k].copy_(v)
            for k, v in extra.items():
                self.extra[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["meta_step"])
        self.best = state.get("best")  # checkpoints before 2026-12-02 have none

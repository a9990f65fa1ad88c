"""Disjoint class splits and N-way K-shot episodes that are data, not RNG state.

An episode is named by an `EpisodeSpec` (dataset, fold, split, seed, step, index, shape); any
process that holds the same dataset rebuilds the identical episode from the spec alone. This is
what makes a distributed run equal a single-process run and a resumed run equal an
uninterrupted one: workers receive specs, never tensors or generator states.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from metapeft_ray.data import DataError, LabelledTexts

Split = Literal["train", "val", "test"]
_SPLIT_CODE: dict[str, int] = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ClassSplits:
    """Meta-train / meta-val / meta-test classes of one fold; disjoint by construction.

    Classes are shuffled once with ``split_seed`` and cut into ``folds`` chunks; fold f tests on
    chunk f, so over all folds every class is a test class exactly once. Of the remaining classes
    a ``val_fraction`` share are meta-validation classes, the rest meta-train.
    """

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    fold: int
    folds: int
    split_seed: int

    @classmethod
    def make(
        cls, classes: Iterable[str], *, folds: int, fold: int, split_seed: int, val_fraction: float
    ) -> ClassSplits:
        ordered = sorted(set(classes))
        if folds < 2 or not 0 <= fold < folds:
            raise DataError(f"need folds >= 2 and 0 <= fold < folds, got folds={folds}, fold={fold}")
        if len(ordered) < folds + 2:
            raise DataError(
                f"{len(ordered)} classes are too few for {folds} folds plus train and val classes; "
                f"lower data.folds"
            )
        perm = [ordered[i] for i in np.random.default_rng(split_seed).permutation(len(ordered))]
        chunks = np.array_split(np.arange(len(perm)), folds)
        test = [perm[i] for i in chunks[fold]]
        rest = [c for c in perm if c not in set(test)]
        n_val = max(1, round(val_fraction * len(rest)))
        return cls(
            train=tuple(sorted(rest[n_val:])),
            val=tuple(sorted(rest[:n_val])),
            test=tuple(sorted(test)),
            fold=fold,
            folds=folds,
            split_seed=split_seed,
        )

    def classes(self, split: Split) -> tuple[str, ...]:
        return getattr(self, split)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class EpisodeSpec:
    """The identity of one episode; small enough to send to any worker."""

    dataset: str
    fold: int
    split: Split
    seed: int
    step: int
    index: int
    n_way: int
    k_shot: int
    q_query: int

    def rng_key(self) -> list[int]:
        return [self.seed, _SPLIT_CODE[self.split], self.fold, self.step, self.index]


@dataclass(frozen=True)
class Episode:
    """Texts with episode-local labels 0..N-1 (class order is permuted per episode)."""

    spec: EpisodeSpec
    class_names: tuple[str, ...]
    support_texts: tuple[str, ...]
    support_labels: tuple[int, ...]
    query_texts: tuple[str, ...]
    query_labels: tuple[int, ...]


class EpisodeSampler:
    """Builds episodes of one dataset and fold from specs."""

    def __init__(self, data: LabelledTexts, splits: ClassSplits) -> None:
        self.data = data
        self.splits = splits
        self._by_class = data.by_class()

    def spec(
        self, split: Split, *, seed: int, step: int, index: int, n_way: int, k_shot: int, q_query: int
    ) -> EpisodeSpec:
        return EpisodeSpec(self.data.name, self.splits.fold, split, seed, step, index, n_way, k_shot, q_query)

    def specs(
        self, split: Split, count: int, *, seed: int, step: int, n_way: int, k_shot: int, q_query: int
    ) -> list[EpisodeSpec]:
        return [
            self.spec(split, seed=seed, step=step, index=i, n_way=n_way, k_shot=k_shot, q_query=q_query)
            for i in range(count)
        ]

    def build(self, spec: EpisodeSpec) -> Episode:
        if spec.dataset != self.data.name or spec.fold != self.splits.fold:
            raise DataError(
                f"episode spec is for {spec.dataset!r} fold {spec.fold}, but this sampler holds "
                f"{self.data.name!r} fold {self.splits.fold}"
            )
        rng = np.random.default_rng(spec.rng_key())
        pool = self.splits.classes(spec.split)
        chosen = [pool[i] for i in rng.choice(len(pool), spec.n_way, replace=False)]
        s_texts: list[str] = []
        s_labels: list[int] = []
        q_texts: list[str] = []
        q_labels: list[int] = []
        for label, name in enumerate(chosen):
            rows = self._by_class[name]
            picked = rng.choice(len(rows), spec.k_shot + spec.q_query, replace=False)
            texts = [self.data.texts[rows[i]] for i in picked]
            s_texts += texts[: spec.k_shot]
            s_labels += [label] * spec.k_shot
            q_texts += texts[spec.k_shot :]
            q_labels += [label] * spec.q_query
        return Episode(spec, tuple(chosen), tuple(s_texts), tuple(s_labels), tuple(q_texts), tuple(q_labels))

    def check_shape(self, split: Split, n_way: int, shots: Sequence[int], q_query: int) -> list[str]:
        """Every reason episodes of this shape cannot be drawn from ``split`` (empty if fine)."""
        problems = []
        pool = self.splits.classes(split)
        if n_way > len(pool):
            problems.append(
                f"{split} split has {len(pool)} classes, fewer than n_way={n_way}; "
                f"lower the way or use fewer folds / a smaller val_fraction"
            )
        need = max(shots) + q_query
        short = sorted(c for c in pool if len(self._by_class[c]) < need)
        if short:
            shown = ", ".join(f"{c} ({len(self._by_class[c])})" for c in short[:8])
            more = f" and {len(short) - 8} more" if len(short) > 8 else ""
            problems.append(
                f"{split} split: k_shot + q_query = {need} exceeds the examples of class(es) "
                f"{shown}{more}; lower the shots or q_query, or drop those classes"
            )
        return problems


def check_labels(data: LabelledTexts) -> None:
    """Class names that differ only in case or spacing would leak one class across splits."""
    seen: dict[str, str] = {}
    clashes = []
    for name in sorted(set(data.labels)):
        key = " ".join(name.casefold().split())
        if key in seen:
            clashes.append(f"{seen[key]!r} / {name!r}")
        seen[key] = name
    if clashes:
        raise DataError(
            f"{data.name}: class names that differ only in case or spacing would end up in "
            f"different splits: {', '.join(clashes)}; merge them in the data"
        )

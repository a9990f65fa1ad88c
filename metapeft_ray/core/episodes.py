"""Disjoint class splits and N-way K-shot episodes that are data, not RNG state.

An episode is named by an `EpisodeSpec` (dataset, fold, split, seed, step, index, shape); any
process that holds the same dataset rebuilds the identical episode from the spec alone. This is
what makes a distributed run equal a single-process run and a resumed run equal an
uninterrupted one: workers receive specs, never tensors or generator states.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, NoReturn

import numpy as np

from metapeft_ray.core.data import DataError, LabelledTexts, label_text
from metapeft_ray.core.splits import (
    EXPECTED_KEYS,
    SPLIT_NAMES,
    match_patterns,
    read_class_lists,
    unknown_hint,
)

Split = Literal["train", "val", "test"]
_SPLIT_CODE: dict[str, int] = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ClassSplits:
    """Meta-train / meta-val / meta-test classes of one fold; disjoint by construction.

    Seeded folds (`make`): classes are shuffled once with ``split_seed`` and cut into ``folds``
    chunks; fold f tests on chunk f, so over all folds every class is a test class exactly once.
    Of the remaining classes a ``val_fraction`` share are meta-validation classes, the rest
    meta-train. A user's split (`from_file`, e.g. a published benchmark's) is taken as listed,
    recorded as fold 0 of 1 with its ``source``.
    """

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    fold: int
    folds: int
    split_seed: int
    source: str | None = None
    """The splits file or folder (``data.splits``) the classes came from; None for seeded folds."""
    exclude_patterns: tuple[str, ...] = ()
    """``data.exclude_classes`` as given (names or globs)."""
    excluded: tuple[str, ...] = ()
    """The classes those patterns removed from meta-train / meta-val (test classes are kept)."""

    @classmethod
    def make(
        cls,
        classes: Iterable[str],
        *,
        folds: int,
        fold: int,
        split_seed: int,
        val_fraction: float,
        hold_out_test: bool = True,
        exclude: Sequence[str] = (),
        name: str = "the data",
    ) -> ClassSplits:
        """Seeded folds. ``hold_out_test=False`` (cross-dataset meta-test, the test classes come
        from another dataset) keeps every class for meta-train / meta-val: ``test`` is empty and
        the split is recorded as fold 0 of 1. ``exclude`` (names or globs) drops classes from
        meta-train / meta-val only, after the test chunk is cut, so a fold's test classes are the
        same with or without exclusions. ``name`` (the dataset, ``data.dataset``) is named in
        errors."""
        ordered = sorted(set(classes))
        dropped, problems = match_patterns(exclude, ordered, setting="data.exclude_classes")
        if problems:
            _fail("the class splits cannot be made", problems)
        perm = [ordered[i] for i in np.random.default_rng(split_seed).permutation(len(ordered))]
        test: list[str] = []
        if hold_out_test:
            if folds < 2 or not 0 <= fold < folds:
                raise DataError(f"need folds >= 2 and 0 <= fold < folds, got folds={folds}, fold={fold}")
            if len(ordered) < folds + 2:
                raise DataError(
                    f"{name} has {len(ordered)} classes, too few for data.folds={folds} folds plus "
                    f"train and val classes (needs at least {folds + 2}); lower data.folds"
                )
            chunks = np.array_split(np.arange(len(perm)), folds)
            test = [perm[i] for i in chunks[fold]]
        else:
            fold, folds = 0, 1
        excluded = sorted(set(dropped) - set(test))
        gone = set(test) | set(excluded)
        rest = [c for c in perm if c not in gone]
        if len(rest) < 2:
            raise DataError(
                f"{name}: {len(rest)} class(es) are left for meta-train and meta-val (after the test "
                f"classes and {len(excluded)} excluded); need at least 2: exclude fewer classes or "
                "lower data.folds"
            )
        n_val = min(len(rest) - 1, max(1, round(val_fraction * len(rest))))
        return cls(
            train=tuple(sorted(rest[n_val:])),
            val=tuple(sorted(rest[:n_val])),
            test=tuple(sorted(test)),
            fold=fold,
            folds=folds,
            split_seed=split_seed,
            exclude_patterns=tuple(exclude),
            excluded=tuple(excluded),
        )

    @classmethod
    def from_file(
        cls, uri: str, classes: Iterable[str], *, exclude: Sequence[str] = (), need_test: bool = True
    ) -> ClassSplits:
        """The split named by ``data.splits`` (a {train, val, test} YAML/JSON file or a
        labels.*.txt folder, local or ``s3://``), checked against the data's classes."""
        lists, problems = read_class_lists(uri, need_test=need_test)
        return cls.from_lists(
            lists, classes, source=uri, exclude=exclude, need_test=need_test, problems=problems
        )

    @classmethod
    def from_lists(
        cls,
        lists: Mapping[str, Sequence[str]],
        classes: Iterable[str],
        *,
        source: str,
        exclude: Sequence[str] = (),
        need_test: bool = True,
        problems: Sequence[str] = (),
    ) -> ClassSplits:
        """Exactly the listed classes, minus ``exclude`` in train / val. Every problem (unknown
        name, with the nearest names; a class listed twice or in two splits; an empty list) is
        reported in one error, together with ``problems`` already found in the file's structure,
        so a hand-edited file is fixed in one go."""
        known = sorted(set(classes))
        known_set = set(known)
        dropped, unmatched = match_patterns(exclude, known, setting="data.exclude_classes")
        problems = [*problems, *unmatched]
        where: dict[str, str] = {}
        for split in SPLIT_NAMES:
            seen: set[str] = set()
            for name in lists.get(split, ()):
                if name in seen:
                    problems.append(f"{split}: {name!r} is listed twice; remove the duplicate")
                    continue
                seen.add(name)
                if name not in known_set:
                    problems.append(
                        f"{split}: {name!r} is not a class of the data ({unknown_hint(name, known)}); "
                        f"fix the name in the splits file"
                    )
                elif name in where:
                    problems.append(
                        f"{name!r} is listed in both {where[name]} and {split}; keep it in one split"
                    )
                else:
                    where[name] = split
        excluded = sorted(c for c, s in where.items() if s != "test" and c in dropped)
        kept = {s: sorted(c for c, w in where.items() if w == s and c not in excluded) for s in SPLIT_NAMES}
        for split, role in (("train", "meta-train"), ("val", "meta-validation"), ("test", "meta-test")):
            if split not in lists and (split != "test" or need_test):
                problems.append(f"no {split} list; {EXPECTED_KEYS}")
            elif not lists.get(split) and (split != "test" or need_test):
                hint = ", or set eval.dataset to meta-test on another dataset" if split == "test" else ""
                problems.append(f"the {split} list is empty; list the {role} classes{hint}")
            elif lists.get(split) and not kept[split] and any(where.get(c) == split for c in lists[split]):
                problems.append(
                    f"data.exclude_classes removes every {split} class; exclude fewer or list more "
                    f"{split} classes"
                )
        if problems:
            _fail(f"data.splits={source!r} does not fit the data's {len(known)} classes", problems)
        return cls(
            train=tuple(kept["train"]),
            val=tuple(kept["val"]),
            test=tuple(kept["test"]),
            fold=0,
            folds=1,
            split_seed=0,
            source=source,
            exclude_patterns=tuple(exclude),
            excluded=tuple(excluded),
        )

    @classmethod
    def test_only(cls, classes: Iterable[str], *, source: str) -> ClassSplits:
        """Meta-test classes of another dataset (cross-dataset protocol): no train or val."""
        return cls(
            train=(), val=(), test=tuple(sorted(set(classes))), fold=0, folds=1, split_seed=0, source=source
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
    query_alpha: float = 0.0
    """0: ``q_query`` queries of every class. > 0: the episode's ``n_way * q_query`` queries split
    among its classes by proportions drawn from a symmetric Dirichlet of this concentration
    (smaller = more uneven; a class may get none), each class capped at the texts it has left."""

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

    @property
    def name_texts(self) -> list[str]:
        """The class names as text, in label order (for a head with label names)."""
        return [label_text(c) for c in self.class_names]

    @property
    def padded_chars(self) -> int:
        """A proxy for the episode's compute: the encoder pads the support and the query batch each
        to its longest text, so their work grows with count x longest (characters here)."""
        return sum(len(texts) * max(map(len, texts)) for texts in (self.support_texts, self.query_texts))


class EpisodeSampler:
    """Builds episodes of one dataset and fold from specs."""

    def __init__(self, data: LabelledTexts, splits: ClassSplits) -> None:
        self.data = data
        self.splits = splits
        self._by_class = data.by_class()

    def spec(
        self,
        split: Split,
        *,
        seed: int,
        step: int,
        index: int,
        n_way: int,
        k_shot: int,
        q_query: int,
        query_alpha: float = 0.0,
    ) -> EpisodeSpec:
        return EpisodeSpec(
            self.data.name, self.splits.fold, split, seed, step, index, n_way, k_shot, q_query, query_alpha
        )

    def specs(
        self,
        split: Split,
        count: int,
        *,
        seed: int,
        step: int,
        n_way: int,
        k_shot: int,
        q_query: int,
        query_alpha: float = 0.0,
    ) -> list[EpisodeSpec]:
        shape = {"n_way": n_way, "k_shot": k_shot, "q_query": q_query, "query_alpha": query_alpha}
        return [self.spec(split, seed=seed, step=step, index=i, **shape) for i in range(count)]

    def build(self, spec: EpisodeSpec) -> Episode:
        if spec.dataset != self.data.name or spec.fold != self.splits.fold:
            raise DataError(
                f"episode spec is for {spec.dataset!r} fold {spec.fold}, but this sampler holds "
                f"{self.data.name!r} fold {self.splits.fold}"
            )
        rng = np.random.default_rng(spec.rng_key())
        pool = self.splits.classes(spec.split)
        chosen = [pool[i] for i in rng.choice(len(pool), spec.n_way, replace=False)]
        queries = [spec.q_query] * spec.n_way
        if spec.query_alpha:
            shares = rng.dirichlet([spec.query_alpha] * spec.n_way)
            queries = rng.multinomial(spec.n_way * spec.q_query, shares).tolist()
        s_texts: list[str] = []
        s_labels: list[int] = []
        q_texts: list[str] = []
        q_labels: list[int] = []
        for label, (name, q) in enumerate(zip(chosen, queries, strict=True)):
            rows = self._by_class[name]
            picked = rng.choice(len(rows), min(spec.k_shot + q, len(rows)), replace=False)
            texts = [self.data.texts[rows[i]] for i in picked]
            s_texts += texts[: spec.k_shot]
            s_labels += [label] * spec.k_shot
            q_texts += texts[spec.k_shot :]
            q_labels += [label] * (len(texts) - spec.k_shot)
        return Episode(spec, tuple(chosen), tuple(s_texts), tuple(s_labels), tuple(q_texts), tuple(q_labels))

    def labelled_batch(self, split: Split, size: int, *, seed: int, step: int) -> Episode:
        """A supervised batch as an all-way 0-shot episode: every class of ``split`` (in split
        order) and ``size`` of its texts drawn without replacement (all of them if fewer) as the
        queries, no support; drawn from ``(seed, split, fold, step)`` alone, like an episode."""
        pool = self.splits.classes(split)
        spec = self.spec(split, seed=seed, step=step, index=0, n_way=len(pool), k_shot=0, q_query=size)
        rows = [(label, row) for label, name in enumerate(pool) for row in self._by_class[name]]
        picked = np.random.default_rng(spec.rng_key()).permutation(len(rows))[:size]
        texts = tuple(self.data.texts[rows[i][1]] for i in picked)
        return Episode(spec, pool, (), (), texts, tuple(rows[i][0] for i in picked))

    def check_shape(self, split: Split, n_way: int, shots: Sequence[int], q_query: int) -> list[str]:
        """Every reason episodes of this shape cannot be drawn from ``split`` (empty if fine)."""
        problems = []
        pool = self.splits.classes(split)
        if n_way > len(pool):
            problems.append(
                f"{split} split has {len(pool)} classes, fewer than n_way={n_way}; "
                + (
                    f"list more {split} classes in data.splits, or lower the way"
                    if self.splits.source
                    else "lower the way or use fewer folds / a smaller val_fraction"
                )
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


def word_dropout_views(texts: Sequence[str], views: int, drop: float, seed: int) -> list[str]:
    """``views`` copies of every text, view-major (all texts' first view, then the second, ...),
    each word deleted with probability ``drop`` (at least one word is kept): augmentation with
    nothing to download, drawn from ``seed`` alone."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(views):
        for text in texts:
            words = text.split()
            keep = rng.random(len(words)) >= drop
            if words and not keep.any():
                keep[rng.integers(len(words))] = True
            out.append(" ".join(w for w, k in zip(words, keep, strict=True) if k))
    return out


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


def _fail(header: str, problems: list[str]) -> NoReturn:
    raise DataError(f"{header}:\n  " + "\n  ".join(problems))

"""Class lists a user brings (``data.splits``) and class-name matching with "did you mean" hints.

Published few-shot benchmarks fix their meta-train / meta-val / meta-test classes in files
(e.g. ProtAugment's ``BANKING77/few_shot/01/labels.{train,valid,test}.txt``); comparing with
them means using exactly those classes, not our seeded folds. This module only reads and matches
names (no numpy, no torch, no Ray); `metapeft_ray.core.episodes.ClassSplits` validates the lists
against the data.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import yaml

from metapeft_ray.core.data import DataError

SPLIT_NAMES = ("train", "val", "test")
SPLIT_FILE_SUFFIXES = (".yaml", ".yml", ".json")
# The folder layout's file per split ("valid", as the published benchmarks name it).
LABEL_FILES = {"train": "labels.train.txt", "val": "labels.valid.txt", "test": "labels.test.txt"}
_KEY_ALIASES = {"valid": "val"}
EXPECTED_KEYS = "expected keys train, val (or valid) and test"
_FORMATS = (
    "a .yaml/.yml/.json file holding {train: [...], val: [...], test: [...]}, or a folder holding "
    + ", ".join(LABEL_FILES.values())
    + " (one class per line)"
)


def _key(name: str) -> str:
    return " ".join(name.casefold().replace("_", " ").replace("-", " ").split())


def nearest_names(name: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The names closest to ``name`` (difflib's similarity, cut-off 0.6), compared ignoring case,
    underscores and spacing so ``card arrival`` finds ``card_arrival`` first. Names much less
    similar than the best one are dropped: ``class_09_acount`` should suggest ``class_09_account``
    alone, not every name sharing the ``class_0`` prefix. Glob characters are ignored, so a
    pattern gets hints too."""
    by_key: dict[str, list[str]] = {}
    for c in sorted(set(names)):
        by_key.setdefault(_key(c), []).append(c)
    wanted = _key(name.translate(str.maketrans("", "", "*?[]")))
    score = {k: difflib.SequenceMatcher(None, wanted, k).ratio() for k in by_key}
    floor = max(0.6, max(score.values(), default=0.0) - 0.15)
    keys = sorted((k for k, r in score.items() if r >= floor), key=lambda k: (-score[k], k))
    return [c for k in keys for c in by_key[k]][:n]


def unknown_hint(name: str, names: Iterable[str]) -> str:
    """``nearest: 'a', 'b'`` or, with nothing close, a few of the names that exist."""
    names = sorted(set(names))
    near = nearest_names(name, names)
    if near:
        return "nearest: " + ", ".join(repr(c) for c in near)
    return f"no name is close; the data has {len(names)} classes, e.g. " + ", ".join(map(repr, names[:3]))


def match_patterns(
    patterns: Iterable[str], names: Iterable[str], *, setting: str
) -> tuple[tuple[str, ...], list[str]]:
    """The names matched by any of ``patterns`` (exact names or `fnmatch` globs, case-sensitive),
    and one problem per pattern that matches nothing — a silent no-op exclusion would let a
    typo change what a run trains on."""
    names = sorted(set(names))
    matched: set[str] = set()
    problems = []
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            problems.append(
                f"{setting}: {pattern!r} matches no class of the data ({unknown_hint(pattern, names)}); "
                f"fix or remove it"
            )
        matched.update(hits)
    return tuple(sorted(matched)), problems


def read_class_lists(uri: str, *, need_test: bool = True) -> tuple[dict[str, list[str]], list[str]]:
    """The class lists of a splits file or labels.*.txt folder (local or ``s3://``), and the
    problems of the file's structure (an unknown key, a value that is not a list), which
    `ClassSplits.from_lists` reports together with the name problems. Only an unreadable source
    raises here. Without ``need_test`` (cross-dataset meta-test) labels.test.txt may be missing."""
    from metapeft_ray.core import storage

    try:
        path = storage.fetch_to_local(uri, Path(tempfile.gettempdir()) / "metapeft-splits")
    except FileNotFoundError:
        path = None
    if path is None or not path.exists():
        raise DataError(f"data.splits={uri!r}: no such file or folder; give {_FORMATS}")
    if path.is_dir():
        required = SPLIT_NAMES if need_test else SPLIT_NAMES[:2]
        missing = [LABEL_FILES[s] for s in required if not (path / LABEL_FILES[s]).is_file()]
        if missing:
            raise DataError(
                f"data.splits={uri!r}: the folder lacks {', '.join(missing)}; it needs "
                f"{', '.join(LABEL_FILES[s] for s in required)} (one class per line)"
            )
        lists = {
            s: [line.strip() for line in (path / f).read_text(encoding="utf-8").splitlines() if line.strip()]
            for s, f in LABEL_FILES.items()
            if (path / f).is_file()
        }
        return lists, []
    if path.suffix not in SPLIT_FILE_SUFFIXES:
        raise DataError(f"data.splits={uri!r}: not a {'/'.join(SPLIT_FILE_SUFFIXES)} file; give {_FORMATS}")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise DataError(f"data.splits={uri!r}: cannot read it ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"data.splits={uri!r}: holds a {type(raw).__name__}, not a mapping; {EXPECTED_KEYS}")
    lists: dict[str, list[str]] = {}
    problems = []
    for key, value in raw.items():
        split = _KEY_ALIASES.get(str(key), str(key))
        if split not in SPLIT_NAMES:
            problems.append(f"unknown key {key!r}; {EXPECTED_KEYS}")
        elif split in lists:
            problems.append("both 'val' and 'valid' are given; keep one")
        elif not isinstance(value, list | None) or any(
            isinstance(v, bool) or not isinstance(v, str | int) for v in value or []
        ):
            problems.append(f"{key!r} must be a list of class names")
        else:
            lists[split] = [str(v).strip() for v in value or []]
    return lists, problems

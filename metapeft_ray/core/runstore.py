"""The run directory: where a run's files live, what is in them, and the checks a rerun makes.

Ray-free (layer 1). The local run (`recipes.train_local`), the Ray Train run
(`distributed.train_ray`) and a Tune trial all read and write runs through this module only.
A run lives under ``run.output_dir/run.name`` (a local directory or ``s3://``)::

    config.yaml                the validated config tree            `write_header`
    splits.json                dataset, val_fraction, class splits  `write_header`, `splits_record`
    metrics.jsonl              one JSON object per meta-step        `append_metrics`, `write_metrics`
    checkpoint_<step>/state.pt the learner's state                  `save_checkpoint`, `load_state`
    training.json              the record of a finished training    `write_record`, `read_record`
    adapter/                   PEFT format + metapeft.json          `metapeft_ray.core.export`
    report.json, report.md     the meta-test report                 `recipes.evaluate_and_report`

A checkpoint is ``MetaLearner.state_dict()`` (adapter tensors, the outer optimiser's state,
``meta_step``, Meta-SGD's / the head's extra meta-parameters) plus the metric ``history`` and the
``world_size`` it ran with (`MetaLearner.run` hands it over). The local run writes it with
`save_checkpoint` and a local rerun resumes from `latest_checkpoint`; Ray Train writes the same
files through its own checkpoint manager and resumes from it. It holds tensors and plain Python
values only, so it is loaded with ``torch.load(weights_only=True)`` (no pickled code runs) and
onto the CPU (a GPU run's checkpoint loads on a CPU-only driver; the optimiser moves its state to
its parameters' device when the learner loads it).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from metapeft_ray.core import storage
from metapeft_ray.core.config import Config, ConfigError, validate_config
from metapeft_ray.core.export import METADATA_FILE

if TYPE_CHECKING:
    from metapeft_ray.core.episodes import EpisodeSampler

__all__ = [
    "ADAPTER_DIR",
    "CONFIG_FILE",
    "METRICS_FILE",
    "REPORT_JSON",
    "REPORT_MD",
    "RESUMABLE_KEYS",
    "SPLITS_FILE",
    "STATE_FILE",
    "TRAINING_RECORD",
    "append_metrics",
    "check_resumable",
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "save_checkpoint",
    "exported_report",
    "finished_training",
    "load_state",
    "read_record",
    "run_uri",
    "save_state",
    "splits_record",
    "staged",
    "write_header",
    "write_metrics",
    "write_record",
]

CONFIG_FILE = "config.yaml"
SPLITS_FILE = "splits.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.pt"
TRAINING_RECORD = "training.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
ADAPTER_DIR = "adapter"
# Settings that may change when a stored run is resumed; anything else must match config.yaml.
# model.activation_checkpointing changes memory and time, not the maths: a run that ran out of
# memory resumes with it on.
RESUMABLE_KEYS = (
    "meta.meta_steps",
    "meta.val_every",
    "meta.checkpoint_every",
    "model.activation_checkpointing",
    "eval",
    "distributed",
)


def run_uri(cfg: Config) -> str:
    """Where the run of ``cfg`` lives: ``run.output_dir/run.name``."""
    return storage.join(cfg.run.output_dir, cfg.run.name)


@contextmanager
def staged(uri: str) -> Iterator[Path]:
    """A local directory for ``uri``: the directory itself, or a temp dir uploaded on success."""
    if not storage.is_remote(uri):
        path = Path(uri)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="metapeft-"))
    try:
        yield tmp
        storage.upload_dir(tmp, uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- header and metrics (into a local, staged directory) ----------------------------------------


def splits_record(cfg: Config, sampler: EpisodeSampler) -> dict[str, Any]:
    """What ``splits.json`` holds (and the report and the adapter's metadata repeat)."""
    return {"dataset": cfg.data.dataset, "val_fraction": cfg.data.val_fraction, **sampler.splits.to_dict()}


def write_header(cfg: Config, sampler: EpisodeSampler, out: Path) -> None:
    """``config.yaml`` and ``splits.json``: what a rerun of the run name is checked against."""
    (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (out / SPLITS_FILE).write_text(json.dumps(splits_record(cfg, sampler), indent=2))


def append_metrics(out: Path, metrics: Mapping[str, float]) -> None:
    """One meta-step's metrics as one line of ``metrics.jsonl``."""
    with (out / METRICS_FILE).open("a") as f:
        f.write(json.dumps(dict(metrics)) + "\n")


def write_metrics(out: Path, history: Iterable[Mapping[str, float]] = ()) -> None:
    """``metrics.jsonl`` from scratch: one line per step of ``history`` (no file for none, until
    `append_metrics` adds the first step)."""
    (out / METRICS_FILE).unlink(missing_ok=True)
    for metrics in history:
        append_metrics(out, metrics)


# -- checkpoints ---------------------------------------------------------------------------------


_CHECKPOINT = re.compile(r"checkpoint_\d{6}")


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint taken after meta-step ``step``."""
    return f"checkpoint_{step:06d}"


def save_checkpoint(uri: str, state: Mapping[str, Any], keep: int = 2) -> str:
    """Store ``state`` as the run's checkpoint of its ``meta_step`` under ``uri`` (local or
    ``s3://``), then delete all but the ``keep`` newest; returns the checkpoint's URI. The new
    one is complete before an old one goes, so an interruption never leaves the run without one."""
    target = storage.join(uri, checkpoint_name(int(state["meta_step"])))
    with tempfile.TemporaryDirectory(prefix="metapeft-ckpt-") as d:
        save_state(d, state)
        storage.upload_dir(Path(d), target)
    for name in list_checkpoints(uri)[:-keep]:
        storage.delete_dir(storage.join(uri, name))
    return target


def latest_checkpoint(uri: str) -> str | None:
    """The URI of the run's newest checkpoint (of either path), or None when it has none."""
    names = list_checkpoints(uri)
    return storage.join(uri, names[-1]) if names else None


def list_checkpoints(uri: str) -> list[str]:
    """The run's complete checkpoint directories, oldest first."""
    return [
        name
        for name in storage.list_dirs(uri)
        if _CHECKPOINT.fullmatch(name) and storage.exists(storage.join(uri, name, STATE_FILE))
    ]


def save_state(directory: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write ``state`` (``MetaLearner.state_dict()``, optionally with ``history`` and
    ``world_size``) as ``directory/state.pt``, a local directory; returns the file."""
    path = Path(directory) / STATE_FILE
    torch.save(dict(state), path)
    return path


def load_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The state `save_state` wrote into the checkpoint directory ``checkpoint`` (local,
    ``s3://``, or a Ray checkpoint's ``as_directory()``), on the CPU, ``weights_only=True``."""
    data = storage.read_bytes(storage.join(os.fspath(checkpoint), STATE_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# -- training record and the checks a rerun makes -----------------------------------------------


def read_record(uri: str) -> dict[str, Any] | None:
    """The run's ``training.json`` (written when the Ray path finished training), if any."""
    return _read_json(uri, TRAINING_RECORD) or None


def write_record(uri: str, record: Mapping[str, Any]) -> None:
    storage.write_text(storage.join(uri, TRAINING_RECORD), json.dumps(dict(record), indent=2))


def check_resumable(cfg: Config, uri: str) -> None:
    """A rerun of ``run.name`` continues the stored run, so it must be the same experiment: only
    the `RESUMABLE_KEYS` may differ from the stored ``config.yaml``. Keys added to the config since
    the run was stored take their defaults, so a newer metapeft resumes a run that did not set them."""
    path = storage.join(uri, CONFIG_FILE)
    if not storage.exists(path):
        return
    stored_raw = yaml.safe_load(storage.read_text(path)) or {}
    try:
        stored = _flatten(validate_config(stored_raw).to_dict())
    except ConfigError:  # a key since removed or renamed: compare the file as it is
        stored = _flatten(stored_raw)
    current = _flatten(cfg.to_dict())
    differ = sorted(
        k
        for k in stored.keys() | current.keys()
        if stored.get(k) != current.get(k) and not k.startswith(RESUMABLE_KEYS)
    )
    if differ:
        shown = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in differ[:5])
        raise ConfigError(
            f"run {uri} exists with a different config ({shown}); rerunning a run.name resumes it, "
            "so choose a new run.name (only meta.meta_steps, meta.val_every, "
            "meta.checkpoint_every, model.activation_checkpointing, "
            "eval.* and distributed.* may change)"
        )


def finished_training(cfg: Config, uri: str) -> dict[str, Any] | None:
    """The training record of a stored run that already trained to ``meta.meta_steps`` or
    stopped early (``meta.patience``); None when there is none or it stopped short (it resumes).
    A run trained past ``meta.meta_steps`` cannot be shortened: `ConfigError`."""
    record = read_record(uri)
    if record is None or (record["meta_step"] < cfg.meta.meta_steps and not record.get("stopped_early")):
        return None
    if record["meta_step"] > cfg.meta.meta_steps:
        raise ConfigError(
            f"run {uri} is already trained to meta-step {record['meta_step']} > "
            f"meta.meta_steps={cfg.meta.meta_steps}; raise meta.meta_steps or choose a new run.name"
        )
    return record


def exported_report(uri: str, step: int) -> dict[str, Any] | None:
    """The stored ``report.json`` when it and the exported adapter are both of meta-step
    ``step``; None when either is missing or older (the run must be exported again)."""
    report = _read_json(uri, REPORT_JSON)
    adapter = _read_json(uri, ADAPTER_DIR, METADATA_FILE)
    if report.get("meta_step") == step and adapter.get("meta_step") == step:
        return report
    return None


def _read_json(uri: str, *parts: str) -> dict[str, Any]:
    path = storage.join(uri, *parts)
    return json.loads(storage.read_text(path)) if storage.exists(path) else {}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat

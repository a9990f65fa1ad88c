"""The meta-learned init in standard PEFT format, plus our metadata beside it.

``adapter_config.json`` + ``adapter_model.safetensors`` (peft's own ``save_pretrained``), so
``PeftModel.from_pretrained(backbone, path)`` loads it (LoRA, DoRA, IA3, prompt and prefix
tuning); the bottleneck adapter, which peft does not know, is ``bottleneck_adapter.safetensors``
+ ``bottleneck_config.json`` for our `load_bottleneck`. ``metapeft.json`` adds the config tree,
the class splits and the metrics, so ``metapeft evaluate`` / ``adapt`` can rebuild everything;
Meta-SGD's learned inner learning rates go beside it as ``metasgd_lrs.safetensors``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from metapeft_ray.core import storage
from metapeft_ray.core.config import Config, validate_config
from metapeft_ray.core.methods import method
from metapeft_ray.core.model import Encoder, encoder_from_config

METADATA_FILE = "metapeft.json"
INNER_LRS_FILE = "metasgd_lrs.safetensors"
LEARNED_HEAD = "learned_head"
"""Metadata key of the meta-learned head values (``head.learn``), ``{"scale": 8.3, ...}``."""


def export_adapter(
    encoder: Encoder,
    path: Path,
    metadata: dict[str, Any],
    inner_lrs: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the encoder's current adapter weights (the meta-learned init) in PEFT format (our
    own format for the bottleneck adapter), and Meta-SGD's learned learning rates if given."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    # No adapter touches the embedding layer: saying so keeps peft from asking the hub whether the
    # base model's vocabulary changed (a network call on every export).
    encoder.model.save_pretrained(str(path), save_embedding_layers=False)
    if inner_lrs:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in inner_lrs.items()}, str(path / INNER_LRS_FILE)
        )
    (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
    return path


def load_inner_lrs(uri: str, device: torch.device | None = None) -> dict[str, torch.Tensor] | None:
    """Meta-SGD's learned per-tensor inner learning rates of an exported init (None if it has
    none): ``{adapter tensor name: rate}``, for `adapt` / `run_episode`'s ``param_lrs``."""
    from safetensors.torch import load_file

    file = local_adapter(uri) / INNER_LRS_FILE
    if not file.is_file():
        return None
    return load_file(str(file), device=str(device or "cpu"))


def read_metadata(path: Path) -> dict[str, Any]:
    file = path / METADATA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {METADATA_FILE}; is this an adapter exported by metapeft?")
    return json.loads(file.read_text())


def local_adapter(uri: str) -> Path:
    """A local path for an adapter given as a directory or ``s3://`` prefix."""
    return storage.fetch_to_local(uri, Path(tempfile.gettempdir()) / "metapeft-adapters")


def with_learned_head(cfg: Config, learned: Mapping[str, float]) -> Config:
    """``cfg`` with the meta-learned head values (``{"scale": 8.3}``) in place of the set ones: the
    head an exported init is adapted and scored with."""
    return cfg.with_overrides({f"head.{k}": v for k, v in learned.items()}) if learned else cfg


def adapter_config(path: Path, overrides: dict[str, Any] | None = None) -> tuple[Config, dict[str, Any]]:
    """The config of an exported init, with its learned head values and ``overrides`` applied,
    and its metadata."""
    metadata = read_metadata(path)
    cfg = with_learned_head(validate_config(metadata["config"]), metadata.get(LEARNED_HEAD, {}))
    return (cfg.with_overrides(overrides) if overrides else cfg), metadata


def load_adapter(
    uri: str, overrides: dict[str, Any] | None = None, device: torch.device | None = None
) -> tuple[Encoder, dict[str, torch.Tensor], Config, dict[str, Any]]:
    """Rebuild the encoder of an exported init: ``(encoder with the init loaded, peft's default
    init for the fine-tuning baseline, config, metadata)``."""

    path = local_adapter(uri)
    cfg, metadata = adapter_config(path, overrides)
    torch.manual_seed(cfg.run.seed)  # the same peft default init the training run compared with
    encoder = encoder_from_config(cfg, device=device)
    default_init = {k: v.detach().clone() for k, v in encoder.adapter_params().items()}
    try:
        method(cfg.peft.method).load_weights(encoder.model, path, encoder.device)
    except ValueError as err:
        raise ValueError(f"{uri}: {err}") from None
    return encoder, default_init, cfg, metadata

"""The meta-learned init in standard PEFT format, plus our metadata beside it.

``adapter_config.json`` + ``adapter_model.safetensors`` (peft's own ``save_pretrained``), so
``PeftModel.from_pretrained(backbone, path)`` loads it; ``metapeft.json`` adds the config tree,
the class splits and the metrics, so ``metapeft evaluate`` / ``adapt`` can rebuild everything.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from metapeft_ray import storage
from metapeft_ray.config import Config, validate_config
from metapeft_ray.model import Encoder, encoder_from_config

METADATA_FILE = "metapeft.json"


def export_adapter(encoder: Encoder, path: Path, metadata: dict[str, Any]) -> Path:
    """Write the encoder's current adapter weights (the meta-learned init) in PEFT format."""
    path.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(str(path))
    (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    file = path / METADATA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {METADATA_FILE}; is this an adapter exported by metapeft?")
    return json.loads(file.read_text())


def local_adapter(uri: str) -> Path:
    """A local path for an adapter given as a directory or ``s3://`` prefix."""
    return storage.fetch_to_local(uri, Path(tempfile.gettempdir()) / "metapeft-adapters")


def load_adapter(
    uri: str, overrides: dict[str, Any] | None = None, device: torch.device | None = None
) -> tuple[Encoder, dict[str, torch.Tensor], Config, dict[str, Any]]:
    """Rebuild the encoder of an exported init: ``(encoder with the init loaded, peft's default
    init for the fine-tuning baseline, config, metadata)``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = local_adapter(uri)
    metadata = read_metadata(path)
    cfg = validate_config(metadata["config"])
    if overrides:
        cfg = cfg.with_overrides(overrides)
    torch.manual_seed(cfg.run.seed)  # the same peft default init the training run compared with
    encoder = encoder_from_config(cfg, device=device)
    default_init = {k: v.detach().clone() for k, v in encoder.adapter_params().items()}
    weights = load_file(str(path / "adapter_model.safetensors"), device=str(encoder.device))
    result = set_peft_model_state_dict(encoder.model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(
            f"{uri}: adapter weights missing for {missing[:3]}; was it exported with this config?"
        )
    return encoder, default_init, cfg, metadata

"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) as a small module of our own:
peft has no such tuner, and the AdapterHub library pins an old transformers.

After each selected output projection (``attention.output.dense`` — role ``o`` — and/or the
FFN's ``output.dense`` — role ``ffn_out``; placement keys ``attn_out``, ``ffn_out`` (Pfeiffer,
the default), ``attn_ffn_out`` (Houlsby), or ``custom`` names of any linear layers), before the
block's residual add and LayerNorm:

    h  ->  h + W_up gelu(W_down h + b_down) + b_up,     W_down: d -> bottleneck_dim

It is attached as a child ``bottleneck`` of the projection and applied by a forward hook, so the
backbone's own parameter names do not change. Default init (the fine-tuning baseline): W_down
as ``nn.Linear``, W_up = 0, b_up = 0 — the identity. Meta-init: W_up small random
(``peft.init_b_std``), for the same reason as LoRA's B: with W_up = 0 the gradient of W_down and
b_down is zero, and the first inner step can only move W_up.

Export: ``bottleneck_adapter.safetensors`` (the adapter tensors, named relative to the backbone)
+ ``bottleneck_config.json``. ``PeftModel.from_pretrained`` cannot load it; `load_bottleneck`
does, giving identical outputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metapeft_ray.core.methods.base import AdapterSpec, PeftMethod
from metapeft_ray.core.placements import matched_modules, target_modules

WEIGHTS_FILE = "bottleneck_adapter.safetensors"
CONFIG_FILE = "bottleneck_config.json"
CHILD = "bottleneck"


class BottleneckAdapter(nn.Module):
    """``h -> h + up(gelu(down(h)))``; ``enabled = False`` makes it the identity."""

    def __init__(self, dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck_dim)
        self.up = nn.Linear(bottleneck_dim, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.enabled = True

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(F.gelu(self.down(h))) if self.enabled else h


def _apply_adapter(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    # Looked up on the hooked module (not closed over), so deep copies and functional_call's
    # parameter swaps see the right tensors.
    return getattr(module, CHILD)(output)


class BottleneckModel(nn.Module):
    """The backbone with bottleneck adapters after ``targets``; mirrors the parts of peft's
    ``PeftModel`` the encoder uses (``get_base_model``, ``disable_adapter``, ``save_pretrained``)."""

    def __init__(
        self, backbone: nn.Module, targets: list[str], bottleneck_dim: int, base_model_name: str = ""
    ) -> None:
        super().__init__()
        self.base_model = backbone
        self.targets = list(targets)
        self.bottleneck_dim = bottleneck_dim
        self.base_model_name = base_model_name
        for name in self.targets:
            linear = backbone.get_submodule(name)
            linear.add_module(CHILD, BottleneckAdapter(linear.out_features, bottleneck_dim))
            linear.register_forward_hook(_apply_adapter)

    def forward(self, **batch: Tensor) -> Any:
        return self.base_model(**batch)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def adapters(self) -> list[BottleneckAdapter]:
        return [m for m in self.modules() if isinstance(m, BottleneckAdapter)]

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        adapters = self.adapters()
        for a in adapters:
            a.enabled = False
        try:
            yield
        finally:
            for a in adapters:
                a.enabled = True

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The adapter tensors, named relative to the backbone (``encoder.layer.0.output.dense.
        bottleneck.down.weight``)."""
        return {
            n: p.detach().cpu().contiguous()
            for n, p in self.base_model.named_parameters()
            if f".{CHILD}." in n
        }

    def save_pretrained(self, path: str | Path, save_embedding_layers: bool = False) -> None:
        """peft's signature; a bottleneck adapter has no embedding layers to save."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_state_dict(), str(path / WEIGHTS_FILE))
        config = {
            "adapter_type": "bottleneck",
            "format_version": 1,
            "targets": self.targets,
            "bottleneck_dim": self.bottleneck_dim,
            "activation": "gelu",
            "residual": "h + up(gelu(down(h))) after each target's output",
            "base_model_name_or_path": self.base_model_name,
        }
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    def load_adapter_weights(self, weights: Mapping[str, Tensor]) -> None:
        """Strict: every adapter tensor present, nothing else."""
        own = self.adapter_state_dict()
        missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(
                f"bottleneck adapter weights do not fit this backbone: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}; was it exported for another placement or backbone?"
            )
        params = dict(self.base_model.named_parameters())
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)


def load_bottleneck(backbone: nn.Module, path: str | Path) -> BottleneckModel:
    """Our loader (``PeftModel.from_pretrained`` cannot read this adapter): the backbone with the
    exported bottleneck adapters injected and loaded, frozen, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    backbone.requires_grad_(False)
    model = BottleneckModel(
        backbone, config["targets"], config["bottleneck_dim"], config.get("base_model_name_or_path", "")
    )
    device = next(backbone.parameters()).device
    model.load_adapter_weights(load_file(str(path / WEIGHTS_FILE), device=str(device)))
    return model.to(device).eval()


class Bottleneck(PeftMethod):
    name = "bottleneck"

    def wrap(self, backbone: nn.Module, spec: AdapterSpec, base_model_name: str) -> nn.Module:
        custom = list(spec.custom_targets) if spec.custom_targets else None
        targets = target_modules(backbone, spec.placement or "", spec.layers, custom)
        backbone.requires_grad_(False)
        return BottleneckModel(
            backbone, matched_modules(backbone, targets), spec.options.bottleneck_dim, base_model_name
        )

    def load_weights(self, model: nn.Module, path: Path, device: torch.device) -> None:
        from safetensors.torch import load_file

        model.load_adapter_weights(load_file(str(path / WEIGHTS_FILE), device=str(device)))

    def meta_init(self, params: Mapping[str, Tensor], spec: AdapterSpec, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in params.items():
                if name.endswith(f".{CHILD}.up.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * spec.options.init_b_std)

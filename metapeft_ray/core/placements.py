"""Placements: string keys (``attn_qv``, ``ffn_out``, ...) x a layer selector (``top_half``, ``0-2``)
expanded to the modules that carry adapters, checked against the real backbone.

A key expands to one exact regex for peft's ``target_modules`` (peft full-matches a string), so
``output.dense`` of the FFN never catches ``attention.output.dense`` by accident. Every module-
based method (LoRA, DoRA, IA3, the bottleneck adapter) resolves its modules here; prompt and
prefix tuning have no placement.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn

from metapeft_ray.core.config import PLACEMENTS

__all__ = [
    "ARCHITECTURES",
    "PLACEMENTS",
    "PlacementError",
    "matched_modules",
    "resolve_layers",
    "role_regex",
    "target_modules",
]

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
            raise PlacementError(
                f"peft.layers={selector!r}: the backbone has {num_layers} layers, so N must be in "
                f"1..{num_layers}; lower N or use peft.layers=all"
            )
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
        raise PlacementError(
            f"peft.layers={selector!r}: this model has layers 0..{num_layers - 1}; pick layers in that range"
        )
    return idx


def role_regex(model: nn.Module, roles: Iterable[str], layers: str) -> str:
    """One exact regex for the modules of ``roles`` in the selected ``layers`` of ``model``."""
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in ARCHITECTURES:
        raise PlacementError(
            f"placement keys are not defined for model_type={model_type!r}; use "
            f"peft.placement=custom with peft.target_modules, e.g. {_linear_names(model)[:4]}"
        )
    prefix, by_role = ARCHITECTURES[model_type]
    layer_alt = "|".join(str(i) for i in resolve_layers(layers, model.config.num_hidden_layers))
    role_alt = "|".join(by_role[r] for r in roles)
    return rf"(?:.*\.)?{prefix.format(layer=f'(?:{layer_alt})')}(?:{role_alt})"


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
        targets = role_regex(model, PLACEMENTS[placement], layers)
    matched = matched_modules(model, targets)
    if not matched:
        wanted = targets if isinstance(targets, list) else [placement]
        near = sorted({n for w in wanted for n in difflib.get_close_matches(w, _linear_names(model), 5, 0.3)})
        raise PlacementError(
            f"peft placement {placement!r} (layers={layers!r}, target_modules={targets!r}) matches no "
            f"module of this backbone; nearest linear modules: {near or _linear_names(model)[:6]}; "
            "set peft.target_modules (with peft.placement=custom) or peft.placement / peft.layers to match"
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

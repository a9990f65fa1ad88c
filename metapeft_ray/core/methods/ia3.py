"""IA3 (peft): learned scaling vectors, ``h = l ⊙ (W x)`` on attention projections and
``h = W (l ⊙ x)`` on the FFN's output projection (so ``l`` scales the FFN's inner activation,
as in Liu et al. 2022). The default placement ``attn_kv_ffn_out`` is the paper's.

Init: peft's vectors of ones (the identity) are also the meta-init. Unlike LoRA's B = 0 they are
not a dead point: ``dL/dl = (dL/dh) ⊙ (W x)`` is non-zero at l = 1 (tested).
"""

from __future__ import annotations

import re

from torch import nn

from metapeft_ray.core.config import PLACEMENTS
from metapeft_ray.core.methods.base import AdapterSpec, PeftMethod
from metapeft_ray.core.placements import ARCHITECTURES, matched_modules, role_regex, target_modules


class IA3(PeftMethod):
    name = "ia3"

    def wrap(self, backbone: nn.Module, spec: AdapterSpec, base_model_name: str) -> nn.Module:
        from peft import IA3Config, get_peft_model

        placement = spec.placement or ""
        custom = list(spec.custom_targets) if spec.custom_targets else None
        targets = target_modules(backbone, placement, spec.layers, custom)
        feedforward: str | list[str]
        if placement == "custom":
            # Exact names, so peft's "feedforward modules are a subset of the targets" check holds.
            targets = matched_modules(backbone, targets)
            known = getattr(backbone.config, "model_type", "?") in ARCHITECTURES
            ffn_out = role_regex(backbone, ["ffn_out"], "all") if known else None
            feedforward = [n for n in targets if ffn_out and re.fullmatch(ffn_out, n)]
        elif "ffn_out" in PLACEMENTS[placement]:
            feedforward = role_regex(backbone, ["ffn_out"], spec.layers)
        else:
            feedforward = []
        config = IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=True)
        model = get_peft_model(backbone, config)
        model.peft_config["default"].base_model_name_or_path = base_model_name
        return model

"""LoRA and DoRA (peft): ``h = W0 x + (alpha/r) B A x``; DoRA rescales the column norm of the
adapted weight by a learned magnitude, ``h = m * (W0 + (alpha/r) B A) x / ||W0 + (alpha/r) B A||``.

peft's default init (A Kaiming, B = 0) is the fine-tuning baseline; the meta-init draws B small
and random, because with B = 0, dL/dA = 0 and the first inner step cannot move A.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from metapeft_ray.core.methods.base import AdapterSpec, PeftMethod
from metapeft_ray.core.placements import PlacementError, matched_modules, target_modules


def wrap_with_lora(
    backbone: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    targets: str | list[str],
    base_model_name: str,
    use_dora: bool = False,
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
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=True,
        use_dora=use_dora,
    )
    model = get_peft_model(backbone, config)
    model.peft_config["default"].base_model_name_or_path = base_model_name
    return model


def meta_init_lora(adapter_params: Mapping[str, Tensor], *, b_std: float, seed: int) -> None:
    """Give B small random values. With B = 0, dL/dA = 0 and the first inner step cannot move A
    (dL/dA = B^T dL/dW = 0 at B = 0); peft's default is right for fine-tuning and wrong for a meta-init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_params.items():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)


class LoRA(PeftMethod):
    name = "lora"
    use_dora = False

    def wrap(self, backbone: nn.Module, spec: AdapterSpec, base_model_name: str) -> nn.Module:
        custom = list(spec.custom_targets) if spec.custom_targets else None
        return wrap_with_lora(
            backbone,
            rank=spec.options.rank,
            alpha=spec.options.alpha,
            dropout=spec.options.dropout,
            targets=target_modules(backbone, spec.placement or "", spec.layers, custom),
            base_model_name=base_model_name,
            use_dora=self.use_dora,
        )

    def set_modes(self, model: nn.Module, spec: AdapterSpec) -> None:
        model.eval()
        if spec.options.dropout > 0:  # only the adapters' dropout is live; the frozen backbone stays in eval
            for name, module in model.named_modules():
                if name.endswith("lora_dropout.default"):
                    module.train()

    def meta_init(self, params: Mapping[str, Tensor], spec: AdapterSpec, seed: int) -> None:
        meta_init_lora(params, b_std=spec.options.init_b_std, seed=seed)


class DoRA(LoRA):
    """peft ``use_dora=True``. The magnitude starts at the column norms of W0 (peft's init) and
    is meta-learned with A and B; peft detaches the norm in the forward (DoRA paper, §4.3)."""

    name = "dora"
    use_dora = True

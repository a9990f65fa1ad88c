"""What every PEFT method provides: how to wrap the frozen backbone, how to meta-initialise its
adapter tensors, and how the encoder reads the backbone's hidden states with and without it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from metapeft_ray.core import registry


@dataclass(frozen=True)
class AdapterSpec:
    """What to put on the backbone (`model.adapter_spec` builds it from ``peft.*`` and
    ``model.max_length``): where, and the method's own validated options (``options.rank``)."""

    method: str = "lora"
    placement: str | None = "attn_qv"
    layers: str = "all"
    custom_targets: tuple[str, ...] | None = None
    options: registry.MethodOptions | None = None
    """The method's `registry.MethodInfo.options`; None: their defaults."""
    max_length: int = 64

    def __post_init__(self) -> None:
        if self.options is None and self.method in registry.METHODS:
            object.__setattr__(self, "options", registry.METHODS[self.method].options())


class PeftMethod(ABC):
    """Base of the PEFT methods (declared in `metapeft_ray.core.registry`, looked up with
    `metapeft_ray.core.methods.method`)."""

    name: ClassVar[str]

    @abstractmethod
    def wrap(self, backbone: nn.Module, spec: AdapterSpec, base_model_name: str) -> nn.Module:
        """The backbone with this adapter in its *default* init (what plain fine-tuning starts
        from). Only the adapter's tensors require grad."""

    def set_modes(self, model: nn.Module, spec: AdapterSpec) -> None:
        """Train/eval modes after wrapping: everything in eval (the backbone is frozen)."""
        model.eval()

    def meta_init(self, params: Mapping[str, Tensor], spec: AdapterSpec, seed: int) -> None:  # noqa: B027
        """Turn the default init into the starting point of meta-learning, in place. The default
        keeps it: right for methods whose default init already has non-zero gradients."""

    def hidden_offset(self, spec: AdapterSpec) -> int:
        """Leading positions of ``last_hidden_state`` that are virtual tokens, not input tokens."""
        return 0

    def backbone_hidden(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """``last_hidden_state`` of the backbone alone (the adapter switched off)."""
        with model.disable_adapter():
            return model(**batch).last_hidden_state

    def load_weights(self, model: nn.Module, path: Path, device: torch.device) -> None:
        """Load the adapter weights that ``model.save_pretrained(path)`` exported (peft's
        ``adapter_model.safetensors`` by default) into ``model``; `ValueError` if some are missing."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(path / "adapter_model.safetensors"), device=str(device))
        own = dict(model.named_parameters())
        result = set_peft_model_state_dict(model, weights)
        # Prompt learning loads its embedding strictly inside peft (under another key name).
        missing = [k for k in result.missing_keys if k in own and own[k].requires_grad]
        if missing and not registry.METHODS[self.name].virtual_tokens_at:
            raise ValueError(f"adapter weights missing for {missing[:3]}; was it exported with this config?")

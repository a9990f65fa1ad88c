"""Prompt tuning and prefix tuning (peft, ``TaskType.FEATURE_EXTRACTION``): meta-learned
virtual-token embeddings.

- Prompt tuning prepends ``num_virtual_tokens`` learned input embeddings to every sentence. The
  encoder mean-pools over the *real* tokens only (the first ``num_virtual_tokens`` positions of
  ``last_hidden_state`` are dropped, the tokenizer's attention mask pools the rest): the virtual
  tokens act on the sentence through attention, and the sentence embedding stays a pooled
  representation of the sentence's own tokens, comparable with the backbone's.
- Prefix tuning prepends learned keys and values to every layer's self-attention (peft passes
  them as a ``DynamicCache``; ``BertModel`` in transformers 5 accepts it as ``cache``). No
  positions are added to ``last_hidden_state``; note that transformers offsets the position ids
  of the real tokens by the cache length (``num_virtual_tokens``), the same in training, export
  and ``PeftModel.from_pretrained``. At build the encoder checks that the prefix really changes
  the backbone's output and refuses a backbone that ignores it.

Init: peft's own (``nn.Embedding``'s N(0, 1)) is both the fine-tuning baseline and the start of
meta-learning; unlike LoRA's B = 0 it is not a point where some gradient vanishes.
The virtual tokens count against ``max_position_embeddings``: a config whose
``model.max_length + peft.num_virtual_tokens`` exceeds it is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from metapeft_ray.core.methods.base import AdapterSpec, PeftMethod
from metapeft_ray.core.placements import PlacementError


class PromptTuning(PeftMethod):
    name = "prompt"

    def _config(self, spec: AdapterSpec):  # noqa: ANN202
        from peft import PromptTuningConfig, TaskType

        return PromptTuningConfig(
            task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=spec.options.num_virtual_tokens
        )

    def wrap(self, backbone: nn.Module, spec: AdapterSpec, base_model_name: str) -> nn.Module:
        from peft import get_peft_model

        limit = getattr(backbone.config, "max_position_embeddings", None)
        tokens = spec.options.num_virtual_tokens
        if limit is not None and spec.max_length + tokens > limit:
            raise PlacementError(
                f"model.max_length={spec.max_length} + peft.num_virtual_tokens={tokens} "
                f"exceeds the backbone's max_position_embeddings={limit}; lower one of them"
            )
        model = get_peft_model(backbone, self._config(spec))
        model.peft_config["default"].base_model_name_or_path = base_model_name
        return model

    def hidden_offset(self, spec: AdapterSpec) -> int:
        return spec.options.num_virtual_tokens

    def backbone_hidden(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        # Prompt learning leaves the base model untouched; peft's disable_adapter() also fails for
        # a bare BertModel here (it looks for prepare_inputs_for_generation).
        return model.get_base_model()(**batch).last_hidden_state


class PrefixTuning(PromptTuning):
    name = "prefix"

    def _config(self, spec: AdapterSpec):  # noqa: ANN202
        from peft import PrefixTuningConfig, TaskType

        return PrefixTuningConfig(
            task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=spec.options.num_virtual_tokens
        )

    def wrap(self, backbone: nn.Module, spec: AdapterSpec, base_model_name: str) -> nn.Module:
        model = super().wrap(backbone, spec, base_model_name)
        _check_prefix_reaches_the_output(model)
        return model

    def hidden_offset(self, spec: AdapterSpec) -> int:
        return 0


def _check_prefix_reaches_the_output(model: nn.Module) -> None:
    """A backbone that drops peft's ``past_key_values`` would train a prefix that does nothing;
    refuse it instead of shipping it (two forwards of a two-token input)."""
    base = model.get_base_model()
    if base.device.type == "meta":  # a weightless skeleton (config checks): nothing to run
        return
    ids = torch.tensor([[getattr(base.config, "pad_token_id", 0) or 0] * 2], device=base.device) + 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    reason = "its output ignores the prefix"
    try:
        with torch.no_grad():
            same = torch.allclose(model(**batch).last_hidden_state, base(**batch).last_hidden_state)
    except (TypeError, ValueError, RuntimeError) as err:
        same, reason = True, f"the forward with a prefix fails ({str(err).splitlines()[0]})"
    if same:
        import transformers

        raise PlacementError(
            f"peft.method=prefix does not work with this backbone ({type(base).__name__}, "
            f"transformers {transformers.__version__}): {reason}; use peft.method=prompt"
        )

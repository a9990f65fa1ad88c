"""The PEFT methods and meta-algorithms, declared without torch: what the config validates
(names, default placements, a method's own ``peft.*`` options, the rules each one brings) and
where each implementation lives.

`config` reads these declarations at load, before torch is imported; an implementation's module
(a `PeftMethod` under ``methods/``, a `MetaAlgorithm` under ``algorithms/``) is imported the
first time a model or learner asks for it (`methods.method`, `algorithms.algorithm`). Adding a
method or an algorithm is its module plus one registration line at the bottom of this file (and,
for a method with settings of its own, its `MethodOptions` next to the line: the config reads
them before torch is imported, so they cannot live in the method's module).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class MethodOptions(BaseModel):
    """A method's own ``peft.*`` settings; this base has none. A method with settings subclasses
    it, each field with its default, constraints and docstring: the config accepts and validates
    ``peft.<field>`` by it, and the method reads the values as ``spec.options.<field>``. Torch-free,
    like everything the config reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _ZeroFactorInit(MethodOptions):
    init_b_std: float = Field(0.01, gt=0)
    """Std of the meta-init of the factor peft initialises to zero (LoRA/DoRA B, the bottleneck's
    up-projection). Never 0: with B = 0 the first inner step cannot move A."""


class LoRAOptions(_ZeroFactorInit):
    rank: int = Field(8, ge=1)
    """r of ``h = W0 x + (alpha/r) B A x``."""
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input (the frozen backbone's own dropout stays off)."""


class VirtualTokenOptions(MethodOptions):
    num_virtual_tokens: int = Field(10, ge=1)
    """Virtual tokens prepended to the input (prompt) or to every layer's keys and values (prefix)."""


class BottleneckOptions(_ZeroFactorInit):
    bottleneck_dim: int = Field(16, ge=1)
    """Width of the down-projection."""


@dataclass(frozen=True)
class MethodInfo:
    """A PEFT method as the config sees it."""

    name: str
    """``peft.method``; also the implementation's ``name``."""
    implementation: str
    """``module:Class`` of its `PeftMethod` subclass."""
    default_placement: str | None = None
    """``peft.placement`` when it is not set; None for a method that takes none."""
    virtual_tokens_at: str | None = None
    """Prompt learning: where its virtual tokens are prepended ("the input"). Such a method takes
    no placement and no layer selection."""
    roles: frozenset[str] | None = None
    """The placement roles it can adapt (None: any). A placement adapting others is refused with
    ``roles_why`` (what the method does) and ``roles_fix`` (which placements to use)."""
    roles_why: str = ""
    roles_fix: str = ""
    options: type[MethodOptions] = MethodOptions
    """Its own settings, given flat as ``peft.<field>``; a method may declare a field another has
    (lora and dora share `LoRAOptions`)."""
    no_activation_checkpointing: str | None = None
    """Why ``model.activation_checkpointing`` cannot work with it (None: it can)."""


@dataclass(frozen=True)
class AlgorithmInfo:
    """A meta-algorithm as the config sees it."""

    name: str
    """``meta.algorithm``; also the implementation's ``name``."""
    implementation: str
    """``module:Class`` of its `MetaAlgorithm` subclass."""
    second_order: bool = False
    """Its inner loop can be differentiated: second order unless ``meta.first_order``."""
    query_gradient: bool = True
    """It takes the query loss's gradient (which ``head.learn`` needs)."""
    inner_steps: tuple[int, int | None] = (0, None)
    """The ``meta.inner_steps`` it trains with (min, max; None: no max) and, in ``steps_why``,
    why: the error message's reason."""
    steps_why: str = ""


METHODS: dict[str, MethodInfo] = {}
ALGORITHMS: dict[str, AlgorithmInfo] = {}


def register_method(info: MethodInfo) -> None:
    _register(METHODS, info)


def register_algorithm(info: AlgorithmInfo) -> None:
    _register(ALGORITHMS, info)


def _register(known: dict[str, Any], info: MethodInfo | AlgorithmInfo) -> None:
    if info.name in known:
        raise ValueError(f"{info.name!r} is registered already (as {known[info.name].implementation})")
    known[info.name] = info


def option_owners() -> dict[str, list[MethodInfo]]:
    """Each ``peft.*`` option the registered methods declare, and which methods declare it (in
    registration order)."""
    owners: dict[str, list[MethodInfo]] = {}
    for info in METHODS.values():
        for key in info.options.model_fields:
            owners.setdefault(key, []).append(info)
    return owners


def load(implementation: str) -> Any:
    """What ``module:name`` names, its module imported now."""
    module, _, name = implementation.partition(":")
    return getattr(importlib.import_module(module), name)


_M, _A = "metapeft_ray.core.methods", "metapeft_ray.core.algorithms"
register_method(MethodInfo("lora", f"{_M}.lora:LoRA", default_placement="attn_qv", options=LoRAOptions))
register_method(MethodInfo("dora", f"{_M}.lora:DoRA", default_placement="attn_qv", options=LoRAOptions))
# the IA3 paper's placement: keys, values, the FFN's inner activation
register_method(MethodInfo("ia3", f"{_M}.ia3:IA3", default_placement="attn_kv_ffn_out"))
register_method(
    MethodInfo(
        "prompt", f"{_M}.prompt:PromptTuning", virtual_tokens_at="the input", options=VirtualTokenOptions
    )
)
register_method(
    MethodInfo(
        "prefix",
        f"{_M}.prompt:PrefixTuning",
        virtual_tokens_at="every layer's keys and values",
        options=VirtualTokenOptions,
        no_activation_checkpointing="prefix tuning passes its virtual keys and values to every block in "
        "a cache that the block extends, so recomputing the block in the backward extends it twice "
        "(a shape error)",
    )
)
register_method(
    MethodInfo(
        "bottleneck",
        f"{_M}.bottleneck:Bottleneck",
        default_placement="ffn_out",  # after the feed-forward block (Pfeiffer); attn_ffn_out = Houlsby
        roles=frozenset({"o", "ffn_out"}),
        roles_why="puts an adapter after a block's output projection",
        roles_fix="use ffn_out (after the feed-forward block), attn_out (after attention) or "
        "attn_ffn_out (both, Houlsby)",
        options=BottleneckOptions,
    )
)
register_algorithm(AlgorithmInfo("maml", f"{_A}.maml:MAML", second_order=True))
register_algorithm(
    AlgorithmInfo(
        "metasgd",
        f"{_A}.metasgd:MetaSGD",
        second_order=True,
        inner_steps=(1, None),
        steps_why="learns inner learning rates",
    )
)
register_algorithm(
    AlgorithmInfo(
        "reptile",
        f"{_A}.reptile:Reptile",
        query_gradient=False,
        inner_steps=(1, None),
        steps_why="moves towards the adapted weights",
    )
)
register_algorithm(
    AlgorithmInfo(
        "protonet",
        f"{_A}.protonet:ProtoNet",
        inner_steps=(0, 0),
        steps_why="trains with the prototypical loss (eval.inner_steps=N adapts at meta-test)",
    )
)

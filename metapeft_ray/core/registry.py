"""The PEFT methods and meta-algorithms, declared without torch: what the config validates
(names, default placements, the rules each one brings) and where each implementation lives.

`config` reads these declarations at load, before torch is imported; an implementation's module
(a `PeftMethod` under ``methods/``, a `MetaAlgorithm` under ``algorithms/``) is imported the
first time a model or learner asks for it (`methods.method`, `algorithms.algorithm`). Adding a
method or an algorithm is its module plus one registration line at the bottom of this file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


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
    dropout: bool = False
    """It has adapter dropout (``peft.dropout``)."""
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


def load(implementation: str) -> Any:
    """What ``module:name`` names, its module imported now."""
    module, _, name = implementation.partition(":")
    return getattr(importlib.import_module(module), name)


_M, _A = "metapeft_ray.core.methods", "metapeft_ray.core.algorithms"
register_method(MethodInfo("lora", f"{_M}.lora:LoRA", default_placement="attn_qv", dropout=True))
register_method(MethodInfo("dora", f"{_M}.lora:DoRA", default_placement="attn_qv", dropout=True))
# the IA3 paper's placement: keys, values, the FFN's inner activation
register_method(MethodInfo("ia3", f"{_M}.ia3:IA3", default_placement="attn_kv_ffn_out"))
register_method(MethodInfo("prompt", f"{_M}.prompt:PromptTuning", virtual_tokens_at="the input"))
register_method(
    MethodInfo(
        "prefix",
        f"{_M}.prompt:PrefixTuning",
        virtual_tokens_at="every layer's keys and values",
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

"""The registries: a PEFT method or a meta-algorithm is one module plus one registration line.

Proved with two that the package does not ship, registered here the way README's "Adding a PEFT
method" shows: peft's LoHa and an always-first-order MAML. The config reads their torch-free
declarations (default placement, LoHa's own options, no second order): a LoHa option is set flat
from an override, validated, saved with the config and reaches peft's LoHa layers with no edit
to the config, and one tiny meta-step trains through them. Also: the config never imports torch,
and every shipped declaration names an implementation of that name."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import yaml
from peft.tuners.loha import LoHaLayer
from pydantic import Field
from torch import nn

from metapeft_ray.core import registry
from metapeft_ray.core.algorithms import algorithm
from metapeft_ray.core.algorithms.maml import MAML
from metapeft_ray.core.config import ConfigError, load_config, validate_config
from metapeft_ray.core.methods import AdapterSpec, PeftMethod, method
from metapeft_ray.core.placements import target_modules
from metapeft_ray.core.train import MetaLearner, prepare_sampler
from tests.tiny import make_tiny_backbone, make_tiny_dataset, tiny_overrides


class LoHaOptions(registry.MethodOptions):
    rank: int = Field(8, ge=1)
    """r of both Hadamard factors."""
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the ranks of the weight update (peft's ``rank_dropout``)."""


class LoHa(PeftMethod):
    """peft's LoHa: ``W0 + (A1 B1) ⊙ (A2 B2)`` on the placement's modules."""

    name = "loha"

    def wrap(self, backbone: nn.Module, spec: AdapterSpec, base_model_name: str) -> nn.Module:
        from peft import LoHaConfig, get_peft_model

        o = spec.options
        targets = target_modules(backbone, spec.placement or "", spec.layers, None)
        config = LoHaConfig(r=o.rank, rank_dropout=o.rank_dropout, target_modules=targets)
        model = get_peft_model(backbone, config)
        model.peft_config["default"].base_model_name_or_path = base_model_name  # for the export
        return model

    def set_modes(self, model: nn.Module, spec: AdapterSpec) -> None:
        model.eval()
        if spec.options.rank_dropout > 0:  # live in train mode only; the frozen backbone stays in eval
            for module in model.modules():
                if isinstance(module, LoHaLayer):
                    module.train()


class FirstOrderMAML(MAML):
    """MAML without its second-order form."""

    name = "fomaml"


@pytest.fixture
def registered() -> Iterator[None]:
    registry.register_method(
        registry.MethodInfo("loha", f"{__name__}:LoHa", default_placement="attn_qv", options=LoHaOptions)
    )
    registry.register_algorithm(registry.AlgorithmInfo("fomaml", f"{__name__}:FirstOrderMAML"))
    try:
        yield
    finally:
        del registry.METHODS["loha"], registry.ALGORITHMS["fomaml"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return str(make_tiny_backbone(root / "bb")), str(make_tiny_dataset(root / "data.jsonl"))


def test_a_registered_method_and_algorithm_validate_and_train(registered, tiny) -> None:  # noqa: ANN001
    cfg = load_config(
        None,
        [*tiny_overrides(*tiny), "peft.method=loha", "peft.rank_dropout=0.25", "meta.algorithm=fomaml"],
    )
    assert cfg.peft.placement == "attn_qv" and not cfg.meta.second_order  # read from the declarations
    assert cfg.peft.options == LoHaOptions(rank=4, rank_dropout=0.25)  # its own options, set flat
    assert validate_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg  # as a run saves it
    with pytest.raises(ConfigError, match=r"peft.rank_dropout: Input should be less than 1 \(got 1.5\)"):
        cfg.with_overrides({"peft.rank_dropout": 1.5})
    with pytest.raises(ConfigError, match="peft.dropout=0.1 applies to lora/dora only"):
        cfg.with_overrides({"peft.dropout": 0.1})
    with pytest.raises(
        ConfigError, match="peft.rank_dropout=0.5 applies to loha only, not to peft.method=lora"
    ):
        cfg.with_overrides({"peft.method": "lora", "peft.rank_dropout": 0.5})
    assert cfg.with_overrides({"peft.method": "lora"}).peft.rank_dropout == 0.25  # kept, unused
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    layers = [m for m in learner.encoder.model.modules() if isinstance(m, LoHaLayer)]
    assert layers and all(m.r["default"] == 4 and m.rank_dropout["default"] == 0.25 for m in layers)
    assert all(m.training for m in layers) and not learner.encoder.model.get_base_model().training
    assert learner.params and all(".hada_" in k for k in learner.params)
    before = {k: v.detach().clone() for k, v in learner.params.items()}
    metrics = learner.meta_step()
    assert metrics["meta_step"] == 1 and torch.isfinite(torch.tensor(metrics["meta_loss"]))
    assert any(not torch.equal(v, before[k]) for k, v in learner.params.items())


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="'lora' is registered already"):
        registry.register_method(registry.MethodInfo("lora", f"{__name__}:LoHa"))


def test_unknown_names_list_the_registered_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"peft.method: not a registered PEFT method; choose one of lora, dora, .*'loha'"
    ):
        load_config(None, ["peft.method=loha"])
    with pytest.raises(
        ConfigError, match=r"meta.algorithm: not a registered meta-algorithm; choose one of maml, .*'fomaml'"
    ):
        load_config(None, ["meta.algorithm=fomaml"])


def test_every_shipped_declaration_names_its_implementation() -> None:
    assert [method(name).name for name in registry.METHODS] == list(registry.METHODS)
    assert [algorithm(name).name for name in registry.ALGORITHMS] == list(registry.ALGORITHMS)


def test_the_config_and_the_registry_import_without_torch() -> None:
    code = (
        "import sys; import metapeft_ray.core.config, metapeft_ray.core.space; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

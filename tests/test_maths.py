"""Unit tests that pin the maths (no Ray): inner loop, meta-gradients, placements, heads."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch.nn import functional as F

from metapeft_ray.core.data import load_dataset
from metapeft_ray.core.episodes import ClassSplits, EpisodeSampler
from metapeft_ray.core.meta import InnerLoop, adapt, episode_tensors, head_logits, proto_head, run_episode
from metapeft_ray.core.methods import AdapterSpec
from metapeft_ray.core.model import PlacementError, build_encoder, meta_init_lora, target_modules
from metapeft_ray.core.registry import LoRAOptions
from tests.tiny import make_tiny_backbone, make_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return str(make_tiny_backbone(root / "bert")), str(make_tiny_dataset(root / "data.jsonl"))


def _encoder(
    backbone: str,
    placement: str | None = "attn_qv",
    layers: str = "all",
    rank: int = 4,
    checkpointing: bool = False,
    method: str = "lora",
):
    torch.manual_seed(0)
    return build_encoder(
        AdapterSpec(
            method=method,
            placement=placement,
            layers=layers,
            options=LoRAOptions(rank=rank, alpha=8) if method in ("lora", "dora") else None,
            max_length=16,
        ),
        backbone=backbone,
        normalize=True,
        second_order=True,
        device=torch.device("cpu"),
        activation_checkpointing=checkpointing,
    )


@pytest.fixture(scope="module")
def setup(tiny: tuple[str, str]):  # noqa: ANN201
    backbone, dataset = tiny
    enc = _encoder(backbone)
    params = enc.adapter_params()
    default = {k: v.detach().clone() for k, v in params.items()}
    meta_init_lora(params, b_std=0.05, seed=0)
    data = load_dataset(dataset)
    sampler = EpisodeSampler(
        data, ClassSplits.make(data.labels, folds=3, fold=0, split_seed=0, val_fraction=0.2)
    )
    episode = sampler.build(sampler.spec("train", seed=0, step=0, index=0, n_way=3, k_shot=2, q_query=3))
    return enc, params, default, episode


def test_functional_inner_step_equals_hand_written_reference(setup) -> None:  # noqa: ANN001
    enc, params, _, episode = setup
    support, labels, _, _ = episode_tensors(enc, episode)
    lr, scale = 0.1, 10.0
    got = adapt(enc, params, support, labels, 3, steps=1, lr=lr, scale=scale, first_order=True)

    # Reference: a stateful copy of the model, loss.backward(), p <- p - lr * p.grad by hand.
    model = copy.deepcopy(enc.model)
    named = dict(model.named_parameters())
    out = model(**support).last_hidden_state
    mask = support["attention_mask"].unsqueeze(-1).float()
    emb = F.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)
    w, b = proto_head(emb, labels, 3)
    w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
    out = model(**support).last_hidden_state
    emb = F.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)
    F.cross_entropy(scale * (emb @ w.T + b), labels).backward()
    for name in params:
        torch.testing.assert_close(got.params[name], named[name] - lr * named[name].grad)
    torch.testing.assert_close(got.weight, w - lr * w.grad)
    torch.testing.assert_close(got.bias, b - lr * b.grad)


def test_first_order_equals_second_order_with_detached_inner_graph(setup) -> None:  # noqa: ANN001
    enc, params, _, episode = setup
    support, s_labels, query, q_labels = episode_tensors(enc, episode)

    def meta_grads(first_order: bool, detach_inner: bool) -> list[torch.Tensor]:
        w, b = proto_head(enc.embed(params, support), s_labels, 3)
        fast = {k: v.view_as(v) for k, v in params.items()}  # inner grads: head held fixed
        for _ in range(2):
            loss = F.cross_entropy(head_logits(enc.embed(fast, support), w, b, 10.0), s_labels)
            gs = torch.autograd.grad(loss, [*fast.values(), w, b], create_graph=True)
            gs = [g.detach() for g in gs] if detach_inner else gs
            fast = {k: v - 0.1 * g for (k, v), g in zip(fast.items(), gs[:-2], strict=True)}
            w, b = w - 0.1 * gs[-2], b - 0.1 * gs[-1]
        q = F.cross_entropy(head_logits(enc.embed(fast, query), w, b, 10.0), q_labels)
        return list(torch.autograd.grad(q, list(params.values())))

    fo = run_episode(enc, params, episode, InnerLoop(2, 0.1, 10.0, first_order=True), meta_gradient=True)
    so = run_episode(enc, params, episode, InnerLoop(2, 0.1, 10.0, first_order=False), meta_gradient=True)
    for got, ref in zip(fo.grads.values(), meta_grads(True, detach_inner=True), strict=True):
        torch.testing.assert_close(got, ref)
    for got, ref in zip(so.grads.values(), meta_grads(False, detach_inner=False), strict=True):
        torch.testing.assert_close(got, ref)
    # and the second-order terms are really there
    assert any(not torch.allclose(a, b) for a, b in zip(fo.grads.values(), so.grads.values(), strict=True))


@pytest.mark.parametrize("first_order", [True, False])
def test_meta_gradients_reach_every_adapter_tensor_and_only_them(setup, first_order: bool) -> None:  # noqa: ANN001
    enc, params, _, episode = setup
    # LoRA A and B of query and value in both layers are the only trainable tensors ...
    lora = {
        f"base_model.model.encoder.layer.{i}.attention.self.{m}.lora_{ab}.default.weight"
        for i in (0, 1)
        for m in ("query", "value")
        for ab in ("A", "B")
    }
    assert {n for n, p in enc.model.named_parameters() if p.requires_grad} == lora == set(params)
    weights = {k: v.detach().clone() for k, v in enc.model.state_dict().items()}
    r = run_episode(enc, params, episode, InnerLoop(1, 0.1, 10.0, first_order), meta_gradient=True)
    # ... the meta-gradient is over exactly them, non-zero everywhere ...
    assert set(r.grads) == lora
    for name, g in r.grads.items():
        assert g.shape == params[name].shape, name
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"zero meta-gradient for {name}"
    # ... and an episode only reads the model: every weight, backbone and adapter, is bit-identical.
    after = enc.model.state_dict()
    assert after.keys() == weights.keys()
    assert [k for k, v in weights.items() if not torch.equal(after[k], v)] == []


def test_lora_with_b_zero_leaves_the_backbone_output_unchanged(setup) -> None:  # noqa: ANN001
    enc, params, default, episode = setup
    support, *_ = episode_tensors(enc, episode)
    assert all(v.abs().sum() == 0 for k, v in default.items() if "lora_B" in k)
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(default, support), enc.embed(None, support))
        assert not torch.allclose(enc.embed(params, support), enc.embed(None, support))


def test_b_zero_init_cannot_move_a_in_the_first_inner_step(setup) -> None:  # noqa: ANN001
    """Why the meta-init draws B: with peft's default B = 0, dL/dA = 0."""
    enc, _, default, episode = setup
    support, labels, *_ = episode_tensors(enc, episode)
    init = {k: v.clone().requires_grad_() for k, v in default.items()}
    out = adapt(enc, init, support, labels, 3, steps=1, lr=0.1, scale=10.0, first_order=True)
    for k in init:
        moved = not torch.equal(out.params[k], init[k])
        assert moved == ("lora_B" in k), k


def test_prototype_head_separates_well_separated_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 16, generator=gen), dim=-1) * 3

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(5).repeat_interleave(n)
        return centres[y] + 0.3 * torch.randn(len(y), 16, generator=gen), y

    xs, ys = draw(5)
    xq, yq = draw(20)
    w, b = proto_head(xs, ys, 5)
    assert (head_logits(xq, w, b, 1.0).argmax(-1) == yq).float().mean() >= 0.95


def test_placements_expand_to_exactly_the_named_modules(tiny: tuple[str, str]) -> None:
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny[0])

    def hits(placement: str, layers: str = "all") -> set[str]:
        rx = target_modules(base, placement, layers, None)
        return {n for n, _ in base.named_modules() if re.fullmatch(rx, n)}

    assert hits("attn_qv") == {
        f"encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")
    }
    assert hits("ffn") == {
        f"encoder.layer.{i}.{m}" for i in (0, 1) for m in ("intermediate.dense", "output.dense")
    }
    assert hits("attn_all", "top_half") == {
        f"encoder.layer.1.attention.{m}" for m in ("self.query", "self.key", "self.value", "output.dense")
    }
    assert len(hits("all_linear", "0")) == 6


@pytest.mark.parametrize(
    ("placement", "layers", "custom", "match"),
    [
        ("attn_qvv", "all", None, "unknown; choose one of"),
        ("custom", "all", ["qery"], "nearest linear modules: .*query"),
        ("attn_qv", "top_5", None, "N must be in 1..2"),
        ("attn_qv", "3-4", None, "this model has layers 0..1"),
        ("attn_qv", "middle", None, "not understood"),
    ],
)
def test_bad_placements_are_rejected_with_the_nearest_names(tiny, placement, layers, custom, match) -> None:  # noqa: ANN001
    from transformers import AutoModel

    with pytest.raises(PlacementError, match=match):
        target_modules(AutoModel.from_pretrained(tiny[0]), placement, layers, custom)


def test_rank_larger_than_the_layer_is_rejected(tiny: tuple[str, str]) -> None:
    with pytest.raises(PlacementError, match="peft.rank=64 exceeds"):
        _encoder(tiny[0], rank=64)


def test_bf16_autocast_meta_gradients_stay_close_to_fp32(setup) -> None:  # noqa: ANN001
    """model.bf16 autocasts on the run's device; second-order meta-gradients keep their direction."""
    from dataclasses import replace

    enc, params, _, episode = setup
    inner = InnerLoop(1, 0.1, 10.0, first_order=False)
    fp32 = run_episode(enc, params, episode, inner, meta_gradient=True).grads
    bf16 = run_episode(replace(enc, bf16=True), params, episode, inner, meta_gradient=True).grads
    a, b = (torch.cat([g.reshape(-1) for g in grads.values()]) for grads in (fp32, bf16))
    assert not torch.equal(a, b)  # autocast really ran in bf16
    assert F.cosine_similarity(a, b, dim=0) > 0.99
    assert (a - b).norm() / a.norm() < 0.1


@pytest.mark.parametrize(
    ("method", "wrt"),
    [
        ("lora", "adapter"),
        ("lora", "every_weight"),
        ("dora", "adapter"),
        ("ia3", "adapter"),
        ("bottleneck", "adapter"),
        ("prompt", "adapter"),
    ],
)
def test_activation_checkpointing_keeps_the_meta_gradient(tiny, setup, method: str, wrt: str) -> None:  # noqa: ANN001
    """model.activation_checkpointing recomputes each block in the backward, under the inner
    loop's double backward too, with the fast weights (not the module's own) substituted: the
    meta-gradient equals the one from kept activations, for every method that supports it
    (prefix tuning is refused at load). ``every_weight``: the whole backbone as meta-parameters,
    as bench_memory's full-model contender runs it."""
    from metapeft_ray.core import registry
    from metapeft_ray.core.methods import method as peft_method

    *_, episode = setup
    placement = registry.METHODS[method].default_placement
    enc, checkpointed = (_encoder(tiny[0], placement, method=method, checkpointing=c) for c in (False, True))
    params = enc.adapter_params()
    peft_method(method).meta_init(params, enc.spec, 0)
    if wrt == "every_weight":
        params = {
            n: p.detach().clone().requires_grad_()
            for n, p in enc.model.named_parameters()
            if ".pooler." not in n
        }
    inner = InnerLoop(2, 0.5, 10.0, first_order=False)
    grads, calls = {}, {}
    for name, e in (("kept", enc), ("checkpointed", checkpointed)):
        runs: list[int] = []
        attention = next(m for n, m in e.model.named_modules() if n.endswith("encoder.layer.1.attention"))
        hook = attention.register_forward_hook(lambda *_, r=runs: r.append(1))
        try:
            grads[name] = run_episode(e, params, episode, inner, meta_gradient=True).grads
        finally:
            hook.remove()
        calls[name] = len(runs)
    assert calls["checkpointed"] > calls["kept"]  # the block really ran again in the backward
    assert grads["checkpointed"].keys() == grads["kept"].keys()
    for name, kept in grads["kept"].items():
        torch.testing.assert_close(grads["checkpointed"][name], kept, rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_is_a_validated_config_switch() -> None:
    from metapeft_ray.core.config import load_config

    assert load_config(None, []).model.activation_checkpointing is False
    assert load_config(None, ["model.activation_checkpointing=true"]).model.activation_checkpointing
    with pytest.raises(ValueError, match="model.activation_checkpointing"):
        load_config(None, ["model.activation_checkpointing=sometimes"])
    with pytest.raises(ValueError, match="does not work with peft.method=prefix"):
        load_config(None, ["model.activation_checkpointing=true", "peft.method=prefix"])

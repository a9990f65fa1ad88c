"""The hybrids on one tiny backbone (no Ray): every PEFT method x every meta-algorithm.

Pinned: only adapter tensors (and Meta-SGD's learning rates) are trainable and receive
meta-gradients; every meta-gradient is finite and non-zero; one meta-step moves every adapter
tensor and leaves every backbone weight bit-identical; the export round-trips through
``PeftModel.from_pretrained`` (our `load_bottleneck` for the bottleneck adapter) with identical
outputs; Reptile's pseudo-gradient is ``phi_0 - phi_K``; Meta-SGD with every rate at
``inner_lr`` is MAML (per-step rates too, each step's with a meta-gradient of its own); the config
rejects the combinations that cannot work.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from metapeft_ray.core import registry
from metapeft_ray.core.algorithms.metasgd import LOG_LR_PREFIX
from metapeft_ray.core.config import ConfigError, load_config
from metapeft_ray.core.export import export_adapter, load_adapter, load_inner_lrs
from metapeft_ray.core.meta import adapt, episode_tensors, head_logits, proto_head
from metapeft_ray.core.train import MetaLearner, prepare_sampler
from tests.tiny import make_tiny_backbone, make_tiny_dataset, tiny_overrides

METHODS = list(registry.METHODS)
ALGORITHMS = list(registry.ALGORITHMS)
# The fast tier (`-m "not slow"`) runs every method once and every algorithm at least once; the
# rest of the matrix is `slow` (each combination builds its own learner: seconds on 2 cores).
FAST_PAIRS = {
    ("lora", "maml"),
    ("dora", "metasgd"),
    ("ia3", "reptile"),
    ("prompt", "protonet"),
    ("prefix", "maml"),
    ("bottleneck", "metasgd"),
}
MATRIX = [
    pytest.param(m, a, marks=() if (m, a) in FAST_PAIRS else pytest.mark.slow)
    for m, a in itertools.product(METHODS, ALGORITHMS)
]
# The export round trip of each storage format in the fast tier: peft's (LoRA), peft's prompt
# learning (another key name) and ours (bottleneck); the other methods are `slow`.
EXPORT_CASES = [
    pytest.param(m, marks=() if m in ("lora", "prompt", "bottleneck") else pytest.mark.slow) for m in METHODS
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return str(make_tiny_backbone(root / "bert")), str(make_tiny_dataset(root / "data.jsonl"))


def make_learner(tiny: tuple[str, str], method: str, algorithm: str = "maml", **extra: Any) -> MetaLearner:
    overrides: dict[str, Any] = {"peft.method": method, "meta.algorithm": algorithm}
    if registry.METHODS[method].virtual_tokens_at:
        overrides["peft.num_virtual_tokens"] = 4
    if algorithm == "protonet":
        overrides["meta.inner_steps"] = 0
    cfg = load_config(None, tiny_overrides(*tiny, **{**overrides, **extra}))
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    learner.cfg = cfg  # type: ignore[attr-defined]  # for the export tests
    return learner


def flat_grads(learner: MetaLearner, spec_index: int = 0) -> dict[str, torch.Tensor]:
    return learner._episode(learner.train_specs(0)[spec_index], meta_gradient=True).grads


# -- the matrix -----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "algorithm"), MATRIX)
def test_meta_gradients_reach_every_adapter_tensor_and_only_them(tiny, method: str, algorithm: str) -> None:  # noqa: ANN001
    learner = make_learner(tiny, method, algorithm)
    model = learner.encoder.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(learner.params) and trainable
    markers = {
        "lora": ("lora_A", "lora_B"),
        "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
        "ia3": ("ia3_l",),
        "prompt": ("prompt_encoder",),
        "prefix": ("prompt_encoder",),
        "bottleneck": (".bottleneck.",),
    }[method]
    assert all(any(m in n for m in markers) for n in trainable), sorted(trainable)[:4]
    assert set(learner.extra) == ({LOG_LR_PREFIX + n for n in trainable} if algorithm == "metasgd" else set())

    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert set(learner.params) <= set(weights)
    grads = flat_grads(learner)
    assert list(grads) == list(learner.meta_params)  # exactly the adapter tensors (+ Meta-SGD's rates)
    for name, g in grads.items():
        assert g.shape == learner.meta_params[name].shape, name
        assert torch.isfinite(g).all(), name
        assert g.abs().sum() > 0, f"zero meta-gradient for {name}"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(weights[k], v)]
    assert changed == [], "an episode changed a weight of the model"

    metrics = learner.meta_step()
    assert torch.isfinite(torch.tensor(metrics["meta_loss"]))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(weights[k], v)}
    # a meta-step moves every adapter tensor and nothing else: the backbone stays bit-identical
    assert changed == set(learner.params), (
        sorted(changed - set(learner.params))[:4],
        sorted(set(learner.params) - changed)[:4],
    )
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in learner.params)


# -- algorithms -----------------------------------------------------------------------------


def test_metasgd_with_every_rate_at_inner_lr_is_maml(tiny) -> None:  # noqa: ANN001
    maml = flat_grads(make_learner(tiny, "ia3", "maml"))
    metasgd = flat_grads(make_learner(tiny, "ia3", "metasgd"))
    for name, g in maml.items():
        torch.testing.assert_close(metasgd[name], g)
    assert any(k.startswith(LOG_LR_PREFIX) for k in metasgd)


def test_metasgd_per_parameter_rates_and_their_effect(tiny) -> None:  # noqa: ANN001
    learner = make_learner(tiny, "bottleneck", "metasgd", **{"meta.metasgd_granularity": "parameter"})
    assert all(learner.extra[LOG_LR_PREFIX + k].shape == p.shape for k, p in learner.params.items())
    base = learner._episode(learner.train_specs(0)[0], meta_gradient=False).support_loss_after
    with torch.no_grad():
        for v in learner.extra.values():
            v.add_(1.0)  # every rate x e
    faster = learner._episode(learner.train_specs(0)[0], meta_gradient=False).support_loss_after
    assert faster != base  # the learned rates are what the inner loop uses


def test_metasgd_per_step_rates_start_as_maml_and_each_step_learns_its_own(tiny) -> None:  # noqa: ANN001
    steps = {"meta.inner_steps": 2, "meta.inner_lr": 0.1}
    learner = make_learner(tiny, "bottleneck", "metasgd", **{"meta.metasgd_granularity": "step"}, **steps)
    for k, p in learner.params.items():  # a step axis, then one rate for the whole tensor
        assert learner.extra[LOG_LR_PREFIX + k].shape == (2,) + (1,) * p.dim()
    maml = flat_grads(make_learner(tiny, "bottleneck", "maml", **steps))
    grads = flat_grads(learner)
    for name, g in maml.items():
        torch.testing.assert_close(grads[name], g)
    for k in learner.params:  # both steps' rates get a meta-gradient of their own
        g = grads[LOG_LR_PREFIX + k].flatten()
        assert torch.all(g != 0) and g[0] != g[1], k


def test_per_step_rates_move_each_step_and_the_last_holds_past_them(tiny) -> None:  # noqa: ANN001
    learner = make_learner(tiny, "lora", "maml")
    enc, params = learner.encoder, learner.params
    support, labels, _, _ = episode_tensors(enc, learner.sampler.build(learner.train_specs(0)[0]))

    def adapted(steps: int, rates: list[float] | None) -> dict[str, torch.Tensor]:
        lrs = None
        if rates is not None:
            lrs = {k: torch.tensor(rates).view(-1, *(1,) * p.dim()) for k, p in params.items()}
        out = adapt(
            enc, params, support, labels, 3, steps=steps, lr=0.1, scale=10.0, first_order=True, param_lrs=lrs
        )
        return {k: v.detach() for k, v in out.params.items()}

    one, rated = adapted(1, None), adapted(2, [0.1, 0.0])  # a zero second rate: the second step stays
    for k in params:
        torch.testing.assert_close(rated[k], one[k])
    three, held = adapted(3, [0.1, 0.3]), adapted(3, [0.1, 0.3, 0.3])
    for k in params:
        torch.testing.assert_close(three[k], held[k])
    assert any(not torch.allclose(three[k], adapted(3, [0.1, 0.1])[k]) for k in params)


def test_reptile_pseudo_gradient_is_init_minus_adapted_weights(tiny) -> None:  # noqa: ANN001
    learner = make_learner(tiny, "lora", "reptile", **{"meta.inner_steps": 2, "meta.inner_lr": 0.1})
    enc, spec = learner.encoder, learner.train_specs(0)[0]
    episode = learner.sampler.build(spec)
    grads = flat_grads(learner)

    # Reference by hand: two SGD steps on the support loss (head from prototypes, held fixed
    # while differentiating), with plain autograd on copies of the init.
    support, labels, _, _ = episode_tensors(enc, episode)
    fast = {k: v.detach().clone().requires_grad_() for k, v in learner.params.items()}
    with torch.no_grad():
        w, b = proto_head(enc.embed(fast, support), labels, 3)
    w, b = w.requires_grad_(), b.requires_grad_()
    for _ in range(2):
        loss = F.cross_entropy(head_logits(enc.embed(fast, support), w, b, 10.0), labels)
        gs = torch.autograd.grad(loss, [*fast.values(), w, b])
        with torch.no_grad():
            fast = {
                k: (v - 0.1 * g).requires_grad_() for (k, v), g in zip(fast.items(), gs[:-2], strict=True)
            }
            w, b = (w - 0.1 * gs[-2]).requires_grad_(), (b - 0.1 * gs[-1]).requires_grad_()
    for k, v in learner.params.items():
        torch.testing.assert_close(grads[k], v.detach() - fast[k].detach())


def test_reptile_with_sgd_is_classic_reptile(tiny) -> None:  # noqa: ANN001
    eps = 0.3
    learner = make_learner(
        tiny,
        "bottleneck",
        "reptile",
        **{"meta.outer_optimizer": "sgd", "meta.outer_lr": eps, "meta.meta_batch_size": 2},
    )
    phi0 = {k: v.detach().clone() for k, v in learner.params.items()}
    pseudo = [flat_grads(learner, i) for i in range(2)]  # phi_0 - phi_K,i (pinned above)
    learner.meta_step()
    for k, v in learner.params.items():
        mean_phi_k = phi0[k] - (pseudo[0][k] + pseudo[1][k]) / 2
        torch.testing.assert_close(v.detach(), phi0[k] + eps * (mean_phi_k - phi0[k]))


def test_protonet_trains_on_the_prototypical_loss(tiny) -> None:  # noqa: ANN001
    learner = make_learner(tiny, "prompt", "protonet")
    r = learner._episode(learner.train_specs(0)[0], meta_gradient=True)
    enc, episode = learner.encoder, learner.sampler.build(learner.train_specs(0)[0])
    support, s_labels, query, q_labels = episode_tensors(enc, episode)
    e_s, e_q = enc.embed(learner.params, support), enc.embed(learner.params, query)
    protos = torch.stack([e_s[s_labels == k].mean(0) for k in range(3)])
    sq_dist = (e_q.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)
    loss = F.cross_entropy(-10.0 * sq_dist, q_labels)  # softmax over -s |x - c_k|^2
    assert r.query_loss == pytest.approx(loss.item(), rel=1e-5)
    ref = torch.autograd.grad(loss, list(learner.params.values()))
    for got, want in zip(r.grads.values(), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_episode_observers_see_every_episode_the_learner_adapts(tiny) -> None:  # noqa: ANN001
    """The hook metrics and benchmarks use (`MetaLearner.episode_observers`): each meta-train and
    meta-validation episode, in order, with the result the step itself used and its wall time."""
    learner = make_learner(tiny, "prompt", "protonet")
    seen: list[tuple[Any, Any, float]] = []
    learner.episode_observers.append(lambda spec, result, seconds: seen.append((spec, result, seconds)))
    metrics = learner.meta_step()
    learner.validate()
    assert [spec for spec, _, _ in seen] == learner.train_specs(0) + learner.val_specs()
    train = [r for _, r, _ in seen[: learner.meta_batch_size]]
    assert metrics["meta_loss"] == pytest.approx(sum(r.query_loss for r in train) / len(train))
    assert all(seconds > 0 for _, _, seconds in seen)


# -- methods --------------------------------------------------------------------------------


def test_ia3_default_init_is_the_identity_and_not_a_dead_point(tiny) -> None:  # noqa: ANN001
    learner = make_learner(tiny, "ia3")
    assert all(torch.equal(v, torch.ones_like(v)) for v in learner.params.values())  # meta-init = ones
    enc = learner.encoder
    batch = enc.tokenize(["card lost today", "refund this item"])
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(learner.params, batch), enc.embed(None, batch))
    grads = flat_grads(learner)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_bottleneck_default_is_identity_and_its_meta_init_is_not(tiny) -> None:  # noqa: ANN001
    learner = make_learner(tiny, "bottleneck", **{"meta.inner_steps": 1})
    enc = learner.encoder
    names = sorted(learner.params)
    assert names == sorted(
        f"base_model.encoder.layer.{i}.output.dense.bottleneck.{p}.{t}"
        for i in (0, 1)
        for p in ("down", "up")
        for t in ("weight", "bias")
    )  # ffn_out (Pfeiffer) by default, after the FFN's output projection
    batch = enc.tokenize(["card lost today", "refund this item"])
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(learner.default_init, batch), enc.embed(None, batch))
        assert not torch.allclose(enc.embed(learner.params, batch), enc.embed(None, batch))
    # With the default W_up = 0, the first inner step cannot move W_down (why the meta-init draws it).
    from metapeft_ray.core.meta import adapt

    support, labels, _, _ = episode_tensors(enc, learner.sampler.build(learner.train_specs(0)[0]))
    init = {k: v.clone().requires_grad_() for k, v in learner.default_init.items()}
    out = adapt(enc, init, support, labels, 3, steps=1, lr=0.1, scale=10.0, first_order=True)
    for k in init:
        assert (not torch.equal(out.params[k], init[k])) == (".up." in k), k


def test_houlsby_placement_and_custom_targets(tiny) -> None:  # noqa: ANN001
    both = make_learner(tiny, "bottleneck", **{"peft.placement": "attn_ffn_out", "peft.layers": "top_1"})
    assert {n.split(".bottleneck.")[0] for n in both.params} == {
        "base_model.encoder.layer.1.attention.output.dense",
        "base_model.encoder.layer.1.output.dense",
    }
    ia3 = make_learner(
        tiny, "ia3", **{"peft.placement": "custom", "peft.target_modules": ["key", "output.dense"]}
    )
    shapes = {
        n.split(".ia3_l")[0].removeprefix("base_model.model."): tuple(p.shape) for n, p in ia3.params.items()
    }
    # output.dense of the FFN scales its input (feedforward, 64 wide); attention.output.dense its output
    assert shapes["encoder.layer.0.output.dense"] == (1, 64)
    assert shapes["encoder.layer.0.attention.output.dense"] == (32, 1)
    assert shapes["encoder.layer.0.attention.self.key"] == (32, 1)


def test_prompt_pooling_drops_the_virtual_tokens_and_ignores_padding(tiny) -> None:  # noqa: ANN001
    learner = make_learner(tiny, "prompt")
    enc = learner.encoder
    short = enc.tokenize(["card lost"])
    both = enc.tokenize(["card lost", "how do i top up my card today please"])
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(learner.params, short)[0], enc.embed(learner.params, both)[0])
        hidden = enc.model(**short).last_hidden_state
        assert hidden.shape[1] == short["input_ids"].shape[1] + 4
        ref = F.normalize(hidden[:, 4:].mean(1), dim=-1)
        torch.testing.assert_close(enc.embed(learner.params, short), ref)
        assert not torch.allclose(enc.embed(learner.params, short), enc.embed(None, short))


def test_prefix_reaches_every_layer_keys_and_values(tiny) -> None:  # noqa: ANN001
    """peft's prefix (a DynamicCache) works with BertModel in this transformers: each layer's key
    and value prefix gets a gradient, and padding does not change a sentence's embedding."""
    learner = make_learner(tiny, "prefix")
    enc = learner.encoder
    (g,) = flat_grads(learner).values()
    per_slot = g.view(4, 2 * 2, 2, 16).abs().sum(dim=(0, 2, 3))  # (tokens, layers*2, heads, head_dim)
    assert (per_slot > 0).all(), per_slot
    short = enc.tokenize(["card lost"])
    both = enc.tokenize(["card lost", "how do i top up my card today please"])
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(learner.params, short)[0], enc.embed(learner.params, both)[0])


# -- export round trip ----------------------------------------------------------------------


@pytest.mark.parametrize("method", EXPORT_CASES)
def test_export_loads_back_with_identical_outputs(tiny, method: str, tmp_path: Path) -> None:  # noqa: ANN001
    from transformers import AutoModel

    learner = make_learner(tiny, method, "metasgd")
    learner.meta_step()
    lrs = learner.inner_lrs()
    path = export_adapter(
        learner.encoder,
        tmp_path / "adapter",
        {"config": learner.cfg.to_dict(), "meta_step": 1},
        inner_lrs=lrs,
    )
    enc = learner.encoder
    batch = enc.tokenize(["how do i top up", "card lost"])
    backbone = AutoModel.from_pretrained(tiny[0]).eval()
    if method == "bottleneck":
        from metapeft_ray.core.methods.bottleneck import load_bottleneck

        assert {p.name for p in path.iterdir()} >= {
            "bottleneck_adapter.safetensors",
            "bottleneck_config.json",
        }
        loaded = load_bottleneck(backbone, path)
    else:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(backbone, str(path)).eval()
    with torch.no_grad():
        ours = enc.model(**batch).last_hidden_state
        theirs = loaded(**batch).last_hidden_state
        torch.testing.assert_close(ours, theirs)
        assert not torch.allclose(enc.embed(learner.params, batch), enc.embed(None, batch))

    # ... and our own loader: the same init, the same default init, the same learned rates.
    encoder, default_init, _, _ = load_adapter(str(path))
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.embed(encoder.adapter_params(), batch), enc.embed(learner.params, batch)
        )
    for k, v in learner.default_init.items():
        torch.testing.assert_close(default_init[k], v)
    loaded_lrs = load_inner_lrs(str(path))
    assert loaded_lrs is not None and loaded_lrs.keys() == lrs.keys()
    for k, v in lrs.items():
        torch.testing.assert_close(loaded_lrs[k], v)


def test_checkpoint_round_trip_keeps_the_learned_rates(tiny) -> None:  # noqa: ANN001
    a = make_learner(tiny, "lora", "metasgd", **{"meta.metasgd_outer_lr": 0.5})
    a.meta_step()
    state = a.state_dict()
    assert set(state["extra_meta_params"]) == set(a.extra)
    b = make_learner(tiny, "lora", "metasgd")
    b.load_state_dict(state)
    for k, v in a.meta_params.items():
        assert torch.equal(b.meta_params[k], v)
    with pytest.raises(ValueError, match="another algorithm"):
        make_learner(tiny, "lora", "maml").load_state_dict(state)


# -- config rules ---------------------------------------------------------------------------


def test_each_method_gets_its_default_placement() -> None:
    placements = {m: load_config(None, [f"peft.method={m}"]).peft.placement for m in METHODS}
    assert placements == {
        "lora": "attn_qv",
        "dora": "attn_qv",
        "ia3": "attn_kv_ffn_out",
        "prompt": None,
        "prefix": None,
        "bottleneck": "ffn_out",
    }
    cfg = load_config(None, ["peft.method=bottleneck"])
    assert cfg.with_overrides({"meta.inner_steps": 2}).peft.placement == "ffn_out"  # survives a round trip


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["meta.algorithm=protonet"], "meta.inner_steps=0"),
        (["meta.algorithm=reptile", "meta.inner_steps=0"], "needs meta.inner_steps >= 1"),
        (["meta.algorithm=metasgd", "meta.inner_steps=0"], "needs meta.inner_steps >= 1"),
        (["peft.method=prompt", "peft.layers=top_half"], "peft.layers='top_half' does not apply"),
        (["peft.method=prefix", "peft.placement=attn_qv"], "set peft.placement=null"),
        (["peft.method=bottleneck", "peft.placement=attn_qv"], "use ffn_out .* attn_out .* attn_ffn_out"),
        (["peft.method=ia3", "peft.dropout=0.1"], "applies to lora/dora only"),
        (["peft.method=adapters"], "peft.method"),
    ],
)
def test_impossible_combinations_are_rejected_with_the_fix(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_too_many_virtual_tokens_for_the_positions(tiny) -> None:  # noqa: ANN001
    from metapeft_ray.core.placements import PlacementError

    with pytest.raises(PlacementError, match="max_position_embeddings=64"):
        make_learner(tiny, "prompt", **{"peft.num_virtual_tokens": 60})


# -- the hybrids benchmark (benchmarks/hybrids.py) ----------------------------------------------


def test_hybrids_benchmark_resumes_a_stopped_run_and_refuses_other_settings(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    """A run stopped after one pair leaves its rows; ``--resume`` keeps them (not meta-trained
    again) and runs only the missing pair; a resume under other settings is refused, naming them;
    a finished run of one more dataset adds its columns to the table."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import hybrids

    backbone, data = tiny
    out = tmp_path / "hybrids.md"
    argv = [
        *("--datasets", data, "--n-way", "3", "--shots", "1", "--q-query", "3", "--episodes", "2"),
        *("--meta-steps", "1", "--meta-batch", "1", "--finetune", "--out", str(out), "--set"),
        *(f"model.backbone={backbone}", "data.folds=3", "data.val_fraction=0.4", "model.max_length=16"),
        "peft.rank=4",
    ]
    hybrids.run(hybrids.parse_args(["--combos", "lora:maml", *argv]))  # stopped after its first pair
    partial = hybrids.partial_path(hybrids.parse_args(argv), data)
    first = json.loads(partial.read_text())["rows"]["lora/maml"]["cells"][data]

    with pytest.raises(SystemExit, match="episodes: 2 there, 3 here"):
        hybrids.main(["--combos", "lora:maml,lora:protonet", "--resume", *argv, "--episodes", "3"])
    hybrids.main(["--combos", "lora:maml,lora:protonet", "--resume", *argv])

    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows["lora/maml"]["cells"][data] == first  # kept, not run again
    assert rows["lora/protonet"]["cells"][data]["3w1s"]["episodes"] == 2
    assert list(rows)[:2] == ["proto", "logreg"] and "lora/maml/init" in rows
    assert not partial.exists()
    assert "Wall time of the last sitting (the other rows resumed)" in out.read_text()

    # a later run of another dataset alone adds its columns to that table instead of replacing it
    other = Path(data).with_name("other.jsonl")
    other.write_text(Path(data).read_text())
    hybrids.main(["--combos", "lora:maml", *argv, "--datasets", str(other)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["rows"]["lora/maml"]["cells"][data] == first
    assert saved["rows"]["lora/protonet"]["cells"].keys() == {data}
    both = {data, str(other)}
    assert set(saved["rows"]["lora/maml"]["cells"]) == set(saved["rows"]["logreg"]["cells"]) == both
    assert out.read_text().count(" 3w1s") == 2  # both datasets' columns

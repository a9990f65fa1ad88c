"""The episode head: label names as a prototype prior, a separate inner temperature, learned values."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from metapeft_ray.cli import main
from metapeft_ray.core.config import ConfigError, load_config
from metapeft_ray.core.data import label_text
from metapeft_ray.core.episodes import word_dropout_views
from metapeft_ray.core.export import load_adapter
from metapeft_ray.core.meta import (
    HEAD_PREFIX,
    InnerLoop,
    class_sums,
    episode_tensors,
    head_logits,
    leave_one_out_logits,
    logreg_head,
    proto_head,
    prototype_weights,
    refine_head,
    run_episode,
)
from metapeft_ray.core.train import MetaLearner, inner_loop, prepare_sampler
from tests.tiny import flat_meta_params, make_tiny_backbone, make_tiny_dataset, tiny_overrides


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return str(make_tiny_backbone(root / "bert")), str(make_tiny_dataset(root / "data.jsonl"))


def test_names_join_the_prototypes_as_weighted_examples() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1, 1])
    names = torch.tensor([[0.0, 2.0], [4.0, 0.0]])
    weight, bias = proto_head(emb, labels, 2, names, 0.5)
    protos = torch.stack([(emb[0] + 0.5 * names[0]) / 1.5, (emb[1] + emb[2] + 0.5 * names[1]) / 2.5])
    torch.testing.assert_close(weight, 2 * protos)
    torch.testing.assert_close(bias, -(protos**2).sum(-1))
    assert label_text("card_arrival") == "card arrival" and label_text("pay-bill  now") == "pay bill now"


@pytest.fixture(scope="module")
def learner(tiny: tuple[str, str]) -> MetaLearner:
    overrides = [
        *tiny_overrides(*tiny, **{"episode.k_shot": 1}),
        "head.label_names=true",
        'head.learn=["scale", "inner_scale", "name_weight"]',
        "head.inner_scale=2",
        "head.name_weight=0.5",
    ]
    cfg = load_config(None, overrides)
    return MetaLearner.from_config(cfg, prepare_sampler(cfg))


def test_a_one_shot_support_loss_is_informative_with_names_or_a_low_inner_temperature(learner) -> None:  # noqa: ANN001
    episode = learner.sampler.build(learner.train_specs(0)[0])
    params = learner.params

    def support_loss(**head: Any) -> float:
        inner = InnerLoop(1, 0.1, first_order=True, **head)
        return run_episode(
            learner.encoder, params, episode, inner, meta_gradient=False, track_support_after=False
        ).support_loss_before

    # The tiny model's embeddings are close together; at s = 100 they are as far apart, relative to
    # the temperature, as MiniLM's at s = 10 (DESIGN.md §6).
    plain = support_loss(scale=100.0)
    assert plain < 1e-6  # 1 shot: each support example is its own prototype
    assert support_loss(scale=100.0, inner_scale=1.0) > 0.1
    assert support_loss(scale=100.0, name_weight=1.0) > 100 * plain


def test_learned_head_values_are_meta_parameters_with_nonzero_gradients(learner) -> None:  # noqa: ANN001
    extra = learner.extra
    assert set(extra) == {HEAD_PREFIX + k for k in ("scale", "inner_scale", "name_weight")}
    assert extra[HEAD_PREFIX + "inner_scale"].item() == pytest.approx(math.log(2.0))
    assert extra[HEAD_PREFIX + "name_weight"].item() == pytest.approx(math.log(0.5))
    assert {v.device for v in extra.values()} == {learner.encoder.device}
    on_meta = learner.inner.head_meta_params(["scale"], device=torch.device("meta"))  # as on a GPU
    assert on_meta[HEAD_PREFIX + "scale"].device == torch.device("meta")
    episode = learner.sampler.build(learner.train_specs(0)[0])
    result = learner.algorithm.episode(
        learner.encoder, learner.params, extra, episode, learner.inner, meta_gradient=True
    )
    assert all(result.grads[k].abs().item() > 0 for k in extra), {k: result.grads[k] for k in extra}
    before = {k: v.item() for k, v in extra.items()}
    learner.meta_step()
    assert all(extra[k].item() != before[k] for k in extra)  # the head's own Adam group moved them
    assert set(learner.learned_head()) == {"scale", "inner_scale", "name_weight"}
    # the learned values travel in checkpoints
    state = learner.state_dict()
    assert set(state["extra_meta_params"]) == set(extra)


def test_second_order_gradient_of_the_inner_temperature_matches_finite_differences(tiny) -> None:  # noqa: ANN001
    cfg = load_config(None, [*tiny_overrides(*tiny), 'head.learn=["inner_scale"]', "head.inner_scale=3"])
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    episode = learner.sampler.build(learner.train_specs(0)[0])
    key = HEAD_PREFIX + "inner_scale"

    def loss_at(log_s: float) -> float:
        extra = {key: torch.tensor(log_s)}
        inner = learner.inner.with_learned(extra)
        return run_episode(learner.encoder, learner.params, episode, inner, meta_gradient=False).query_loss

    result = learner.algorithm.episode(
        learner.encoder, learner.params, learner.extra, episode, learner.inner, meta_gradient=True
    )
    x, h = math.log(3.0), 1e-2  # float32 losses: at h = 1e-3 rounding moves the difference by ~5 %
    assert result.grads[key].item() == pytest.approx((loss_at(x + h) - loss_at(x - h)) / (2 * h), rel=0.05)


def test_learned_head_is_exported_and_used_at_meta_test(tiny: tuple[str, str], tmp_path: Path) -> None:
    argv = [
        "train",
        "--local",
        "--quiet",
        "--config",
        "quickstart",
        *tiny_overrides(*tiny, **{"run.output_dir": str(tmp_path), "run.name": "h"}),
        "head.label_names=true",
        'head.learn=["scale", "name_weight"]',
        "head.outer_lr=0.5",
        "head.query_refine=2",
        'eval.methods=["meta", "meta_init", "proto_names", "logreg_names", "logreg", "proto_names_refined"]',
        "eval.query_alpha=0.3",  # unbalanced query batches: some classes of an episode have no query
    ]
    assert main(argv) == 0
    meta = json.loads((tmp_path / "h" / "adapter" / "metapeft.json").read_text())
    learned = meta["learned_head"]
    assert set(learned) == {"scale", "name_weight"} and learned["scale"] != 10.0
    _, _, cfg, _ = load_adapter(str(tmp_path / "h" / "adapter"))
    assert (cfg.head.scale, cfg.head.name_weight) == (learned["scale"], learned["name_weight"])
    report = json.loads((tmp_path / "h" / "report.json").read_text())
    assert report["learned_head"] == learned and report["config"]["head"]["scale"] == learned["scale"]
    methods = ["meta", "meta_init", "proto_names", "logreg_names", "logreg", "proto_names_refined"]
    assert list(report["results"]) == methods


def test_frozen_name_baselines_add_the_name_as_one_example(tiny: tuple[str, str]) -> None:
    from metapeft_ray.core import baselines
    from metapeft_ray.core.model import encoder_from_config

    cfg = load_config(None, tiny_overrides(*tiny))
    encoder = encoder_from_config(cfg)
    sampler = prepare_sampler(cfg)
    episode = sampler.build(sampler.spec("test", seed=0, step=0, index=1, n_way=3, k_shot=1, q_query=3))
    cache = baselines.EmbeddingCache(encoder)
    e_s, e_q, e_n = cache(episode.support_texts), cache(episode.query_texts), cache(episode.name_texts)
    protos = (e_s + e_n) / 2  # 1 shot: support and name weigh the same
    expected = (-torch.cdist(e_q, protos)).argmax(-1) == torch.tensor(episode.query_labels)
    assert baselines.prototype_scorer(cache, label_names=True)(episode) == pytest.approx(
        expected.float().mean().item()
    )
    assert F.cosine_similarity(e_n, e_s).min() < 0.999  # the names are other texts than the support


def test_learning_head_values_with_reptile_or_names_off_is_refused() -> None:
    with pytest.raises(ConfigError, match="meta.algorithm=reptile never takes"):
        load_config(None, ["meta.algorithm=reptile", 'head.learn=["scale"]'])
    with pytest.raises(ConfigError, match="set head.label_names=true"):
        load_config(None, ['head.learn=["name_weight"]'])
    with pytest.raises(ConfigError, match="inner_scale, which acts on the query loss only through"):
        load_config(None, ["meta.first_order=true", 'head.learn=["inner_scale"]'])


def test_meta_init_from_the_cache_equals_the_inner_loop_at_zero_steps(learner) -> None:  # noqa: ANN001
    from metapeft_ray.core import baselines

    cache = baselines.EmbeddingCache(learner.encoder, learner.params)
    for spec in [*learner.val_specs(), *learner.train_specs(0)]:
        episode = learner.sampler.build(spec)
        inner = InnerLoop(0, 0.1, 10.0, first_order=True, name_weight=0.5)
        direct = baselines.adapted_scorer(learner.encoder, learner.params, inner)(episode)
        cached = baselines.prototype_scorer(cache, label_names=True, name_weight=0.5)(episode)
        assert cached == pytest.approx(direct["accuracy"])
    # the meta-learned encoder's logistic regression sees the adapter: not the frozen one's numbers
    frozen = baselines.EmbeddingCache(learner.encoder)
    texts = list(episode.support_texts)
    assert not torch.allclose(cache(texts), frozen(texts))


def test_word_dropout_views_are_seeded_view_major_subsequences() -> None:
    texts = ["how do i top up my card", "card arrival", "hi"]
    views = word_dropout_views(texts, 3, 0.5, seed=7)
    assert views == word_dropout_views(texts, 3, 0.5, seed=7) != word_dropout_views(texts, 3, 0.5, seed=8)
    assert len(views) == 9 and views[7] in ("card arrival", "card", "arrival")  # view-major
    for i, view in enumerate(views):
        words, source = view.split(), texts[i % 3].split()
        assert words and all(w in source for w in words)  # a subsequence, never empty
        assert [w for w in source if w in words] == words
    kept = sum(len(v.split()) for v in views[::3]) / len(texts[0].split())
    assert 0 < kept < 3  # about half the words of the long text survive, over its 3 views


def test_support_views_make_the_one_shot_support_loss_informative_and_adaptation_lowers_it(learner) -> None:  # noqa: ANN001
    episode = learner.sampler.build(learner.train_specs(0)[0])
    inner = InnerLoop(3, 0.005, 100.0, first_order=True)
    clean = run_episode(learner.encoder, learner.params, episode, inner, meta_gradient=False)
    viewed = run_episode(
        learner.encoder, learner.params, episode, replace(inner, views=2, view_drop=0.5), meta_gradient=False
    )
    assert clean.support_loss_before < 1e-6 and viewed.support_loss_before > 1e-3
    assert viewed.support_loss_after < viewed.support_loss_before
    assert viewed.query_accuracy != clean.query_accuracy or viewed.query_loss != clean.query_loss


def test_support_views_reach_the_meta_gradient_through_the_config(tiny) -> None:  # noqa: ANN001
    base = [*tiny_overrides(*tiny, **{"episode.k_shot": 1}), "head.scale=100", "meta.inner_lr=0.005"]
    grads = {}
    for views in (0, 2):
        cfg = load_config(None, [*base, f"head.views={views}"])
        learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
        assert learner.inner.views == views
        episode = learner.sampler.build(learner.train_specs(0)[0])
        r = learner.algorithm.episode(
            learner.encoder, learner.params, learner.extra, episode, learner.inner, meta_gradient=True
        )
        grads[views] = torch.cat([g.reshape(-1) for g in r.grads.values()])
    assert grads[2].isfinite().all() and not torch.allclose(grads[0], grads[2])


def test_leave_one_out_logits_score_each_example_without_itself() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [2.0, 2.0]])
    labels = torch.tensor([0, 1, 1, 0])
    names = torch.tensor([[0.0, 2.0], [4.0, 0.0]])
    logits = leave_one_out_logits(emb, labels, 2, 3.0, names, 0.5)
    for i in range(4):  # brute force: the prototypes of the support without example i
        keep = [j for j in range(4) if j != i]
        weight, bias = proto_head(emb[keep], labels[keep], 2, names, 0.5)
        torch.testing.assert_close(logits[i], 3.0 * (emb[i] @ weight.T + bias))
    # 1 shot with names: each example's own prototype is its class name alone
    one = leave_one_out_logits(emb[:2], labels[:2], 2, 1.0, names, 0.5)
    torch.testing.assert_close(one[0, 0], 2 * emb[0] @ names[0] - names[0] @ names[0])
    with pytest.raises(ValueError, match="k_shot >= 2 or head.label_names=true"):
        leave_one_out_logits(emb[:2], labels[:2], 2, 1.0)


def test_leave_one_out_support_loss_is_informative_at_one_shot_and_adaptation_lowers_it(learner) -> None:  # noqa: ANN001
    episode = learner.sampler.build(learner.train_specs(0)[0])
    inner = InnerLoop(3, 0.005, 100.0, first_order=True, name_weight=1.0)
    loo = replace(inner, leave_one_out=True)
    plain = run_episode(learner.encoder, learner.params, episode, inner, meta_gradient=False)
    r = run_episode(learner.encoder, learner.params, episode, loo, meta_gradient=False)
    assert (
        r.support_loss_before > 10 * plain.support_loss_before
        and r.support_loss_after < r.support_loss_before
    )
    # the init's own head with 0 steps: the same prototypes either way
    no_steps = [
        run_episode(learner.encoder, learner.params, episode, replace(i, steps=0), meta_gradient=False)
        for i in (inner, loo)
    ]
    assert no_steps[0].query_loss == pytest.approx(no_steps[1].query_loss, rel=1e-6)
    # second order: the meta-gradient flows through the adapted prototypes to every adapter tensor
    r = learner.algorithm.episode(
        learner.encoder,
        learner.params,
        learner.extra,
        episode,
        replace(loo, first_order=False),
        meta_gradient=True,
    )
    assert all(g.isfinite().all() and g.abs().sum() > 0 for g in r.grads.values())


def test_leave_one_out_is_a_config_switch_that_refuses_what_cannot_work(tiny) -> None:  # noqa: ANN001
    base = [*tiny_overrides(*tiny, **{"episode.k_shot": 1}), "head.support_loss=leave_one_out"]
    cfg = load_config(None, [*base, "head.label_names=true"])
    assert MetaLearner.from_config(cfg, prepare_sampler(cfg)).inner.leave_one_out
    with pytest.raises(ConfigError, match="set head.label_names=true"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="set head.views=0"):
        load_config(None, [*base, "head.label_names=true", "head.views=2"])


def test_logreg_head_is_scikit_learns_logistic_regression_as_a_linear_head() -> None:
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(0)
    for n_way in (2, 4):
        x = F.normalize(torch.randn(6 * n_way, 8, generator=gen), dim=-1)
        y = torch.arange(n_way).repeat(6)
        names = F.normalize(torch.randn(n_way, 8, generator=gen), dim=-1)
        queries = F.normalize(torch.randn(50, 8, generator=gen), dim=-1)
        # the names as examples of weight 0.5, the head at temperature 4
        weight, bias = logreg_head(x, y, n_way, names, 0.5, scale=4.0)
        assert weight.shape == (n_way, 8) and bias.shape == (n_way,)
        clf = LogisticRegression(C=10.0, max_iter=1000).fit(
            torch.cat([x, names]).double().numpy(),
            torch.cat([y, torch.arange(n_way)]).numpy(),
            sample_weight=[1.0] * len(y) + [0.5] * n_way,
        )
        probs = F.softmax(head_logits(queries, weight, bias, 4.0), -1)
        expected = torch.as_tensor(clf.predict_proba(queries.double().numpy()))
        torch.testing.assert_close(probs.double(), expected)


def test_logreg_test_head_scores_queries_where_no_meta_gradient_goes(learner) -> None:  # noqa: ANN001
    from metapeft_ray.core import baselines
    from metapeft_ray.core.adapt import adapt_to_support, classify
    from metapeft_ray.core.data import LabelledTexts

    episode = learner.sampler.build(learner.train_specs(0)[0])
    proto = InnerLoop(0, 0.005, 100.0, first_order=True, name_weight=0.5)
    logreg = replace(proto, test_head="logreg")
    # 0 steps: the meta_init row of the same episode (the init's encoder, from a cache)
    cache = baselines.EmbeddingCache(learner.encoder, learner.params)
    cached = baselines.logreg_scorer(cache, label_names=True, name_weight=0.5)(episode)
    direct = run_episode(learner.encoder, learner.params, episode, logreg, meta_gradient=False)
    assert direct.query_accuracy == pytest.approx(cached)
    # the head differs from the prototypes' (the tiny model's prototypes and logreg disagree here)
    by_proto = run_episode(learner.encoder, learner.params, episode, proto, meta_gradient=False)
    assert direct.query_loss != pytest.approx(by_proto.query_loss, rel=1e-3)
    # meta-training keeps the differentiable prototype head
    proto, logreg = replace(proto, steps=1), replace(logreg, steps=1)
    r, r_proto = (
        run_episode(learner.encoder, learner.params, episode, inner, meta_gradient=True)
        for inner in (logreg, proto)
    )
    assert r.query_loss == pytest.approx(r_proto.query_loss)
    # `metapeft adapt` and Serve: the adapted task's head is the logistic regression's
    support = LabelledTexts(
        "s", tuple(episode.support_texts), tuple(episode.class_names[i] for i in episode.support_labels)
    )
    task = adapt_to_support(learner.encoder, learner.params, support, logreg)
    predicted = [p["label"] for p in classify(learner.encoder, task, episode.query_texts)]
    expected = [episode.class_names[i] for i in episode.query_labels]
    accuracy = sum(a == b for a, b in zip(predicted, expected, strict=True)) / len(expected)
    adapted = run_episode(learner.encoder, learner.params, episode, logreg, meta_gradient=False)
    assert accuracy == pytest.approx(adapted.query_accuracy)


def test_logreg_test_head_is_a_config_switch(tiny) -> None:  # noqa: ANN001
    cfg = load_config(None, [*tiny_overrides(*tiny), "head.test_head=logreg"])
    assert MetaLearner.from_config(cfg, prepare_sampler(cfg)).inner.test_head == "logreg"
    with pytest.raises(ConfigError, match="head.test_head"):
        load_config(None, [*tiny_overrides(*tiny), "head.test_head=svm"])


def test_refine_head_is_soft_k_means_on_the_queries() -> None:
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    names = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    # class 0's queries lie towards the middle: the first is nearer class 1's prototype (0, 1.33)
    # than class 0's (1, 0.33), until its neighbours pull class 0's prototype towards them
    queries = torch.tensor([[0.45, 0.85], [0.7, 0.8], [0.75, 0.75], [0.8, 0.8], [0.0, 1.5]])
    sums, counts = class_sums(support, labels, 2, names, 0.5)
    torch.testing.assert_close(sums, support + 0.5 * names)
    torch.testing.assert_close(counts, torch.tensor([1.5, 1.5]))
    weight, bias = proto_head(support, labels, 2, names, 0.5)
    assert refine_head(weight, bias, queries, sums, counts, 4.0, 0) == (weight, bias)
    p = F.softmax(head_logits(queries, weight, bias, 4.0), -1)
    protos = (sums + p.T @ queries) / (counts + p.sum(0)).unsqueeze(1)
    once = refine_head(weight, bias, queries, sums, counts, 4.0, 1)
    torch.testing.assert_close(once[0], 2 * protos)
    torch.testing.assert_close(once[1], -(protos**2).sum(-1))
    assert head_logits(queries, weight, bias, 1.0).argmax(-1).tolist() == [1, 0, 0, 0, 1]
    refined = refine_head(weight, bias, queries, sums, counts, 4.0, 10)
    assert head_logits(queries, *refined, 1.0).argmax(-1).tolist() == [0, 0, 0, 0, 1]


@pytest.mark.parametrize("prior", [None, 0.0, 2.0])
def test_query_refinement_is_the_same_in_every_path_and_off_the_meta_gradient(
    learner,  # noqa: ANN001
    prior: float | None,
) -> None:  # noqa: ANN001
    from metapeft_ray.core import baselines
    from metapeft_ray.core.adapt import adapt_to_support, classify
    from metapeft_ray.core.data import LabelledTexts

    episode = learner.sampler.build(learner.train_specs(0)[0])
    plain = InnerLoop(0, 0.05, 3.0, first_order=True, name_weight=0.5)
    refined = replace(plain, query_refine=3, refine_prior=prior)
    r = run_episode(learner.encoder, learner.params, episode, refined, meta_gradient=False)
    # by hand: the init's support, names and queries, the prototypes refined 3 times
    support, labels, query, q_labels = episode_tensors(learner.encoder, episode)
    names = learner.encoder.tokenize(episode.name_texts)
    with torch.no_grad():
        e_s, e_q, e_n = (learner.encoder.embed(learner.params, t) for t in (support, query, names))
    n_way = len(episode.class_names)
    sums = class_sums(e_s, labels, n_way, e_n, 0.5)
    head = refine_head(*proto_head(e_s, labels, n_way, e_n, 0.5), e_q, *sums, 3.0, 3, prior)
    expected = (head_logits(e_q, *head, 1.0).argmax(-1) == q_labels).float().mean().item()
    assert r.query_accuracy == pytest.approx(expected)
    unrefined = run_episode(learner.encoder, learner.params, episode, plain, meta_gradient=False)
    assert r.query_loss != pytest.approx(unrefined.query_loss, rel=1e-4)
    # the frozen-style baseline on the same encoder (a cache of the init) refines the same way
    cache = baselines.EmbeddingCache(learner.encoder, learner.params)
    scorer = baselines.prototype_scorer(
        cache, label_names=True, name_weight=0.5, refine=3, scale=3.0, refine_prior=prior
    )
    assert scorer(episode) == pytest.approx(expected)
    # meta-training differentiates the unrefined head, or with train_refined the refined one: the
    # loss that a (first-order) evaluation of the same adaptation scores
    trained = [
        run_episode(learner.encoder, learner.params, episode, replace(inner, steps=1), meta_gradient=True)
        for inner in (plain, refined, replace(refined, train_refined=True))
    ]
    assert trained[0].query_loss == pytest.approx(trained[1].query_loss)
    evaluated = run_episode(
        learner.encoder, learner.params, episode, replace(refined, steps=1), meta_gradient=False
    )
    assert trained[2].query_loss == pytest.approx(evaluated.query_loss, rel=1e-5)
    assert trained[2].query_loss != pytest.approx(trained[0].query_loss, rel=1e-4)
    assert all(g.abs().sum() > 0 for g in trained[2].grads.values())
    # `metapeft adapt` and Serve refine on the texts classified together
    texts = tuple(episode.support_texts)
    task = adapt_to_support(
        learner.encoder,
        learner.params,
        LabelledTexts("s", texts, tuple(episode.class_names[i] for i in episode.support_labels)),
        refined,
    )
    predicted = [p["label"] for p in classify(learner.encoder, task, episode.query_texts)]
    truth = [episode.class_names[i] for i in episode.query_labels]
    assert sum(a == b for a, b in zip(predicted, truth, strict=True)) / len(truth) == pytest.approx(expected)


def test_the_refinement_with_class_shares_leaves_a_class_the_batch_lacks_at_its_support() -> None:
    # two classes, support at e0 and e1 (one example each); a batch of queries of class 0 only,
    # some of them half-way: plain soft k-means pulls them into class 1's prototype
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    queries = torch.stack([e0] * 6 + [torch.tensor([0.6, 0.4])] * 4)
    sums, counts = torch.stack([e0, e1]), torch.ones(2)
    start = prototype_weights(sums)

    def proto_1(prior: float | None) -> torch.Tensor:
        weight, bias = refine_head(*start, queries, sums, counts, 5.0, 10, prior)
        return weight[1] / 2  # W_k = 2 c_k

    plain, shares = proto_1(None), proto_1(0.0)
    assert (plain - e1).norm() > 0.2 and (shares - e1).norm() < (plain - e1).norm() / 2
    # the estimated shares go into the bias: class 1 is predicted less than by the prototypes alone
    weight, bias = refine_head(*start, queries, sums, counts, 5.0, 10, 0.0)
    assert (head_logits(queries, weight, bias, 5.0).argmax(-1) == 0).all()
    # pseudo-queries of every class (a Dirichlet prior) move the shares toward the even ones of the
    # plain refinement: class 1's prototype lies between, and far more of them give the plain one
    smoothed = proto_1(2.0)
    assert (shares - e1).norm() < (smoothed - e1).norm() < (plain - e1).norm()
    torch.testing.assert_close(proto_1(1e6), plain, atol=1e-3, rtol=0)
    # on a balanced batch the shares stay even and the refinement is the plain one
    balanced = torch.stack([e0, e1] * 5)
    a, b = (refine_head(*start, balanced, sums, counts, 5.0, 10, p) for p in (None, 0.0))
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1] - b[1], (a[1] - b[1])[0].expand(2))


def test_query_refinement_is_a_config_switch_with_its_frozen_baseline(tiny) -> None:  # noqa: ANN001
    cfg = load_config(None, [*tiny_overrides(*tiny), "head.query_refine=4"])
    assert MetaLearner.from_config(cfg, prepare_sampler(cfg)).inner.query_refine == 4
    with pytest.raises(ConfigError, match="head.query_refine=0; set head.query_refine"):
        load_config(None, [*tiny_overrides(*tiny), 'eval.methods=["meta", "proto_names_refined"]'])
    with pytest.raises(ConfigError, match="head.query_refine"):
        load_config(None, [*tiny_overrides(*tiny), "head.query_refine=-1"])
    with pytest.raises(ConfigError, match="head.train_refined=true meta-trains through"):
        load_config(None, [*tiny_overrides(*tiny), "head.train_refined=true"])
    with pytest.raises(ConfigError, match="head.refine_prior=true estimates class shares"):
        load_config(None, [*tiny_overrides(*tiny), "head.refine_prior=true"])
    with pytest.raises(
        ConfigError, match="head.refine_prior_counts=2 smooths .* set head.refine_prior=true"
    ) as err:
        load_config(None, [*tiny_overrides(*tiny), "head.query_refine=3", "head.refine_prior_counts=2"])
    assert "(got" not in str(err.value)  # a rule across the section's keys: no dump of the section
    counts = [*tiny_overrides(*tiny), "head.query_refine=3", "head.refine_prior=true"]
    assert inner_loop(load_config(None, counts)).refine_prior == 0.0
    assert inner_loop(load_config(None, [*counts, "head.refine_prior_counts=1.5"])).refine_prior == 1.5
    assert inner_loop(load_config(None, counts[:-1])).refine_prior is None
    # meta-trained through the refinement with class shares, on unbalanced training and validation
    # batches (episode.query_alpha): a meta-step moves the init, finitely
    cfg = load_config(
        None,
        [
            *tiny_overrides(*tiny),
            *("head.query_refine=2", "head.refine_prior=true", "head.train_refined=true"),
            *("episode.query_alpha=0.5", "meta.first_order=true"),
        ],
    )
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    assert learner.inner.refine_prior == 0.0 and learner.inner.train_refined
    specs = [*learner.train_specs(0), *learner.val_specs()]
    assert {s.query_alpha for s in specs} == {0.5}
    assert len({learner.sampler.build(s).query_labels.count(0) for s in specs}) > 1  # uneven shares
    before = flat_meta_params(learner)
    metrics = learner.meta_step()
    assert math.isfinite(metrics["meta_loss"]) and not torch.equal(flat_meta_params(learner), before)
    cfg = load_config(None, [*tiny_overrides(*tiny), "head.query_refine=2", "head.train_refined=true"])
    assert MetaLearner.from_config(cfg, prepare_sampler(cfg)).inner.train_refined

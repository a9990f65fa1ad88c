"""The ruler: paired statistics, the baselines that really train, cross-dataset meta-test (no Ray)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from metapeft_ray.cli import main
from metapeft_ray.core import baselines
from metapeft_ray.core.config import Config, load_config
from metapeft_ray.core.data import load_dataset
from metapeft_ray.core.episodes import ClassSplits, EpisodeSampler
from metapeft_ray.core.evaluate import markdown_table, meta_test, paired
from metapeft_ray.core.meta import InnerLoop, run_episode
from metapeft_ray.core.model import encoder_from_config, length_batches
from tests.tiny import make_tiny_backbone, make_tiny_dataset, tiny_overrides


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return str(make_tiny_backbone(root / "bert")), str(make_tiny_dataset(root / "data.jsonl"))


def _sampler(dataset: str) -> EpisodeSampler:
    data = load_dataset(dataset)
    return EpisodeSampler(
        data, ClassSplits.make(data.labels, folds=3, fold=0, split_seed=0, val_fraction=0.2)
    )


# -- statistics -----------------------------------------------------------------------------


def test_paired_statistics_match_a_hand_computation() -> None:
    method, reference = [1.0, 0.8, 0.6, 1.0], [0.8, 0.8, 0.4, 0.6]
    # d = [0.2, 0, 0.2, 0.4]: mean 0.2, sd (ddof 1) = sqrt(((0)^2 + 0.2^2 + 0 + 0.2^2) / 3)
    sd = math.sqrt(0.08 / 3)
    got = paired(method, reference)
    assert got["diff"] == pytest.approx(0.2)
    assert got["ci95"] == pytest.approx(1.96 * sd / 2)
    assert got["episodes"] == 4
    # errors: method 1 - 0.85 = 0.15, reference 1 - 0.65 = 0.35 -> 1 - 0.15 / 0.35
    assert got["error_reduction"] == pytest.approx(1 - 0.15 / 0.35)
    # a costly row scored on a prefix is compared on that prefix only
    prefix = paired(method[:2], reference)
    assert (prefix["episodes"], prefix["diff"], prefix["reference_mean"]) == (2, pytest.approx(0.1), 0.8)


def test_meta_test_pairs_every_row_on_the_same_episodes_and_runs_costly_rows_on_a_prefix(
    tiny: tuple[str, str],
) -> None:
    sampler = _sampler(tiny[1])
    seen: dict[str, list[tuple]] = {"logreg": [], "finetune": [], "meta": []}

    def scorer(name: str, value: float):  # noqa: ANN202
        def score(episode) -> float:  # noqa: ANN001
            seen[name].append((episode.spec, episode.support_texts))
            return value if episode.spec.index % 2 else 1.0

        return score

    results = meta_test(
        {"logreg": scorer("logreg", 0.5), "finetune": scorer("finetune", 0.0), "meta": scorer("meta", 0.75)},
        sampler,
        cells=[(3, 1), (2, 2)],
        q_query=2,
        episodes=6,
        costly_episodes=2,
        seed=0,
    )
    assert seen["meta"] == seen["logreg"] and seen["finetune"] == seen["logreg"][:2] + seen["logreg"][6:8]
    assert [r["episodes"] for r in results["finetune"].values()] == [2, 2]
    assert results["meta"]["3w1s"]["per_episode"] == [1.0, 0.75] * 3
    assert results["meta"]["3w1s"]["paired"]["diff"] == pytest.approx(0.125)
    got = dict(results["finetune"]["2w2s"]["paired"])
    assert got.pop("vs") == "logreg" and got == pytest.approx(paired([1.0, 0.0], [1.0, 0.5]))
    assert "paired" not in results["logreg"]["3w1s"]
    md = markdown_table(results, "t")
    assert "| adapter fine-tune from peft default init (Adam) (first 2 episodes) |" in md
    assert "Paired against frozen backbone + logistic regression" in md
    assert "| meta-learned init + adaptation | +12.5 ± " in md


def test_a_meta_test_scored_in_parts_merges_into_the_whole_episode_by_episode(tiny: tuple[str, str]) -> None:
    """Every method, scored in three parts (episode i in part i % 3, the parts merged in reverse
    order), gives the single-process table: the same per-episode values in episode order, the
    same means, CIs, support losses and paired statistics. What `distributed.fan_out_meta_test`
    relies on, here without Ray (tests/test_distributed.py runs it on Ray workers)."""
    from metapeft_ray.core.evaluate import merge_scores
    from metapeft_ray.core.recipes import meta_test_learner
    from metapeft_ray.core.train import MetaLearner, prepare_sampler

    methods = ["meta", "meta_init", "meta_logreg", "proto", "logreg", "proto_names", "logreg_names"]
    methods += ["finetune", "full_finetune"]
    overrides = {
        "eval.methods": methods,
        "eval.n_way": [2, 3],
        "eval.episodes": 5,
        "eval.costly_episodes": 3,
        "eval.finetune.steps": 2,
        "eval.full_finetune.steps": 1,
        "head.label_names": True,
        "head.learn": ["scale"],
        "meta.meta_steps": 1,
    }
    cfg = load_config(None, tiny_overrides(*tiny, **overrides))
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    list(learner.iterate(1, val_every=100))  # a moved init and a learned head value
    whole = merge_scores([meta_test_learner(cfg, learner)], cfg.eval.reference)
    parts = [meta_test_learner(cfg, learner, indices=range(p, 5, 3)) for p in range(3)]
    assert sorted(parts[2]["3w1s"]["meta"]) == [2] and sorted(parts[2]["3w1s"]["finetune"]) == [2]
    merged = merge_scores(parts[::-1], cfg.eval.reference)
    assert list(merged) == methods and list(merged["meta"]) == ["2w1s", "3w1s"]

    def timeless(results: dict) -> dict:
        return {
            m: {c: {k: v for k, v in r.items() if k != "ms_per_task"} for c, r in per.items()}
            for m, per in results.items()
        }

    assert timeless(merged) == timeless(whole)
    assert [whole[m]["3w1s"]["episodes"] for m in ("meta", "finetune", "full_finetune")] == [5, 3, 3]
    # a lost part, or a part merged twice, is an error rather than a smaller table
    with pytest.raises(ValueError, match="not 0..n-1"):
        merge_scores(parts[:2])
    with pytest.raises(ValueError, match="scored twice"):
        merge_scores([*parts, parts[0]])


def test_embedding_cache_with_the_meta_test_texts_gives_each_text_one_embedding(
    encoder_and_episode,  # noqa: ANN001
) -> None:
    """A text's embedding depends on the batch it is padded in; a cache given every text up front
    returns the same tensor for it whichever episodes a process asks for first."""
    encoder, episode = encoder_and_episode
    texts = [*episode.support_texts, *episode.query_texts, "a much longer text than any of the episode texts"]
    first, later = (
        baselines.EmbeddingCache(encoder, texts=texts),
        baselines.EmbeddingCache(encoder, texts=texts),
    )
    ask = list(episode.query_texts)
    later(texts[::-1])  # the queries in one batch with the long text (padded to its length)
    assert torch.equal(first(ask), later(ask))
    with torch.no_grad():
        direct = encoder.embed(None, encoder.tokenize(ask))
    torch.testing.assert_close(first(ask), direct, atol=1e-5, rtol=1e-4)


# -- baselines that train -------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_and_episode(tiny: tuple[str, str]):  # noqa: ANN201
    cfg = load_config(None, tiny_overrides(*tiny))
    torch.manual_seed(0)
    encoder = encoder_from_config(cfg)
    sampler = _sampler(tiny[1])
    episode = sampler.build(sampler.spec("test", seed=0, step=0, index=0, n_way=3, k_shot=2, q_query=3))
    return encoder, episode


def test_adapter_finetune_lowers_the_support_loss_and_moves_the_adapter(encoder_and_episode) -> None:  # noqa: ANN001
    encoder, episode = encoder_and_episode
    default = {k: v.detach().clone() for k, v in encoder.adapter_params().items()}
    assert all(v.abs().sum() == 0 for k, v in default.items() if "lora_B" in k)  # peft's B = 0
    result = run_episode(
        encoder, default, episode, InnerLoop.finetune(20, 1e-2, 10.0), meta_gradient=False, keep_adapted=True
    )
    assert result.support_loss_after < 0.5 * result.support_loss_before
    moved = {k: (result.adapted[k] - v).abs().max().item() for k, v in default.items()}
    assert all(m > 1e-3 for m in moved.values()), moved
    # ...so its queries are not scored by the frozen prototypes any more
    batch = encoder.tokenize(episode.query_texts)
    with torch.no_grad():
        assert not torch.allclose(encoder.embed(result.adapted, batch), encoder.embed(None, batch), atol=1e-4)
    sgd = run_episode(
        encoder,
        default,
        episode,
        InnerLoop(1, 1e-2, 10.0, first_order=True),
        meta_gradient=False,
        keep_adapted=True,
    )
    b = next(k for k in default if "lora_B" in k)
    assert (result.adapted[b] - default[b]).abs().max() > 10 * (sgd.adapted[b] - default[b]).abs().max()


def test_full_finetune_moves_every_backbone_weight_and_leaves_the_module_untouched(
    encoder_and_episode,  # noqa: ANN001
) -> None:
    encoder, episode = encoder_and_episode
    view = encoder.backbone_view()
    weights = view.backbone_params()
    before = {k: v.detach().clone() for k, v in weights.items()}
    assert not set(weights) & set(encoder.adapter_params())
    result = run_episode(
        view, weights, episode, InnerLoop.finetune(3, 1e-3, 10.0), meta_gradient=False, keep_adapted=True
    )
    assert result.support_loss_after < result.support_loss_before
    moved = [k for k in weights if not torch.equal(result.adapted[k], before[k])]
    assert len(moved) == len(weights)
    assert all(torch.equal(v, before[k]) for k, v in view.backbone_params().items())


def test_length_batches_cut_long_texts_from_short_ones() -> None:
    lengths = [10] * 31 + [64]
    batches = length_batches(lengths, 64)
    assert batches == [list(range(31)), [31]]  # 31 * 10 + 64 + 2 passes < 32 * 64 + 1 pass
    assert length_batches([12] * 40, 64) == [list(range(40))]  # equal lengths: one pass
    mixed = [7, 50, 9, 30, 12, 64, 8, 11] * 5
    batches = length_batches(mixed, 8)
    assert sorted(i for b in batches for i in b) == list(range(len(mixed)))
    assert all(len(b) <= 8 for b in batches)
    runs = [[mixed[i] for i in b] for b in batches]
    assert all(r == sorted(r) for r in runs)
    assert all(max(a) <= min(b) for a, b in itertools.pairwise(runs))


def test_embed_texts_gives_each_text_its_own_embedding_in_order(encoder_and_episode) -> None:  # noqa: ANN001
    encoder, episode = encoder_and_episode
    texts = [*episode.query_texts, "a much longer text than the others " * 3, *episode.support_texts]
    params = {k: v.detach() for k, v in encoder.adapter_params().items()}
    together = encoder.embed_texts(params, texts, batch_size=3)
    with torch.no_grad():
        alone = torch.cat([encoder.embed(params, encoder.tokenize([t])) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_embedding_cache_returns_the_frozen_embeddings(encoder_and_episode) -> None:  # noqa: ANN001
    encoder, episode = encoder_and_episode
    cache = baselines.EmbeddingCache(encoder, batch_size=2)
    texts = list(episode.query_texts)
    first = cache(texts)
    with torch.no_grad():
        direct = encoder.embed(None, encoder.tokenize(texts))
    torch.testing.assert_close(first, direct, atol=1e-5, rtol=1e-4)
    assert cache(texts[::-1]).data_ptr() != first.data_ptr()
    torch.testing.assert_close(cache(texts[::-1]), first.flip(0))


# -- cross-dataset meta-test through the real CLI -------------------------------------------


@pytest.fixture(scope="module")
def other_dataset(tiny: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """Another corpus: the tiny texts under new class names (other_00 ... other_11)."""
    rows = [json.loads(line) for line in Path(tiny[1]).read_text().splitlines()]
    path = tmp_path_factory.mktemp("other") / "other.jsonl"
    path.write_text("".join(json.dumps({**r, "label": "other_" + r["label"][6:8]}) + "\n" for r in rows))
    return str(path)


def prototype_accuracies(cfg: Config, n_way: int, k_shot: int) -> list[float]:
    """The ``proto`` row of a meta-test cell, computed here: the cell's episodes rebuilt from their
    specs (as `meta_test` draws them), the frozen backbone's embeddings, and the nearest mean
    support embedding (Euclidean) for each query."""
    from metapeft_ray.core.train import prepare_sampler, prepare_test_sampler

    sampler = prepare_test_sampler(cfg, prepare_sampler(cfg))
    encoder = encoder_from_config(cfg)
    ev = cfg.eval
    specs = sampler.specs(
        "test", ev.episodes, seed=cfg.run.seed, step=0, n_way=n_way, k_shot=k_shot, q_query=ev.q_query
    )
    accuracies = []
    for episode in map(sampler.build, specs):
        with torch.no_grad():
            e_s = encoder.embed(None, encoder.tokenize(episode.support_texts))
            e_q = encoder.embed(None, encoder.tokenize(episode.query_texts))
        y_s, y_q = torch.tensor(episode.support_labels), torch.tensor(episode.query_labels)
        prototypes = torch.stack([e_s[y_s == k].mean(0) for k in range(n_way)])
        accuracies.append((torch.cdist(e_q, prototypes).argmin(-1) == y_q).float().mean().item())
    return accuracies


@pytest.mark.slow  # SetFit trains the real MiniLM
def test_train_meta_tests_on_another_dataset_with_every_baseline(
    tiny: tuple[str, str], other_dataset: str, tmp_path: Path
) -> None:
    methods = ["meta", "meta_init", "proto", "logreg", "finetune", "full_finetune", "setfit"]
    overrides = [
        *tiny_overrides(*tiny, **{"run.output_dir": str(tmp_path), "run.name": "x", "meta.meta_steps": 2}),
        f"eval.dataset={other_dataset}",
        f"eval.methods={json.dumps(methods)}",
        "eval.n_way=[3,4]",
        "eval.episodes=4",
        "eval.costly_episodes=2",
        "eval.finetune.steps=3",
        "eval.full_finetune.steps=2",
    ]
    assert main(["train", "--local", "--quiet", "--config", "quickstart", *overrides]) == 0
    report = json.loads((tmp_path / "x" / "report.json").read_text())
    assert report["protocol"] == "cross-dataset" and report["test_dataset"] == other_dataset
    assert report["test_classes"] == [f"other_{i:02d}" for i in range(12)]
    splits = json.loads((tmp_path / "x" / "splits.json").read_text())
    assert splits["test"] == [] and len(splits["train"]) + len(splits["val"]) == 12  # nothing held out
    results = report["results"]
    assert list(results) == methods
    q_query = 3  # tiny_overrides
    for m in methods:
        assert list(results[m]) == ["3w1s", "4w1s"]
        episodes = 2 if m in ("finetune", "full_finetune", "setfit") else 4
        assert [c["episodes"] for c in results[m].values()] == [episodes, episodes], m
        for n_way, cell in zip((3, 4), results[m].values(), strict=True):
            # an accuracy is a count of right answers among the n_way * q_query queries
            correct = [v * n_way * q_query for v in cell["per_episode"]]
            assert correct == pytest.approx([round(c) for c in correct], abs=1e-5), (m, cell["per_episode"])
            assert cell["mean"] == pytest.approx(sum(cell["per_episode"]) / episodes)
        assert ("paired" in results[m]["3w1s"]) == (m != "logreg")
    # the frozen prototype row equals a nearest-prototype classifier computed here, episode by episode
    cfg = load_config("quickstart", overrides)
    for n_way in (3, 4):
        want = prototype_accuracies(cfg, n_way, 1)
        assert results["proto"][f"{n_way}w1s"]["per_episode"] == pytest.approx(want, abs=1e-6), n_way
    md = (tmp_path / "x" / "report.md").read_text()
    assert (
        "Meta-test (cross-dataset) on" in md
        and "| SetFit (contrastive fine-tune + logistic regression) (first 2" in md
    )


@pytest.mark.slow  # a training run and three evaluations through the CLI
def test_evaluate_an_exported_init_on_named_classes_of_another_dataset(
    tiny: tuple[str, str], other_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "train",
        "--local",
        "--quiet",
        "--config",
        "quickstart",
        *tiny_overrides(*tiny, **{"run.output_dir": str(tmp_path), "run.name": "a", "meta.meta_steps": 1}),
        'eval.methods=["meta","logreg"]',
    ]
    assert main(argv) == 0
    adapter = str(tmp_path / "a" / "adapter")
    out = tmp_path / "eval"
    evaluate = [
        "evaluate",
        "--quiet",
        "--adapter",
        adapter,
        "--out",
        str(out),
        f"eval.dataset={other_dataset}",
    ]
    assert main([*evaluate, 'eval.classes=["other_0*", "other_10"]', "eval.episodes=3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["test_classes"] == [f"other_{i:02d}" for i in range(10)] + ["other_10"]
    assert report["results"]["meta"]["3w1s"]["episodes"] == 3
    # a pattern that matches nothing fails before any model loads, naming the nearest classes
    capsys.readouterr()
    assert main([*evaluate, 'eval.classes=["othr_01"]']) == 2
    err = capsys.readouterr().err
    assert "eval.classes: 'othr_01' matches no class of the data" in err and "other_01" in err
    # a way the other dataset cannot hold is refused the same way
    assert main([*evaluate, "eval.n_way=13"]) == 2
    assert "fewer than n_way=13" in capsys.readouterr().err


# -- pooling reports over folds (benchmarks/accuracy.py) ------------------------------------


def test_accuracy_pools_folds_episode_by_episode_and_pairs_prefixes(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import accuracy

    def report(fold: int, results: dict, cells_from: str = "train") -> str:
        path = tmp_path / f"{cells_from}{fold}.json"
        body = {
            "protocol": "in-domain",
            "test_dataset": "banking77",
            "test_classes": [f"c{fold}"],
            "splits": {"dataset": "banking77", "fold": fold},
            "config": {"run": {"seed": 0}, "eval": {"q_query": 5}},
            "results": {m: {c: {"per_episode": v} for c, v in per.items()} for m, per in results.items()},
        }
        path.write_text(json.dumps(body))
        return str(path)

    reports = [
        report(
            0,
            {
                "logreg": {"5w1s": [0.8, 0.6, 1.0]},
                "meta": {"5w1s": [1.0, 0.8, 1.0]},
                "setfit": {"5w1s": [0.6]},
                "logreg_names": {"5w1s": [1.0, 0.8, 0.8]},
            },
        ),
        report(
            1,
            {
                "logreg": {"5w1s": [0.4, 1.0]},
                "meta": {"5w1s": [0.6, 1.0]},
                "setfit": {"5w1s": [0.2]},
                "logreg_names": {"5w1s": [0.6, 0.8]},
            },
        ),
        report(1, {"logreg": {"20w1s": [0.5]}, "meta": {"20w1s": [0.75]}}, cells_from="evaluate"),
    ]
    rows = {(r["method"], r["n_way"]): r for r in accuracy.pool(reports)}
    meta = rows[("meta", 5)]
    assert (meta["episodes"], meta["folds"], meta["mean"]) == (5, 2, pytest.approx(0.88))
    assert meta["paired_diff_vs_logreg"] == pytest.approx(0.12)  # diffs .2 .2 0 .2 0
    assert meta["error_reduction_vs_logreg"] == pytest.approx(1 - 0.12 / 0.24)
    # a costly row: fold 0's first episode and fold 1's first, against logreg's same two episodes
    setfit = rows[("setfit", 5)]
    assert setfit["episodes"] == 2 and setfit["paired_diff_vs_logreg"] == pytest.approx(-0.2)
    assert setfit["logreg_mean_on_these_episodes"] == pytest.approx(0.6)
    assert rows[("meta", 20)]["folds"] == 1 and "paired_diff_vs_logreg" not in rows[("logreg", 5)]
    # every row is also paired with logistic regression with the label names, where both folds have it
    assert meta["paired_diff_vs_logreg_names"] == pytest.approx(0.08)  # diffs 0 0 .2 0 .2
    assert setfit["paired_diff_vs_logreg_names"] == pytest.approx(-0.4)
    assert "paired_diff_vs_logreg_names" not in rows[("meta", 20)]
    # the recipe is paired with each fine-tuning baseline on that baseline's prefix (meta 1.0 and 0.6
    # against setfit 0.6 and 0.2); only the recipe's row is
    assert meta["paired_diff_vs_setfit"] == pytest.approx(0.4) and meta["paired_episodes_vs_setfit"] == 2
    assert meta["error_reduction_vs_setfit"] == pytest.approx(1 - 0.2 / 0.6)
    assert (
        "paired_episodes_vs_logreg" not in meta and "paired_diff_vs_setfit" not in rows[("logreg_names", 5)]
    )
    summary = "\n".join(accuracy.summary(list(rows.values())))
    assert "| setfit: -20.0 ± " in summary and "(n=2) | +40.0 ± " in summary
    # a method's cell of one fold from two reports: once where the values are the same (a frozen
    # baseline of the same episodes), refused where they differ
    assert json.dumps(accuracy.pool([reports[0], reports[0]])) == json.dumps(accuracy.pool([reports[0]]))
    with pytest.raises(SystemExit, match="already come from"):
        accuracy.pool([reports[0], report(0, {"logreg": {"5w1s": [0.6, 0.8, 0.8]}}, "other")])
    # an adapted row is paired with its own init; PATH:ALIAS keeps another inner loop beside it,
    # with the baselines both reports scored
    logreg = {"logreg": {"5w1s": [0.8, 0.6, 1.0]}}
    probe = report(
        0, {"meta": {"5w1s": [1.0, 1.0, 1.0]}, "meta_init": {"5w1s": [1.0, 0.8, 0.8]}} | logreg, "probe"
    )
    base = report(0, {"meta_init": {"5w1s": [0.8, 0.8, 1.0]}, "meta": {"5w1s": [1.0, 0.8, 1.0]}}, "base")
    rows = {r["method"]: r for r in accuracy.pool([base, f"{probe}:meta_5steps"])}
    assert rows["meta"]["paired_diff_vs_init"] == pytest.approx(0.2 / 3)  # diffs .2 0 0
    assert rows["meta_5steps"]["paired_diff_vs_init"] == pytest.approx(0.4 / 3)  # diffs 0 .2 .2
    assert "paired_diff_vs_init" not in rows["meta_5steps_init"]
    assert rows["meta"]["paired_diff_vs_logreg"] == pytest.approx(0.4 / 3)  # logreg from the aliased report
    # an aliased report's other rows that differ (e.g. a baseline at another learned temperature)
    # are left out, not refused: it was given for its renamed rows
    other = report(0, {"meta": {"5w1s": [0.0, 0.0, 1.0]}, "logreg": {"5w1s": [0.0, 0.0, 0.0]}}, "other")
    rows = {r["method"]: r for r in accuracy.pool([base, f"{probe}:meta_5steps", f"{other}:meta_x"])}
    assert rows["logreg"]["mean"] == pytest.approx(0.8) and rows["meta_x"]["mean"] == pytest.approx(1 / 3)


def test_accuracy_table_is_an_input_to_the_next_table(tmp_path: Path) -> None:
    """A later run adds its cells to a written table without the runs behind it: the JSON keeps
    every fold's per-episode values, and a table from before that keeps its rows."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import accuracy

    def report(name: str, fold: int, results: dict) -> str:
        body = {
            "test_classes": ["a", "b"],
            "splits": {"dataset": "hwu64", "fold": fold},
            "config": {"run": {"seed": 0}, "eval": {"q_query": 5}},
            "results": {m: {c: {"per_episode": v} for c, v in per.items()} for m, per in results.items()},
        }
        (path := tmp_path / f"{name}.json").write_text(json.dumps(body))
        return str(path)

    one = report("f0", 0, {"logreg": {"5w1s": [0.6, 0.8]}, "meta": {"5w1s": [1.0, 0.8]}})
    two = report("f1", 1, {"logreg": {"5w1s": [0.4, 1.0]}, "meta": {"5w1s": [0.6, 1.0]}})
    folds, carried = accuracy.gather([one])
    legacy_row = {"protocol": "in-domain", "dataset": "hwu64", "n_way": 20, "k_shot": 1, "method": "meta"}
    (old := tmp_path / "old.json").write_text(json.dumps({"cells": [legacy_row]}))
    (table := tmp_path / "table.json").write_text(
        json.dumps({"cells": accuracy.table(folds, carried), "folds": accuracy.kept(folds)})
    )
    rows = {(r["method"], r["n_way"]): r for r in accuracy.pool([str(table), two, str(old)])}
    # fold 0 from the table, fold 1 from its report: pooled and paired as if both were reports
    assert rows == {(r["method"], r["n_way"]): r for r in accuracy.pool([one, two, str(old)])}
    assert rows[("meta", 5)]["folds"] == 2 and rows[("meta", 5)]["paired_diff_vs_logreg"] == pytest.approx(
        0.15
    )
    assert rows[("meta", 20)] == legacy_row  # carried as it was
    twenty = report("f2", 2, {"meta": {"20w1s": [0.5]}})
    with pytest.raises(SystemExit, match="cannot be pooled"):  # a legacy row's cell from a report
        accuracy.pool([str(old), twenty])
    # ... unless the reports replace it: then theirs is the row, the other carried rows stay
    other = {**legacy_row, "method": "meta_5steps"}
    (old2 := tmp_path / "old2.json").write_text(json.dumps({"cells": [legacy_row, other]}))
    replaced = accuracy.table(*accuracy.gather([str(old2), twenty]), replace=True)
    assert other in replaced and legacy_row not in replaced
    assert [r["episodes"] for r in replaced if r["method"] == "meta"] == [1]
    assert accuracy.pool([str(table), one]) == accuracy.pool([one])  # a table's fold given again
    rerun = report("f0b", 0, {"meta": {"5w1s": [0.6, 0.6]}})
    with pytest.raises(SystemExit, match="already come from"):  # other values of a cell are refused
        accuracy.pool([str(table), rerun])
    # ... unless a re-run replaces them: the later input's values are the fold's
    again = {
        (r["method"], r["n_way"]): r
        for r in accuracy.table(*accuracy.gather([str(table), rerun], replace=True))
    }
    assert again[("meta", 5)]["mean"] == pytest.approx(0.6) and again[("logreg", 5)]["mean"] == pytest.approx(
        0.7
    )
    # a table that holds both (kept folds and a carried row) keeps both when it is read back
    folds, carried = accuracy.gather([one, str(old)])
    (both := tmp_path / "both.json").write_text(
        json.dumps({"cells": accuracy.table(folds, carried), "folds": accuracy.kept(folds)})
    )
    assert accuracy.gather([str(both)])[1] == [legacy_row]
    assert {(r["method"], r["n_way"]): r for r in accuracy.pool([str(both), two])} == rows


def test_paired_compares_two_reports_of_the_same_episodes_row_by_row(tmp_path: Path) -> None:
    """benchmarks/paired.py: two meta-tests of one init (another head, another inner loop) on the
    same episodes, each row against each reference, per cell."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import accuracy
    import paired as paired_script

    def report(name: str, results: dict, classes: tuple[str, ...] = ("a", "b"), alpha: float = 0) -> str:
        body = {
            "test_classes": list(classes),
            "splits": {"dataset": "hwu64", "fold": 0},
            "config": {"run": {"seed": 0}, "eval": {"q_query": 5, "query_alpha": alpha}},
            "results": {m: {c: {"per_episode": v} for c, v in per.items()} for m, per in results.items()},
        }
        (path := tmp_path / f"{name}.json").write_text(json.dumps(body))
        return str(path)

    base = report(
        "protos", {"meta": {"5w5s": [0.8, 0.8, 1.0, 0.6]}, "logreg": {"5w5s": [0.8, 0.6, 1.0, 0.6]}}
    )
    other = report(
        "lr", {"meta": {"5w5s": [1.0, 0.8, 1.0, 0.8]}, "meta_init": {"5w5s": [1.0, 0.8, 0.8, 0.8]}}
    )
    folds, _ = accuracy.gather([base, f"{other}:lrhead"])
    pairs = [("lrhead", "meta"), ("lrhead", "logreg"), ("lrhead", "lrhead_init"), ("lrhead", "setfit")]
    (entry,) = paired_script.compare(folds, pairs)
    assert entry["cell"] == "5w5s" and set(entry["rows"]) == {"meta", "logreg", "lrhead", "lrhead_init"}
    assert set(entry["pairs"]) == {"lrhead:meta", "lrhead:logreg", "lrhead:lrhead_init"}  # no setfit row
    assert entry["pairs"]["lrhead:meta"]["diff"] == pytest.approx(0.1)  # diffs .2 0 0 .2
    assert entry["pairs"]["lrhead:logreg"]["error_reduction"] == pytest.approx(1 - 0.1 / 0.25)
    assert entry["pairs"]["lrhead:lrhead_init"]["diff"] == pytest.approx(0.05)
    assert "lrhead − meta | +10.0 ± " in paired_script.markdown([entry])
    # the accuracy table keeps the values: a row of it pairs with a new report the same way
    (table := tmp_path / "table.json").write_text(json.dumps({"cells": [], "folds": accuracy.kept(folds)}))
    assert paired_script.compare(accuracy.gather([str(table)])[0], pairs) == [entry]
    assert paired_script.compare(folds, [("meta", "setfit")]) == []  # a cell without a pair is left out
    with pytest.raises(SystemExit, match="other episodes"):  # other test classes: other episodes
        accuracy.gather([base, report("elsewhere", {"meta": {"5w5s": [1.0]}}, ("c", "d"))])
    # unbalanced query batches (eval.query_alpha) are other episodes of the same classes: a table of
    # their own, under a protocol that names them, never merged into the balanced one
    uneven = report("uneven", {"meta": {"5w5s": [0.6, 1.0]}, "logreg": {"5w5s": [0.4, 1.0]}}, alpha=2)
    tables = paired_script.compare(accuracy.gather([base, uneven])[0], [("meta", "logreg")])
    assert [(e["protocol"], e["pairs"]["meta:logreg"]["diff"]) for e in tables] == [
        ("in-domain", pytest.approx(0.05)),
        ("in-domain, queries Dirichlet(2)", pytest.approx(0.1)),
    ]

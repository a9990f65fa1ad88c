"""Config, data, episodes, export and the real CLI recipe on a tiny model (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from metapeft_ray.cli import main
from metapeft_ray.core.config import PACKAGED_CONFIGS, ConfigError, load_config
from metapeft_ray.core.data import DataError, LabelledTexts, load_dataset
from metapeft_ray.core.episodes import ClassSplits, EpisodeSampler, check_labels
from metapeft_ray.core.evaluate import meta_test_specs
from tests.tiny import make_tiny_backbone, make_tiny_dataset, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return str(make_tiny_backbone(root / "bert")), str(make_tiny_dataset(root / "data.jsonl"))


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(PACKAGED_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_validates_and_names_its_command(path: Path) -> None:
    load_config(path)
    assert path.read_text().startswith("# metapeft "), "a shipped config starts with its launch command"


def test_the_transductive_recipe_is_the_recipe_with_the_refined_head() -> None:
    """configs/fewshot_transductive.yaml repeats configs/fewshot.yaml: only the refinement, the
    run's name and the meta-test cells and rows may differ, so the two recipes cannot drift."""
    recipe, transductive = (load_config(name).model_dump() for name in ("fewshot", "fewshot_transductive"))
    assert (transductive["head"]["query_refine"], transductive["head"]["train_refined"]) == (10, True)
    assert "proto_names_refined" in transductive["eval"]["methods"]
    for section, keys in {"head": ("query_refine", "train_refined"), "run": ("name",)}.items():
        for key in keys:
            recipe[section].pop(key), transductive[section].pop(key)
    for key in ("n_way", "shots", "methods"):
        recipe["eval"].pop(key), transductive["eval"].pop(key)
    assert transductive == recipe


def test_config_errors_are_all_listed_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta: {inner_stepz: 3, outer_lr: fast}\npeft: {rank: 0}\nbogus: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, ["data.fold=9"])
    msg = str(err.value)
    for needle in (
        "meta.inner_stepz: unknown key",
        "meta.outer_lr",
        "'fast'",
        "peft.rank",
        "bogus: unknown key",
        "data.fold=9 is out of range",
    ):
        assert needle in msg


def test_dotted_overrides_are_typed_and_checked() -> None:
    cfg = load_config("quickstart", ["meta.inner_steps=3", "eval.shots=[1,2]", "meta.first_order=true"])
    assert (cfg.meta.inner_steps, cfg.eval.shots, cfg.meta.first_order) == (3, [1, 2], True)
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["meta.inner_steps"])
    with pytest.raises(ConfigError, match="not found; give a path or one of: .*quickstart"):
        load_config("no_such_config")


# -- data -----------------------------------------------------------------------------------


def test_packaged_benchmarks_load_offline() -> None:
    sizes = {name: len(set(load_dataset(name).labels)) for name in ("banking77", "hwu64", "clinc150")}
    assert sizes == {"banking77": 77, "hwu64": 64, "clinc150": 150}


def test_local_files_in_all_formats(tmp_path: Path) -> None:
    (tmp_path / "a.tsv").write_text('text\tlabel\n"two\nlines"\tx\nplain\ty\n')
    (tmp_path / "a.csv").write_text('sentence,intent\n"hello, world",x\n')
    (tmp_path / "a.jsonl").write_text('{"text": "hi", "label": "x"}\n')
    assert load_dataset(str(tmp_path / "a.tsv")).texts == ("two\nlines", "plain")
    assert load_dataset(str(tmp_path / "a.csv"), "sentence", "intent").labels == ("x",)
    assert load_dataset(str(tmp_path / "a.jsonl")).texts == ("hi",)


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        ("", "empty.csv", "no rows"),
        ("text,category\nhi,x\n", "cols.csv", r"missing column\(s\) \['label'\].*data.label_column"),
        ("text,label\n,x\n", "blank.csv", "row 1 has an empty"),
        ('{"text": "hi", "label"', "broken.jsonl", "cannot read it"),
        ("x", "data.parquet", "expected .jsonl, .csv or .tsv"),
    ],
)
def test_bad_data_files_get_clear_errors(tmp_path: Path, content: str, name: str, match: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        load_dataset(str(tmp_path / name))


def test_missing_path_and_clashing_class_names() -> None:
    with pytest.raises(DataError, match="no such file, and not a packaged dataset"):
        load_dataset("/nonexistent/data.csv")
    with pytest.raises(DataError, match="'Card Lost' / 'card  lost'"):
        check_labels(LabelledTexts("t", ("a", "b"), ("Card Lost", "card  lost")))


# -- splits and episodes --------------------------------------------------------------------


def test_class_splits_are_disjoint_and_folds_cover_every_class_once() -> None:
    classes = [f"c{i}" for i in range(77)]
    tested: list[str] = []
    for fold in range(5):
        s = ClassSplits.make(classes, folds=5, fold=fold, split_seed=3, val_fraction=0.2)
        assert not (set(s.train) & set(s.val) or set(s.train) & set(s.test) or set(s.val) & set(s.test))
        assert len(s.train) + len(s.val) + len(s.test) == 77
        tested += s.test
    assert sorted(tested) == sorted(classes)
    assert (
        ClassSplits.make(classes, folds=5, fold=0, split_seed=4, val_fraction=0.2).test
        != ClassSplits.make(classes, folds=5, fold=0, split_seed=3, val_fraction=0.2).test
    )


def test_an_episode_spec_rebuilds_the_identical_episode_in_another_process() -> None:
    code = (
        "import json,sys; from dataclasses import asdict\n"
        "from metapeft_ray.core.data import load_dataset\n"
        "from metapeft_ray.core.episodes import ClassSplits, EpisodeSampler, EpisodeSpec\n"
        "d = load_dataset('banking77')\n"
        "s = EpisodeSampler(d, ClassSplits.make(d.labels, folds=5, fold=1, split_seed=0, val_fraction=0.2))\n"
        "e = s.build(EpisodeSpec(**json.loads(sys.argv[1])))\n"
        "print(json.dumps([e.class_names, e.support_texts, e.query_labels]))\n"
    )
    data = load_dataset("banking77")
    sampler = EpisodeSampler(
        data, ClassSplits.make(data.labels, folds=5, fold=1, split_seed=0, val_fraction=0.2)
    )
    spec = sampler.spec("train", seed=7, step=11, index=2, n_way=5, k_shot=2, q_query=3, query_alpha=0.5)
    from dataclasses import asdict

    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(spec))],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    ep = sampler.build(spec)
    assert json.loads(out.stdout) == json.loads(
        json.dumps([ep.class_names, ep.support_texts, ep.query_labels])
    )
    assert set(ep.class_names) <= set(sampler.splits.train)
    assert (
        sampler.build(spec) == ep
        and sampler.build(sampler.spec("train", seed=7, step=11, index=3, n_way=5, k_shot=2, q_query=3)) != ep
    )


def test_unbalanced_query_batches_split_the_same_queries_unevenly_among_the_classes() -> None:
    data = load_dataset("banking77")
    sampler = EpisodeSampler(
        data, ClassSplits.make(data.labels, folds=3, fold=0, split_seed=0, val_fraction=0)
    )
    label_of = dict(zip(data.texts, data.labels, strict=True))
    balanced = meta_test_specs(sampler, cells=[(5, 1)], q_query=6, episodes=30, seed=0)["5w1s"]
    uneven = meta_test_specs(sampler, cells=[(5, 1)], q_query=6, episodes=30, seed=0, query_alpha=0.5)["5w1s"]
    assert {s.query_alpha for s in balanced} == {0.0} and {s.query_alpha for s in uneven} == {0.5}
    counts = []
    for spec in balanced + uneven:
        ep = sampler.build(spec)
        assert ep.support_labels == tuple(range(5)) and len(ep.query_texts) == 30  # k per class; n x q
        assert all(
            label_of[t] == ep.class_names[y] for t, y in zip(ep.query_texts, ep.query_labels, strict=True)
        )
        assert not set(ep.query_texts) & set(ep.support_texts) and sampler.build(spec) == ep
        counts.append(sorted(Counter(ep.query_labels).get(y, 0) for y in range(5)))
    assert counts[:30] == [[6] * 5] * 30  # balanced: q_query of each class, as before the switch
    assert sum(c[0] == 0 for c in counts[30:]) >= 5 and max(c[-1] for c in counts[30:]) >= 15
    with pytest.raises(ConfigError, match="eval.query_alpha"):
        load_config("quickstart", ["eval.query_alpha=-1"])


def test_impossible_episode_shapes_are_rejected_before_any_work(tiny: tuple[str, str]) -> None:
    with pytest.raises(ConfigError) as err:
        main_checked(["check", *tiny_overrides(*tiny, **{"episode.n_way": 9, "eval.shots": "[10]"})])
    msg = str(err.value)
    assert "fewer than n_way=9" in msg and "k_shot + q_query = 13 exceeds the examples of class(es)" in msg
    assert "class_04_exchange (12)" in msg


def main_checked(argv: list[str]) -> None:
    """Run the CLI's command function directly so the exception itself can be inspected."""
    from metapeft_ray.cli import build_parser

    args = build_parser().parse_args(argv)
    args.func(args)


def test_the_maths_layer_does_not_import_ray() -> None:
    code = (
        "import sys; import metapeft_ray.core.recipes, metapeft_ray.cli, metapeft_ray.core.adapt; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- the real CLI recipe, export round trip, adapt ------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    argv = [
        "train",
        "--local",
        "--quiet",
        "--config",
        "quickstart",
        *tiny_overrides(*tiny),
        f"run.output_dir={out}",
        "run.name=tiny",
    ]
    assert main(argv) == 0
    return out / "tiny"


def test_recipe_writes_every_artifact_with_the_pinned_losses(trained: Path) -> None:
    names = {p.name for p in trained.iterdir()}
    assert {"config.yaml", "splits.json", "metrics.jsonl", "adapter", "report.json", "report.md"} <= names
    assert {"adapter_config.json", "adapter_model.safetensors", "metapeft.json"} <= {
        p.name for p in (trained / "adapter").iterdir()
    }
    steps = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [s["meta_step"] for s in steps] == [1, 2, 3]
    assert "meta_val_accuracy" in steps[1] and "meta_val_accuracy" in steps[2]
    # Fixed seed, tiny model: these are the values this code computes; a change in the maths shows here.
    losses = [s["meta_loss"] for s in steps]
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-3), losses
    report = json.loads((trained / "report.json").read_text())
    assert list(report["results"]) == ["meta", "meta_init", "proto", "logreg", "finetune"]
    assert report["results"]["meta"]["3w1s"]["episodes"] == 3
    assert report["splits"]["test"] and not set(report["splits"]["test"]) & set(report["splits"]["train"])
    assert "| frozen backbone + prototypes |" in (trained / "report.md").read_text()


PINNED_LOSSES = [0.907470, 0.979837, 0.712992]


def test_exported_init_loads_with_peft_from_pretrained_and_gives_identical_outputs(
    trained: Path, tiny: tuple[str, str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from metapeft_ray.core.export import load_adapter

    encoder, default_init, _, meta = load_adapter(str(trained / "adapter"))
    assert meta["meta_step"] == 3 and "splits" in meta
    peft_model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(tiny[0]), str(trained / "adapter")
    ).eval()
    batch = AutoTokenizer.from_pretrained(tiny[0])(
        ["how do i top up", "card lost"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        ours = encoder.model(**batch).last_hidden_state
        theirs = peft_model(**batch).last_hidden_state
        base = encoder.embed(None, dict(batch))
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(encoder.embed(encoder.adapter_params(), dict(batch)), base)
    assert all(v.abs().sum() == 0 for k, v in default_init.items() if "lora_B" in k)


@pytest.mark.slow  # the CLI in a subprocess, then the same adaptation twice here
def test_adapt_command_classifies_stdin_lines(trained: Path, tiny: tuple[str, str], tmp_path: Path) -> None:
    support = tmp_path / "support.jsonl"
    support.write_text(
        "".join(
            json.dumps({"text": t, "label": y}) + "\n"
            for t, y in [
                ("my card is lost", "lost"),
                ("lost card again", "lost"),
                ("refund for item", "refund"),
                ("i want a refund", "refund"),
            ]
        )
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "metapeft_ray.cli",
            "adapt",
            "--adapter",
            str(trained / "adapter"),
            "--support",
            str(support),
            "--steps",
            "3",
            "head.query_refine=2",  # an override of the init's config: the two texts refine together
        ],
        input="card lost today\nrefund this item please\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    preds = [json.loads(line) for line in out.stdout.splitlines()]
    queries = ["card lost today", "refund this item please"]
    assert [p["text"] for p in preds] == queries
    assert [p["label"] for p in preds] == ["lost", "refund"]
    # The same adaptation in this process, from the exported init: --steps 3 (the config says 2)
    # at the config's inner lr and head, the override applied, as `metapeft adapt` documents it.
    from metapeft_ray.core.adapt import adapt_and_predict
    from metapeft_ray.core.export import load_adapter
    from metapeft_ray.core.train import inner_loop

    encoder, _, cfg, _ = load_adapter(str(trained / "adapter"))
    assert cfg.meta.inner_steps == 2 and cfg.head.query_refine == 0

    def predict(steps: int, refine: int = 2) -> list[dict]:
        support_set = load_dataset(str(support))
        inner = inner_loop(cfg.with_overrides({"head.query_refine": refine}), steps)
        return list(adapt_and_predict(encoder, encoder.adapter_params(), support_set, queries, inner))

    want = predict(3)
    assert [p["label"] for p in want] == [p["label"] for p in preds]
    assert [p["confidence"] for p in preds] == pytest.approx([p["confidence"] for p in want], abs=1e-4)
    # ... which the number of steps and the override change, so the comparison tells them apart
    for other in (predict(2), predict(3, refine=0)):
        assert [p["confidence"] for p in other] != pytest.approx([p["confidence"] for p in want], abs=1e-4)


def test_cli_reports_config_errors_in_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--local", "peft.rank=-1", "meta.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "invalid config, 2 problem(s)" in err and "meta.nope: unknown key" in err


def test_ranks_are_dealt_the_meta_batch_by_cost_so_they_finish_together() -> None:
    from metapeft_ray.core.episodes import Episode
    from metapeft_ray.core.train import shard

    specs = list("abcdefg")
    cost = {"a": 5, "b": 4, "c": 3, "d": 3, "e": 3, "f": 1, "g": 1}.__getitem__
    shares = [shard(specs, r, 2, cost) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == specs  # every episode once, on one rank
    # longest first to the least-loaded rank: 10 / 10 where the round-robin deal gives 12 / 8
    assert [sum(map(cost, s)) for s in shares] == [10, 10]
    assert [sum(map(cost, specs[r::2])) for r in range(2)] == [12, 8]
    assert shard(specs, 0, 1, cost) == specs
    assert [shard(specs, r, 3, lambda _: 1) for r in range(3)] == [specs[r::3] for r in range(3)]
    # the cost a meta-step deals by: each batch is padded to its longest text
    episode = Episode(None, ("x", "y"), ("ab", "abcd"), (0, 1), ("a", "b", "c"), (0, 1, 1))  # type: ignore[arg-type]
    assert episode.padded_chars == 2 * 4 + 3 * 1


def test_a_meta_batch_that_leaves_workers_idle_is_refused_or_warned(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from metapeft_ray.on_ray.distributed import check_meta_batch

    with pytest.raises(
        ValueError, match="meta_batch_size=2 is smaller than distributed.workers .--workers.=3"
    ):
        check_meta_batch(2, 3)
    check_meta_batch(6, 3)
    assert capsys.readouterr().err == ""
    check_meta_batch(5, 2, "tune.trial_workers")
    assert "not a multiple of tune.trial_workers=2" in capsys.readouterr().err

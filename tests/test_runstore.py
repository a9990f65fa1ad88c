"""The run store (`metapeft_ray.core.runstore`, no Ray): checkpoints load with ``weights_only=True``
and resume bit-for-bit for every algorithm and both outer optimisers; a stored run's
changed-config, finished and exported checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from metapeft_ray.core import runstore
from metapeft_ray.core.config import ConfigError, load_config
from metapeft_ray.core.train import BEST_VAL_ACCURACY, MetaLearner, prepare_sampler
from tests.tiny import make_tiny_backbone, make_tiny_dataset, tiny_overrides


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return str(make_tiny_backbone(root / "bert")), str(make_tiny_dataset(root / "data.jsonl"))


# Every algorithm, both outer optimisers, and every kind of extra meta-parameter in the
# optimiser's state (Meta-SGD's log rates, learned head values: their own param groups).
CASES = {
    "maml+head": {"meta.algorithm": "maml", "head.learn": ["scale"]},
    "metasgd+head": {  # first order, one step: cheap enough for the fast tier
        "meta.algorithm": "metasgd",
        "head.learn": ["scale"],
        "meta.first_order": True,
        "meta.inner_steps": 1,
    },
    "reptile+sgd": {"meta.algorithm": "reptile", "meta.outer_optimizer": "sgd", "meta.inner_steps": 1},
    "protonet": {"meta.algorithm": "protonet", "meta.inner_steps": 0, "meta.first_order": True},
}


def _learner(tiny: tuple[str, str], overrides: dict[str, Any]) -> MetaLearner:
    cfg = load_config(None, tiny_overrides(*tiny, **overrides))
    return MetaLearner.from_config(cfg, prepare_sampler(cfg))


@pytest.mark.parametrize(
    "case",
    # the fast tier: an SGD and an Adam state with two extra param groups; the rest is `slow`
    [pytest.param(c, marks=() if c in ("metasgd+head", "reptile+sgd") else pytest.mark.slow) for c in CASES],
)
def test_checkpoint_loads_weights_only_and_resumes_bit_for_bit(tiny, case: str, tmp_path: Path) -> None:  # noqa: ANN001
    a = _learner(tiny, CASES[case])
    history = [a.meta_step() for _ in range(2)]
    runstore.save_state(tmp_path, {**a.state_dict(), "history": history, "world_size": 1})
    state = runstore.load_state(tmp_path)  # weights_only=True, map_location="cpu"
    assert state["history"] == history and state["world_size"] == 1
    b = _learner(tiny, CASES[case])
    b.load_state_dict(state)
    assert b.step == a.step == 2
    assert b.optimizer.state_dict()["param_groups"] == a.optimizer.state_dict()["param_groups"]
    # the optimiser's moments came back too: the next step is the same step
    assert b.meta_step() == a.meta_step()
    for k, v in a.meta_params.items():
        assert torch.equal(b.meta_params[k], v), k


def test_a_checkpoint_written_before_the_run_store_still_loads(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    """The Tune trial used to write ``torch.save(learner.state_dict(), <dir>/state.pt)`` itself."""
    a = _learner(tiny, CASES["metasgd+head"])
    a.meta_step()
    torch.save(a.state_dict(), tmp_path / "state.pt")
    b = _learner(tiny, CASES["metasgd+head"])
    b.load_state_dict(runstore.load_state(str(tmp_path)))
    assert b.meta_step() == a.meta_step()


def test_load_state_refuses_pickled_objects(tmp_path: Path) -> None:
    torch.save({"meta_step": 1, "bad": object()}, tmp_path / runstore.STATE_FILE)
    with pytest.raises(Exception, match="Weights only load failed"):
        runstore.load_state(tmp_path)


def test_changed_config_finished_and_exported_checks(tmp_path: Path) -> None:
    cfg = load_config("quickstart", [f"run.output_dir={tmp_path}", "run.name=r", "meta.meta_steps=4"])
    uri = runstore.run_uri(cfg)
    assert uri == str(tmp_path / "r")
    runstore.check_resumable(cfg, uri)  # nothing stored yet
    assert runstore.finished_training(cfg, uri) is None

    Path(uri).mkdir()
    (Path(uri) / runstore.CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))  # YAML reads JSON
    runstore.check_resumable(cfg.with_overrides({"meta.meta_steps": 9, "eval.episodes": 7}), uri)
    # a run that ran out of memory resumes with activation checkpointing (the same maths)
    runstore.check_resumable(cfg.with_overrides({"model.activation_checkpointing": True}), uri)
    with pytest.raises(ConfigError, match=r"different config \(meta.outer_lr: .* -> 0.5\).*new run.name"):
        runstore.check_resumable(cfg.with_overrides({"meta.outer_lr": 0.5}), uri)
    # a run stored before a key existed resumes when the key keeps its default, not when it is set
    older = cfg.to_dict()
    del older["head"]["refine_prior"]
    (Path(uri) / runstore.CONFIG_FILE).write_text(json.dumps(older))
    runstore.check_resumable(cfg, uri)
    with pytest.raises(ConfigError, match=r"head.refine_prior: False -> True"):
        runstore.check_resumable(cfg.with_overrides({"head.query_refine": 3, "head.refine_prior": True}), uri)
    (Path(uri) / runstore.CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))

    runstore.write_record(uri, {"meta_step": 4, "checkpoint": runstore.checkpoint_name(4)})
    assert runstore.read_record(uri) == {"meta_step": 4, "checkpoint": "checkpoint_000004"}
    assert runstore.finished_training(cfg.with_overrides({"meta.meta_steps": 5}), uri) is None  # resumes
    with pytest.raises(ConfigError, match="already trained to meta-step 4 > meta.meta_steps=3"):
        runstore.finished_training(cfg.with_overrides({"meta.meta_steps": 3}), uri)
    assert runstore.finished_training(cfg, uri)["meta_step"] == 4

    assert runstore.exported_report(uri, 4) is None  # not exported yet
    (Path(uri) / runstore.REPORT_JSON).write_text(json.dumps({"meta_step": 4, "results": {}}))
    (Path(uri) / runstore.ADAPTER_DIR).mkdir()
    (Path(uri) / runstore.ADAPTER_DIR / "metapeft.json").write_text(json.dumps({"meta_step": 3}))
    assert runstore.exported_report(uri, 4) is None  # the adapter is older
    (Path(uri) / runstore.ADAPTER_DIR / "metapeft.json").write_text(json.dumps({"meta_step": 4}))
    assert runstore.exported_report(uri, 4) == {"meta_step": 4, "results": {}}


def test_metrics_file_is_rewritten_from_a_history_and_appended(tmp_path: Path) -> None:
    runstore.write_metrics(tmp_path, [{"meta_step": 1, "meta_loss": 0.5}])
    runstore.append_metrics(tmp_path, {"meta_step": 2, "meta_loss": 0.25})
    lines = (tmp_path / runstore.METRICS_FILE).read_text().splitlines()
    assert [json.loads(x)["meta_step"] for x in lines] == [1, 2]
    runstore.write_metrics(tmp_path)
    assert not (tmp_path / runstore.METRICS_FILE).exists()


def test_local_run_checkpoints_resumes_after_a_crash_and_is_not_retrained(  # noqa: ANN001
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local path drives the same loop as Ray Train: checkpoints every
    ``meta.checkpoint_every`` steps, the newest two kept; a rerun after a crash resumes at the
    step after the last checkpoint and ends where an uninterrupted run ends."""
    from metapeft_ray.core.recipes import train_local

    def cfg(name: str, **extra: Any):  # noqa: ANN202
        over = {"meta.meta_steps": 5, "meta.checkpoint_every": 2, "eval.episodes": 1, **extra}
        where = [f"run.output_dir={tmp_path}", f"run.name={name}"]
        return load_config(None, [*tiny_overrides(*tiny, **over), *where])

    reference = train_local(cfg("straight"), progress=False)
    straight = runstore.load_state(runstore.latest_checkpoint(str(tmp_path / "straight")))
    assert runstore.list_checkpoints(str(tmp_path / "straight")) == ["checkpoint_000004", "checkpoint_000005"]

    real_step, steps_run, crash = MetaLearner.meta_step, [], [True]

    def watched_step(self: MetaLearner, **kw: Any) -> dict[str, float]:
        if crash[0] and self.step == 3:  # the 4th meta-step, after the checkpoint of step 2
            raise RuntimeError("node lost")
        steps_run.append(self.step + 1)
        return real_step(self, **kw)

    monkeypatch.setattr(MetaLearner, "meta_step", watched_step)
    with pytest.raises(RuntimeError, match="node lost"):
        train_local(cfg("crashed"), progress=False)
    assert runstore.latest_checkpoint(str(tmp_path / "crashed")).endswith("checkpoint_000002")
    crash[0] = False
    steps_run.clear()
    report = train_local(cfg("crashed"), progress=False)
    assert steps_run == [3, 4, 5]  # resumed after the checkpoint of step 2, not from 0
    resumed = runstore.load_state(runstore.latest_checkpoint(str(tmp_path / "crashed")))

    def untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in m.items() if k != "adapt_ms"} for m in history]  # wall time

    def scores(report: dict[str, Any]) -> dict[str, Any]:
        return {m: {c: r["per_episode"] for c, r in cells.items()} for m, cells in report["results"].items()}

    assert untimed(resumed["history"]) == untimed(straight["history"])
    for k, v in straight["adapter"].items():
        assert torch.equal(resumed["adapter"][k], v), k
    lines = (tmp_path / "crashed" / runstore.METRICS_FILE).read_text().splitlines()
    assert [json.loads(x)["meta_step"] for x in lines] == [1, 2, 3, 4, 5]
    assert scores(report) == scores(reference)

    # Finished: a rerun trains nothing and returns the stored report.
    steps_run.clear()
    assert scores(train_local(cfg("crashed"), progress=False)) == scores(report)
    assert steps_run == []
    with pytest.raises(ConfigError, match="meta.outer_lr"):
        train_local(cfg("crashed", **{"meta.outer_lr": 0.5}), progress=False)


def _scripted_validation(monkeypatch: pytest.MonkeyPatch, accuracies: dict[int, float]) -> None:
    """Validation that reports ``accuracies[step]`` (the real one on a tiny model is all ties)."""

    def validate(self: MetaLearner, **kw: Any) -> dict[str, float]:
        return {"meta_val_accuracy": accuracies[self.step]}

    monkeypatch.setattr(MetaLearner, "validate", validate)


def test_the_best_validation_is_kept_through_a_checkpoint(  # noqa: ANN001
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``meta.keep: best``: the learner remembers the meta-parameters (adapter and extra) of its
    best validation, a checkpoint carries them, and `keep_best` loads them — not the last ones."""
    _scripted_validation(monkeypatch, {1: 0.5, 2: 0.9, 3: 0.9, 4: 0.7})
    a = _learner(tiny, CASES["metasgd+head"])
    seen, reported = {}, []
    for metrics in a.iterate(4, val_every=1):
        seen[a.step] = {k: v.detach().clone() for k, v in a.meta_params.items()}
        reported.append(a.reported(metrics))
    # each checkpoint's report carries the best validation so far (a Tune search ranks by it)
    assert [r[BEST_VAL_ACCURACY] for r in reported] == [0.5, 0.9, 0.9, 0.9]
    assert reported[-1]["meta_val_accuracy"] == 0.7 and reported[-1]["trainable_params"] > 0
    runstore.save_state(tmp_path, {**a.state_dict(), "history": [], "world_size": 1})
    b = _learner(tiny, CASES["metasgd+head"])
    b.load_state_dict(runstore.load_state(tmp_path))
    assert b.keep_best() == {"meta_step": 2, "meta_val_accuracy": 0.9}  # the earliest of equals
    assert a.extra and all(torch.equal(b.meta_params[k], v) for k, v in seen[2].items())
    assert not all(torch.equal(b.meta_params[k], v) for k, v in seen[4].items())
    assert b.step == 4  # the step (and the optimiser) stay the last: exported, not trained on


def test_a_local_run_stops_early_and_exports_its_best_validation(  # noqa: ANN001
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``meta.patience=2``: training ends two validations after the best (step 4 of 9; a step
    past it would find no scripted accuracy), the run counts as finished, and ``meta.keep=best``
    exports the best validation's meta-parameters."""
    from metapeft_ray.core.export import load_adapter
    from metapeft_ray.core.recipes import train_local

    _scripted_validation(monkeypatch, {1: 0.4, 2: 0.8, 3: 0.6, 4: 0.8})
    over = {"meta.meta_steps": 9, "meta.val_every": 1, "meta.checkpoint_every": 5, "eval.episodes": 1}
    over |= {"meta.keep": "best", "meta.patience": 2}
    cfg = load_config(None, [*tiny_overrides(*tiny, **over), f"run.output_dir={tmp_path}", "run.name=r"])
    report = train_local(cfg, progress=False)
    assert report["kept"] == {"meta_step": 2, "meta_val_accuracy": 0.8} and report["meta_step"] == 4
    record = runstore.read_record(str(tmp_path / "r"))
    assert record["stopped_early"] and record["checkpoint"] == runstore.checkpoint_name(4)
    assert runstore.list_checkpoints(str(tmp_path / "r"))[-1] == runstore.checkpoint_name(4)
    assert train_local(cfg, progress=False)["kept"] == report["kept"]  # finished: not trained on
    adapter = tmp_path / "r" / runstore.ADAPTER_DIR
    metadata = json.loads((adapter / "metapeft.json").read_text())
    assert metadata["kept"]["meta_step"] == metadata["metrics"]["meta_step"] == 2
    best = runstore.load_state(runstore.latest_checkpoint(str(tmp_path / "r")))["best"]["adapter"]
    exported = load_adapter(str(adapter), {})[0].adapter_params()
    assert best.keys() == exported.keys()
    assert all(torch.allclose(exported[k].cpu(), v) for k, v in best.items())

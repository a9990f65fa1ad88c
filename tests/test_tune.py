"""A small Tune search on the session's local Ray: Optuna + ASHA, a rejected trial, resume
(from the checkpoint, not from step 0), distributed trials (really 2 ranks), the best init
loading with PeftModel.from_pretrained and scoring its reported meta-val accuracy again, and a
stopped trial trained on by the summary in a Ray task, not on the driver."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metapeft_ray.core import runstore
from metapeft_ray.core.config import Config, ConfigError, load_config
from metapeft_ray.core.export import load_adapter
from metapeft_ray.core.space import base_point, load_space, trial_config
from metapeft_ray.on_ray.tune import pareto_front
from tests.conftest import S3_BUCKET
from tests.s3server import S3Server
from tests.tiny import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]

# Sequential grid: deterministic. 5-6 does not exist in the 2-layer tiny model (rejected); an
# inner rate of 20 diverges, a weak trial that ASHA stops once a good one has set the rung.
SPACE = """
search:
  peft.layers: {choice: ["all", "5-6"]}
  meta.inner_lr: {choice: [0.1, 20.0]}
tune: {searcher: grid, scheduler: asha, grace_period: 1, reduction_factor: 2, max_concurrent: 1,
       trial_cpus: 1}
"""


def _base(tiny_backbone: str, tiny_dataset: str, out: Path, **extra: object):  # noqa: ANN202
    over = {"meta.meta_steps": 4, "meta.val_every": 1, "run.output_dir": str(out), "run.name": "t", **extra}
    return load_config("quickstart", tiny_overrides(tiny_backbone, tiny_dataset, **over))


def meta_val_accuracy(config: Path, adapter: Path) -> float:
    """The meta-validation accuracy of an exported init, recomputed here from its files: the
    config's learner with the exported adapter weights, on the same validation episodes (one
    thread, as in a trial, so the float sums run in the same order)."""
    from metapeft_ray.core.export import load_adapter
    from metapeft_ray.core.train import MetaLearner, prepare_sampler

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(config)
        learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
        encoder, *_ = load_adapter(str(adapter))
        exported = encoder.adapter_params()
        assert exported.keys() == learner.params.keys()
        with torch.no_grad():
            for name, value in exported.items():
                learner.params[name].copy_(value)
        return learner.validate()["meta_val_accuracy"]
    finally:
        torch.set_num_threads(threads)


def train_on_here(cfg: Config, trial_dir: Path, step: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """What the search's export did on its driver before issue 14: the trial's checkpoint of
    ``step`` trained on in this process to ``meta.meta_steps`` (one thread, as the task has).
    Returns the adapter init and the metrics of the steps taken."""
    from metapeft_ray.core.train import MetaLearner, prepare_sampler

    states = [runstore.load_state(p.parent) for p in trial_dir.glob("checkpoint_*/state.pt")]
    [state] = [s for s in states if s["meta_step"] == step]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
        learner.load_state_dict(state)
        history = list(learner.iterate(cfg.meta.meta_steps, val_every=cfg.meta.val_every))
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach() for k, v in learner.params.items()}, history


def test_space_files_are_checked_against_the_config_tree(tmp_path: Path) -> None:
    bad = tmp_path / "space.yaml"
    bad.write_text(
        "search:\n  peft.rnk: {choice: [2]}\n  meta.inner_lr: {uniform: [0.1, 0.2], choice: [1]}\n"
    )
    with pytest.raises(ConfigError, match="exactly one of"):
        load_space(bad, load_config("quickstart"))
    bad.write_text("search:\n  peft.rnk: {choice: [2]}\n  meta.inner_steps: {choice: [many]}\n")
    with pytest.raises(ConfigError) as err:
        load_space(bad, load_config("quickstart"))
    assert "search.peft.rnk" in str(err.value) and "search.meta.inner_steps" in str(err.value)
    assert "did you mean peft.rank?" in str(err.value)
    assert load_space("default", load_config("quickstart")).tune.searcher == "optuna"
    bad.write_text("search:\n  peft.rank: {choice: [4, 8]}\n")  # a method's option, of another method
    with pytest.raises(ConfigError, match=r"search.peft.rank: .*applies to lora/dora only, not to .*=ia3"):
        load_space(bad, load_config("quickstart", ["peft.method=ia3"]))


def test_a_trial_leaves_out_the_options_its_method_does_not_take() -> None:
    base = load_config("quickstart", ["peft.rank=8"])
    assert trial_config(base, {"peft.method": "lora", "peft.rank": 4}).peft.rank == 4
    ia3 = trial_config(base, {"peft.method": "ia3", "peft.rank": 4, "meta.inner_lr": 0.1})
    assert (ia3.peft.method, ia3.peft.rank, ia3.meta.inner_lr) == ("ia3", 8, 0.1)


def test_the_base_config_starts_the_search_only_if_it_lies_in_the_space(tmp_path: Path) -> None:
    base = load_config("quickstart", ["peft.rank=8", "meta.inner_lr=0.05"])
    space = tmp_path / "space.yaml"
    space.write_text("search:\n  peft.rank: {choice: [4, 8]}\n  meta.inner_lr: {loguniform: [0.01, 0.1]}\n")
    assert base_point(base, load_space(space, base)) == {"peft.rank": 8, "meta.inner_lr": 0.05}
    space.write_text("search:\n  peft.rank: {choice: [4, 8]}\n  meta.inner_lr: {uniform: [0.1, 0.3]}\n")
    assert base_point(base, load_space(space, base)) is None


def test_pareto_front_keeps_only_undominated_trials() -> None:
    rows = [
        {"trial": "a", "status": "ok", "meta_val_accuracy": 0.9, "trainable_params": 100},
        {"trial": "b", "status": "ok", "meta_val_accuracy": 0.8, "trainable_params": 50},
        {"trial": "c", "status": "ok", "meta_val_accuracy": 0.7, "trainable_params": 100},
        {"trial": "d", "status": "rejected", "meta_val_accuracy": 0.0, "trainable_params": 1},
    ]
    assert [r["trial"] for r in pareto_front(rows, "trainable_params")] == ["a", "b"]


def test_with_keep_best_the_summary_ranks_trials_by_their_best_validation() -> None:
    """``meta.keep: best`` exports each trial's best validation, so the summary ranks trials (and
    picks the best) by the best validation each reported, not by its last."""
    from metapeft_ray.core.train import BEST_VAL_ACCURACY
    from metapeft_ray.on_ray.tune import OBJECTIVE, _rows

    def result(trial: str, last: float, best: float) -> SimpleNamespace:
        m = {"trial_id": trial, "meta_step": 4, "status": "ok", OBJECTIVE: last, BEST_VAL_ACCURACY: best}
        return SimpleNamespace(metrics=m, config={"peft.rank": 4}, error=None, path=None)

    grid = [result("a", 0.7, 0.9), result("b", 0.8, 0.8)]
    rejected = SimpleNamespace(
        metrics={"status": "rejected", OBJECTIVE: 0.0}, config={"peft.rank": 4}, error=None, path="x"
    )
    assert [r[OBJECTIVE] for r in _rows([*grid, rejected], 4, ["peft.rank"])] == [0.7, 0.8, 0.0]
    best_rows = _rows([*grid, rejected], 4, ["peft.rank"], BEST_VAL_ACCURACY)
    assert [(r["trial"], r[OBJECTIVE], r["status"]) for r in best_rows] == [
        ("trial_a", 0.9, "ok"),
        ("trial_b", 0.8, "ok"),
        ("x", 0.0, "rejected"),
    ]


def test_a_stopped_trial_releases_its_gauges(  # noqa: ANN001
    tiny_backbone, tiny_dataset, tmp_path, monkeypatch
) -> None:
    """Tune stops a trial by raising SystemExit in its report and may then reuse its actor for
    the next trial: the trial's gauges must leave Ray's gauge refresh (`metrics.release`) however
    it ends. Without Ray: the Tune session calls are replaced, and metrics go to a recorder."""
    from ray import tune as ray_tune

    from metapeft_ray.core import metrics
    from metapeft_ray.on_ray import tune
    from tests.test_metrics import _Recorded

    backend = _Recorded()
    monkeypatch.setattr(metrics, "_backend", lambda: backend)
    context = SimpleNamespace(
        get_trial_name=lambda: "trial_x",
        get_trial_resources=lambda: SimpleNamespace(required_resources={"CPU": 1}),
    )
    monkeypatch.setattr(ray_tune, "get_context", lambda: context)
    monkeypatch.setattr(ray_tune, "get_checkpoint", lambda: None)

    reports: list[object] = []

    def stop(*args: object, **kwargs: object) -> None:  # the second report: ASHA stops the trial
        reports.append(args)
        if len(reports) == 2:
            assert backend._last, "the trial set no gauge before it was stopped"
            raise SystemExit(0)  # what Tune's report does in a trial it stops

    monkeypatch.setattr(ray_tune, "report", stop)
    base = _base(tiny_backbone, tiny_dataset, tmp_path)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit):
            tune.trial({}, base=base.to_dict())
    finally:
        torch.set_num_threads(threads)  # a trial sets its own
    assert backend._last == {}
    backend.sets.clear()
    backend.refresh_once()
    assert backend.sets == []


def test_a_distributed_trial_names_its_metrics_after_the_trial(  # noqa: ANN001
    tiny_backbone, tiny_dataset, tmp_path, monkeypatch
) -> None:
    """A trial that is a distributed run hands its trainer a config named after the trial, so
    its workers and its failure counter tag their live metrics ``run=<trial name>`` (as a
    single-process trial's are), while the Train run stays in ``<trial>/train``. Without Ray: the
    Tune context and the trainer are replaced."""
    from ray import tune as ray_tune
    from ray.tune.integration import ray_train

    from metapeft_ray.core import metrics
    from metapeft_ray.core.config import validate_config
    from metapeft_ray.on_ray import distributed, tune

    monkeypatch.setattr(ray_tune, "get_context", lambda: SimpleNamespace(get_trial_name=lambda: "trial_x"))
    monkeypatch.setattr(ray_train, "TuneReportCallback", lambda: "relay")  # needs a Tune session
    monkeypatch.setattr(distributed, "cluster_view", lambda: distributed.ClusterView({"CPU": 4.0}))
    fits: list[tuple] = []
    monkeypatch.setattr(distributed, "fit", lambda cfg, *a, **kw: fits.append((cfg, kw)))
    base = _base(tiny_backbone, tiny_dataset, tmp_path)
    tune.trial({}, base=base.to_dict(), workers=2)
    [(cfg, kw)] = fits
    # what train_loop_per_worker and the failure counter tag with, from the config they are given
    assert metrics.tags_for(validate_config(cfg.to_dict()), 1)["run"] == "trial_x"
    assert metrics.tags_for(cfg, "driver")["run"] == "trial_x"
    assert (cfg.run.output_dir, kw["storage_name"]) == (str(tmp_path / "t-tune" / "trial_x"), "train")
    assert cfg.distributed.workers == 2 and cfg.meta.checkpoint_every == cfg.meta.val_every
    assert kw["callbacks"] == ["relay"]


@pytest.mark.ray
@pytest.mark.slow
def test_search_rejects_stops_early_and_exports_the_best(
    ray_cluster: dict[str, str],
    tiny_backbone: str,
    tiny_dataset: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peft import PeftModel
    from transformers import AutoModel

    from metapeft_ray.on_ray.distributed import TEST_PID_DIR_ENV
    from metapeft_ray.on_ray.tune import run_search

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    pid_dir = tmp_path / "pids"  # the training on publishes its PID there after each step
    pid_dir.mkdir()
    monkeypatch.setenv(TEST_PID_DIR_ENV, str(pid_dir))
    # The base config is the diverging grid point (inner lr 20): ASHA stops it, the summary trains
    # it on to the full budget and meta-tests it beside the best.
    base = _base(tiny_backbone, tiny_dataset, tmp_path, **{"meta.inner_lr": 20.0})
    report = run_search(base, str(space), progress=False)
    statuses = [t["status"] for t in report["trials"]]
    assert len(statuses) == 4
    rejected = [t for t in report["trials"] if t["status"] == "rejected"]
    assert rejected and all("this model has layers 0..1" in t["reason"] for t in rejected)
    assert "stopped early" in statuses, statuses
    best = report["best"]
    assert best["peft.layers"] == "all" and best["meta_step"] == 4
    # the best is the finished trial with the highest meta-val accuracy, and its exported init
    # scores exactly that accuracy again on the meta-val episodes
    finished = [t for t in report["trials"] if t["status"] in ("ok", "stopped early")]
    row = next(t for t in report["trials"] if t["trial"] == best["trial"])
    assert best["meta_val_accuracy"] == row["meta_val_accuracy"]
    assert row["meta_val_accuracy"] == max(t["meta_val_accuracy"] for t in finished)
    summary = tmp_path / "t-tune" / "summary"
    recomputed = meta_val_accuracy(summary / "best.yaml", summary / "best" / "adapter")
    assert recomputed == pytest.approx(best["meta_val_accuracy"], abs=1e-9)
    base_trial = report["base_trial"]
    assert base_trial["meta.inner_lr"] == 20.0 and base_trial["peft.layers"] == "all"
    assert base_trial["stopped_early_at"] < base_trial["meta_step"] == 4
    # It was trained on in a Ray task, not in this (the driver's) process: one PID per step taken.
    stopped = base_trial["stopped_early_at"]
    pids = {
        int(re.match(r"train-on-step(\d+)-", p.name)[1]): int(p.read_text())
        for p in pid_dir.glob("train-on-step*.pid")
    }
    assert sorted(pids) == list(range(stopped + 1, 5)), sorted(pids)
    assert len(set(pids.values())) == 1 and os.getpid() not in pids.values(), pids
    # ... with the numbers the training on in this process gives, from the same checkpoint
    [trial_dir] = summary.parent.glob(f"{base_trial['trial']}_*")
    trained_here, history = train_on_here(base, trial_dir, stopped)
    assert base_trial["meta_val_accuracy"] == history[-1]["meta_val_accuracy"]
    encoder, *_ = load_adapter(str(summary / "base" / "adapter"))
    exported = encoder.adapter_params()
    assert exported.keys() == trained_here.keys()
    for name, value in trained_here.items():
        torch.testing.assert_close(exported[name].detach().cpu(), value, equal_nan=True)
    assert set(base_trial["meta_test"]) == {"meta", "meta_init", "proto", "logreg", "finetune"}
    assert set(best["meta_test"]) == {"meta", "meta_init", "proto", "logreg", "finetune"}
    assert "best trial against the base config" in (summary / "report.md").read_text()
    assert {"best.yaml", "report.md", "report.json", "accuracy_vs_params.png", "base"} <= {
        p.name for p in summary.iterdir()
    }
    assert load_config(summary / "best.yaml").peft.layers == "all"
    PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_backbone), str(summary / "best" / "adapter"))


def checkpoint_steps(exp: Path) -> dict[str, set[int]]:
    """``{directory under the experiment: meta-steps of the checkpoints in it}``: a single-process
    trial's Tune checkpoints (``<trial dir>/checkpoint_*/state.pt``) and a distributed trial's
    Train checkpoints (``trial_<id>/train/checkpoint_*/state.pt``)."""
    steps: dict[str, set[int]] = {}
    for path in exp.glob("*/**/checkpoint_*/state.pt"):
        try:
            state = runstore.load_state(path.parent)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            continue  # a checkpoint the interrupt cut short: nothing can resume from it
        steps.setdefault(path.relative_to(exp).parts[0], set()).add(int(state["meta_step"]))
    return steps


def processed_results(exp: Path, n: int) -> bool:
    """Whether some trial's result log (written by the Tune driver) holds ``n`` results."""
    for log in exp.glob("*/result.json"):
        if sum(1 for line in log.read_text().splitlines() if line.strip()) >= n:
            return True
    return False


def logged_steps(result_json: Path) -> set[int]:
    """The meta-steps of the results a trial's Tune result log holds."""
    lines = result_json.read_text().splitlines()
    return {int(json.loads(line)["meta_step"]) for line in lines if line.strip()}


def first_step_after_resume(result_json: Path) -> tuple[str, int]:
    """``(trial id, meta_step of the trial's first report since it was last (re)started)``, from
    the trial's Tune result log: ``iterations_since_restore`` is 1 on the first report of every
    start of the trial, and a resumed trial appends to the log it had."""
    rows = [json.loads(line) for line in result_json.read_text().splitlines() if line.strip()]
    last_start = [r for r in rows if r["iterations_since_restore"] == 1][-1]
    return rows[0]["trial_id"], int(last_start["meta_step"])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "steps", "val_every"), [(1, 40, 1), (2, 12, 3)], ids=["single-process", "distributed"]
)
def test_an_interrupted_search_resumes(
    ray_cluster: dict[str, str],
    tiny_backbone: str,
    tiny_dataset: str,
    tmp_path: Path,
    workers: int,
    steps: int,
    val_every: int,
) -> None:
    """Ctrl-C, then --resume: a single-process trial continues from its Tune checkpoint, a
    distributed one's Train run from its own checkpoints beside the trial; neither from step 0."""
    space = tmp_path / "space.yaml"
    space.write_text(
        "search:\n  meta.inner_lr: {loguniform: [0.01, 0.1]}\n"
        f"tune: {{num_samples: 2, searcher: optuna, scheduler: none, trial_workers: {workers}}}\n"
    )
    over = tiny_overrides(
        tiny_backbone,
        tiny_dataset,
        # long enough that Ctrl-C lands while the first trial is still running
        **{
            "meta.meta_steps": steps,
            "meta.val_every": val_every,
            "run.output_dir": str(tmp_path),
            "run.name": "r",
        },
    )
    cmd = [
        sys.executable,
        "-m",
        "metapeft_ray.cli",
        "tune",
        "--config",
        "quickstart",
        "--space",
        str(space),
        "--address",
        ray_cluster["address"],
        "--quiet",
        *over,
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    exp = tmp_path / "r-tune"
    deadline = time.monotonic() + 240

    # Ctrl-C once there is a checkpoint to resume from: for a single-process trial one Tune has
    # registered (the driver has logged two results of a trial), for a distributed one a Train
    # checkpoint on disk.
    def resumable() -> bool:
        return processed_results(exp, 2) if workers == 1 else bool(list(exp.glob("**/checkpoint_0*")))

    while not resumable() and time.monotonic() < deadline:
        assert first.poll() is None, first.stdout.read()
        time.sleep(1)
    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and exits
    assert first.wait(timeout=120) == 130, first.stdout.read()
    assert not (exp / "summary" / "report.json").exists()
    at_interrupt = checkpoint_steps(exp)
    if workers == 1:
        # A Tune checkpoint is resumable once registered with its result, which the driver logs;
        # one written just before Ctrl-C but never processed is not. (A distributed trial resumes
        # from its Train run's own checkpoints, whichever are on disk.)
        logged = {log.parent.name: logged_steps(log) for log in exp.glob("*/result.json")}
        at_interrupt = {d: s & logged.get(d, set()) for d, s in at_interrupt.items()}

    done = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((exp / "summary" / "report.json").read_text())
    assert [t["status"] for t in report["trials"]] == ["ok", "ok"]
    assert all(t["meta_step"] == steps for t in report["trials"])
    # A trial that was checkpointed but unfinished at the interrupt reports next the step after
    # one of those checkpoints (a report every val_every steps), not the first steps again.
    resumed = 0
    for result_json in exp.glob("*/result.json"):
        trial_id, first_step = first_step_after_resume(result_json)
        own = [s for d, s in at_interrupt.items() if re.fullmatch(rf"trial_{re.escape(trial_id)}(_.*)?", d)]
        before = set().union(*own)
        if not before or max(before) >= steps:
            continue  # not checkpointed yet, or already finished, when Ctrl-C came
        assert first_step - val_every in before, (trial_id, first_step, sorted(before))
        resumed += 1
    assert resumed >= 1, at_interrupt


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_can_itself_be_a_distributed_run_on_s3(
    ray_cluster: dict[str, str], tiny_backbone: str, tiny_dataset: str, tmp_path: Path, s3_env: S3Server
) -> None:
    """Trials that are 2-worker TorchTrainers (their checkpoints say they ran as 2 ranks), the
    experiment and the summary all on S3."""
    from metapeft_ray.on_ray.tune import run_search

    space = tmp_path / "space.yaml"
    space.write_text(SPACE.replace("trial_cpus: 1", "trial_cpus: 1, trial_workers: 2"))
    base = _base(tiny_backbone, tiny_dataset, tmp_path, **{"run.output_dir": f"s3://{S3_BUCKET}/tune"})
    report = run_search(base, str(space), progress=False)
    statuses = sorted(t["status"] for t in report["trials"])
    assert statuses == ["ok", "rejected", "rejected", "stopped early"], statuses
    assert len({t["trial"] for t in report["trials"]}) == 4  # grid trial ids: <exp>_0000<i>
    ok = next(t for t in report["trials"] if t["status"] == "ok")
    # LoRA rank 4 (tiny_overrides) on query and value of the 2 layers, 32 wide: A 4x32 + B 32x4
    assert ok["meta_step"] == 4 and ok["trainable_params"] == 2 * 2 * (4 * 32 + 32 * 4)
    # a 2-worker TorchTrainer ran inside each trial and checkpointed beside it; the summary
    # (its best adapter trained from the reported checkpoint path) is on S3 too
    pages = s3_env.client().get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix="tune/t-tune/")
    keys = [o["Key"].removeprefix("tune/t-tune/") for page in pages for o in page.get("Contents", [])]
    train_checkpoints = [k for k in keys if re.fullmatch(r"trial_\w+/train/checkpoint_\d+/state\.pt", k)]
    assert train_checkpoints, keys
    for key in train_checkpoints:  # the workers record the world size they ran with
        body = s3_env.client().get_object(Bucket=S3_BUCKET, Key=f"tune/t-tune/{key}")["Body"].read()
        state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
        assert state["world_size"] == 2, key
    assert any(k.startswith("experiment_state") for k in keys), keys
    for key in ("summary/report.json", "summary/best.yaml", "summary/best/adapter/adapter_model.safetensors"):
        assert key in keys, keys
    assert report["best"]["meta_step"] == 4 and report["best"]["meta.inner_lr"] == 0.1
    assert set(report["best"]["meta_test"]) == {"meta", "meta_init", "proto", "logreg", "finetune"}
    # Tune stopped every trainer (ASHA, or the trial reaching max_t): their controllers died
    # and Ray Train's cleaner freed the workers' placement groups through the state API. The
    # diverging trial ran after the good one, so its workers found CPUs; none stay reserved.
    from ray.util import placement_group_table

    deadline = time.monotonic() + 30
    while held := [g for g in placement_group_table().values() if g["state"] != "REMOVED"]:
        assert time.monotonic() < deadline, held
        time.sleep(1)


@pytest.mark.ray
@pytest.mark.slow
def test_distributed_trials_are_checked_and_sized_to_the_cluster(
    ray_cluster: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from metapeft_ray.core.space import TuneSettings
    from metapeft_ray.on_ray import distributed
    from metapeft_ray.on_ray.tune import _distributed_concurrency

    # distributed.cpus_per_worker: 1; the session Ray has 4 CPUs; a meta-batch every size divides
    base = load_config("quickstart", ["meta.meta_batch_size=10"])
    assert _distributed_concurrency(base, TuneSettings(trial_workers=2)) == 2
    assert _distributed_concurrency(base, TuneSettings(trial_workers=2, max_concurrent=1)) == 1
    with pytest.raises(distributed.ClusterCapacityError, match=r"at most 4 workers \(tune.trial_workers\)"):
        _distributed_concurrency(base, TuneSettings(trial_workers=5))
    # The cluster's processes know their dashboard (`init_local`), this process does not.
    import ray

    env = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get(distributed.API_SERVER_ENV)).remote())
    assert env and env.startswith("http://127.0.0.1:") and distributed.API_SERVER_ENV not in os.environ
    # Without a state API (a cluster started without the dashboard) the probe says why.
    monkeypatch.setenv(distributed.API_SERVER_ENV, "http://127.0.0.1:9")
    assert "Failed to connect" in (distributed._state_api_error() or "")

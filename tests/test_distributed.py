"""Distributed meta-training on a real local Ray (one cluster for the session, tiny BERT).

What is pinned: W workers == the single-process MetaLearner (same seed and meta-batch), first
and second order, and the workers record that they ran as W ranks; the meta-test fanned out
over the workers == the single-process one, episode by episode; checkpoint + resume ==
uninterrupted; a finished run is not re-trained; a worker killed by PID mid-run is recovered
from the last checkpoint with the same result; S3 storage end to end; and every bad input fails
quickly, before a TorchTrainer is built.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from metapeft_ray.core import runstore, storage
from metapeft_ray.core.config import Config, load_config
from metapeft_ray.core.evaluate import merge_scores
from metapeft_ray.core.recipes import meta_test_learner
from metapeft_ray.core.runstore import run_uri
from metapeft_ray.core.train import MetaLearner, prepare_sampler
from metapeft_ray.on_ray import distributed
from tests.tiny import tiny_overrides

try:
    from tests.conftest import S3_BUCKET
except ImportError:  # plain `pytest` puts tests/ (not the repo root) on sys.path
    from conftest import S3_BUCKET  # type: ignore[no-redef]

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 4


def make_cfg(backbone: str, dataset: str, output_dir: str, name: str, **extra: Any) -> Config:
    """The tiny config as a 2-worker run: `STEPS` meta-steps of 4 episodes (2 per rank),
    checkpointed every 2."""
    overrides = {
        "run.name": name,
        "run.output_dir": output_dir,
        "run.seed": 3,
        "meta.first_order": True,
        "meta.meta_steps": STEPS,
        "meta.meta_batch_size": 4,
        "meta.checkpoint_every": 2,
        "meta.outer_lr": 0.01,
        "distributed.workers": 2,
        "distributed.max_failures": 0,
        **extra,
    }
    return load_config(None, tiny_overrides(backbone, dataset, **overrides))


def final_state(cfg: Config) -> dict[str, Any]:
    """The run's final checkpoint (adapter, optimizer, history, the world size it ran with)."""
    uri = run_uri(cfg)
    record = runstore.read_record(uri)
    return runstore.load_state(storage.join(uri, record["checkpoint"]))


def final_adapter(cfg: Config) -> dict[str, torch.Tensor]:
    return final_state(cfg)["adapter"]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def base(tiny_backbone: str, tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory):
    out = str(tmp_path_factory.mktemp("runs"))

    def cfg(name: str, **extra: Any) -> Config:
        return make_cfg(tiny_backbone, tiny_dataset, out, name, **extra)

    return cfg


def single_process_final(cfg: Config) -> dict[str, torch.Tensor]:
    """The adapter init after ``meta.meta_steps`` uninterrupted single-process steps (no Ray)."""
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    init = {k: v.detach().clone() for k, v in learner.params.items()}
    for _ in learner.iterate(cfg.meta.meta_steps, val_every=cfg.meta.val_every):
        pass
    final = {k: v.detach().cpu().clone() for k, v in learner.params.items()}
    # The comparisons with it mean something only if training moved the init well past 1e-5.
    assert max((final[k] - init[k]).abs().max().item() for k in init) > 1e-3
    return final


@pytest.fixture(scope="module")
def reference(base) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The single-process, uninterrupted 4-step first-order adapter init (no Ray)."""
    return single_process_final(base("reference"))


def timeless(results: dict[str, Any]) -> dict[str, Any]:
    """A meta-test's results without the wall times (the one thing two runs may not share)."""
    return {
        m: {cell: {k: v for k, v in r.items() if k != "ms_per_task"} for cell, r in per.items()}
        for m, per in results.items()
    }


def single_process_meta_test(cfg: Config, learner: MetaLearner) -> dict[str, Any]:
    """The meta-test of ``learner`` scored here, in one process, with the workers' one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return merge_scores([meta_test_learner(cfg, learner)], cfg.eval.reference)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def no_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a TorchTrainer is ever built."""
    import ray.train.torch

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a TorchTrainer was started")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", boom)


def test_two_workers_equal_single_process(ray_cluster, base, reference) -> None:  # noqa: ANN001
    cfg = base("equivalence")
    report = distributed.train_ray(cfg, progress=False)
    assert_same(final_adapter(cfg), reference)
    assert final_state(cfg)["world_size"] == 2  # recorded by the workers: really 2 ranks
    out = Path(run_uri(cfg))
    assert report["meta_step"] == STEPS and report["distributed"]["restarts"] == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["meta_step"] for line in lines] == list(range(1, STEPS + 1))
    assert {"config.yaml", "splits.json", "report.json", "report.md"} <= {p.name for p in out.iterdir()}
    # the meta-test ran on the workers (`fan_out_meta_test`) and equals one scored in one process
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    learner.load_state_dict(final_state(cfg))
    assert timeless(report["results"]) == timeless(single_process_meta_test(cfg, learner))


def test_meta_test_on_two_workers_equals_the_single_process_one(ray_cluster, base) -> None:  # noqa: ANN001
    """Two Ray tasks with a worker's resources, episode i in part i % 2, give the single-process
    meta-test episode by episode: every method (the costly rows' prefix split between the parts,
    label names, a learned head value), two cells, an uneven split of 5 episodes."""
    methods = ["meta", "meta_init", "meta_logreg", "proto", "logreg", "logreg_names", "finetune"]
    cfg = base(
        "fan-out",
        **{
            "eval.methods": methods,
            "eval.n_way": [2, 3],
            "eval.episodes": 5,
            "eval.costly_episodes": 3,
            "eval.finetune.steps": 2,
            "head.label_names": True,
            "head.learn": ["scale"],
        },
    )
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    list(learner.iterate(2, val_every=100))  # an init and a head value that training moved
    parts = distributed.fan_out_meta_test(2, False, {"CPU": 1.0})(cfg, learner)
    assert [sorted(p["3w1s"]["meta"]) for p in parts] == [[0, 2, 4], [1, 3]]
    assert [sorted(p["3w1s"]["finetune"]) for p in parts] == [[0, 2], [1]]
    want = single_process_meta_test(cfg, learner)
    assert list(want) == methods and [want[m]["2w1s"]["episodes"] for m in ("meta", "finetune")] == [5, 3]
    assert timeless(merge_scores(parts, cfg.eval.reference)) == timeless(want)


def test_two_workers_equal_single_process_second_order(ray_cluster, base) -> None:  # noqa: ANN001
    """The same with second-order MAML: the inner graph (eager attention) is kept on each rank,
    and the all-reduced second-order meta-gradients give the single-process init."""
    cfg = base("equivalence-second-order", **{"meta.first_order": False})
    report = distributed.train_ray(cfg, progress=False)
    assert report["meta_step"] == STEPS and final_state(cfg)["world_size"] == 2
    want = single_process_final(base("reference-second-order", **{"meta.first_order": False}))
    assert_same(final_adapter(cfg), want)


def test_early_stopping_and_the_kept_best_equal_the_single_process(ray_cluster, base) -> None:  # noqa: ANN001
    """``meta.patience`` and ``meta.keep=best`` on 2 ranks: every rank sees the same all-reduced
    validation, so they stop at the step one process stops at and export the same best init."""
    extra = {"meta.val_every": 1, "meta.val_episodes": 2, "meta.patience": 1, "meta.keep": "best"}
    cfg = base("early-stop", **extra)
    report = distributed.train_ray(cfg, progress=False)
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg))
    list(learner.iterate(STEPS, val_every=1))
    kept = learner.keep_best()
    assert report["meta_step"] == learner.step and report["kept"]["meta_step"] == kept["meta_step"]
    assert report["kept"]["meta_val_accuracy"] == pytest.approx(kept["meta_val_accuracy"])
    if learner.step < STEPS:
        assert report["distributed"]["stopped_early"]
    assert_same(final_state(cfg)["best"]["adapter"], {k: v.detach().cpu() for k, v in learner.params.items()})


def test_resume_equals_uninterrupted_and_finished_is_not_rerun(  # noqa: ANN001
    ray_cluster, base, reference, monkeypatch
) -> None:
    distributed.train_ray(base("resume", **{"meta.meta_steps": 2}), progress=False)
    cfg = base("resume")
    # uploaded in the background (CheckpointUploadMode.ASYNC), and in storage when fit returned
    assert (Path(run_uri(cfg)) / "checkpoint_000002" / "state.pt").is_file()
    report = distributed.train_ray(cfg, progress=False)
    assert report["meta_step"] == STEPS
    assert_same(final_adapter(cfg), reference)
    history = [json.loads(x) for x in (Path(run_uri(cfg)) / "metrics.jsonl").read_text().splitlines()]
    assert [m["meta_step"] for m in history] == list(range(1, STEPS + 1))

    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", None)  # would fail if called
    t0 = time.monotonic()
    again = distributed.train_ray(cfg, progress=False)
    assert time.monotonic() - t0 < 10
    assert again["results"] == report["results"]
    # The export lost: re-exported from the final checkpoint, still without training.
    storage_dir = Path(run_uri(cfg))
    for f in (storage_dir / "adapter").iterdir():
        f.unlink()
    distributed.train_ray(cfg, progress=False)
    assert (storage_dir / "adapter" / "adapter_model.safetensors").is_file()
    # Asking for fewer steps than done, or a different experiment under the same name: refused.
    with pytest.raises(ValueError, match="already trained to meta-step 4"):
        distributed.train_ray(base("resume", **{"meta.meta_steps": 3}), progress=False)
    with pytest.raises(ValueError, match="meta.inner_lr"):
        distributed.train_ray(base("resume", **{"meta.inner_lr": 0.5}), progress=False)


def exported_failures(run: str) -> float | None:
    """``ray_metapeft_worker_failures_total`` of ``run`` as the session Ray's nodes serve it on
    their metrics export ports now (the sum over the processes that record it); None: no series."""
    import ray

    found = []
    for node in ray.nodes():
        if node["Alive"]:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            series = rf'^ray_metapeft_worker_failures_total\{{[^}}]*\brun="{re.escape(run)}"[^}}]*\}} (\S+)$'
            found += [float(v) for v in re.findall(series, text, flags=re.M)]
    return sum(found) if found else None


def wait_for_failures(run: str, want: float, timeout: float = 60) -> float | None:
    """Poll `exported_failures` until it reads ``want`` (Ray exports every 10 s by default)."""
    deadline = time.monotonic() + timeout
    while (got := exported_failures(run)) != want and time.monotonic() < deadline:
        time.sleep(1)
    return got


def test_killed_worker_is_recovered(  # noqa: ANN001
    ray_cluster, base, reference, tmp_path, monkeypatch
) -> None:
    """SIGKILL rank 1 by PID after step 3 (checkpoint at 2): the group restarts from step 2.
    The failure counter is read live from the node's metrics port: at 0 while the run is under
    way, 1 after the restart (a series that first appeared at 1 would show no increase)."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    (pid_dir / "hold-step3").touch()  # both ranks wait after step 3 until the kill is done
    monkeypatch.setenv(distributed.TEST_PID_DIR_ENV, str(pid_dir))
    killed: list[int] = []
    before_kill: list[float | None] = []

    def killer() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            found = list(pid_dir.glob("rank1-step3-*.pid"))
            if found:
                before_kill.append(wait_for_failures("killed", 0))  # the ranks hold meanwhile
                pid = int(found[0].read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.1)
        (pid_dir / "hold-step3").unlink(missing_ok=True)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    cfg = base("killed", **{"distributed.max_failures": 2})
    report = distributed.train_ray(cfg, progress=False)
    thread.join(timeout=10)
    assert killed, "the worker never reached step 3"
    assert before_kill == [0]
    assert report["distributed"]["restarts"] == 1
    assert wait_for_failures("killed", 1) == 1
    assert_same(final_adapter(cfg), reference)
    pids_after = {int(p.read_text()) for p in pid_dir.glob("rank1-step4-*.pid")}
    assert pids_after and killed[0] not in pids_after  # step 4 ran in a new worker process


def test_s3_storage_end_to_end(ray_cluster, base, reference, s3_env) -> None:  # noqa: ANN001
    cfg = base("on-s3", **{"run.output_dir": f"s3://{S3_BUCKET}/runs"})
    report = distributed.train_ray(cfg, progress=False)
    assert report["meta_step"] == STEPS
    keys = {
        o["Key"] for o in s3_env.client().list_objects_v2(Bucket=S3_BUCKET, Prefix="runs/on-s3/")["Contents"]
    }
    for key in (
        "checkpoint_000004/state.pt",
        "adapter/adapter_model.safetensors",
        "adapter/metapeft.json",
        "report.json",
        "metrics.jsonl",
        "training.json",
    ):
        assert f"runs/on-s3/{key}" in keys, sorted(keys)
    assert_same(final_adapter(cfg), reference)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_inputs_fail_fast(ray_cluster, base, s3_env, monkeypatch, no_trainer) -> None:  # noqa: ANN001
    def fails(match: str, cfg: Config, **kw: Any) -> None:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=match) as err:
            distributed.train_ray(cfg, progress=False, **kw)
        assert time.monotonic() - t0 < 15, f"took {time.monotonic() - t0:.1f}s"
        assert "\n" not in str(err.value)

    fails("cannot reach the Ray cluster", base("bad-address"), address=f"127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    fails("cannot reach the Ray cluster", base("bad-address"))
    monkeypatch.delenv("RAY_ADDRESS")
    fails("cannot be placed.*at most 4", base("too-many", **{"meta.meta_batch_size": 5}), workers=5)
    fails("meta.meta_batch_size=4 is smaller than distributed.workers .--workers.=5", base("idle"), workers=5)
    fails("cannot be placed.*no node", base("too-big", **{"distributed.resources_per_worker": {"TPU": 1}}))
    fails("does not exist", base("s3", **{"run.output_dir": "s3://no-such-bucket-here/runs"}))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    fails("credentials", base("s3", **{"run.output_dir": f"s3://{S3_BUCKET}/runs"}))


def test_capacity_counts_nodes_and_autoscaler_types(ray_cluster, monkeypatch) -> None:  # noqa: ANN001
    check = distributed.check_capacity
    check(4, {"CPU": 1})  # the session cluster: one node, 4 CPUs
    with pytest.raises(distributed.ClusterCapacityError, match="at most 2"):
        check(3, {"CPU": 2})
    with pytest.raises(distributed.ClusterCapacityError, match="at most 1"):
        check(2, {"CPU": 1}, nodes=[{"CPU": 1.5}])  # a worker cannot span nodes
    # An autoscaler that can add GPU nodes: a GPU request is not refused ...
    monkeypatch.setattr(distributed, "_autoscaler_node_types", lambda: [({"CPU": 8, "GPU": 1}, -1)])
    check(16, {"CPU": 1, "GPU": 1})
    # ... but a resource no node type offers is.
    with pytest.raises(distributed.ClusterCapacityError, match="no node"):
        check(1, {"CPU": 1, "TPU": 1})
    monkeypatch.setattr(distributed, "_autoscaler_node_types", lambda: [({"CPU": 8}, 2)])
    with pytest.raises(distributed.ClusterCapacityError, match="at most 16"):
        check(17, {"CPU": 1})


def test_no_secret_reaches_the_trainer(ray_cluster, base, s3_env, monkeypatch) -> None:  # noqa: ANN001
    """Credentials stay in the processes' environment: nothing handed to Ray carries them."""
    import ray.cloudpickle
    import ray.train.torch

    seen: list[bytes] = []

    class Captured(Exception):
        pass

    def capture(*a: Any, **k: Any) -> None:
        seen.append(ray.cloudpickle.dumps((a, k)))
        raise Captured

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", capture)
    with pytest.raises(Captured):
        distributed.train_ray(base("secret", **{"run.output_dir": f"s3://{S3_BUCKET}/runs"}))
    assert seen and s3_env.secret_key.encode() not in seen[0]
    assert s3_env.access_key.encode() not in seen[0]

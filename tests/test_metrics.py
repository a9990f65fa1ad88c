"""Metrics without a cluster: Ray-free import, no-op without a backend, the local
prometheus_client exporter, and a real `metapeft train --local --metrics-port` run.

Ray's side (``ray.util.metrics`` on a node's metrics export port) is pinned end to end in
``tests/test_cluster_e2e.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from metapeft_ray import cli
from metapeft_ray.core import metrics
from metapeft_ray.on_ray.metrics import RayBackend

try:
    from tests.tiny import make_tiny_backbone, make_tiny_dataset, tiny_overrides
except ImportError:  # plain `pytest` puts tests/ (not the repo root) on sys.path
    from tiny import make_tiny_backbone, make_tiny_dataset, tiny_overrides  # type: ignore[no-redef]

TAGS = {"run": "r1", "worker": "0", "algorithm": "maml"}
STEP = {
    "meta_step": 7,
    "meta_loss": 0.5,
    "query_accuracy": 0.8,
    "support_loss_before": 1.0,
    "support_loss_after": 0.25,
    "adaptation_gain": 0.75,
    "meta_val_accuracy": 0.6,
    "other": 1.0,
}


def scrape(port: int) -> dict[tuple[str, str], float]:
    """``{(series name, labels text): value}`` of the ray_metapeft_* samples at ``port``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for m in re.finditer(r"^(ray_metapeft_\w+)\{([^}]*)\} (\S+)$", text, flags=re.M):
        samples[(m.group(1), m.group(2))] = float(m.group(3))
    return samples


def value(samples: dict[tuple[str, str], float], name: str, **labels: str) -> float:
    hits = [
        v
        for (n, lab), v in samples.items()
        if n == name and all(f'{k}="{x}"' in lab for k, x in labels.items())
    ]
    assert len(hits) == 1, (name, labels, sorted(samples))
    return hits[0]


@pytest.fixture
def local_exporter() -> Iterator[int]:
    port = metrics.serve_local(0)
    try:
        yield port
    finally:
        metrics.stop_local()


def test_importing_metrics_and_recipes_does_not_import_ray() -> None:
    code = (
        "import sys, metapeft_ray.core.metrics, metapeft_ray.core.recipes; "
        "from metapeft_ray.core import metrics as m; "
        "m.record_step({'meta_loss': 1.0}, run='a', worker='0', algorithm='maml'); "
        "m.record_episode(0.1, run='a', worker='0', algorithm='maml'); "
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_records_are_noops_without_ray_or_exporter() -> None:
    # In a fresh process: this pytest process may already hold the session's Ray.
    code = (
        "from metapeft_ray.core import metrics as m; assert m._backend() is None; "
        "tags = dict(run='a', worker='0', algorithm='maml'); "
        "m.record_step({'meta_loss': 1.0}, **tags); m.record_episode(0.2, **tags); "
        "m.record_failure(**tags); m.record_val(0.5, **tags)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_names_follow_the_prefix_and_ray_export_rules() -> None:
    names = metrics.prometheus_names()
    assert all(n.startswith("ray_metapeft_") for n in names)
    assert {
        "ray_metapeft_meta_loss",
        "ray_metapeft_episodes_total",
        "ray_metapeft_worker_failures_total",
        "ray_metapeft_inner_loop_seconds",
    } <= names
    assert "ray_metapeft_inner_loop_seconds_bucket" in metrics.prometheus_series()
    assert set(metrics.STEP_GAUGES) <= {m.name for m in metrics.METRICS}


def test_local_exporter_serves_every_metric_with_its_tags(local_exporter: int) -> None:
    metrics.record_step(STEP, **TAGS)
    metrics.record_episode(0.2, **TAGS)
    metrics.record_episode(3.0, **TAGS)
    metrics.record_failure(2, **TAGS)
    metrics.record_val(0.9, **{**TAGS, "run": "trial_1"})
    samples = scrape(local_exporter)
    assert metrics.sample_names() <= {name for name, _ in samples}
    for key in metrics.STEP_GAUGES:
        assert value(samples, f"ray_metapeft_{key}", **TAGS) == STEP[key]
    assert value(samples, "ray_metapeft_meta_val_accuracy", run="trial_1") == 0.9
    assert value(samples, "ray_metapeft_episodes_total", **TAGS) == 2
    assert value(samples, "ray_metapeft_worker_failures_total", **TAGS) == 2
    assert value(samples, "ray_metapeft_inner_loop_seconds_count", **TAGS) == 2
    assert value(samples, "ray_metapeft_inner_loop_seconds_sum", **TAGS) == pytest.approx(3.2)
    assert value(samples, "ray_metapeft_inner_loop_seconds_bucket", le="0.25", **TAGS) == 1


def test_a_failure_counter_starts_at_zero(local_exporter: int) -> None:
    """``record_failure(0)`` at the start of a run: the series exists at 0 before any failure, so
    Prometheus' ``increase()`` counts the first one (Ray's side: tests/test_distributed.py)."""
    metrics.record_failure(0, **TAGS)
    assert value(scrape(local_exporter), "ray_metapeft_worker_failures_total", **TAGS) == 0
    metrics.record_failure(1, **TAGS)
    assert value(scrape(local_exporter), "ray_metapeft_worker_failures_total", **TAGS) == 1


class _Recorded(RayBackend):
    """Ray's backend with each metric object replaced by a recorder of its ``set`` calls (``inc``
    and ``observe`` do nothing), and no refresh thread (the test calls `refresh_once`, what the
    thread does every interval)."""

    def __init__(self) -> None:
        super().__init__()
        self.sets: list[tuple[str, str, float]] = []
        self._refresher = threading.Thread(target=lambda: None)  # never started

    def _create(self, spec: metrics.MetricSpec) -> Any:
        def record(value: float, tags: dict[str, str]) -> None:
            self.sets.append((spec.name, tags["run"], value))

        return SimpleNamespace(set=record, inc=lambda *a, **k: None, observe=lambda *a, **k: None)


def test_a_finished_trials_gauges_are_not_kept_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's backend re-sets every gauge's last value each export interval so a slow step does
    not drop it; a Tune actor reused for the next trial must stop doing so for the last trial's
    gauges once it `release`s them (tune.trial does, however the trial ends)."""
    backend = _Recorded()
    monkeypatch.setattr(metrics, "_backend", lambda: backend)
    first, second = {**TAGS, "run": "trial_1"}, {**TAGS, "run": "trial_2"}
    metrics.record_step({"meta_loss": 0.5}, **first)
    backend.refresh_once()
    assert backend.sets[-1] == ("meta_loss", "trial_1", 0.5)  # kept alive while the trial runs
    metrics.release(**first)
    metrics.record_step({"meta_loss": 0.25}, **second)
    backend.sets.clear()
    backend.refresh_once()
    assert backend.sets == [("meta_loss", "trial_2", 0.25)]


def test_local_exporter_busy_port_is_a_clear_error(local_exporter: int) -> None:
    metrics.stop_local()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ValueError, match=r"cannot serve metrics on 127\.0\.0\.1:\d+ .*--metrics-port"):
            metrics.serve_local(s.getsockname()[1])


def test_train_local_with_metrics_port(tmp_path, capsys) -> None:  # noqa: ANN001
    """A real tiny `metapeft train --local --metrics-port 0`: every episode the learner adapts is
    timed and counted (pins `instrument_episodes` to `MetaLearner`), the gauges hold the last
    step, and the exporter outlives the run for a last scrape."""
    backbone = make_tiny_backbone(tmp_path / "bb")
    data = make_tiny_dataset(tmp_path / "data.jsonl")
    overrides = tiny_overrides(
        str(backbone),
        str(data),
        **{
            "run.output_dir": str(tmp_path / "runs"),
            "run.name": "local-metrics",
            "meta.first_order": True,
            "eval.methods": json.dumps(["meta"]),
        },
    )
    try:
        rc = cli.main(["train", "--local", "--quiet", "--metrics-port", "0", *overrides])
        assert rc == 0
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/metrics", capsys.readouterr().err).group(1))
        samples = scrape(port)
    finally:
        metrics.stop_local()
    tags = {"run": "local-metrics", "worker": "local", "algorithm": "maml_fo"}
    # tiny_overrides: 3 meta-steps x 2 episodes; validation (2 episodes) after steps 2 and 3.
    assert value(samples, "ray_metapeft_episodes_total", **tags) == 3 * 2 + 2 * 2
    assert value(samples, "ray_metapeft_inner_loop_seconds_count", **tags) == 10
    assert value(samples, "ray_metapeft_meta_step", **tags) == 3
    lines = (tmp_path / "runs" / "local-metrics" / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(x) for x in lines]
    assert value(samples, "ray_metapeft_meta_loss", **tags) == pytest.approx(history[-1]["meta_loss"])
    assert value(samples, "ray_metapeft_meta_val_accuracy", **tags) == pytest.approx(
        history[-1]["meta_val_accuracy"]
    )


def test_metrics_port_needs_local(capsys) -> None:  # noqa: ANN001
    assert cli.main(["train", "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--metrics-port serves a --local run" in err and err.count("\n") == 1


def test_algorithm_tag() -> None:
    assert metrics.algorithm_name("maml", False) == "maml"
    assert metrics.algorithm_name("maml", True) == "maml_fo"
    assert metrics.algorithm_name("metasgd", True) == "metasgd_fo"
    assert metrics.algorithm_name("reptile", True) == "reptile"  # first order anyway

"""Metrics for Prometheus: one set of names, recorded from Ray workers, drivers, long
``--local`` runs and the Serve replicas of ``metapeft serve``. Ray-free: the Ray backend lives in
the Ray layer (`metapeft_ray.on_ray.metrics`), which installs it here when it is imported.

Every metric is named ``metapeft_<name>``. Training metrics (:data:`METRICS`) carry the tag keys
:data:`TAG_KEYS` (``run``, ``worker``, ``algorithm``); serving metrics (:data:`SERVE_METRICS`,
``metapeft_serve_*``) carry :data:`SERVE_TAG_KEYS` (``init``). Where they appear:

* On Ray (workers and drivers), through ``ray.util.metrics`` (the runtime backend that
  `metapeft_ray.on_ray` installs in every process that runs Ray-layer code): each node's
  ``--metrics-export-port`` serves them as ``ray_metapeft_<name>`` (counters with ``_total``,
  the histogram as ``_bucket`` / ``_sum`` / ``_count``) about 10 s after they are recorded; the Ray
  dashboard's metrics view and ``deploy/grafana/metapeft-dashboard.json`` read them from there.
* Outside Ray (``metapeft train --local --metrics-port N``), through ``prometheus_client`` on
  ``http://HOST:N/metrics`` under the *same* Prometheus names, so one dashboard serves both.
* Anywhere else (tests, notebooks, a ``--local`` run without ``--metrics-port``) every
  ``record_*`` call is a no-op: the maths never depends on whether anyone is watching.

The metric objects are created lazily, once per process (Ray wants one object per name per
process, with its tag keys declared up front), on the first ``record_*`` call that has a backend.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from metapeft_ray.core import registry

if TYPE_CHECKING:
    from metapeft_ray.core.config import Config
    from metapeft_ray.core.episodes import EpisodeSpec
    from metapeft_ray.core.meta import EpisodeResult
    from metapeft_ray.core.train import MetaLearner

__all__ = [
    "METRICS",
    "PREFIX",
    "SERVE_METRICS",
    "SERVE_TAG_KEYS",
    "TAG_KEYS",
    "MetricSpec",
    "algorithm_name",
    "instrument_episodes",
    "prometheus_names",
    "prometheus_series",
    "record_episode",
    "record_failure",
    "record_serve_seconds",
    "record_step",
    "record_task_cache",
    "record_val",
    "release",
    "sample_names",
    "serve_local",
    "tags_for",
]

PREFIX = "metapeft_"
RAY_EXPORT_PREFIX = "ray_"
"""Prefix Ray's exporter puts before every ``ray.util.metrics`` name; the local exporter uses it
too, so Prometheus queries and the Grafana dashboard are the same for both."""
TAG_KEYS = ("run", "worker", "algorithm")
SERVE_TAG_KEYS = ("init",)
# Inner-loop (one episode's adaptation) latency, seconds: from a tiny CPU model (~10 ms) up to
# many second-order steps of a large backbone.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

Kind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    """Without the prefix; counters without ``_total`` (the exporters add it)."""
    kind: Kind
    description: str
    tag_keys: tuple[str, ...] = TAG_KEYS

    @property
    def full_name(self) -> str:
        return PREFIX + self.name

    @property
    def prometheus_name(self) -> str:
        """As Prometheus shows it: ``ray_metapeft_<name>``, counters with ``_total``."""
        return RAY_EXPORT_PREFIX + self.full_name + ("_total" if self.kind == "counter" else "")


# The keys of `MetaLearner.iterate`'s per-step dict that become gauges (same names).
STEP_GAUGES = (
    "meta_step",
    "meta_loss",
    "query_accuracy",
    "support_loss_before",
    "support_loss_after",
    "adaptation_gain",
    "meta_val_accuracy",
)
_GAUGE_HELP = {
    "meta_step": "outer (meta) updates applied to the adapter init so far",
    "meta_loss": "query loss after adaptation, mean over the meta-batch (the meta-objective)",
    "query_accuracy": "query accuracy after adaptation, mean over the meta-batch",
    "support_loss_before": "meta-validation support loss at the adapter init, before the inner loop",
    "support_loss_after": "meta-validation support loss after the inner loop",
    "adaptation_gain": "meta-validation support loss before - after (what the inner loop achieved)",
    "meta_val_accuracy": "query accuracy after adaptation on the meta-validation classes",
}
METRICS: tuple[MetricSpec, ...] = (
    *(MetricSpec(name, "gauge", _GAUGE_HELP[name]) for name in STEP_GAUGES),
    MetricSpec("episodes", "counter", "few-shot episodes adapted (meta-train and meta-validation)"),
    MetricSpec("worker_failures", "counter", "worker-group failures (each restarts it from a checkpoint)"),
    MetricSpec("inner_loop_seconds", "histogram", "wall time of one episode's inner loop"),
)
# `metapeft serve`: recorded in the replicas, tagged by the init's name.
SERVE_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "serve_adaptation_seconds",
        "histogram",
        "wall time of adapting an init to a support set (a new task, a task rebuilt by another "
        "replica, a one-shot request)",
        SERVE_TAG_KEYS,
    ),
    MetricSpec(
        "serve_classify_seconds",
        "histogram",
        "wall time of classifying one request's texts, the wait for its batch included",
        SERVE_TAG_KEYS,
    ),
    MetricSpec(
        "serve_task_cache_hits",
        "counter",
        "task requests a replica answered from its cache of adapted tasks",
        SERVE_TAG_KEYS,
    ),
    MetricSpec(
        "serve_task_cache_misses",
        "counter",
        "task requests a replica had to adapt for (a new task, or one made or evicted elsewhere)",
        SERVE_TAG_KEYS,
    ),
)
_BY_NAME = {m.name: m for m in (*METRICS, *SERVE_METRICS)}


def prometheus_names(specs: tuple[MetricSpec, ...] = METRICS) -> set[str]:
    """Metric names as Prometheus shows them (``ray_metapeft_meta_loss``, ...); of the training
    metrics unless ``specs`` says otherwise (``METRICS + SERVE_METRICS``: all of them)."""
    return {m.prometheus_name for m in specs}


def prometheus_series(specs: tuple[MetricSpec, ...] = METRICS) -> set[str]:
    """Every series name a query may use: the names plus the histograms' bucket/sum/count."""
    return prometheus_names(specs) | {
        f"{m.prometheus_name}_{suffix}"
        for m in specs
        if m.kind == "histogram"
        for suffix in ("bucket", "sum", "count")
    }


def sample_names(specs: tuple[MetricSpec, ...] = METRICS) -> set[str]:
    """The sample names a scrape of ``/metrics`` shows (a histogram only as bucket/sum/count)."""
    return prometheus_series(specs) - {m.prometheus_name for m in specs if m.kind == "histogram"}


def algorithm_name(algorithm: str, first_order: bool) -> str:
    """The ``algorithm`` tag: ``meta.algorithm``, with ``_fo`` for the first-order variant of an
    algorithm that has a second-order one (``maml_fo``; Reptile and ProtoNet have none)."""
    return f"{algorithm}_fo" if first_order and registry.ALGORITHMS[algorithm].second_order else algorithm


def tags_for(cfg: Config, worker: str | int) -> dict[str, str]:
    """The tags of a run: ``run.name``, the worker (a rank, ``local`` or ``driver``), and the
    algorithm from ``meta.*``. Use as ``record_step(m, **tags_for(cfg, rank))``."""
    return {
        "run": cfg.run.name,
        "worker": str(worker),
        "algorithm": algorithm_name(cfg.meta.algorithm, cfg.meta.first_order),
    }


# -- backends -----------------------------------------------------------------------------------


class Backend(ABC):
    """One metric object per name, created on first use."""

    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}
        self._lock = threading.Lock()

    @abstractmethod
    def _create(self, spec: MetricSpec) -> Any:
        """Backend-specific."""

    def get(self, name: str) -> Any:
        obj = self._objects.get(name)
        if obj is None:
            with self._lock:
                obj = self._objects.get(name)
                if obj is None:
                    obj = self._objects[name] = self._create(_BY_NAME[name])
        return obj

    @abstractmethod
    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        """Backend-specific."""

    @abstractmethod
    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        """Backend-specific; ``value`` 0 makes the counter's series exist at 0."""

    @abstractmethod
    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        """Backend-specific."""

    def release(self, tags: Mapping[str, str]) -> None:  # noqa: B027 (only Ray's backend needs it)
        """Stop keeping the gauges of ``tags`` alive."""

    def live(self) -> bool:
        """Whether records can go here now (Ray's backend: while Ray is initialised)."""
        return True


class _PrometheusBackend(Backend):
    """prometheus_client objects in a registry of their own (nothing else is exported)."""

    def __init__(self) -> None:
        super().__init__()
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()

    def _create(self, spec: MetricSpec) -> Any:
        import prometheus_client as pc

        # prometheus_client appends _total to counters itself, as Ray's exporter does.
        name = RAY_EXPORT_PREFIX + spec.full_name
        kw = {"labelnames": spec.tag_keys, "registry": self.registry}
        if spec.kind == "gauge":
            return pc.Gauge(name, spec.description, **kw)
        if spec.kind == "counter":
            return pc.Counter(name, spec.description, **kw)
        return pc.Histogram(name, spec.description, buckets=LATENCY_BUCKETS, **kw)

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.get(name).labels(**tags).set(value)

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.get(name).labels(**tags).inc(value)  # labels() alone creates the series at 0

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.get(name).labels(**tags).observe(value)


_runtime_backend: Backend | None = None
_local_backend: _PrometheusBackend | None = None
_local_server: Any = None


def use_runtime_backend(backend: Backend) -> None:
    """Record through ``backend`` whenever it is `live` and no local exporter serves: the Ray
    layer installs Ray's here when it is imported (`metapeft_ray.on_ray`)."""
    global _runtime_backend
    _runtime_backend = backend


def _backend() -> Backend | None:
    """The local exporter if this process started one, else the runtime's backend while it is
    live (Ray's, where the Ray layer is imported and Ray is initialised), else None."""
    if _local_backend is not None:
        return _local_backend
    if _runtime_backend is not None and _runtime_backend.live():
        return _runtime_backend
    return None


def serve_local(port: int, host: str = "127.0.0.1") -> int:
    """Serve this process's metrics with ``prometheus_client`` on ``http://host:port/metrics``
    (a process outside Ray: ``metapeft train --local --metrics-port N``). ``port=0`` picks a free
    port. Returns the port. From then on, ``record_*`` calls of this process go there."""
    global _local_backend, _local_server
    if _local_server is not None:
        return int(_local_server.server_port)
    from prometheus_client import start_http_server

    backend = _PrometheusBackend()
    try:
        server, _ = start_http_server(port, addr=host, registry=backend.registry)
    except OSError as err:
        raise ValueError(
            f"cannot serve metrics on {host}:{port} ({err.strerror or err}); choose another "
            "--metrics-port (0 picks a free one)"
        ) from None
    _local_backend, _local_server = backend, server
    return int(server.server_port)


def stop_local() -> None:
    """Stop the local exporter (tests); later ``record_*`` calls go back to Ray or nowhere."""
    global _local_backend, _local_server
    if _local_server is not None:
        _local_server.shutdown()
        _local_server.server_close()
    _local_backend, _local_server = None, None


# -- recording ----------------------------------------------------------------------------------


def _tags(run: str, worker: str, algorithm: str) -> dict[str, str]:
    return {"run": str(run), "worker": str(worker), "algorithm": str(algorithm)}


def record_step(metrics: Mapping[str, float], *, run: str, worker: str, algorithm: str) -> None:
    """Set the gauges from one `MetaLearner.iterate` step dict (keys it lacks, such as
    ``meta_val_accuracy`` on most steps, are left at their last value; unknown keys ignored)."""
    backend = _backend()
    if backend is None:
        return
    tags = _tags(run, worker, algorithm)
    for key in STEP_GAUGES:
        if key in metrics:
            backend.set(key, float(metrics[key]), tags)


def record_episode(seconds: float, *, run: str, worker: str, algorithm: str) -> None:
    """One episode adapted: its inner-loop wall time into the histogram, and the counter."""
    backend = _backend()
    if backend is None:
        return
    tags = _tags(run, worker, algorithm)
    backend.observe("inner_loop_seconds", float(seconds), tags)
    backend.inc("episodes", 1.0, tags)


def record_failure(count: int = 1, *, run: str, worker: str, algorithm: str) -> None:
    """``count`` worker-group failures (a worker died; the group restarts from the last
    checkpoint while ``distributed.max_failures`` allows). ``count=0`` at the start of a run makes
    the series exist at 0, so that Prometheus' ``increase()`` counts the first failure (a series
    that first appears at 1 shows an increase of 0)."""
    backend = _backend()
    if backend is None or count < 0:
        return
    backend.inc("worker_failures", float(count), _tags(run, worker, algorithm))


def release(*, run: str, worker: str, algorithm: str) -> None:
    """The run of these tags has ended in a process that lives on (a Tune trial in a reused
    actor): stop keeping its gauges alive, so that they leave Ray's export about two export
    intervals later instead of showing its last values for ever. Counters and histograms stay."""
    backend = _backend()
    if backend is not None:
        backend.release(_tags(run, worker, algorithm))


def record_val(accuracy: float, *, run: str, worker: str, algorithm: str) -> None:
    """Meta-validation accuracy, e.g. of a Tune trial (``run`` = the trial's name)."""
    backend = _backend()
    if backend is None:
        return
    backend.set("meta_val_accuracy", float(accuracy), _tags(run, worker, algorithm))


def instrument_episodes(learner: MetaLearner, *, run: str, worker: str, algorithm: str) -> None:
    """Time every episode ``learner`` adapts (meta-train and meta-validation) and count it:
    an observer on `MetaLearner.episode_observers`, which times each episode for its observers.
    Costs nothing measurable, and records nothing when no backend is active."""

    def observe(spec: EpisodeSpec, result: EpisodeResult, seconds: float) -> None:
        record_episode(seconds, run=run, worker=worker, algorithm=algorithm)

    learner.episode_observers.append(observe)


def record_serve_seconds(what: Literal["adaptation", "classify"], seconds: float, *, init: str) -> None:
    """A Serve replica adapted an init to a support set, or classified one request's texts, in
    ``seconds``."""
    backend = _backend()
    if backend is not None:
        backend.observe(f"serve_{what}_seconds", float(seconds), {"init": init})


def record_task_cache(hit: bool, *, init: str) -> None:
    """A Serve replica found the adapted task it needed in its cache (``hit``), or adapted it."""
    backend = _backend()
    if backend is not None:
        backend.inc(f"serve_task_cache_{'hits' if hit else 'misses'}", 1.0, {"init": init})

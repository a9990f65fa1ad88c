"""The ``ray.util.metrics`` backend of `metapeft_ray.core.metrics`.

Each node's ``--metrics-export-port`` serves what it records as ``ray_metapeft_<name>``
(counters with ``_total``, histograms as ``_bucket`` / ``_sum`` / ``_count``) about 10 s after it
is recorded. `metapeft_ray.on_ray` installs it (`metrics.use_runtime_backend`) when imported, so
every process that runs Ray-layer code (Train workers, the failure counter, Tune trials, Serve
replicas) records through Ray while Ray is initialised there; the metric objects are created
once per process, on first use, as Ray wants.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from metapeft_ray.core.metrics import LATENCY_BUCKETS, Backend, MetricSpec


class RayBackend(Backend):
    """``ray.util.metrics`` objects, plus a daemon thread that re-sets every gauge's last value.

    Why the thread: Ray 2.60's node agent drops a gauge series when its process has not re-set it
    for two export intervals (``RAY_metrics_report_interval_ms``, 10 s by default), even while
    the process lives; a meta-step slower than that would make the gauges blink in and out of
    Prometheus. Re-setting them every interval keeps a live worker's last values visible, as a
    Prometheus gauge is expected to behave. They leave the export when the worker exits, or two
    intervals after the run that set them `release`s them: a Tune actor reused for the next
    trial must not keep the last trial's gauges alive.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._refresher: threading.Thread | None = None

    def live(self) -> bool:
        """Ray is initialised in this process. Only looked up in ``sys.modules``: if nothing
        imported Ray, it is not initialised, and a record call should not import it."""
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    def _create(self, spec: MetricSpec) -> Any:
        from ray.util import metrics as rm

        if spec.kind == "gauge":
            return rm.Gauge(spec.full_name, spec.description, tag_keys=spec.tag_keys)
        if spec.kind == "counter":
            return rm.Counter(spec.full_name, spec.description, tag_keys=spec.tag_keys)
        return rm.Histogram(
            spec.full_name, spec.description, boundaries=list(LATENCY_BUCKETS), tag_keys=spec.tag_keys
        )

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.get(name).set(value, tags=dict(tags))
        with self._lock:
            self._last[(name, tuple(sorted(tags.items())))] = value
            if self._refresher is None:
                self._refresher = threading.Thread(
                    target=self._refresh, name="metapeft-gauge-refresh", daemon=True
                )
                self._refresher.start()

    def _refresh(self) -> None:
        import ray

        try:
            period = max(1.0, ray._config.metrics_report_interval_ms() / 1000.0)
        except Exception:  # private API; the default report interval is 10 s
            period = 5.0
        while True:
            time.sleep(period)
            if not ray.is_initialized():
                with self._lock:
                    self._last.clear()
                    self._refresher = None
                return
            self.refresh_once()

    def refresh_once(self) -> None:
        """Re-set every kept gauge to its last value."""
        with self._lock:
            last = list(self._last.items())
        for (name, tags), value in last:
            self.get(name).set(value, tags=dict(tags))

    def release(self, tags: Mapping[str, str]) -> None:
        key = tuple(sorted(tags.items()))
        with self._lock:
            self._last = {k: v for k, v in self._last.items() if k[1] != key}

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        if value == 0:  # Counter.inc refuses 0; the record it wraps creates the series at 0
            self.get(name)._record(0.0, tags=dict(tags))
        else:
            self.get(name).inc(value, tags=dict(tags))

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.get(name).observe(value, tags=dict(tags))

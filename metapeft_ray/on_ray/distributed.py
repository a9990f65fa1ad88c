"""Distributed meta-training on Ray Train (V2): `train_ray`, what `metapeft train` runs.

Thin by design: every worker builds the same `MetaLearner` and calls ``learner.iterate`` with its
``rank``/``world`` and an all-reduce; the learner already splits the meta-batch
(`train.shard`), packs meta-gradients and statistics into one flat vector and divides by
the meta-batch size, so a W-worker run equals the single-process run (float32 tolerance).

Order of work (everything that can be checked is checked before any cluster resource is taken):

1. config (re-validated with ``--workers``), data and episode shapes (`prepare_sampler`), storage
   (`storage.check_writable`), and that a rerun of ``run.name`` is compatible with what is stored;
2. a run that already finished is recognised (``training.json``) and not re-run;
3. Ray: an unreachable ``--address`` / ``RAY_ADDRESS`` fails in seconds, a request for more
   workers than the cluster can ever hold fails before the trainer starts;
4. ``TorchTrainer.fit()``: rank 0 checkpoints ``learner.state_dict()`` (+ the metric history)
   every ``meta.checkpoint_every`` steps and at the end into ``run.output_dir/run.name`` (local or
   ``s3://``); rerunning the same name resumes from the latest checkpoint (Ray Train V2 reloads
   its checkpoint-manager snapshot from that directory), and a killed worker restarts the group
   from the latest checkpoint up to ``distributed.max_failures`` times;
5. the driver loads the final checkpoint and exports the adapter (`recipes.finish`); the meta-test
   runs as Ray tasks with the workers' resources, a share of the episodes each
   (`fan_out_meta_test`), and the driver merges their per-episode scores into the report.

Secrets never travel through Ray task arguments: the train-loop config is the plain config tree,
and the pickled pyarrow S3 filesystem carries no credentials (checked); workers take ``AWS_*``
from their own process environment (the cluster nodes' environment, or the job's runtime env).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metapeft_ray.core import metrics as live_metrics
from metapeft_ray.core import runstore, storage
from metapeft_ray.core.config import Config, ConfigError
from metapeft_ray.core.evaluate import EpisodeScores
from metapeft_ray.core.model import quiet_transformers
from metapeft_ray.core.recipes import (
    MetaTestFanOut,
    export_state,
    finished_run,
    training_record,
    validation_line,
)
from metapeft_ray.core.runstore import run_uri, staged, write_header
from metapeft_ray.core.train import MetaLearner, prepare_sampler

__all__ = [
    "ClusterCapacityError",
    "ClusterView",
    "RayConnectionError",
    "TrainingFailedError",
    "check_capacity",
    "cluster_view",
    "fan_out_meta_test",
    "fit",
    "train_on",
    "train_ray",
    "worker_resources",
]

CONNECT_TIMEOUT_S = 3.0
# Test hook only (never a secret): workers write their PIDs there and may hold at a step so a
# test can kill one by PID at a known point. Forwarded to workers through the runtime env.
TEST_PID_DIR_ENV = "METAPEFT_TEST_PID_DIR"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state and job clients find the dashboard
LOGGER_LEVEL_ENV = "RAY_LOGGER_LEVEL"  # the `ray` logger's level in the Ray processes it reaches


class RayConnectionError(ValueError):
    """The Ray cluster named by ``--address`` / ``RAY_ADDRESS`` cannot be reached."""


class ClusterCapacityError(ValueError):
    """More workers (or bigger ones) than the cluster can ever hold."""


class TrainingFailedError(RuntimeError):
    """The workers failed more than ``distributed.max_failures`` times."""


# -- driver -------------------------------------------------------------------------------------


def check_meta_batch(
    meta_batch_size: int, workers: int, field: str = "distributed.workers (--workers)"
) -> None:
    """Each rank runs its share of a meta-batch (`train.shard`): with fewer episodes than workers
    some ranks idle through every step, so that is refused; a meta-batch that is not a multiple of
    the workers leaves some ranks idle for part of each step, which is only worth a warning."""
    if meta_batch_size < workers:
        raise ValueError(
            f"meta.meta_batch_size={meta_batch_size} is smaller than {field}={workers}: "
            f"{workers - meta_batch_size} worker(s) would idle through every meta-step; set "
            f"meta.meta_batch_size to a multiple of {workers} or use {meta_batch_size} worker(s)"
        )
    if meta_batch_size % workers:
        most = -(-meta_batch_size // workers)
        print(
            f"metapeft: warning: meta.meta_batch_size={meta_batch_size} is not a multiple of {field}="
            f"{workers}; each step waits for the ranks with {most} episodes while others have "
            f"{meta_batch_size // workers} (use {workers * most})",
            file=sys.stderr,
        )


def train_ray(
    cfg: Config,
    *,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Meta-train on Ray, export the adapter, meta-test it; returns `recipes.finish`'s report.
    ``progress``: a progress bar and one line per validation on this process; ``verbose``: Ray's
    and the libraries' own info and warnings too (without it only their errors show)."""
    if workers is not None:
        cfg = cfg.with_overrides({"distributed.workers": workers})
    check_meta_batch(cfg.meta.meta_batch_size, cfg.distributed.workers)
    sampler = prepare_sampler(cfg)
    uri = run_uri(cfg)
    storage.check_writable(uri)
    runstore.check_resumable(cfg, uri)
    record = runstore.finished_training(cfg, uri)
    if record is not None:
        return {**finished_run(cfg, uri, record, sampler, progress), "distributed": record}

    with staged(uri) as out:  # early, so an interrupted run is still checked on its rerun
        write_header(cfg, sampler, out)

    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    started_here = connect(cfg, address, quiet=not verbose)
    try:
        use_gpu, per_worker = worker_resources(cfg, cluster_view())
        check_capacity(cfg.distributed.workers, per_worker)
        t0 = time.monotonic()
        result, restarts = fit(cfg, use_gpu, per_worker, progress, quiet=not verbose)
        fit_s = time.monotonic() - t0

        state = runstore.load_state(storage.join(uri, Path(result.checkpoint.path).name))
        if restarts:
            print(
                f"metapeft: recovered from {restarts} worker-group failure(s) "
                f"(distributed.max_failures="
                f"{cfg.distributed.max_failures}); resumed from the last checkpoint each time"
            )
        record = training_record(
            state["meta_step"],
            cfg.meta.meta_steps,
            workers=cfg.distributed.workers,
            fit_s=fit_s,
            use_gpu=use_gpu,
            restarts=restarts,
        )
        runstore.write_record(uri, record)
        fan_out = fan_out_meta_test(
            cfg.distributed.workers, use_gpu, per_worker, progress=progress, quiet=not verbose
        )
        report = export_state(cfg, sampler, uri, state, progress, fan_out)
    finally:
        if started_here:
            ray.shutdown()
    return {**report, "distributed": record}


# -- Ray connection and capacity ----------------------------------------------------------------


def connect(cfg: Config, address: str | None, dashboard: bool = False, quiet: bool = False) -> bool:
    """Connect to ``address`` (checked first, so a wrong one fails in seconds) or start an
    embedded local Ray, with the dashboard (and so the state API) if ``dashboard``. Returns True
    when this call started Ray (and must shut it down). ``quiet``: the ``ray`` loggers of this
    process and of the embedded Ray's processes show only errors (see `init_local`)."""
    import ray

    if address is not None:
        _probe(address)
    if ray.is_initialized():  # e.g. a notebook or a test session that already holds a cluster
        return False
    level = {"logging_level": logging.ERROR} if quiet else {}
    if address is None:
        d = cfg.distributed
        # The embedded Ray's size is known before it starts: check the workers fit it first.
        local = {"CPU": float(d.local_num_cpus or os.cpu_count() or 1)}
        local["GPU"] = float(torch.cuda.device_count())
        check_capacity(d.workers, worker_resources(cfg, ClusterView(local))[1], nodes=[local])
        init_local(  # for a dashboard otherwise: `ray start --head`, then --address
            dashboard,
            quiet=quiet,
            num_cpus=int(local["CPU"]),
            object_store_memory=d.local_object_store_mb << 20,
            log_to_driver=True,
            **level,
        )
        return True
    try:
        ray.init(address=address, log_to_driver=True, **level)
    except Exception as err:  # ConnectionError, auth failures, version mismatch ...
        raise RayConnectionError(
            f"cannot connect to the Ray cluster at {address!r}: {_first_line(err)}"
        ) from None
    return True


def init_local(dashboard: bool, quiet: bool = False, **init_kwargs: Any) -> Any:
    """``ray.init`` of a new local Ray, with or without its dashboard (and so the state API).

    The dashboard gets a free loopback port, and ``RAY_API_SERVER_ADDRESS`` names it in the
    environment the Ray processes start with (this process's own is restored after): a
    state-API call inside the cluster (Ray Train's placement-group cleaner) then finds this
    dashboard even when other Ray instances run on the machine, where auto-detection fails with
    "Found multiple active Ray instances".

    ``quiet``: ``RAY_LOGGER_LEVEL=error`` in that environment, so the ``ray`` logger of every
    Ray process shows only errors. Without a dashboard Ray Train's placement-group cleaner would
    otherwise warn every second that the state API does not answer (~100 lines per quickstart;
    harmless here, since this process shuts its Ray down itself). Not ``ray.LoggingConfig``: with
    a job logging config Ray drops the ``(RayTrainWorker pid=...)`` prefix of worker logs."""
    import ray

    env = {LOGGER_LEVEL_ENV: "error"} if quiet else {}
    if not dashboard:
        with _environ(env):
            return ray.init(include_dashboard=False, **init_kwargs)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with _environ({**env, API_SERVER_ENV: f"http://127.0.0.1:{port}"}):
        return ray.init(
            include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, **init_kwargs
        )


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in this process's environment (and so in the processes it starts) meanwhile."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def check_state_api(field: str) -> None:
    """Fail unless the cluster's state API answers where Ray Train asks it: on the head node.

    Ray Train removes the placement group of a run whose controller died (a Tune trial that
    ASHA or the end of the search stopped) only after the state API says the controller is
    dead. Without it the workers' resources stay reserved for the driver's lifetime and the
    next trial waits for them for ever."""
    import ray

    head = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(_state_api_error)
    if (err := ray.get(head.remote(), timeout=60)) is not None:
        raise ConfigError(
            f"{field} needs the Ray state API, which the cluster does not serve ({err[:160]}): "
            "Ray Train frees the workers of a stopped trial only through it. Start the head "
            f"with the dashboard (`ray start --head`, with ray[default] installed) or set {field}: 1"
        )


def _state_api_error() -> str | None:
    """Why the state API does not answer this process (None: it does)."""
    from ray.util.state import list_nodes

    try:
        list_nodes(limit=1, timeout=10, raise_on_missing_output=False)
    except Exception as err:  # ServerUnavailable, RayStateApiException, ValueError ...
        return _first_line(err)
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else repr(err)


def _probe(address: str) -> None:
    """A TCP connect to the GCS (``host:port``) or Ray Client (``ray://host:port``) port, so an
    unreachable address fails in seconds instead of ray.init's minute of retries."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RayConnectionError(
            f"Ray address {address!r} is not of the form host:port, ray://host:port or auto"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise RayConnectionError(
            f"cannot reach the Ray cluster at {address!r} ({err.strerror or err}); check "
            "--address / "
            "RAY_ADDRESS (the head's GCS port, 6379 by default, or ray://host:10001) and that the "
            "cluster is running"
        ) from None


@dataclass(frozen=True)
class ClusterView:
    """What a run can get from a cluster: the resources it has now (``ray.cluster_resources()``)
    and the node types its autoscaler may add, as ``(resources of one node, max_count)`` with
    max_count -1 for unbounded (none where no autoscaler published them: a fixed cluster, the
    embedded local Ray). A plain value, so what is decided from it is tested without Ray."""

    resources: Mapping[str, float]
    node_types: tuple[tuple[Mapping[str, float], int], ...] = ()

    def can_have(self, resource: str) -> bool:
        """The cluster has ``resource`` now, or one of its node types would bring it: a KubeRay
        cluster whose GPU group is at 0 replicas still has GPUs to offer."""
        return self.resources.get(resource, 0) > 0 or any(
            res.get(resource, 0) > 0 and count != 0 for res, count in self.node_types
        )


def cluster_view() -> ClusterView:
    """The connected cluster's `ClusterView`."""
    import ray

    return ClusterView(dict(ray.cluster_resources()), tuple(_autoscaler_node_types()))


def worker_resources(cfg: Config, cluster: ClusterView) -> tuple[bool, dict[str, float]]:
    """Whether the workers use GPUs, and one worker's resource request. ``use_gpu: auto`` asks
    for one GPU per worker when the cluster has GPUs or can scale to nodes that have them (so an
    autoscaling cluster that starts without GPU nodes, and publishes its node types, still gets
    GPU workers)."""
    d = cfg.distributed
    use_gpu = d.use_gpu == "yes" or (d.use_gpu == "auto" and cluster.can_have("GPU"))
    per_worker = {"CPU": d.cpus_per_worker, **d.resources_per_worker}
    if use_gpu:
        per_worker.setdefault("GPU", 1.0)
    return use_gpu, per_worker


def _fits(node: Mapping[str, float], per_worker: Mapping[str, float]) -> float:
    """How many workers of ``per_worker`` one node of resources ``node`` holds (inf: unbounded)."""
    return min((node.get(k, 0.0) // v for k, v in per_worker.items() if v > 0), default=float("inf"))


def check_capacity(
    workers: int,
    per_worker: Mapping[str, float],
    nodes: list[Mapping[str, float]] | None = None,
    field: str = "distributed.workers, --workers",
    types: list[tuple[Mapping[str, float], int]] | None = None,
) -> float:
    """Fail before the trainer starts when ``workers`` can never be placed (``field`` names the
    setting to lower); else return how many such workers the cluster can hold (inf: unbounded).
    ``nodes`` (each node's total resources) and ``types`` (the autoscaler's node types, as in
    `ClusterView`) describe the cluster; without ``nodes`` they are read from the connected Ray
    (``ray.nodes()``, public, and `_autoscaler_node_types`), so the decision is tested without Ray.

    Compared with the cluster's *total* resources (not what is free now: busy resources free up,
    and Ray queues the worker group until they do), node by node, since a worker cannot span
    nodes. An autoscaling cluster may grow: when the autoscaler published its node types, the
    bound is what those types could hold at their max_count; when it did not (a fixed-size
    cluster, `ray start` by hand, the embedded local Ray), the cluster is taken as it is, since
    nothing will add nodes to it and the trainer would otherwise wait for ever.
    """
    if nodes is None:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        types = _autoscaler_node_types()
    now = sum(_fits(n, per_worker) for n in nodes)
    bound, source = now, "the cluster's nodes"
    if types:  # none given: a cluster without autoscaler (the embedded local Ray before it starts)
        # max_count -1: unbounded; 0 * inf would be nan, so a type that fits no worker adds 0.
        grown = sum(
            (float("inf") if count == -1 else count) * fit
            for res, count in types
            if (fit := _fits(res, per_worker)) > 0
        )
        bound, source = max(now, grown), "the cluster's nodes and the autoscaler's node types"
    if bound >= workers:
        return bound
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in per_worker}
    have = ", ".join(f"{k}={total.get(k, 0):g}" for k in per_worker)
    need = ", ".join(f"{k}={v:g}" for k, v in per_worker.items())
    hint = (
        (
            "no node (type) can hold even one worker; lower distributed.cpus_per_worker / "
            "distributed.resources_per_worker or add such nodes"
        )
        if bound == 0
        else (f"use at most {int(bound)} workers ({field}), or smaller workers")
    )
    raise ClusterCapacityError(
        f"{workers} workers of {{{need}}} cannot be placed: {source} hold at most {int(bound)} "
        f"(cluster total {have}); {hint}"
    )


def _autoscaler_node_types() -> list[tuple[dict[str, float], int]]:
    """``[(resources of one node, max_count)]`` from the autoscaler's published cluster config
    (KubeRay / cluster launcher with autoscaler v2); empty when there is none. Private Ray API,
    pinned ray version; any failure means "no autoscaler known". Ray 2.60 has no public API for
    this (``ray.autoscaler.sdk`` takes a launcher YAML, or requests resources); Ray Train reads
    the same record for its own capacity check (``get_max_resources_from_cluster_config``), and
    Ray Data for its autoscaling. The only private Ray state the capacity checks read: the nodes
    and resources come from ``ray.nodes()`` and ``ray.cluster_resources()``."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:
        return []
    if config is None:
        return []
    return [(dict(g.resources), int(g.max_count)) for g in config.node_group_configs if g.max_count != 0]


# -- the trainer --------------------------------------------------------------------------------


def fit(
    cfg: Config,
    use_gpu: bool,
    per_worker: dict[str, float],
    progress: bool,
    callbacks: list[Any] | None = None,
    quiet: bool = False,
    storage_name: str | None = None,
) -> tuple[Any, int]:
    """``TorchTrainer.fit`` of the worker loop; returns the result and the worker-group restarts
    (each also counted live in ``ray_metapeft_worker_failures_total``, see `_FailureCounter`).
    ``progress``: rank 0 feeds its steps to a bar drawn here (`_progress`); ``quiet``: Ray Train
    and the workers (their root logger, transformers) log only warnings and errors;
    ``storage_name``: the Train run's directory under ``run.output_dir`` when it is not
    ``run.name`` (which still names the run in the metrics' ``run`` tag)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, path = storage.pyarrow_filesystem(cfg.run.output_dir)
    env = {k: v for k, v in os.environ.items() if k == TEST_PID_DIR_ENV}
    failures = ray.remote(_FailureCounter).options(num_cpus=0).remote(live_metrics.tags_for(cfg, "driver"))
    try:
        with _progress(cfg.meta.meta_steps) if progress else contextlib.nullcontext() as feed:
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"config": cfg.to_dict(), "progress": feed, "quiet": quiet},
                scaling_config=ScalingConfig(
                    num_workers=cfg.distributed.workers, use_gpu=use_gpu, resources_per_worker=per_worker
                ),
                run_config=RunConfig(
                    name=storage_name or cfg.run.name,
                    storage_path=path,
                    storage_filesystem=fs if storage.is_remote(cfg.run.output_dir) else None,
                    failure_config=FailureConfig(max_failures=cfg.distributed.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                    worker_runtime_env={"env_vars": env} if env else None,
                    callbacks=[*(callbacks or []), _count_failures(failures)],
                    logging_config=LoggingConfig(log_level="WARNING" if quiet else "INFO"),
                ),
            )
            try:
                result = trainer.fit()
            except Exception as err:  # ray.train.TrainingFailedError after max_failures
                raise TrainingFailedError(
                    f"distributed training of {cfg.run.name!r} failed after "
                    f"{cfg.distributed.max_failures} restart(s): {_first_line(err)}; fix the cause "
                    "and rerun the same run.name to resume from its last checkpoint"
                ) from err
        # fit succeeded, so the group restarted after each failure
        restarts = ray.get(failures.get.remote())
    finally:
        ray.kill(failures)
    if result.error is not None:
        raise TrainingFailedError(f"distributed training of {cfg.run.name!r} failed: {result.error}")
    if result.checkpoint is None:
        raise TrainingFailedError(f"distributed training of {cfg.run.name!r} reported no checkpoint")
    return result, restarts


@contextlib.contextmanager
def _progress(meta_steps: int) -> Iterator[Any]:
    """A progress bar and one line per validation, drawn by this (the driver) process while
    ``fit`` blocks it; yields the feed (a `ray.util.queue.Queue`, a CPU-less actor) that rank 0
    puts each step's metrics on. Drawn here, not printed by the worker: Ray forwards a worker's
    output prefixed, and Ray Train 2.60 emits each ``print`` of a worker twice (its print patch
    tees to stdout and to a console logger)."""
    import threading

    import ray
    from ray.util.queue import Empty, Queue
    from tqdm.auto import tqdm

    feed = Queue(actor_options={"num_cpus": 0})
    bar = tqdm(total=meta_steps, desc="starting workers", unit="step")
    fitted = threading.Event()

    def show() -> None:
        while True:
            try:
                metrics = feed.get(timeout=0.5)
            except Empty:
                if fitted.is_set():  # everything rank 0 put is read
                    return
                continue
            except Exception:  # Ray shut down under the display: stop drawing, never fail the run
                return
            bar.set_description("meta-train", refresh=False)
            bar.n = int(metrics["meta_step"])  # absolute: a restarted group repeats steps
            bar.set_postfix(loss=f"{metrics['meta_loss']:.3f}", acc=f"{metrics['query_accuracy']:.2f}")
            if "meta_val_accuracy" in metrics:
                bar.write(validation_line(metrics, meta_steps))

    reader = threading.Thread(target=show, name="metapeft-progress", daemon=True)
    reader.start()
    try:
        yield feed
    finally:
        fitted.set()
        reader.join(timeout=30)
        bar.close()
        ray.kill(feed.actor)


class _FailureCounter:
    """The worker-group failures of one fit, counted live: a tiny Ray actor (``ray.remote``, no
    CPU) that lives for the whole fit, told of each failure by `_count_failures` on the Train
    controller. It holds the run's ``ray_metapeft_worker_failures_total``: at 0 from the start
    (so Prometheus' ``increase()`` sees the first failure), one more per failure as it happens."""

    def __init__(self, tags: dict[str, str]) -> None:
        self.n, self.tags = 0, tags
        live_metrics.record_failure(0, **tags)

    def add(self) -> None:
        self.n += 1
        live_metrics.record_failure(1, **self.tags)

    def get(self) -> int:
        return self.n


def _count_failures(counter: Any) -> Any:
    """A ``ray.train.UserCallback`` for `_FailureCounter` ``counter``: Ray Train calls its
    ``after_exception`` on the controller once per failed worker group (each poll that finds
    failed workers leads to one restart, or to the end of the run past ``max_failures``)."""
    import ray.train

    class CountFailures(ray.train.UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            counter.add.remote()  # no wait: the controller's loop is asyncio

    return CountFailures()


# -- the export's work on the workers: training on, meta-test -----------------------------------


def fan_out_meta_test(
    workers: int,
    use_gpu: bool,
    per_worker: Mapping[str, float],
    *,
    progress: bool = False,
    quiet: bool = False,
) -> MetaTestFanOut:
    """A `recipes.MetaTestFanOut` that scores a learner's meta-test as ``workers`` Ray tasks,
    each with one training worker's resources (``per_worker``) and every ``workers``-th episode
    of each cell (episode i goes to part ``i % workers``, which also spreads the costly rows'
    prefix). The driver only puts the learner's state in the object store and merges the parts.

    Tasks, not the Train worker group: the meta-test is a stateless map over episode indices
    with a merge, and needs no process group, collective or checkpoint. As tasks it runs after
    the training record is written, Ray retries a lost part alone (a failure inside ``fit``
    would restart the whole group from its last checkpoint), and the same function serves every
    caller that holds a trained learner (`train_ray` and the export of a Tune search)."""

    def run(cfg: Config, learner: MetaLearner) -> list[EpisodeScores]:
        import ray
        from tqdm.auto import tqdm

        parts = min(workers, cfg.eval.episodes)  # never an empty part
        task = _worker_task(_meta_test_part, use_gpu, per_worker)
        state, threads = ray.put(learner.state_dict()), _threads(per_worker)
        pending = [
            task.remote(
                cfg.to_dict(), state, list(range(part, cfg.eval.episodes, parts)), use_gpu, threads, quiet
            )
            for part in range(parts)
        ]
        refs = list(pending)
        with tqdm(total=parts, desc=f"meta-test on {parts} worker(s)", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return ray.get(refs)  # raises a part's error, if any

    return run


def train_on(
    cfg: Config,
    state: Mapping[str, Any],
    use_gpu: bool,
    per_worker: Mapping[str, float],
    *,
    quiet: bool = False,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Meta-train the learner of ``state`` (a `MetaLearner.state_dict`, e.g. the checkpoint of a
    Tune trial that ASHA stopped early) on to ``meta.meta_steps``, in one Ray task with one
    training worker's resources (``per_worker``), not in this process. Returns the learner's
    state at ``meta.meta_steps`` (its tensors on the CPU) and the metrics of the steps it took.

    One task also for the state of a distributed run: the learner continues from the state
    (parameters, optimiser, step) and draws the same episodes, and one process computes the same
    meta-gradients as W ranks (float32 tolerance, see the module docstring); W workers would
    only be faster, at the price of a worker group for a few steps."""
    import ray

    task = _worker_task(_train_on, use_gpu, per_worker)
    return ray.get(task.remote(cfg.to_dict(), dict(state), use_gpu, _threads(per_worker), quiet))


def _worker_task(fn: Any, use_gpu: bool, per_worker: Mapping[str, float]) -> Any:
    """``fn`` as a Ray task with one training worker's resources. ``max_calls=1``: the task's
    process exits when it returns (no backbone left in an idle worker). The test hook's
    directory (`_test_hook`) goes with it, as to the Train workers."""
    import ray

    extra = {k: v for k, v in per_worker.items() if k not in ("CPU", "GPU")}
    env = {k: v for k, v in os.environ.items() if k == TEST_PID_DIR_ENV}
    return ray.remote(max_calls=1)(fn).options(
        num_cpus=per_worker.get("CPU", 1.0),
        num_gpus=per_worker.get("GPU", 0.0) if use_gpu else 0.0,
        resources=extra or None,
        runtime_env={"env_vars": env} if env else None,
    )


def _threads(per_worker: Mapping[str, float]) -> int:
    """torch's threads in a task: the CPUs it holds."""
    return max(1, int(per_worker.get("CPU", 1.0)))


def _worker_learner(
    config: dict[str, Any], state: dict[str, Any], use_gpu: bool, threads: int, quiet: bool
) -> tuple[Config, MetaLearner]:
    """In a `_worker_task`: the config and the learner rebuilt from its state, as the driver's."""
    from metapeft_ray.core.config import validate_config

    cfg = validate_config(config)
    if quiet:
        quiet_transformers()
    torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu else "cpu")
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg), device=device)
    learner.load_state_dict(state)
    return cfg, learner


def _meta_test_part(
    config: dict[str, Any],
    state: dict[str, Any],
    indices: list[int],
    use_gpu: bool,
    threads: int,
    quiet: bool,
) -> EpisodeScores:
    """One Ray task of `fan_out_meta_test`: the core's `recipes.meta_test_learner` on episodes
    ``indices``."""
    from metapeft_ray.core.recipes import meta_test_learner

    cfg, learner = _worker_learner(config, state, use_gpu, threads, quiet)
    return meta_test_learner(cfg, learner, indices)


def _train_on(
    config: dict[str, Any], state: dict[str, Any], use_gpu: bool, threads: int, quiet: bool
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The Ray task of `train_on`."""
    cfg, learner = _worker_learner(config, state, use_gpu, threads, quiet)
    history: list[dict[str, float]] = []
    for metrics in learner.iterate(cfg.meta.meta_steps, val_every=cfg.meta.val_every):
        history.append(metrics)
        _test_hook("train-on", learner.step)
    return learner.state_dict(), history  # CPU tensors: the driver may have no GPU


# -- the worker ---------------------------------------------------------------------------------


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the core's MetaLearner, this rank's share, an all-reduce."""
    import ray.train
    import ray.train.torch

    from metapeft_ray.core.config import validate_config

    cfg = validate_config(loop_config["config"])
    if loop_config["quiet"]:
        quiet_transformers()
        # Ray Train logs every report at INFO through a logger under the root one (named by its
        # file path, so `LoggingConfig` does not reach it): warnings and errors only.
        logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    feed = loop_config["progress"] if rank == 0 else None  # a `_progress` queue, or None
    torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))

    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg), device=ray.train.torch.get_device())
    tags = live_metrics.tags_for(cfg, rank)  # ray_metapeft_* on each node's metrics port
    live_metrics.instrument_episodes(learner, **tags)
    history: list[dict[str, float]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = runstore.load_state(d)
        learner.load_state_dict(state)
        history = list(state["history"])

    def on_step(metrics: dict[str, float]) -> None:
        if rank == 0:  # every rank holds the same all-reduced numbers
            live_metrics.record_step(metrics, **tags)
        if feed is not None:
            feed.put_nowait(metrics)
        _test_hook(f"rank{rank}", learner.step)

    m = cfg.meta
    learner.run(
        m.meta_steps,
        val_every=m.val_every,
        history=history,
        on_step=on_step,
        checkpoint_every=m.checkpoint_every,
        on_checkpoint=lambda state: _report(learner, state, rank),
        rank=rank,
        world=world,
        reduce=_all_reduce_sum,
    )


def _report(learner: MetaLearner, state: dict[str, Any], rank: int) -> None:
    """Every rank calls report (a barrier); only rank 0 hands over a checkpoint, uploaded in the
    background (``CheckpointUploadMode.ASYNC``) while the ranks go on with the next steps: Ray
    Train registers it once it is in storage, deletes the local copy, and lets the worker end only
    after its last upload. The report and the checkpoint record ``world_size``, the ranks the
    steps really ran on (a Tune trial's reports reach Tune through `TuneReportCallback`)."""
    import ray.train

    metrics = {**learner.reported(state["history"][-1]), "world_size": state["world_size"]}
    if rank != 0:
        ray.train.report(metrics)
        return
    d = tempfile.mkdtemp(prefix="metapeft-ckpt-")  # Ray Train deletes it after the upload
    runstore.save_state(d, state)
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(d),
        checkpoint_dir_name=runstore.checkpoint_name(learner.step),
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
    )


def _test_hook(who: str, step: int) -> None:
    """Tests only (``METAPEFT_TEST_PID_DIR``): publish this process's PID after each step (as
    ``<who>-step<N>-*.pid``, ``who`` ``rank<R>`` or ``train-on``) and, while ``hold-step<N>``
    exists there, wait after step N so the test can kill a worker then."""
    pid_dir = os.environ.get(TEST_PID_DIR_ENV)
    if not pid_dir:
        return
    d = Path(pid_dir)
    (d / f"{who}-step{step}-{uuid.uuid4().hex[:6]}.pid").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while (d / f"hold-step{step}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)

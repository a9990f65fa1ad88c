"""Ray Tune search over the PEFT configuration, scored on meta-validation episodes.

The search space (`metapeft_ray.core.space`, Ray-free) addresses the same config tree by dotted paths
(``peft.rank``, ``peft.placement``, ``meta.inner_lr``, ...). Each trial re-validates its config
(and its placement against the backbone's module names, on the meta device, without loading
weights) before it loads anything; an invalid combination is recorded as *rejected* with its
reason and the search goes on.
A trial meta-trains in one process, or is itself a distributed run (``tune.trial_workers``: a
`TorchTrainer` inside the trial), and reports the meta-validation accuracy (never the meta-test
classes) every ``meta.val_every`` steps with a checkpoint, so ASHA can stop weak trials early.
At the end the best config is written as YAML, the best trial's init is exported in PEFT format
and meta-tested with confidence intervals, and all trials are reported (Markdown, JSON, PNG). The
driver stays light: a stopped trial's training on and the meta-tests run as Ray tasks.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from metapeft_ray.core import runstore, storage
from metapeft_ray.core.config import Config, ConfigError, validate_config
from metapeft_ray.core.evaluate import markdown_table
from metapeft_ray.core.space import Distribution, TuneSettings, base_point, load_space, trial_config

if TYPE_CHECKING:
    from metapeft_ray.on_ray.distributed import ClusterView

OBJECTIVE = "meta_val_accuracy"
DRIVER_MEMORY = 512 << 20  # bytes: a distributed trial's own process (torch, tokenizer, episodes)


class SearchInterrupted(RuntimeError):
    """The search stopped before every trial finished (Ctrl-C); `--resume` continues it."""


def to_tune(dist: Distribution, grid: bool) -> Any:
    """The Tune sampler of one dimension of the space (``grid``: the grid searcher's)."""
    from ray import tune

    if dist.choice is not None:
        return tune.grid_search(dist.choice) if grid else tune.choice(dist.choice)
    if grid:
        raise ValueError("the grid searcher takes only `choice` dimensions")
    if dist.uniform:
        return tune.uniform(*dist.uniform)
    if dist.loguniform:
        return tune.loguniform(*dist.loguniform)
    return tune.randint(*dist.randint)


def precheck(cfg: Config) -> None:
    """Reject a config before loading weights or data: placement and rank against the backbone's
    module structure, built on the meta device (no memory, no download of weights)."""
    from metapeft_ray.core.model import adapter_skeleton

    adapter_skeleton(cfg)


def trial(params: dict[str, Any], base: dict[str, Any], workers: int = 1) -> None:
    """One Tune trial: validate, meta-train, report meta-val accuracy with a checkpoint."""
    from ray import tune

    from metapeft_ray.core import metrics as live_metrics
    from metapeft_ray.core.train import MetaLearner, prepare_sampler

    try:
        cfg = trial_config(validate_config(base), params)
        precheck(cfg)
        sampler = prepare_sampler(cfg)
    except ValueError as err:  # ConfigError, PlacementError, DataError
        tune.report({OBJECTIVE: 0.0, "status": "rejected", "reason": str(err).replace("\n", " ")})
        return
    if workers > 1:
        _distributed_trial(cfg, workers)
        return
    torch.set_num_threads(
        max(1, int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1)))
    )
    learner = MetaLearner.from_config(cfg, sampler)
    history: list[dict[str, float]] = []
    if (ckpt := tune.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            state = runstore.load_state(d)
        learner.load_state_dict(state)
        history = list(state.get("history", []))  # checkpoints before 2026-12 have none
    tags = {**live_metrics.tags_for(cfg, 0), "run": tune.get_context().get_trial_name()}
    live_metrics.instrument_episodes(learner, **tags)

    def report(state: dict[str, Any]) -> None:
        """A report to Tune with a checkpoint at every validation step (as a distributed trial's,
        whose ``meta.checkpoint_every`` is ``meta.val_every``): a scheduler may stop the trial
        there, and a paused or failed trial resumes from it."""
        with tempfile.TemporaryDirectory() as d:
            runstore.save_state(d, state)
            tune.report(
                {**learner.reported(state["history"][-1]), "status": "ok"},
                checkpoint=tune.Checkpoint.from_directory(d),
            )

    try:
        learner.run(
            cfg.meta.meta_steps,
            val_every=cfg.meta.val_every,
            history=history,
            on_step=lambda metrics: live_metrics.record_step(metrics, **tags),
            checkpoint_every=cfg.meta.val_every,
            on_checkpoint=report,
        )
    finally:  # finished, failed, or stopped (Tune ends a stopped trial's report with SystemExit)
        live_metrics.release(**tags)  # the actor may be reused: its gauges must not outlive it


def experiment_uri(cfg: Config) -> str:
    """Where a search of this base config keeps its experiment, trials and summary."""
    return storage.join(cfg.run.output_dir, f"{cfg.run.name}-tune")


def _distributed_trial(cfg: Config, workers: int) -> None:
    """A trial that is itself a distributed run: the same worker loop as `metapeft train`,
    reporting (with a checkpoint) at every validation step, relayed to Tune. Its ``run.name`` is
    the trial's name, so its workers tag their live metrics with it (as a single-process trial's)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from metapeft_ray.on_ray import distributed

    # the trainer's storage: beside the trial's in the experiment (local or s3://, as the search)
    name = tune.get_context().get_trial_name()
    cfg = cfg.with_overrides(
        {
            "distributed.workers": workers,
            "meta.checkpoint_every": cfg.meta.val_every,
            "run.output_dir": storage.join(experiment_uri(cfg), name),
            "run.name": name,
        }
    )
    use_gpu, per_worker = distributed.worker_resources(cfg, distributed.cluster_view())
    distributed.fit(
        cfg, use_gpu, per_worker, progress=False, callbacks=[TuneReportCallback()], storage_name="train"
    )


def _distributed_concurrency(base: Config, s: TuneSettings) -> int | None:
    """Checks for trials that are distributed runs, before any trial starts: each trial's workers
    fit the cluster, and the state API answers (see `distributed.check_state_api`). Returns
    how many trials may run at once: as many as the cluster holds worker groups for, so no
    trial waits while holding part of the cluster (``tune.max_concurrent`` lowers it)."""
    from metapeft_ray.on_ray import distributed

    _, per_worker = distributed.worker_resources(base, distributed.cluster_view())
    distributed.check_meta_batch(base.meta.meta_batch_size, s.trial_workers, "tune.trial_workers")
    slots = distributed.check_capacity(s.trial_workers, per_worker, field="tune.trial_workers")
    distributed.check_state_api("tune.trial_workers")
    fit = None if math.isinf(slots) else int(slots // s.trial_workers)
    return min((x for x in (fit, s.max_concurrent) if x is not None), default=None)


def trial_resources(s: TuneSettings, cluster: ClusterView) -> dict[str, float]:
    """What Tune reserves for one trial's own process on ``cluster`` (a
    `distributed.ClusterView`). A distributed trial's process only waits for its trainer: no
    CPU, and the memory it holds (Tune refuses an empty request)."""
    if s.trial_workers > 1:
        return {"cpu": 0, "memory": DRIVER_MEMORY}
    has_gpus = cluster.can_have("GPU")
    gpus = (1.0 if has_gpus else 0.0) if s.trial_gpus == "auto" else float(s.trial_gpus)
    if gpus > 0 and not has_gpus:
        raise ConfigError(
            f"tune.trial_gpus={s.trial_gpus!r}, but the cluster has no GPU and none of its node "
            "types (if it autoscales) has one, so no trial would ever start; set tune.trial_gpus "
            "to 0 or auto, or add GPU nodes"
        )
    return {"cpu": s.trial_cpus, "gpu": gpus}


def pareto_front(rows: list[dict[str, Any]], second: str) -> list[dict[str, Any]]:
    """Trials not dominated in (max accuracy, min ``second``)."""
    ok = [r for r in rows if r["status"] == "ok"]
    return [
        r
        for r in ok
        if not any(
            o[OBJECTIVE] >= r[OBJECTIVE]
            and o[second] <= r[second]
            and (o[OBJECTIVE] > r[OBJECTIVE] or o[second] < r[second])
            for o in ok
        )
    ]


def _plot(rows: list[dict[str, Any]], second: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for status, marker in (("ok", "o"), ("stopped early", "x")):
        pts = [r for r in rows if r["status"] == status]
        ax.scatter([r[second] for r in pts], [r[OBJECTIVE] for r in pts], marker=marker, label=status)
    front = sorted(pareto_front(rows, second), key=lambda r: r[second])
    ax.plot([r[second] for r in front], [r[OBJECTIVE] for r in front], "--", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(second.replace("_", " "))
    ax.set_ylabel("meta-val accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rows(
    result_grid: Any, meta_steps: int, keys: list[str], ranked_by: str = OBJECTIVE
) -> list[dict[str, Any]]:
    """One row per trial from its last report; its ``OBJECTIVE`` is that report's ``ranked_by``
    (with ``meta.keep: best``, the best validation so far: what the trial's export keeps)."""
    rows = []
    for r in result_grid:
        m = r.metrics or {}
        status = m.get("status", "ok" if OBJECTIVE in m else "error")  # distributed trials: no status
        if r.error is not None:
            status = "error"
        elif status == "ok" and m.get("meta_step", meta_steps) < meta_steps:
            status = "stopped early"
        rows.append(
            {
                "trial": f"trial_{m['trial_id']}" if "trial_id" in m else Path(r.path or "?").name,
                **{k: r.config.get(k) for k in keys},
                OBJECTIVE: m.get(ranked_by, m.get(OBJECTIVE, math.nan)),
                "meta_step": m.get("meta_step", 0),
                "trainable_params": m.get("trainable_params", math.nan),
                "adapt_ms": m.get("adapt_ms", math.nan),
                "status": status,
                "reason": m.get("reason") or (str(r.error).splitlines()[0] if r.error else ""),
                "checkpoint_path": m.get("checkpoint_path"),  # a distributed trial's Train checkpoint
                "_result": r,
            }
        )
    return rows


def _markdown(
    rows: list[dict[str, Any]], keys: list[str], best: dict[str, Any] | None, base_row: dict[str, Any] | None
) -> str:
    head = ["trial", *keys, "meta-val acc", "params", "adapt ms", "steps", "status"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: -(r[OBJECTIVE] if r[OBJECTIVE] == r[OBJECTIVE] else -1)):
        status = r["status"] + (f": {r['reason'][:80]}" if r["reason"] else "")
        out.append(
            "| "
            + " | ".join(
                [
                    r["trial"] + (" (base config)" if r is base_row else ""),
                    *[str(r[k]) for k in keys],
                    f"{100 * r[OBJECTIVE]:.1f}",
                    f"{r['trainable_params']:,.0f}"
                    if r["trainable_params"] == r["trainable_params"]
                    else "-",
                    f"{r['adapt_ms']:.0f}" if r["adapt_ms"] == r["adapt_ms"] else "-",
                    str(r["meta_step"]),
                    status,
                ]
            )
            + " |"
        )
    if best:
        out += ["", f"Best trial: {best['trial']} ({100 * best[OBJECTIVE]:.1f} % meta-val accuracy)"]
    return "\n".join(out) + "\n"


def _comparison(report: dict[str, Any]) -> str:
    """Meta-test of the best trial next to the base config's trial (same budget, same episodes)."""
    if "best" not in report or "base_trial" not in report:
        return ""
    if report["base_trial"].get("is_best"):
        return "\nThe base config's own trial was the best: the search found nothing better.\n"

    def label(name: str, t: dict[str, Any]) -> str:
        stop = t["stopped_early_at"]
        note = f", stopped by ASHA at step {stop} and trained on" if stop is not None else ""
        return f"{name} ({t['trial']}{note}; {t['meta_step']} meta-steps)"

    rows = {
        label(n, report[k]): report[k]["meta_test"]["meta"]
        for n, k in (("best", "best"), ("base config", "base_trial"))
    }
    return "\n## Meta-test: best trial against the base config\n\n" + markdown_table(rows)


def run_search(
    base: Config, space_path: str, *, address: str | None = None, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """The whole search: Tune, then export + meta-test of the best trial, then the report."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from metapeft_ray.core.recipes import finish
    from metapeft_ray.core.runstore import staged
    from metapeft_ray.core.train import BEST_VAL_ACCURACY, MetaLearner, prepare_sampler
    from metapeft_ray.on_ray.distributed import (
        cluster_view,
        connect,
        fan_out_meta_test,
        train_on,
        worker_resources,
    )

    space = load_space(space_path, base)
    s = space.tune
    start = base_point(base, space) if s.compare_base else None
    prepare_sampler(base)  # data and episode shapes, before any cluster resource
    root = experiment_uri(base)
    name = Path(root).name  # <run.name>-tune
    storage.check_writable(base.run.output_dir)
    distributed_trials = s.trial_workers > 1
    connect(base, address, dashboard=distributed_trials)
    max_concurrent = _distributed_concurrency(base, s) if distributed_trials else s.max_concurrent
    resources = trial_resources(s, cluster_view())
    # The exports' training on and meta-tests run on the cluster, with one worker's (or a
    # single-process trial's) resources, the meta-test in as many parts as a trial has workers:
    # not on this driver.
    use_gpu, per_part = (
        worker_resources(base, cluster_view())
        if distributed_trials
        else (resources["gpu"] > 0, {"CPU": float(resources["cpu"]), "GPU": resources["gpu"]})
    )
    fan_out = fan_out_meta_test(s.trial_workers, use_gpu, per_part, progress=progress)

    fs, path = storage.pyarrow_filesystem(base.run.output_dir)
    exp_path = storage.join(path, name)
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=base.to_dict(), workers=s.trial_workers), resources
    )
    if resume:
        if not tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
            raise ConfigError(f"--resume: no Tune experiment to resume at {root}")
        tuner = tune.Tuner.restore(exp_path, trainable, resume_errored=True, storage_filesystem=fs)
    else:
        search_alg = None
        first = [start] if start else None  # a grid holds the base point already, if it is in it
        if s.searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(metric=OBJECTIVE, mode="max", seed=s.seed, points_to_evaluate=first)
        elif s.searcher == "random":
            from ray.tune.search import BasicVariantGenerator

            search_alg = BasicVariantGenerator(points_to_evaluate=first, random_state=s.seed)
        # Rungs in meta-steps, not in Tune iterations: a resumed distributed trial restarts its
        # iteration count while its Train run goes on from its checkpoint's step.
        grace = min(s.grace_period * base.meta.val_every, base.meta.meta_steps)
        scheduler = (
            ASHAScheduler(
                time_attr="meta_step",
                max_t=base.meta.meta_steps,
                grace_period=grace,
                reduction_factor=s.reduction_factor,
            )
            if s.scheduler == "asha"
            else None
        )
        tuner = tune.Tuner(
            trainable,
            param_space={k: to_tune(d, s.searcher == "grid") for k, d in space.search.items()},
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE,
                mode="max",
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=1 if s.searcher == "grid" else s.num_samples,
                max_concurrent_trials=max_concurrent,
                # a single-process trial's actor keeps torch/transformers imported
                reuse_actors=not distributed_trials,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=path,
                storage_filesystem=fs,
                verbose=1 if progress else 0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    grid = tuner.fit()
    # After Ctrl-C Tune returns normally, having saved the experiment state before stopping the
    # live trials: in that saved state an interrupted search still has unfinished trials.
    saved = tune.ExperimentAnalysis(exp_path, storage_filesystem=fs)
    unfinished = [t for t in saved.trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        raise SearchInterrupted(
            f"search interrupted with {len(unfinished)} unfinished trial(s); its state is saved in "
            f"{root}: continue it with `metapeft tune ... --resume`"
        )

    keys = list(space.search)
    rows = _rows(
        grid, base.meta.meta_steps, keys, BEST_VAL_ACCURACY if base.meta.keep == "best" else OBJECTIVE
    )
    finished = [r for r in rows if r["status"] in ("ok", "stopped early")]
    best = max(finished, key=lambda r: r[OBJECTIVE], default=None)
    base_row = next((r for r in finished if start and all(r[k] == start[k] for k in keys)), None)
    report: dict[str, Any] = {"space": space.model_dump(mode="json"), "base": base.to_dict()}

    def export(row: dict[str, Any], name: str, out: Path) -> dict[str, Any]:
        """Export a trial's init as ``out/name`` and meta-test it, at the full budget: a trial that
        ASHA stopped early is first trained on from its checkpoint to ``meta.meta_steps`` (the same
        episodes it would have seen), so best and base compare like for like. The training on
        (`distributed.train_on`: one task with one worker's resources, also for a distributed
        trial) and the meta-test (``fan_out``) run as Ray tasks; this driver reads the
        checkpoint's state and writes the files."""
        cfg = trial_config(base, {**{k: row[k] for k in keys}, "run.name": name})
        ckpt = row["_result"].checkpoint
        if ckpt is None and row["checkpoint_path"]:
            from ray.train import Checkpoint

            ckpt = Checkpoint(row["checkpoint_path"], filesystem=fs)
        with ckpt.as_directory() as d:
            state = runstore.load_state(d)
        stopped_at = int(state["meta_step"])
        history: list[dict[str, float]] = []
        if stopped_at < cfg.meta.meta_steps:
            state, history = train_on(cfg, state, use_gpu, per_part)
        # The backbone is still loaded here (on the CPU, no forward pass): `finish` exports
        # through the PEFT model's `save_pretrained`, which needs the adapter's tensors in it.
        learner = MetaLearner.from_config(cfg, prepare_sampler(cfg), device=torch.device("cpu"))
        learner.load_state_dict(state)
        done = finish(cfg, learner, out / name, history, progress, fan_out)
        if "kept" in done:  # meta.keep=best: the init exported is the best validation's
            val = done["kept"][OBJECTIVE]
        else:
            val = history[-1][OBJECTIVE] if history else row[OBJECTIVE]
        return {
            "trial": row["trial"],
            **{k: row[k] for k in keys},
            OBJECTIVE: val,
            "meta_step": learner.step,
            "stopped_early_at": stopped_at if history else None,
            "meta_test": done["results"],
        }

    with staged(storage.join(root, "summary")) as out:
        if best is not None:
            best_cfg = trial_config(base, {**{k: best[k] for k in keys}, "run.name": "best"})
            (out / "best.yaml").write_text(
                "# metapeft train --config best.yaml   (best configuration of the search)\n"
                + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False)
            )
            report["best"] = export(best, "best", out)
        if base_row is not None:
            report["base_trial"] = (
                {**report["best"], "is_best": True} if base_row is best else export(base_row, "base", out)
            )
        report["trials"] = [{k: v for k, v in r.items() if k != "_result"} for r in rows]
        if s.second_objective:
            report["pareto_front"] = [r["trial"] for r in pareto_front(rows, s.second_objective)]
            if any(r["status"] == "ok" for r in rows):
                _plot(rows, s.second_objective, out / "accuracy_vs_params.png")
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "report.md").write_text(
            f"# Tune search {name}\n\n" + _markdown(rows, keys, best, base_row) + _comparison(report)
        )
    return report

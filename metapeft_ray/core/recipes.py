"""Recipes: setup -> train -> finish, as short as the work allows. The CLI calls these.

Artifacts of a run, under ``run.output_dir/run.name`` (a local dir or ``s3://``):
``config.yaml``, ``splits.json``, ``metrics.jsonl`` (one line per meta-step), ``adapter/``
(PEFT format + metapeft.json), ``report.json`` and ``report.md`` (the meta-test table); their
names, formats and the checks of a rerun are `metapeft_ray.core.runstore`'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metapeft_ray.core import baselines, runstore, storage
from metapeft_ray.core import metrics as live_metrics
from metapeft_ray.core.config import Config
from metapeft_ray.core.episodes import EpisodeSampler
from metapeft_ray.core.evaluate import (
    EpisodeScores,
    episode_texts,
    markdown_table,
    merge_scores,
    meta_test_specs,
    score_episodes,
)
from metapeft_ray.core.export import (
    LEARNED_HEAD,
    adapter_config,
    export_adapter,
    load_adapter,
    load_inner_lrs,
    local_adapter,
    with_learned_head,
)
from metapeft_ray.core.meta import InnerLoop
from metapeft_ray.core.model import Encoder, resolve_backbone
from metapeft_ray.core.runstore import (
    ADAPTER_DIR,
    REPORT_JSON,
    REPORT_MD,
    append_metrics,
    run_uri,
    splits_record,
    staged,
    write_header,
    write_metrics,
)
from metapeft_ray.core.train import MetaLearner, inner_loop, prepare_sampler, prepare_test_sampler


def validation_line(metrics: Mapping[str, float], meta_steps: int) -> str:
    """The one line a run prints at each validation step (``meta.val_every``)."""
    return (
        f"meta-step {int(metrics['meta_step'])}/{meta_steps}: meta-val accuracy "
        f"{metrics['meta_val_accuracy']:.3f} (meta-loss {metrics['meta_loss']:.3f}, "
        f"query accuracy {metrics['query_accuracy']:.3f})"
    )


def build_scorers(
    cfg: Config,
    encoder: Encoder,
    meta_init: Mapping[str, Tensor],
    default_init: Mapping[str, Tensor],
    inner_lrs: Mapping[str, Tensor] | None = None,
    texts: Sequence[str] = (),
) -> dict[str, baselines.Scorer]:
    """One scorer per method of ``eval.methods``, from the config's flat values. ``meta_init``:
    the meta-learned adapter init; ``default_init``: the method's default init (the ``finetune``
    baseline starts there); ``inner_lrs``: Meta-SGD's learned rates for ``meta``; ``texts``:
    every text of the meta-test, embedded up front by the frozen rows' caches (see
    `baselines.EmbeddingCache`)."""
    ev, scale = cfg.eval, cfg.head.scale
    inner = inner_loop(cfg, ev.inner_steps, ev.inner_lr)
    cache = baselines.EmbeddingCache(encoder, texts=texts)
    meta_cache = baselines.EmbeddingCache(encoder, meta_init, texts=texts)
    names = {"label_names": inner.name_weight is not None}
    factories: dict[str, Callable[[], baselines.Scorer]] = {
        "meta": lambda: baselines.adapted_scorer(encoder, meta_init, inner, param_lrs=inner_lrs),
        # 0 inner steps: the test head (`head.test_head`) on the meta-learned encoder (from a cache)
        "meta_init": lambda: (
            baselines.logreg_scorer if inner.test_head == "logreg" else baselines.prototype_scorer
        )(meta_cache, **names, name_weight=float(inner.name_weight or 1.0)),
        "meta_logreg": lambda: baselines.logreg_scorer(meta_cache, **names),
        "proto": lambda: baselines.prototype_scorer(cache),
        "logreg": lambda: baselines.logreg_scorer(cache),
        "proto_names": lambda: baselines.prototype_scorer(cache, label_names=True),
        "logreg_names": lambda: baselines.logreg_scorer(cache, label_names=True),
        "proto_names_refined": lambda: baselines.prototype_scorer(
            cache,
            label_names=True,
            refine=inner.query_refine,
            scale=float(scale),
            refine_prior=inner.refine_prior,
        ),
        "finetune": lambda: baselines.adapted_scorer(
            encoder, default_init, InnerLoop.finetune(ev.finetune.steps, ev.finetune.lr, scale)
        ),
        "full_finetune": lambda: baselines.full_finetune_scorer(
            encoder, InnerLoop.finetune(ev.full_finetune.steps, ev.full_finetune.lr, scale)
        ),
        "setfit": lambda: baselines.setfit_scorer(
            resolve_backbone(cfg.model.backbone),
            max_length=cfg.model.max_length,
            seed=cfg.run.seed,
            **ev.setfit.model_dump(),
        ),
    }
    return {m: factories[m]() for m in ev.methods}


def meta_test_part(
    cfg: Config,
    encoder: Encoder,
    meta_init: Mapping[str, Tensor],
    default_init: Mapping[str, Tensor],
    sampler: EpisodeSampler,
    inner_lrs: Mapping[str, Tensor] | None = None,
    indices: Iterable[int] | None = None,
    progress: bool = False,
) -> EpisodeScores:
    """Episodes ``indices`` (of every cell; all when None) of the meta-test that
    `evaluate_and_report` reports, scored by every method of ``eval.methods``: any process that
    holds the same config and init scores any part with the same numbers, so the parts of a
    meta-test fanned out over workers merge (`evaluate.merge_scores`) into the single-process
    table."""
    ev = cfg.eval
    test_sampler = prepare_test_sampler(cfg, sampler)
    specs = meta_test_specs(
        test_sampler,
        cells=ev.cells,
        q_query=ev.q_query,
        query_alpha=ev.query_alpha,
        episodes=ev.episodes,
        seed=cfg.run.seed,
    )
    texts = episode_texts(test_sampler, specs)
    return score_episodes(
        build_scorers(cfg, encoder, meta_init, default_init, inner_lrs, texts),
        test_sampler,
        specs,
        costly_episodes=ev.costly_episodes,
        indices=indices,
        progress=progress,
    )


def meta_test_learner(
    cfg: Config, learner: MetaLearner, indices: Iterable[int] | None = None, progress: bool = False
) -> EpisodeScores:
    """`meta_test_part` of a learner's init with its learned head values and Meta-SGD rates:
    what `finish` scores, in this process or (a part each) in several."""
    return meta_test_part(
        with_learned_head(cfg, learner.learned_head()),
        learner.encoder,
        learner.params,
        learner.default_init,
        learner.sampler,
        learner.inner_lrs(),
        indices,
        progress,
    )


MetaTestFanOut = Callable[[Config, MetaLearner], list[EpisodeScores]]
"""Scores a learner's meta-test in parts elsewhere (each part a `meta_test_learner` call) and
returns the parts; `distributed.fan_out_meta_test` makes one that runs them on Ray workers."""


def evaluate_and_report(
    cfg: Config,
    encoder: Encoder,
    meta_init: Mapping[str, Tensor],
    default_init: Mapping[str, Tensor],
    sampler: EpisodeSampler,
    out: Path,
    extra: Mapping[str, Any] | None = None,
    progress: bool = False,
    inner_lrs: Mapping[str, Tensor] | None = None,
    parts: Sequence[EpisodeScores] | None = None,
) -> dict[str, Any]:
    """Meta-test every method of ``eval.methods`` on the same episodes of the test classes (of
    ``data.dataset``, or of ``eval.dataset``) and write report.json + report.md. ``parts``: the
    meta-test already scored elsewhere (`meta_test_part`); else it is scored here."""
    ev = cfg.eval
    test_sampler = prepare_test_sampler(cfg, sampler)
    if parts is None:
        parts = [meta_test_part(cfg, encoder, meta_init, default_init, sampler, inner_lrs, progress=progress)]
    results = merge_scores(parts, ev.reference)
    protocol = "cross-dataset" if ev.dataset else "in-domain"
    test_name = ev.dataset or cfg.data.dataset
    title = f"Meta-test ({protocol}) on {test_name}, {len(test_sampler.splits.test)} held-out classes" + (
        "" if ev.dataset else f", fold {cfg.data.fold}"
    )
    report = {
        "protocol": protocol,
        "test_dataset": test_name,
        "test_classes": list(test_sampler.splits.test),
        "results": results,
        "splits": splits_record(cfg, sampler),
        "config": cfg.to_dict(),
        **(extra or {}),
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (out / REPORT_MD).write_text(f"# {title}\n\n" + markdown_table(results, title))
    return report


def finish(
    cfg: Config,
    learner: MetaLearner,
    out: Path,
    history: Iterable[Mapping[str, float]] = (),
    progress: bool = False,
    fan_out: MetaTestFanOut | None = None,
) -> dict[str, Any]:
    """Export the meta-learned init (with its learned head values), then meta-test it against
    the baselines: in this process, or in parts by ``fan_out``. With ``meta.keep: best`` the
    learner first loads the meta-parameters of its best validation."""
    kept = learner.keep_best() if cfg.meta.keep == "best" else None
    history = list(history)
    step = learner.step if kept is None else kept["meta_step"]
    metrics = next((dict(m) for m in reversed(history) if m["meta_step"] == step), {})
    learned = learner.learned_head()
    # what the training gave, in the adapter's metadata and in the report
    trained = {"meta_step": learner.step, LEARNED_HEAD: learned, **({} if kept is None else {"kept": kept})}
    metadata = {
        "config": cfg.to_dict(),
        "splits": splits_record(cfg, learner.sampler),
        "metrics": metrics,
        **trained,
    }
    lrs = learner.inner_lrs()  # Meta-SGD's learned rates; None for the other algorithms
    export_adapter(learner.encoder, out / ADAPTER_DIR, metadata, inner_lrs=lrs)
    parts = (
        fan_out(cfg, learner) if fan_out is not None else [meta_test_learner(cfg, learner, progress=progress)]
    )
    return evaluate_and_report(
        with_learned_head(cfg, learned),
        learner.encoder,
        learner.params,
        learner.default_init,
        learner.sampler,
        out,
        trained,
        progress,
        inner_lrs=lrs,
        parts=parts,
    )


def train_local(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Single-process meta-training (`metapeft train --local`). Like the Ray path it checkpoints
    every ``meta.checkpoint_every`` steps, and a rerun of the same ``run.name`` resumes from the
    newest checkpoint (or only exports and meta-tests a run that finished training)."""
    from tqdm.auto import tqdm

    sampler = prepare_sampler(cfg)
    uri = run_uri(cfg)
    storage.check_writable(uri)
    runstore.check_resumable(cfg, uri)
    if (record := runstore.finished_training(cfg, uri)) is not None:
        return finished_run(cfg, uri, record, sampler, progress)
    learner = MetaLearner.from_config(cfg, sampler)
    history: list[dict[str, float]] = []
    if (checkpoint := runstore.latest_checkpoint(uri)) is not None:
        state = runstore.load_state(checkpoint)
        learner.load_state_dict(state)
        history = list(state["history"])
    tags = live_metrics.tags_for(cfg, "local")  # recorded only with --metrics-port (or on Ray)
    live_metrics.instrument_episodes(learner, **tags)
    m = cfg.meta
    with staged(uri) as out:
        write_header(cfg, sampler, out)
        write_metrics(out, history)
        bar = tqdm(total=m.meta_steps, initial=learner.step, desc="meta-train", disable=not progress)

        def on_step(metrics: dict[str, float]) -> None:
            append_metrics(out, metrics)
            live_metrics.record_step(metrics, **tags)
            bar.update()
            bar.set_postfix(loss=f"{metrics['meta_loss']:.3f}", acc=f"{metrics['query_accuracy']:.2f}")
            if progress and "meta_val_accuracy" in metrics:
                bar.write(validation_line(metrics, m.meta_steps))

        t0 = time.monotonic()
        learner.run(
            m.meta_steps,
            val_every=m.val_every,
            history=history,
            on_step=on_step,
            checkpoint_every=m.checkpoint_every,
            on_checkpoint=lambda state: runstore.save_checkpoint(uri, state),
        )
        bar.close()
        record = training_record(learner.step, m.meta_steps, workers=1, fit_s=time.monotonic() - t0)
        runstore.write_record(uri, record)
        return finish(cfg, learner, out, history, progress)


def training_record(step: int, meta_steps: int, *, workers: int, fit_s: float, **more: Any) -> dict[str, Any]:
    """``training.json``: written when training reached ``meta.meta_steps`` or stopped early at
    ``step`` (``meta.patience``), before the export, so a rerun re-exports instead of re-training
    when the export is lost."""
    return {
        "meta_step": step,
        **({"stopped_early": True} if step < meta_steps else {}),
        "checkpoint": runstore.checkpoint_name(step),
        "workers": workers,
        **more,
        "fit_seconds": round(fit_s, 2),
    }


def finished_run(
    cfg: Config, uri: str, record: Mapping[str, Any], sampler: EpisodeSampler, progress: bool
) -> dict[str, Any]:
    """A rerun of a run that finished training: its stored report, or (when the export is
    missing or older) a new export and meta-test from its final checkpoint."""
    step = record["meta_step"]
    report = runstore.exported_report(uri, step)
    if report is not None:
        how = "stopped early (meta.patience)" if record.get("stopped_early") else "already finished"
        print(
            f"metapeft: run {uri} {how} at meta-step {step}; not re-training "
            "(choose a new run.name, or raise meta.meta_steps to continue it)"
        )
        return report
    print(
        f"metapeft: run {uri} finished training at meta-step {step} but its export is missing "
        "or older; re-exporting from the final checkpoint"
    )
    state = runstore.load_state(storage.join(uri, record["checkpoint"]))
    return export_state(cfg, sampler, uri, state, progress)


def export_state(
    cfg: Config,
    sampler: EpisodeSampler,
    uri: str,
    state: Mapping[str, Any],
    progress: bool,
    fan_out: MetaTestFanOut | None = None,
) -> dict[str, Any]:
    """The artifacts of a checkpoint's final init, made on this process: header, metrics,
    adapter, report (its meta-test here, or in parts by ``fan_out``)."""
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.model.device != "cpu" else "cpu")
    learner = MetaLearner.from_config(cfg, sampler, device=device)
    learner.load_state_dict(dict(state))
    history = state["history"]
    with staged(uri) as out:
        write_header(cfg, sampler, out)
        write_metrics(out, history)
        return finish(cfg, learner, out, history, progress, fan_out)


def evaluate_adapter(
    adapter: str, overrides: Mapping[str, Any], out_uri: str | None, progress: bool = True
) -> dict[str, Any]:
    """Meta-test an exported init (local or s3://) on the test classes of its own split, or with
    ``eval.dataset`` on another dataset's classes. Data and episode shapes are checked first."""
    sampler = prepare_sampler(adapter_config(local_adapter(adapter), dict(overrides))[0])
    encoder, default_init, cfg, metadata = load_adapter(adapter, dict(overrides))
    lrs = load_inner_lrs(adapter, encoder.device)
    with staged(out_uri or storage.join(adapter.rstrip("/").rsplit("/", 1)[0], "eval")) as out:
        return evaluate_and_report(
            cfg,
            encoder,
            encoder.adapter_params(),
            default_init,
            sampler,
            out,
            {"adapter": adapter, "meta_step": metadata.get("meta_step")},
            progress,
            inner_lrs=lrs,
        )

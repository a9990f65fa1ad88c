"""Latency of the user path: adapt the meta-learned init to a new task and classify its queries.

    python benchmarks/bench_latency.py --adapter runs/banking77_fold0/adapter --threads 2
    python benchmarks/bench_latency.py --tasks 10 --inner-steps 1 5      # untrained meta-init

Issue 7, item 5: time to adapt to a new 5-way 5-shot task and predict its 25 queries (5 per
class) on CPU; target < 2 s with the packaged backbone. Each task is one call of
`metapeft_ray.core.adapt.adapt_and_predict`, what ``metapeft adapt`` runs, consumed to the last
prediction, with the init, inner learning rate, head scale and Meta-SGD rates (if any) of the
exported adapter. The call is split where adaptation ends: at its first tokenisation of query
texts (``encoder.tokenize`` is wrapped to timestamp its calls); ``adapt`` includes tokenising the
support set, ``predict`` includes tokenising the queries.

``--adapter`` loads an exported adapter (`metapeft_ray.core.export.load_adapter`, as the CLI does:
its config decides the attention implementation); without it, or when the path does not exist,
the packaged backbone with an untrained meta-init stands in (the values do not change the time).
Tasks are fixed held-out-class episodes of the adapter's dataset and fold. Model load and the
first (cold) task are reported separately; each row then takes one untimed warm-up task and
``--tasks`` timed ones, at 1 thread and at ``--threads``, for the config's inner steps and 5.
``--device`` defaults to cpu, the target's setting; ``--device cuda`` times the same path on a GPU.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from metapeft_ray.core.adapt import adapt_and_predict
from metapeft_ray.core.config import Config
from metapeft_ray.core.data import LabelledTexts
from metapeft_ray.core.episodes import Episode
from metapeft_ray.core.export import load_adapter, load_inner_lrs
from metapeft_ray.core.meta import InnerLoop
from metapeft_ray.core.model import Encoder

from common import fixed_episodes, meta_encoder, set_threads, workload, write_result

TARGET_S = 2.0
N_WAY, Q_QUERY = 5, 5


@dataclass
class Model:
    """What the user path needs, loaded once."""

    encoder: Encoder
    init: dict[str, torch.Tensor]
    param_lrs: dict[str, torch.Tensor] | None
    cfg: Config
    source: str


@dataclass
class Row:
    shots: int
    inner_steps: int
    threads: int
    adapt_s: float
    predict_s: float
    total_s_median: float
    total_s_p90: float


def load_model(adapter: str | None, device: str) -> Model:
    """The exported adapter as ``metapeft adapt`` loads it, or the packaged backbone's meta-init."""
    if adapter and Path(adapter).exists():
        encoder, _, cfg, _ = load_adapter(adapter, {"model.device": device})
        lrs = load_inner_lrs(adapter, encoder.device)
        return Model(encoder, dict(encoder.adapter_params()), lrs, cfg, adapter)
    if adapter:
        print(f"{adapter} does not exist: using the packaged backbone with an untrained meta-init")
    cfg = workload(f"model.device={device}")
    encoder, params = meta_encoder(cfg)
    return Model(encoder, params, None, cfg, "packaged backbone, untrained meta-init")


def task_of(episode: Episode) -> tuple[LabelledTexts, tuple[str, ...]]:
    """An episode as a user's task: support texts with class names, and the query texts."""
    labels = tuple(episode.class_names[i] for i in episode.support_labels)
    return LabelledTexts("task", episode.support_texts, labels), episode.query_texts


def timed_task(model: Model, episode: Episode, steps: int) -> tuple[float, float]:
    """Seconds of one `adapt_and_predict` call, split into (adapt, predict) at the first
    tokenisation of query texts."""
    support, queries = task_of(episode)
    encoder = model.encoder
    tokenize = encoder.tokenize
    marks: list[float] = []

    def marked(texts: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
        marks.append(time.perf_counter())
        return tokenize(texts)

    encoder.tokenize = marked  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        preds = list(
            adapt_and_predict(
                encoder,
                model.init,
                support,
                queries,
                InnerLoop(steps, model.cfg.meta.inner_lr, model.cfg.head.scale, first_order=True),
                param_lrs=model.param_lrs,
            )
        )
        end = time.perf_counter()
    finally:
        del encoder.tokenize  # the instance attribute; the method shows again
    assert len(preds) == len(queries) and len(marks) == 2, (len(preds), len(marks))
    return marks[1] - start, end - marks[1]


def measure(model: Model, episodes: list[Episode], *, shots: int, steps: int, threads: int) -> Row:
    set_threads(threads)
    timed_task(model, episodes[0], steps)  # warm-up
    times = np.array([timed_task(model, ep, steps) for ep in episodes[1:]])
    total = times.sum(1)
    return Row(
        shots,
        steps,
        threads,
        float(np.median(times[:, 0])),
        float(np.median(times[:, 1])),
        float(np.median(total)),
        float(np.percentile(total, 90)),
    )


def markdown(rows: list[Row], model: Model, load_s: float, cold_s: float, args: argparse.Namespace) -> str:
    cfg = model.cfg
    lines = [
        "# Adapt-and-predict latency (the user path)",
        "",
        f"Init: {model.source}; {cfg.model.backbone}, {cfg.peft.method} ({cfg.peft.placement}), "
        f"{'eager' if cfg.meta.second_order else 'SDPA'} attention, device {model.encoder.device}. "
        f"Tasks: {args.tasks} fixed {N_WAY}-way held-out-class episodes of {cfg.data.dataset} fold "
        f"{cfg.data.fold} per row (after one warm-up), {Q_QUERY} queries/class, inner lr "
        f"{cfg.meta.inner_lr}. One `adapt_and_predict` call per task, consumed to the last prediction; "
        "adapt / predict = medians of its two parts (split at the first query tokenisation). "
        f"Model load {load_s:.1f} s and the first (cold) task {cold_s:.2f} s are not in the rows. "
        f"Target: < {TARGET_S:.0f} s per task.",
        "",
        "| shots | K | threads | adapt s | predict s | total s median | total s p90 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shots} | {r.inner_steps} | {r.threads} | {r.adapt_s:.3f} | {r.predict_s:.3f} | "
            f"**{r.total_s_median:.3f}** | {r.total_s_p90:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--adapter", help="an exported adapter directory (default: untrained meta-init)")
    p.add_argument("--tasks", type=int, default=10, help="timed tasks per row")
    p.add_argument("--shots", type=int, nargs="+", default=[5])
    p.add_argument("--inner-steps", type=int, nargs="*", default=[5], help="besides the config's")
    p.add_argument("--threads", type=int, default=1, help="rows at 1 thread and at this many")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    args = p.parse_args()
    set_threads(1)
    t0 = time.perf_counter()
    model = load_model(args.adapter, args.device)
    load_s = time.perf_counter() - t0
    task_cfg = model.cfg.with_overrides({"episode.n_way": N_WAY, "episode.q_query": Q_QUERY})
    steps_list = list(dict.fromkeys([model.cfg.meta.inner_steps, *args.inner_steps]))
    tasks = {shots: fixed_episodes(task_cfg, 1 + args.tasks, k_shot=shots) for shots in args.shots}
    cold_s = sum(timed_task(model, tasks[args.shots[0]][0], steps_list[0]))
    rows: list[Row] = []
    for shots, episodes in tasks.items():
        for threads in dict.fromkeys([1, args.threads]):
            for steps in steps_list:
                rows.append(measure(model, episodes, shots=shots, steps=steps, threads=threads))
                print(rows[-1], flush=True)
    payload = {
        "rows": [asdict(r) for r in rows],
        "target_s": TARGET_S,
        "load_s": load_s,
        "cold_first_task_s": cold_s,
        "init": model.source,
    }
    write_result("latency", payload, markdown(rows, model, load_s, cold_s, args))


if __name__ == "__main__":
    main()

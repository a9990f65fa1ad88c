"""Meta-test wall time: one process, and fanned out over 1 and 2 Ray workers, in one run.

    python benchmarks/bench_meta_test.py                  # banking77 config, 40 episodes per cell
    python benchmarks/bench_meta_test.py --episodes 600 --costly-episodes 100   # the full meta-test
    python benchmarks/bench_meta_test.py --episodes 4 --no-write \\
        --overrides model.backbone=/path/to/tiny data.dataset=/path/to/tiny.jsonl ...   # smoke test

The meta-test that ends `metapeft train` on Ray (`distributed.fan_out_meta_test`): Ray tasks with
one worker's resources (``--threads`` CPUs, as many torch threads), each scoring every W-th
episode of each cell, merged by the driver. Timed as the driver sees it, from the call to the
merged parts: a fresh worker process per part (as after training: the tasks run with
``max_calls=1``), the learner rebuilt from its state (backbone load), the frozen rows'
embeddings of every meta-test text (each part embeds them all, so any part's numbers equal the
single process's) and the part's episodes. The config is ``--config`` (default ``banking77``,
the Banking77 benchmark's meta-test: 5-way 1- and 5-shot, the meta-learned init adapted with the
baselines beside it) with ``--episodes`` per cell, scored from the untrained meta-init (the
wall time does not depend on training).

The speed-up is time(1 worker) / time(2 workers), both Ray tasks at Ray's niceness; the single
process (this one, ``--threads`` threads, timed first) shows Ray's own cost. All three
meta-tests must give identical per-episode results (checked). Time it on an idle machine:
on a loaded one the workers compete with the load (DESIGN.md §6); ``--no-write`` prints without
storing results/meta_test.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from metapeft_ray.core.config import Config, load_config
from metapeft_ray.core.evaluate import merge_scores
from metapeft_ray.core.recipes import meta_test_learner
from metapeft_ray.core.train import MetaLearner, prepare_sampler

from common import write_result


def bench_config(args: argparse.Namespace) -> Config:
    return load_config(
        args.config,
        [
            f"eval.episodes={args.episodes}",
            f"eval.costly_episodes={min(args.episodes, args.costly_episodes)}",
            f"distributed.cpus_per_worker={args.threads}",
            *args.overrides,
        ],
    )


def timeless(results: dict[str, Any]) -> dict[str, Any]:
    return {
        m: {cell: {k: v for k, v in r.items() if k != "ms_per_task"} for cell, r in per.items()}
        for m, per in results.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="banking77")
    p.add_argument("--episodes", type=int, default=40, help="meta-test episodes per cell")
    p.add_argument(
        "--costly-episodes", type=int, default=20, help="eval.costly_episodes (capped at --episodes)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (= Ray CPUs) per process")
    p.add_argument("--overrides", nargs="*", default=[], help="dotted config overrides")
    p.add_argument("--no-write", action="store_true", help="print only (a smoke test, a busy machine)")
    args = p.parse_args()
    cfg = bench_config(args)
    load_before = os.getloadavg()[0]

    from metapeft_ray.on_ray.distributed import fan_out_meta_test

    torch.set_num_threads(args.threads)
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg), device=torch.device("cpu"))
    rows: dict[str, float] = {}
    t0 = time.perf_counter()
    want = merge_scores([meta_test_learner(cfg, learner)], cfg.eval.reference)
    rows["single process"] = time.perf_counter() - t0

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    import ray

    ray.init(
        num_cpus=2 * args.threads, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False
    )
    identical = True
    try:
        for workers in (1, 2):
            fan_out = fan_out_meta_test(workers, False, {"CPU": float(args.threads)})
            t0 = time.perf_counter()
            parts = fan_out(cfg, learner)
            rows[f"Ray, {workers} worker{'s' if workers > 1 else ''}"] = time.perf_counter() - t0
            identical &= timeless(merge_scores(parts, cfg.eval.reference)) == timeless(want)
    finally:
        ray.shutdown()

    speedup = rows["Ray, 1 worker"] / rows["Ray, 2 workers"]
    ev = cfg.eval
    cells = ", ".join(f"{n}w{k}s" for n, k in ev.cells)
    steps = cfg.meta.inner_steps if ev.inner_steps is None else ev.inner_steps
    md = [
        f"Meta-test of {cfg.model.backbone} ({cfg.peft.method}, {steps} "
        f"adaptation step(s)) on {cfg.data.dataset} fold {cfg.data.fold}: cells {cells}, {ev.episodes} "
        f"episodes each ({ev.costly_episodes} for the costly rows), {ev.q_query} queries per class, "
        f"methods {', '.join(ev.methods)}; {args.threads} thread(s) per process; 1-min load average "
        f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after (other processes skew the ratios).",
        "",
        "| mode | wall s | vs Ray, 1 worker |",
        "|---|---|---|",
        *(f"| {name} | {s:.1f} | {rows['Ray, 1 worker'] / s:.2f}x |" for name, s in rows.items()),
        "",
        f"Speed-up of the meta-test with 2 workers against 1: {speedup:.2f}x (target >= 1.6x). "
        f"Per-episode results identical in all three: {'yes' if identical else 'NO'}.",
    ]
    payload = {"seconds": rows, "speedup_2_vs_1": speedup, "identical": identical, "args": vars(args)}
    if args.no_write:
        print("\n".join(md))
    else:
        write_result("meta_test", payload, "\n".join(md))
    if not identical:
        raise SystemExit("the fanned-out meta-test differs from the single-process one")


if __name__ == "__main__":
    main()

"""Meta-steps/s: single process vs Ray Train with 1 and 2 workers, same workload.

    python benchmarks/bench_distributed.py              # packaged MiniLM, banking77, 5w1s FO
    python benchmarks/bench_distributed.py --workers 1 2 4 --steps 10 --threads 2

Every mode uses ``--threads`` torch threads per process (default 1; a Ray worker asks for that
many CPUs): the single process and the 1-worker run do the same work on the same cores, so their
ratio is Ray's overhead, and W workers use W times the cores. One thread per process also keeps
the numbers sane on a shared machine: with other load on the cores, 2-thread intra-op torch was
measured 6x slower than 1 thread here (OpenMP threads waiting on each other).

Every mode runs the core's `MetaLearner.meta_step` (Ray runs it in `TorchTrainer` workers with
the same all-reduce as `metapeft train`), takes ``--warmup`` untimed steps, then times
``--steps``. Per step it separates the time inside the inner loops (the episodes: forward,
adaptation, query meta-gradient) from the rest (spec drawing, packing, the all-reduce and any
wait for the slowest rank, the Adam update). Worker-group start (~20 s on 2 cores) is reported
separately and excluded from steps/s. From the single process's episode times it also computes
how long a rank of 2 would wait for the other at each all-reduce, with the meta-batch dealt round
robin and by padded text length (`train.shard`, what the workers do).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from metapeft_ray.core.config import Config
from metapeft_ray.core.train import MetaLearner, prepare_sampler, shard

from common import workload, write_result


def bench_config(args: argparse.Namespace) -> Config:
    return workload(
        f"model.backbone={args.backbone}",
        f"data.dataset={args.dataset}",
        "episode.n_way=5",
        "episode.k_shot=1",
        "episode.q_query=5",
        "meta.first_order=true",
        f"meta.meta_batch_size={args.meta_batch}",
        "meta.val_every=100000",
    )


def timed_steps(
    learner: MetaLearner, warmup: int, steps: int, rank: int = 0, world: int = 1, reduce: Any = None
) -> dict[str, float]:
    """Run warm-up + timed meta-steps; returns wall and inner-loop seconds per timed step, and
    each timed episode's spec and seconds (``episodes``, in meta-batch order)."""
    inner = [0.0]  # seconds in the per-episode unit (the inner loop + meta-gradient)
    episodes: list[tuple[Any, float]] = []

    def add_episode_time(spec: Any, _result: Any, seconds: float) -> None:
        inner[0] += seconds
        episodes.append((spec, seconds))

    learner.episode_observers.append(add_episode_time)
    kw = {"rank": rank, "world": world} | ({"reduce": reduce} if reduce else {})
    for _ in range(warmup):
        learner.meta_step(**kw)
    inner[0] = 0.0
    episodes.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        learner.meta_step(**kw)
    wall = time.perf_counter() - t0
    return {"wall_per_step": wall / steps, "inner_per_step": inner[0] / steps, "episodes": episodes}


def rank_idle(episodes: list[tuple[Any, float]], meta_batch: int, world: int, cost: Any) -> dict[str, float]:
    """From one process's episode times, meta-batch by meta-batch: the mean share of a
    ``world``-rank step that a rank spends waiting at the all-reduce for the slowest one
    (1 - mean load / max load), with the meta-batch dealt round robin and by `train.shard`."""
    deals = {
        "round robin": lambda specs, r: specs[r::world],
        "by padded length (shard)": lambda specs, r: shard(specs, r, world, cost),
    }
    idle: dict[str, float] = {}
    for name, deal in deals.items():
        shares = []
        for i in range(0, len(episodes) - meta_batch + 1, meta_batch):
            batch = episodes[i : i + meta_batch]
            seconds = {id(spec): t for spec, t in batch}
            loads = [sum(seconds[id(x)] for x in deal([spec for spec, _ in batch], r)) for r in range(world)]
            shares.append(1 - sum(loads) / world / max(loads))
        idle[name] = sum(shares) / len(shares)
    return idle


def ray_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train
    import ray.train.torch

    from metapeft_ray.core.config import validate_config
    from metapeft_ray.on_ray.distributed import _all_reduce_sum

    t_start = time.time()
    cfg = validate_config(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg), device=ray.train.torch.get_device())
    t = timed_steps(learner, config["warmup"], config["steps"], rank, world, _all_reduce_sum)
    del t["episodes"]
    t["setup_s"] = t_start - config["fit_called_at"]
    gathered: list[dict[str, float]] = [{}] * world
    torch.distributed.all_gather_object(gathered, t)
    ray.train.report({"done": 1})
    return {"ranks": gathered} if rank == 0 else None


def run_ray(cfg: Config, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cpus = args.threads
    trainer = TorchTrainer(
        ray_loop,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "threads": args.threads,
            "warmup": args.warmup,
            "steps": args.steps,
            "fit_called_at": time.time(),
        },
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"bench-{workers}w-{os.getpid()}", storage_path=args.storage),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - t0
    ranks = result.return_value["ranks"]
    return {
        "wall_per_step": max(r["wall_per_step"] for r in ranks),
        "inner_per_step": max(r["inner_per_step"] for r in ranks),
        "inner_per_rank": [round(r["inner_per_step"], 3) for r in ranks],
        "worker_start_s": max(r["setup_s"] for r in ranks),
        "fit_s": fit_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="all-MiniLM-L6-v2")
    p.add_argument("--dataset", default="banking77")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads (= Ray CPUs) per process")
    p.add_argument("--storage", default="/tmp/metapeft-bench")
    args = p.parse_args()
    cfg = bench_config(args)
    load_before = os.getloadavg()[0]

    torch.set_num_threads(args.threads)
    num_cpus = max(args.workers) * args.threads
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg), device=torch.device("cpu"))
    rows = {"single process": timed_steps(learner, args.warmup, args.steps)}
    del learner

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    import ray

    ray.init(num_cpus=num_cpus, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False)
    try:
        for w in args.workers:
            rows[f"Ray, {w} worker{'s' if w > 1 else ''}"] = run_ray(cfg, w, args)
    finally:
        ray.shutdown()
    # Again at the end: on a shared machine the load drifts; the baseline is the mean of both.
    learner = MetaLearner.from_config(cfg, prepare_sampler(cfg), device=torch.device("cpu"))
    rows["single process, again"] = timed_steps(learner, args.warmup, args.steps)
    episodes = [e for name in ("single process", "single process, again") for e in rows[name].pop("episodes")]
    idle = rank_idle(episodes, cfg.meta.meta_batch_size, 2, learner.episode_cost)
    base = (rows["single process"]["wall_per_step"] + rows["single process, again"]["wall_per_step"]) / 2
    md = [
        f"Workload: {cfg.model.backbone} on {cfg.data.dataset}, 5-way 1-shot, 5 queries/class, "
        f"first-order, 1 inner step, meta-batch {cfg.meta.meta_batch_size}; {args.warmup} warm-up "
        f"+ {args.steps} timed meta-steps; {args.threads} thread(s) per process; 1-min load average "
        f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after (other processes skew the ratios).",
        "",
        "| mode | meta-steps/s | vs single (mean) | s/step | inner loops s/step | outside inner loops "
        "s/step | worker start s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        wall, inner = r["wall_per_step"], r["inner_per_step"]
        r["speedup"] = base / wall
        start = f"{r['worker_start_s']:.1f}" if "worker_start_s" in r else "-"
        md.append(
            f"| {name} | {1 / wall:.3f} | {base / wall:.2f}x | {wall:.2f} | {inner:.2f} | "
            f"{wall - inner:.3f} ({100 * (wall - inner) / wall:.1f} %) | {start} |"
        )
    md.append("")
    for name, r in rows.items():
        if "inner_per_rank" in r:
            md.append(f"{name}: inner-loop s/step per rank {r['inner_per_rank']}, fit() {r['fit_s']:.1f} s.")
    md += [
        "",
        f"Rank imbalance, from the single process's {len(episodes)} episode times: a rank of 2 would wait "
        + ", ".join(f"{100 * v:.1f} % of each step with the meta-batch dealt {k}" for k, v in idle.items())
        + ".",
    ]
    payload = {"rows": rows, "two_rank_idle_share": idle, "workload": vars(args)}
    write_result("distributed", payload, "\n".join(md))


if __name__ == "__main__":
    main()

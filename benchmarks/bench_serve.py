"""Load test of `metapeft serve`: a fixed number of HTTP requests at a fixed concurrency.

    python benchmarks/bench_serve.py --adapter runs/accuracy/banking77_fold0/adapter   # the real one
    python benchmarks/bench_serve.py --tiny --requests 16 --out-dir /tmp/bench-serve     # a smoke test

Starts its own local Ray on 127.0.0.1 (``--num-cpus``, a 200 MiB object store, token auth off,
HOME in a temporary directory, as the tests do) and the Serve application of ``metapeft serve``
on a free loopback port, with one replica of ``--replica-cpus`` CPUs. Three phases, each
``--requests`` requests sent by ``--concurrency`` clients:

1. **create**: 5-way 5-shot tasks (``POST /tasks``), each a different support set: fixed episodes
   of the init's dataset on its meta-test classes; every one is a new task (adapted, not cached);
2. **classify, batched**: ``POST /tasks/ID/classify`` of 32 texts to one task, the replica
   batching up to ``--max-batch-size`` requests (``--batch-wait-ms``);
3. **classify, no batching**: the same requests with the application redeployed at a max batch
   size of 1 (``metapeft serve --max-batch-size 1``).

Before each application's phases one untimed task and classify load the init. Every request must
be answered with HTTP 200 (the script exits 1 naming what was lost); ``--time-limit`` bounds the
whole run (SIGALRM): it then stops, tears down and exits 1. Teardown is ``serve.shutdown()`` and
``ray.shutdown()``, which stops the Ray processes this script's ``ray.init`` started, then the
temporary directories are removed. Reported per phase: p50 and p99 latency, requests/s, and the
mean number of requests classified together (``batch`` in the response). Results go to
``--out-dir``/serve.{json,md} (default ``benchmarks/results``).

``--tiny``: the tests' tiny BERT and dataset (``tests/tiny.py``) with an untrained init, 2 folds
so that the meta-test split has the 5 classes a 5-way task needs: checks the script, measures
nothing of interest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metapeft_ray.core.config import Config
from metapeft_ray.core.episodes import Episode
from metapeft_ray.core.export import adapter_config, local_adapter
from metapeft_ray.core.train import prepare_sampler

from common import RESULTS, write_result

N_WAY, K_SHOT, Q_QUERY, CLASSIFY_TEXTS = 5, 5, 7, 32
ROOT = Path(__file__).resolve().parents[1]


def tiny_init(root: Path) -> str:
    """An untrained init on the tests' tiny backbone and dataset, exported like a trained one."""
    import torch

    sys.path.insert(0, str(ROOT))
    from metapeft_ray.core.config import load_config
    from metapeft_ray.core.export import export_adapter
    from metapeft_ray.core.model import encoder_from_config
    from tests.tiny import make_tiny_backbone, make_tiny_dataset, tiny_overrides

    backbone, data = make_tiny_backbone(root / "backbone"), make_tiny_dataset(root / "tiny.jsonl")
    cfg = load_config(
        None, tiny_overrides(str(backbone), str(data), **{"data.folds": 2, "data.val_fraction": 0.5})
    )
    torch.manual_seed(0)
    meta = {"config": cfg.to_dict(), "meta_step": 0, "metrics": {}}
    export_adapter(encoder_from_config(cfg), root / "init", meta)
    return str(root / "init")


@dataclass
class Workload:
    cfg: Config
    tasks: list[Episode]
    """Fixed 5-way 5-shot episodes of the init's dataset and fold, meta-test classes: one per
    create request, and one more for the task the classify requests go to."""
    texts: list[list[str]]
    """32 texts per classify request, drawn in turn from the episodes' queries."""


def workload(uri: str, requests: int) -> Workload:
    cfg, _ = adapter_config(local_adapter(uri))
    sampler = prepare_sampler(cfg)
    specs = sampler.specs("test", requests + 1, seed=0, step=0, n_way=N_WAY, k_shot=K_SHOT, q_query=Q_QUERY)
    tasks = [sampler.build(s) for s in specs]
    pool = [t for e in tasks for t in e.query_texts]
    n = CLASSIFY_TEXTS
    return Workload(cfg, tasks, [[pool[(j * n + i) % len(pool)] for i in range(n)] for j in range(requests)])


def support(episode: Episode) -> dict[str, Any]:
    return {
        "init": "init",
        "texts": list(episode.support_texts),
        "labels": [episode.class_names[y] for y in episode.support_labels],
    }


def post(url: str, body: dict[str, Any], timeout: float) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, {"detail": err.read().decode(errors="replace")[:200]}
    except OSError as err:  # refused, reset, timed out
        return 0, {"detail": str(err)}


def phase(url: str, requests: list[tuple[str, dict[str, Any]]], concurrency: int, deadline: float) -> dict:
    """Send ``requests`` ((path, body)) from ``concurrency`` threads; latency and throughput."""

    def one(request: tuple[str, dict[str, Any]]) -> tuple[int, float, dict[str, Any]]:
        start = time.perf_counter()
        status, out = post(url + request[0], request[1], max(1.0, deadline - time.monotonic()))
        return status, time.perf_counter() - start, out

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, requests))
    wall = time.perf_counter() - start
    ok = [(s, out) for s, _, out in results if s == 200]
    latencies = [t for s, t, _ in results if s == 200]
    lost = [f"{s}: {out.get('detail')}" for s, _, out in results if s != 200]
    batches = [out["batch"] for _, out in ok if "batch" in out]
    return {
        "requests": len(requests),
        "answered": len(ok),
        "lost": lost[:5],
        "concurrency": concurrency,
        "p50_s": float(np.percentile(latencies, 50)) if latencies else float("nan"),
        "p99_s": float(np.percentile(latencies, 99)) if latencies else float("nan"),
        "requests_per_s": len(ok) / wall,
        "wall_s": wall,
        "mean_batch": float(np.mean(batches)) if batches else None,
        "cached": sum(bool(out.get("cached")) for _, out in ok),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: argparse.Namespace, uri: str, work: Workload, deadline: float) -> dict[str, Any]:
    from ray import serve

    from metapeft_ray.on_ray.serve import APP_NAME, ServeSettings, build_app, start

    tasks, texts = work.tasks, work.texts
    port, rows, info = free_port(), {}, {}
    for batched in (True, False):
        settings = ServeSettings(
            cache_size=max(64, 2 * args.requests),
            max_texts=CLASSIFY_TEXTS,
            max_batch_size=args.max_batch_size if batched else 1,
            batch_wait_s=args.batch_wait_ms / 1000,
        )
        url = start(build_app({"init": uri}, settings, num_cpus=args.replica_cpus), port=port)
        t0 = time.perf_counter()
        status, warm = post(f"{url}/tasks", support(tasks[-1]), 600)
        assert status == 200, warm
        status, out = post(f"{url}/tasks/{warm['task_id']}/classify", {"texts": texts[0]}, 600)
        assert status == 200, out
        info["first_task_and_classify_s" + ("" if batched else "_unbatched")] = time.perf_counter() - t0
        with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
            info["replica_threads"] = json.loads(resp.read())["threads"]
        classify = [(f"/tasks/{warm['task_id']}/classify", {"texts": t}) for t in texts]
        if batched:
            creates = [("/tasks", support(e)) for e in tasks[:-1]]
            rows[f"create task ({N_WAY}-way {K_SHOT}-shot)"] = phase(url, creates, args.concurrency, deadline)
            rows[f"classify {CLASSIFY_TEXTS} texts, batched (max {args.max_batch_size})"] = phase(
                url, classify, args.concurrency, deadline
            )
        else:
            rows[f"classify {CLASSIFY_TEXTS} texts, no batching"] = phase(
                url, classify, args.concurrency, deadline
            )
        serve.delete(APP_NAME)
    return {"rows": rows, "info": info, "dataset": work.cfg.data.dataset, "backbone": work.cfg.model.backbone}


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    info = result["info"]
    lines = [
        f"`metapeft serve` over HTTP on one replica ({args.replica_cpus:g} CPUs, {info['replica_threads']} "
        f"torch threads), local Ray with {args.num_cpus} CPUs; init {args.init_name} ({result['backbone']}, "
        f"tasks from {result['dataset']} meta-test classes); {args.requests} requests per phase from "
        f"{args.concurrency} concurrent clients; batch wait {args.batch_wait_ms:g} ms. First task + "
        f"classify (loads the init): {info['first_task_and_classify_s']:.1f} s.",
        "",
        "| phase | requests | answered | p50 s | p99 s | requests/s | mean batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        batch = "-" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}"
        lines.append(
            f"| {name} | {r['requests']} | {r['answered']} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | "
            f"{r['requests_per_s']:.2f} | {batch} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="an exported (meta-trained) init: directory or s3:// prefix")
    which.add_argument("--tiny", action="store_true", help="the tests' tiny model, untrained (a smoke test)")
    p.add_argument("--requests", type=int, default=64, help="requests per phase")
    p.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--replica-cpus", type=float, default=2, help="CPUs (and torch threads) of the replica")
    p.add_argument("--time-limit", type=float, default=900, help="seconds for the whole run, start included")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where serve.{json,md} go")
    args = p.parse_args()
    deadline = time.monotonic() + args.time_limit

    def out_of_time(*_: Any) -> None:
        raise TimeoutError(f"--time-limit {args.time_limit:g} s reached")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(max(1, int(args.time_limit)))
    scratch = Path(tempfile.mkdtemp(prefix="metapeft-bench-serve-"))
    ray_temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    import ray

    try:
        uri = tiny_init(scratch) if args.tiny else args.adapter
        args.init_name = "tiny, untrained" if args.tiny else uri
        work = workload(uri, args.requests)  # before Ray starts: a bad init or dataset fails fast
        # Token auth off and HOME isolated while Ray starts (it writes ~/.ray), as the tests do.
        home = os.environ.get("HOME")
        os.environ.update({"RAY_AUTH_MODE": "disabled", "HOME": str(scratch)})
        try:
            ray.init(
                num_cpus=args.num_cpus,
                object_store_memory=200 << 20,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                _temp_dir=ray_temp,
                log_to_driver=False,
            )
        finally:
            if home is not None:
                os.environ["HOME"] = home
        result = run(args, uri, work, deadline)
    finally:
        signal.alarm(0)
        if ray.is_initialized():
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(ray_temp, ignore_errors=True)
    write_result(
        "serve",
        {**result, "settings": {k: str(v) for k, v in vars(args).items()}},
        markdown(result, args),
        args.out_dir,
    )
    lost = {name: r["lost"] for name, r in result["rows"].items() if r["answered"] < r["requests"]}
    if lost:
        print(f"requests lost: {lost}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

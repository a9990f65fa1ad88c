"""How a meta-step scales with W Ray workers: what is communicated per step, per PEFT method and
backbone size, and the step-time model that follows from it.

    python benchmarks/bench_scaling.py                      # no weights loaded, a few seconds
    python benchmarks/bench_scaling.py --episode-ms 40 --meta-batch 32 --link-gbps 100 3

Per meta-step every worker runs its share (`train.shard`) of the B episodes, then all workers
sum one flat float64 vector (the adapter meta-gradient, the algorithm's extra meta-parameters —
Meta-SGD's log learning rates — and 4 statistics) in a single all-reduce, and each applies the
same Adam update. The frozen backbone, the episodes (each worker rebuilds them from a few-byte
spec) and the optimiser state never travel. So per step:

    bytes in the all-reduce    S = 8 (P + E + 4)              P adapter, E extra meta-parameters
    sent per worker (ring)     2 (W-1)/W * S
    step time                  T(W) = ceil(B/W) * t_episode + t_allreduce(S, W) + t_update

The adapter counts below come from wrapping each backbone's module skeleton on the meta device
(no weights, no download), with the method's default placement and the default ranks/sizes.
With t_episode measured on a GPU (``--episode-ms``), the table gives the predicted speed-up
``B t_episode / T(W)`` for links of the given bandwidth (NVLink ~100+ GB/s; 25 GbE ~3 GB/s).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from transformers import AutoModel, BertConfig, LlamaConfig, PretrainedConfig

from metapeft_ray.core import registry
from metapeft_ray.core.config import load_config
from metapeft_ray.core.methods import method as peft_method
from metapeft_ray.core.model import adapter_spec, resolve_backbone

from common import write_result

N_STATS = 4  # query loss, query accuracy, support loss before/after: reduced with the gradient


def backbones() -> dict[str, PretrainedConfig]:
    from transformers import AutoConfig

    return {
        "all-MiniLM-L6-v2 (22 M)": AutoConfig.from_pretrained(resolve_backbone("all-MiniLM-L6-v2")),
        "BERT-base (110 M)": BertConfig(),
        "BERT-large (335 M)": BertConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
        ),
        "Llama-2-7B shape (6.7 B)": LlamaConfig(),
    }


def adapter_sizes(config: PretrainedConfig, method: str) -> tuple[int, int, int]:
    """(backbone params, adapter params, Meta-SGD per-tensor lrs) with the method's defaults."""
    with torch.device("meta"):
        spec = adapter_spec(load_config(None, [f"peft.method={method}"]))  # the method's defaults
        model = peft_method(method).wrap(AutoModel.from_config(config), spec, "")
    total = sum(p.numel() for p in model.parameters())
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return (
        total - sum(p.numel() for p in adapter.values()),
        sum(p.numel() for p in adapter.values()),
        len(adapter),
    )


def allreduce_s(nbytes: float, workers: int, gbps: float, latency_s: float) -> float:
    """Ring all-reduce: 2 (W-1) latency-bound hops plus 2 (W-1)/W of the buffer over the link."""
    if workers == 1:
        return 0.0
    return 2 * (workers - 1) * latency_s + 2 * (workers - 1) / workers * nbytes / (gbps * 1e9)


def step_s(
    nbytes: float,
    workers: int,
    meta_batch: int,
    episode_s: float,
    update_s: float,
    gbps: float,
    latency_s: float,
) -> float:
    return (
        math.ceil(meta_batch / workers) * episode_s + allreduce_s(nbytes, workers, gbps, latency_s) + update_s
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--episode-ms",
        type=float,
        default=50.0,
        help="one episode on one GPU with the first backbone; scaled by parameter count for the others",
    )
    p.add_argument("--update-ms", type=float, default=5.0, help="per-step cost outside the episodes")
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--link-gbps", type=float, nargs="+", default=[100.0, 3.0], help="GB/s per link")
    p.add_argument("--latency-us", type=float, default=10.0, help="per-hop all-reduce latency")
    args = p.parse_args(argv)

    rows: list[dict[str, Any]] = []
    for backbone, config in backbones().items():
        for method in registry.METHODS:
            frozen, adapter, tensors = adapter_sizes(config, method)
            rows.append(
                {
                    "backbone": backbone,
                    "method": method,
                    "frozen_params": frozen,
                    "adapter_params": adapter,
                    "allreduce_bytes": 8 * (adapter + N_STATS),
                    "allreduce_bytes_metasgd": 8 * (adapter + tensors + N_STATS),
                }
            )

    lat, upd = args.latency_us * 1e-6, args.update_ms / 1e3
    ref = rows[0]["frozen_params"]
    speedups: list[dict[str, Any]] = []
    for row in rows:
        ep = args.episode_ms / 1e3 * row["frozen_params"] / ref  # compute ~ parameter count
        one = step_s(row["allreduce_bytes"], 1, args.meta_batch, ep, upd, 0, lat)
        for gbps in args.link_gbps:
            speedups.append(
                {
                    "backbone": row["backbone"],
                    "method": row["method"],
                    "link_gbps": gbps,
                    "episode_s": ep,
                    "speedup": {
                        w: one / step_s(row["allreduce_bytes"], w, args.meta_batch, ep, upd, gbps, lat)
                        for w in args.workers
                    },
                }
            )

    md = [
        "## What one meta-step communicates",
        "",
        "One all-reduce of a float64 vector per meta-step; the frozen backbone never travels.",
        "",
        "| backbone | method | frozen params | adapter params | all-reduce bytes/step | with Meta-SGD lrs | "
        f"per-worker ring traffic at W=8 | all-reduce at {args.link_gbps[0]:g} GB/s, W=8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["allreduce_bytes"]
        md.append(
            f"| {r['backbone']} | {r['method']} | {r['frozen_params']:,} | {r['adapter_params']:,} | "
            f"{_bytes(s)} | {_bytes(r['allreduce_bytes_metasgd'])} | {_bytes(2 * 7 / 8 * s)} | "
            f"{1e3 * allreduce_s(s, 8, args.link_gbps[0], lat):.3f} ms |"
        )
    md += [
        "",
        f"## Predicted speed-up over one GPU worker (meta-batch {args.meta_batch}, t_episode = "
        f"{args.episode_ms:g} ms on the first backbone, scaled by parameter count, t_update = "
        f"{args.update_ms:g} ms, {args.latency_us:g} µs per hop)",
        "",
        "| backbone | method | t_episode | link GB/s | " + " | ".join(f"W={w}" for w in args.workers) + " |",
        "|---|---|---|---|" + "---|" * len(args.workers),
    ]
    for s in speedups:
        if s["method"] in ("lora", "prompt"):
            cells = " | ".join(f"{v:.2f}" for v in s["speedup"].values())
            md.append(
                f"| {s['backbone']} | {s['method']} | {1e3 * s['episode_s']:.0f} ms | "
                f"{s['link_gbps']:g} | {cells} |"
            )
    md += [
        "",
        "Every method's all-reduce is at most a few MB even on a 7 B backbone, well under a "
        "millisecond on NVLink: the step is compute-bound. What caps the speed-up is "
        "``ceil(B/W)`` (workers beyond the meta-batch idle; choose B a multiple of W) and the "
        "per-step cost outside the episodes, which does not shrink with W; on CPUs "
        "`bench_distributed.py` measures it (spec drawing, packing, all-reduce wait, Adam).",
    ]
    write_result(
        "scaling",
        {"rows": rows, "speedups": speedups, "model": vars(args)},
        "\n".join(md),
    )


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


if __name__ == "__main__":
    main()

"""Peak memory of second-order MAML over the LoRA tensors vs over every backbone parameter.

    python benchmarks/bench_memory.py     # MiniLM (22 M), random BERT-base (110 M) and BERT-large (335 M)
    python benchmarks/bench_memory.py --backbones all-MiniLM-L6-v2 --inner-steps 1 5 --shots 5 --device cuda

Issue 7, item 2: the claim that restricting MAML to the adapter "drastically reduces" memory,
measured as the ratio of peak memories (target <= 0.3). Both contenders run the same
`run_episode(..., meta_gradient=True)` with second-order inner steps (eager attention, as
meta-training loads it) on the same 5-way episodes: ``lora`` differentiates w.r.t. the
adapter tensors (the meta-init), ``full`` w.r.t. a copy of every parameter of the model, LoRA
tensors included (they are then just part of "all"), which `functional_call` substitutes for the
whole backbone, so the inner loop adapts and the meta-gradient covers all of it. Only BERT's pooler
is left out: the mean-pooled sentence embedding never reads it (autograd rejects unused inputs).
``lora+ckpt`` is ``lora`` with ``model.activation_checkpointing=true``: each transformer block
keeps only its input and is recomputed in the backward (the same meta-gradient, tested).

Each (contender, K) runs in a fresh process (this script re-invoked with ``--contender``), so
the CPU high-water mark is its own. After loading the model, copying the meta-parameters and one
no-grad forward (library one-offs), `common.peak_memory` records what the first meta-gradient
episode adds on top: activations, the double-backward graph, the fast weights, the gradients.
The meta-parameters themselves (~87 MiB for ``full``, 0.3 MiB for ``lora``) are in the baseline,
not the peak; ``meta_params_mib`` reports them. CPU: resident high-water mark (includes the
allocator's slack); CUDA: ``max_memory_allocated``. Then ``--repeats`` further episodes are timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from metapeft_ray.core.config import Config
from metapeft_ray.core.episodes import Episode
from metapeft_ray.core.meta import InnerLoop, run_episode
from metapeft_ray.core.model import Encoder

from common import (
    backbone_path,
    fixed_episodes,
    meta_encoder,
    peak_memory,
    set_threads,
    workload,
    write_result,
)

TARGET = 0.3
CONTENDERS = ("lora", "lora+ckpt", "full")


@dataclass
class Row:
    backbone: str
    params: str
    shots: int
    inner_steps: int
    trainable: int
    peak_mib: float
    episode_s: float
    meta_params_mib: float


def contender_params(encoder: Encoder, lora: dict[str, Tensor], which: str) -> dict[str, Tensor]:
    """The meta-parameters: the adapter tensors, or a differentiable copy of every model parameter
    the sentence embedding depends on (all but BERT's pooler, which mean pooling never reads)."""
    if which != "full":
        return lora
    return {
        n: p.detach().clone().requires_grad_()
        for n, p in encoder.model.named_parameters()
        if ".pooler." not in n
    }


def meta_gradient(cfg: Config, encoder: Encoder, params: dict[str, Tensor], episode: Episode) -> None:
    inner = InnerLoop(cfg.meta.inner_steps, cfg.meta.inner_lr, cfg.head.scale, first_order=False)
    run_episode(encoder, params, episode, inner, meta_gradient=True)


def timed_episode(cfg: Config, encoder: Encoder, params: dict[str, Tensor], episode: Episode) -> float:
    t = time.perf_counter()
    meta_gradient(cfg, encoder, params, episode)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize(encoder.device)
    return time.perf_counter() - t


def run_contender(backbone: str, which: str, shots: int, steps: int, repeats: int, device: str) -> Row:
    """One contender in this (fresh) process: peak of the first episode, then median s/episode."""
    cfg = workload(
        f"model.backbone={backbone_path(backbone)}",
        "meta.first_order=false",
        f"meta.inner_steps={steps}",
        f"model.device={device}",
        f"model.activation_checkpointing={which.endswith('+ckpt')}",
    )
    encoder, lora = meta_encoder(cfg)
    params = contender_params(encoder, lora, which)
    episodes = fixed_episodes(cfg, 1 + repeats, k_shot=shots)
    with torch.no_grad():
        encoder.embed(params, encoder.tokenize(episodes[0].query_texts))
    with peak_memory(encoder.device) as peak:
        meta_gradient(cfg, encoder, params, episodes[0])
    seconds = [timed_episode(cfg, encoder, params, ep) for ep in episodes[1:]]
    trainable = sum(p.numel() for p in params.values())
    meta_mib = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
    return Row(backbone, which, shots, steps, trainable, peak.mib, statistics.median(seconds), meta_mib)


def spawn_contender(backbone: str, which: str, steps: int, args: argparse.Namespace) -> Row:
    """Re-invoke this script for one contender; its result is the last line of its stdout."""
    cmd = [
        sys.executable,
        __file__,
        "--contender",
        which,
        "--backbones",
        backbone,
        "--inner-steps",
        str(steps),
        "--shots",
        str(args.shots),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return Row(**json.loads(out.strip().splitlines()[-1]))


def markdown(rows: list[Row], ratios: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    cfg = workload()
    lines = [
        "# Peak memory: second-order MAML over LoRA vs over the whole backbone",
        "",
        f"{', '.join(args.backbones)} (eager attention; `bert-base-random` / `bert-large-random` = "
        "BERT-base's / BERT-large's shape with random weights: memory does not depend on the values), "
        f"LoRA r={cfg.peft.rank} ({cfg.peft.placement}), "
        f"{cfg.data.dataset} test classes, 5-way {args.shots}-shot, {cfg.episode.q_query} queries/class, "
        f"second order, inner lr {cfg.meta.inner_lr}. Peak = memory the first meta-gradient episode adds "
        "above the post-load baseline (fresh process per row; CPU: resident high-water mark, CUDA: "
        "max allocated); the meta-parameters themselves are in the baseline (meta-params MiB). "
        f"s/episode: median of {args.repeats} later episode(s). `full` = every model parameter "
        "(LoRA tensors included) but the unused pooler; `lora+ckpt` = `lora` with "
        "`model.activation_checkpointing=true` (each block recomputed in the backward). "
        f"Target: lora / full <= {TARGET}.",
        "",
        "| backbone | params | K | trainable | meta-params MiB | peak MiB | s/episode |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.backbone} | {r.params} | {r.inner_steps} | {r.trainable:,} | {r.meta_params_mib:.1f} | "
            f"{r.peak_mib:.0f} | {r.episode_s:.2f} |"
        )
    lines += [
        "",
        "| backbone, K | peak lora / full | peak lora+ckpt / full | s/episode lora+ckpt / lora |",
        "|---|---|---|---|",
    ]
    for k, v in ratios.items():
        lines.append(f"| {k} | {v['lora']:.3f} | **{v['lora+ckpt']:.3f}** | {v['ckpt_time']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--backbones", nargs="+", default=["all-MiniLM-L6-v2", "bert-base-random", "bert-large-random"]
    )
    p.add_argument("--inner-steps", type=int, nargs="+", default=[1])
    p.add_argument("--shots", type=int, default=1, help="5-way SHOTS-shot episodes")
    p.add_argument("--repeats", type=int, default=1, help="timed episodes after the measured one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args()
    set_threads(args.threads)
    if args.contender:
        row = run_contender(
            args.backbones[0], args.contender, args.shots, args.inner_steps[0], args.repeats, args.device
        )
        print(json.dumps(asdict(row)))  # the parent reads this last line
        return
    t0 = time.perf_counter()
    rows = []
    for backbone in args.backbones:
        for steps in args.inner_steps:
            for which in CONTENDERS:
                rows.append(spawn_contender(backbone, which, steps, args))
                print(rows[-1], flush=True)
    by = {(r.backbone, r.params, r.inner_steps): r for r in rows}
    ratios = {
        f"{b}, K={k}": {
            "lora": by[b, "lora", k].peak_mib / by[b, "full", k].peak_mib,
            "lora+ckpt": by[b, "lora+ckpt", k].peak_mib / by[b, "full", k].peak_mib,
            "ckpt_time": by[b, "lora+ckpt", k].episode_s / by[b, "lora", k].episode_s,
        }
        for b in args.backbones
        for k in args.inner_steps
    }
    print(f"total {time.perf_counter() - t0:.0f} s")
    payload = {"rows": [asdict(r) for r in rows], "ratios": ratios, "target": TARGET}
    write_result("memory", payload, markdown(rows, ratios, args))


if __name__ == "__main__":
    main()

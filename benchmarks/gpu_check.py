"""What only a GPU can check, in one short run (a few minutes on one GPU; no Ray needed).

    python benchmarks/gpu_check.py                       # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --episodes 2 --backbone PATH   # dry run of the script

1. A second-order MAML meta-gradient on the packaged MiniLM (eager attention, 5-way 5-shot
   Banking77 episodes) in fp32 and with ``model.bf16`` autocast: time per episode, peak memory and
   how far the bf16 meta-gradient is from the fp32 one (cosine, relative error).
2. A 1-worker NCCL process group: meta-steps of the shipped few-shot recipe (first order, learned
   head values) whose meta-gradient goes through ``torch.distributed.all_reduce`` give the same
   adapter as the same steps without it (the Ray Train worker loop reduces this way on GPUs).
3. The episode's time against the bare passes it needs on the same batch (support and query
   forward + backward of the adapted backbone), first order.

Writes ``results/gpu_check.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from dataclasses import replace
from typing import Any

import torch
from torch.nn import functional as F

from metapeft_ray.core.config import load_config
from metapeft_ray.core.meta import InnerLoop, run_episode
from metapeft_ray.core.train import MetaLearner, prepare_sampler

from common import fixed_episodes, meta_encoder, set_threads, write_result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def second_order(cfg: Any, device: torch.device, episodes: int) -> dict[str, Any]:
    encoder, params = meta_encoder(cfg, device=device)
    eps = fixed_episodes(cfg, episodes, k_shot=5)
    kw = {"inner": InnerLoop(1, 0.05, 10.0, first_order=False), "meta_gradient": True}
    out: dict[str, Any] = {}
    grads = {}
    for name, enc in (("fp32", encoder), ("bf16", replace(encoder, bf16=True))):
        run_episode(enc, params, eps[0], **kw)  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        for ep in eps:
            g = run_episode(enc, params, ep, **kw).grads
        _sync(device)
        grads[name] = torch.cat([v.reshape(-1).float() for v in g.values()])
        out[name] = {"s_per_episode": (time.perf_counter() - t0) / len(eps), "peak_mib": _peak_mib(device)}
    a, b = grads["fp32"], grads["bf16"]
    out["bf16_vs_fp32"] = {
        "cosine": F.cosine_similarity(a, b, dim=0).item(),
        "relative_error": ((a - b).norm() / a.norm()).item(),
    }
    return out


def nccl_one_worker(cfg: Any, device: torch.device, steps: int) -> dict[str, Any]:
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t

        finals = []
        for reduce in (all_reduce, None):
            learner = MetaLearner.from_config(cfg, prepare_sampler(cfg), device=device)
            for _ in range(steps):
                learner.meta_step(reduce=reduce) if reduce else learner.meta_step()
            finals.append(torch.cat([p.detach().reshape(-1) for p in learner.params.values()]))
        return {
            "backend": backend,
            "steps": steps,
            "max_abs_diff": (finals[0] - finals[1]).abs().max().item(),
        }
    finally:
        dist.destroy_process_group()


def episode_vs_bare(cfg: Any, device: torch.device, episodes: int) -> dict[str, Any]:
    encoder, params = meta_encoder(cfg, device=device)
    eps = fixed_episodes(cfg, episodes, k_shot=5)
    kw = {"inner": InnerLoop(1, 0.05, 10.0, first_order=True), "meta_gradient": True}

    def bare(ep: Any) -> None:
        for texts in (ep.support_texts, ep.query_texts):
            emb = encoder.embed(params, encoder.tokenize(texts))
            torch.autograd.grad(emb.sum(), list(params.values()))

    timings = {}
    for name, fn in (("episode", lambda ep: run_episode(encoder, params, ep, **kw)), ("bare", bare)):
        fn(eps[0])
        _sync(device)
        t0 = time.perf_counter()
        for ep in eps:
            fn(ep)
        _sync(device)
        timings[name] = (time.perf_counter() - t0) / len(eps)
    return {**timings, "ratio": timings["episode"] / timings["bare"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backbone", default="all-MiniLM-L6-v2")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine, or --device cpu for a dry run")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    base = ["data.dataset=banking77", f"model.backbone={args.backbone}", "run.seed=0", "meta.inner_steps=1"]
    so = load_config(None, base)  # second order by default: eager attention
    # first order as the shipped recipe trains (its learned head values are meta-parameters too)
    fo = load_config("fewshot", [*base, "meta.meta_batch_size=2"])
    results = {
        "second_order": second_order(so, device, args.episodes),
        "nccl": nccl_one_worker(fo, device, args.steps),
        "episode_vs_bare": episode_vs_bare(fo, device, args.episodes),
    }
    so_r, ratio = results["second_order"], results["episode_vs_bare"]
    md = "\n".join(
        [
            f"# GPU check on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (dry run)'}",
            "",
            "| check | result |",
            "|---|---|",
            f"| second order, fp32 | {so_r['fp32']['s_per_episode']:.3f} s/episode, peak "
            f"{so_r['fp32']['peak_mib'] or 0:.0f} MiB |",
            f"| second order, bf16 autocast | {so_r['bf16']['s_per_episode']:.3f} s/episode, peak "
            f"{so_r['bf16']['peak_mib'] or 0:.0f} MiB |",
            f"| bf16 vs fp32 meta-gradient | cosine {so_r['bf16_vs_fp32']['cosine']:.4f}, relative error "
            f"{so_r['bf16_vs_fp32']['relative_error']:.3f} |",
            f"| 1-worker {results['nccl']['backend']} all-reduce, {args.steps} meta-steps | max |diff| "
            f"{results['nccl']['max_abs_diff']:.2e} against no reduction |",
            f"| first-order episode vs bare passes | {ratio['episode']:.3f} s vs {ratio['bare']:.3f} s "
            f"= {ratio['ratio']:.2f}x |",
        ]
    )
    if device.type == "cuda":
        write_result("gpu_check", results, md)
    else:  # a dry run of the script is no GPU result
        print(md)


if __name__ == "__main__":
    main()

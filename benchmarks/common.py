"""What every benchmark script shares: the workload, fixed episodes, peak memory, result files.

Each script measures things side by side in one run (the machines are noisy: a ratio measured in
one process holds, an absolute CPU time does not) and writes ``results/<name>.json`` (for
`report.py`'s plots) and ``results/<name>.md`` (for the report and the README).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metapeft_ray.core.config import Config, load_config
from metapeft_ray.core.episodes import Episode
from metapeft_ray.core.evaluate import mean_ci95
from metapeft_ray.core.methods import method
from metapeft_ray.core.model import Encoder, encoder_from_config
from metapeft_ray.core.train import prepare_sampler

RESULTS = Path(__file__).resolve().parent / "results"


def workload(*overrides: str) -> Config:
    """The benchmark workload: packaged MiniLM, Banking77 fold 0, 5-way 1-shot, 1 inner step."""
    return load_config(None, ["data.dataset=banking77", "run.seed=0", "meta.inner_steps=1", *overrides])


RANDOM_BACKBONES = {
    "bert-base-random": {},  # BertConfig() defaults: BERT-base, 110 M parameters
    "bert-large-random": {  # BERT-large, 335 M parameters
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
}


def backbone_path(name: str) -> str:
    """``name`` itself, or for ``bert-base-random`` / ``bert-large-random`` a randomly initialised
    BERT-base / BERT-large saved once under the temp dir with the packaged MiniLM's tokenizer (the
    same uncased WordPiece vocabulary):
    for measurements that depend on a backbone's shape, not its weights (memory, time)."""
    if name not in RANDOM_BACKBONES:
        return name
    import tempfile

    from transformers import AutoTokenizer, BertConfig, BertModel

    from metapeft_ray.core.model import resolve_backbone

    path = Path(tempfile.gettempdir()) / f"metapeft-{name}"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        BertModel(BertConfig(**RANDOM_BACKBONES[name])).save_pretrained(path)
        AutoTokenizer.from_pretrained(resolve_backbone("all-MiniLM-L6-v2")).save_pretrained(path)
    return str(path)


def meta_encoder(
    cfg: Config, *, device: torch.device | None = None
) -> tuple[Encoder, dict[str, torch.Tensor]]:
    """The encoder of ``cfg`` and its adapter tensors in the meta-init the learner starts from."""
    torch.manual_seed(cfg.run.seed)
    encoder = encoder_from_config(cfg, device=device)
    params = encoder.adapter_params()
    method(cfg.peft.method).meta_init(params, encoder.spec, cfg.run.seed)
    return encoder, params


def fixed_episodes(
    cfg: Config, count: int, *, split: str = "test", k_shot: int | None = None
) -> list[Episode]:
    """``count`` episodes of ``cfg``'s shape (``k_shot`` overrides ``episode.k_shot``), the same in
    every run and every process."""
    sampler = prepare_sampler(cfg)
    e = cfg.episode
    specs = sampler.specs(
        split, count, seed=cfg.run.seed, step=0, n_way=e.n_way, k_shot=k_shot or e.k_shot, q_query=e.q_query
    )
    return [sampler.build(s) for s in specs]


def set_threads(threads: int) -> None:
    # One thread per process keeps CPU timings sane on a shared machine (no OpenMP spinning).
    torch.set_num_threads(threads)


def median_seconds(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Mean and 95 % CI half-width (`mean_ci95`) of the per-pair ratios ``times[i] / reference[i]``
    of timings taken side by side; the CI is NaN below two pairs (no spread to go on)."""
    s = mean_ci95([t / r for t, r in zip(times, reference, strict=True)])
    return {"ratio": s["mean"], "ci95": s["ci95"] if s["episodes"] > 1 else math.nan, "pairs": s["episodes"]}


def against(ratio: float, ci95: float, bound: float) -> str:
    """Where the CI ``ratio`` ± ``ci95`` lies against ``bound``: "below", "above" or "straddles"
    (also when the CI is NaN)."""
    if ratio + ci95 <= bound:
        return "below"
    if ratio - ci95 > bound:
        return "above"
    return "straddles"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


@dataclass
class Peak:
    mib: float = float("nan")
    """Peak memory above what was resident when the block started, in MiB."""


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    """Peak memory a block adds: CUDA ``max_memory_allocated``, or on CPU the process's resident
    high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident size
    at the start (Linux). CPU numbers include the allocator's slack: compare contenders measured
    the same way, each in a fresh process for a clean high-water mark."""
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    # Hand glibc's freed heap back first: otherwise a warmed-up process reuses the freed pages and
    # its high-water mark does not rise during the block.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _status_kib("VmRSS")
    yield peak
    peak.mib = (_status_kib("VmHWM") - base) / 1024


def environment() -> dict[str, Any]:
    return {
        "command": shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def write_result(
    name: str, payload: dict[str, Any], markdown: str, out_dir: Path = RESULTS
) -> dict[str, Any]:
    """``results/<name>.json`` (payload + environment) and ``results/<name>.md``; prints the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"environment": environment(), **payload}
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    env = record["environment"]
    footer = f"\n`{env['command']}` — {env['date']}, {env['machine']}, torch {env['torch']}"
    footer += f", {env['threads']} thread(s)"
    footer += f", GPU {env['gpu']}\n" if env["gpu"] else "\n"
    (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n" + footer)
    print(markdown.rstrip() + footer)
    return record

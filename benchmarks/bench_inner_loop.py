"""Inner-loop efficiency: s/episode of MAML-LoRA's meta-gradient vs the bare passes it needs.

    python benchmarks/bench_inner_loop.py                        # 5w1s + 5w5s, K = 1 and 5, FO + SO
    python benchmarks/bench_inner_loop.py --shots 5 --inner-steps 1 --orders first --repeats 10

Issue 7, item 1. "Ours" is an episode's meta-gradient exactly as meta-training gets it
(`MetaAlgorithm.episode` -> `run_episode(..., meta_gradient=True)`). The floor does the
passes the algorithm cannot avoid, written out bare on the same episode, the same adapter
tensors and the same encoder: K support forwards (the first one also gives the prototype head)
and K support backwards to the adapter and head (with ``create_graph`` for second order), then
one query forward and one backward to the init (through the prototypes, and for second order
back through the inner steps). Both tokenise their episode inside the timed call
(`run_episode` cannot be handed tokens); the tokenisation time is reported beside them. The
floor returns the same meta-gradient as ours (checked, ``max |diff|`` column), so it is the
same maths and not a cheaper approximation.

The contenders alternate episode by episode (the one going first rotates), over ``--repeats``
passes of the episodes, so load drifting on a shared machine hits all alike. The number to read
is the ratio ours / floor: the mean of the per-pair ratios (one pair per episode and repeat) with
its 95 % CI; the absolute seconds are this machine's. A first-order row meets the target when the
CI's upper bound is at most the target, misses it when the lower bound is above it, and is
inconclusive when the CI straddles it. The per-pair seconds are in the JSON.
First order runs on the SDPA backbone, second order on eager attention (as meta-training loads
them: SDPA has no double backward); each ratio compares passes on the same backbone.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from statistics import mean

import torch
from torch import Tensor
from torch.nn import functional as F

from metapeft_ray.core.algorithms.maml import MAML
from metapeft_ray.core.config import Config
from metapeft_ray.core.episodes import Episode
from metapeft_ray.core.meta import InnerLoop, head_logits, proto_head
from metapeft_ray.core.model import Encoder

from common import (
    RESULTS,
    against,
    fixed_episodes,
    meta_encoder,
    paired_ratio,
    set_threads,
    workload,
    write_result,
)

TARGET_FIRST_ORDER = 1.10
ORDERS = ("first", "second")
VERDICTS = {"below": "meets", "above": "misses", "straddles": "inconclusive"}


def floor_episode(
    encoder: Encoder,
    params: Mapping[str, Tensor],
    episode: Episode,
    *,
    steps: int,
    lr: float,
    scale: float,
    second_order: bool,
) -> dict[str, Tensor]:
    """The meta-gradient ``d L_query / d params`` by the bare passes (see the module docstring)."""
    dev = encoder.device
    support, query = encoder.tokenize(episode.support_texts), encoder.tokenize(episode.query_texts)
    s_labels = torch.tensor(episode.support_labels, device=dev)
    q_labels = torch.tensor(episode.query_labels, device=dev)
    names, init = list(params), list(params.values())
    embedded = encoder.embed(params, support)
    weight, bias = proto_head(embedded, s_labels, len(episode.class_names))
    fast = init
    for step in range(steps):
        # Step 0 reuses the prototypes' support forward; the inner gradient is the partial one
        # w.r.t. the adapter with the head held fixed (taken at a fresh node of the embedding).
        emb = (
            embedded.view_as(embedded)
            if step == 0
            else encoder.embed(dict(zip(names, fast, strict=True)), support)
        )
        loss = F.cross_entropy(head_logits(emb, weight, bias, scale), s_labels)
        if step == 0:
            g_emb, g_w, g_b = torch.autograd.grad(loss, [emb, weight, bias], create_graph=second_order)
            g = torch.autograd.grad(embedded, fast, g_emb, create_graph=second_order, retain_graph=True)
        else:
            *g, g_w, g_b = torch.autograd.grad(loss, [*fast, weight, bias], create_graph=second_order)
        fast = [p - lr * gp for p, gp in zip(fast, g, strict=True)]
        weight, bias = weight - lr * g_w, bias - lr * g_b
    logits = head_logits(encoder.embed(dict(zip(names, fast, strict=True)), query), weight, bias, scale)
    return dict(zip(names, torch.autograd.grad(F.cross_entropy(logits, q_labels), init), strict=True))


def ours_episode(
    encoder: Encoder,
    params: Mapping[str, Tensor],
    episode: Episode,
    *,
    steps: int,
    lr: float,
    scale: float,
    second_order: bool,
) -> dict[str, Tensor]:
    """One episode's contribution exactly as `MetaLearner.meta_step` gets it."""
    inner = InnerLoop(steps, lr, scale, first_order=not second_order)
    result = MAML().episode(encoder, params, {}, episode, inner, meta_gradient=True)
    assert result.grads is not None
    return result.grads


def tokenize_episode(encoder: Encoder, episode: Episode) -> None:
    encoder.tokenize(episode.support_texts)
    encoder.tokenize(episode.query_texts)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


@dataclass
class Row:
    order: str
    shots: int
    inner_steps: int
    episode_s: float
    floor_s: float
    ratio: float
    """Mean of the per-pair ratios ours / floor."""
    ratio_ci95: float
    pairs: int
    verdict: str | None
    """Against ``TARGET_FIRST_ORDER`` by the CI (first order only): meets, misses, inconclusive."""
    tokenize_s: float
    grad_max_abs_diff: float
    ours_times: list[float]
    floor_times: list[float]


def measure(
    cfg: Config,
    encoder: Encoder,
    params: Mapping[str, Tensor],
    episodes: list[Episode],
    *,
    order: str,
    shots: int,
    steps: int,
    repeats: int,
) -> Row:
    """Seconds per episode of each contender, alternating contenders episode by episode, with
    the ratio ours / floor over the (episode, repeat) pairs."""
    ours = partial(
        ours_episode,
        encoder,
        params,
        steps=steps,
        lr=cfg.meta.inner_lr,
        scale=cfg.head.scale,
        second_order=order == "second",
    )
    floor = partial(
        floor_episode,
        encoder,
        params,
        steps=steps,
        lr=cfg.meta.inner_lr,
        scale=cfg.head.scale,
        second_order=order == "second",
    )
    contenders: dict[str, Callable[[Episode], object]] = {
        "ours": ours,
        "floor": floor,
        "tokenize": partial(tokenize_episode, encoder),
    }
    # The check that the floor computes the same meta-gradient doubles as this row's warm-up.
    g_ours, g_floor = ours(episodes[0]), floor(episodes[0])
    diff = max((g_ours[k] - g_floor[k]).abs().max().item() for k in g_ours)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        for i, ep in enumerate(episodes):
            shift = (r * len(episodes) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(timed(partial(contenders[name], ep), encoder.device))
    pr = paired_ratio(times["ours"], times["floor"])
    verdict = VERDICTS[against(pr["ratio"], pr["ci95"], TARGET_FIRST_ORDER)] if order == "first" else None
    return Row(
        order,
        shots,
        steps,
        mean(times["ours"]),
        mean(times["floor"]),
        pr["ratio"],
        pr["ci95"],
        pr["pairs"],
        verdict,
        mean(times["tokenize"]),
        diff,
        times["ours"],
        times["floor"],
    )


def summary(rows: list[Row]) -> str:
    """The first-order rows' verdicts against the target, counted."""
    verdicts = [r.verdict for r in rows if r.verdict]
    if not verdicts:
        return "No first-order row: no verdict against the target."
    counts = ", ".join(f"{v} at {verdicts.count(v)}" for v in VERDICTS.values() if v in verdicts)
    target = f"<= {TARGET_FIRST_ORDER:.2f}x"
    return f"First order against the target {target} (by the 95 % CI): {counts} of {len(verdicts)} rows."


def markdown(rows: list[Row], args: argparse.Namespace, cfg: Config) -> str:
    lines = [
        "# Inner loop vs its floor (MAML-LoRA meta-gradient per episode)",
        "",
        f"{cfg.model.backbone}, LoRA r={cfg.peft.rank} ({cfg.peft.placement}), {cfg.data.dataset} test "
        f"classes, 5-way, {cfg.episode.q_query} queries/class, inner lr {cfg.meta.inner_lr}; {args.episodes} "
        f"fixed episodes x {args.repeats} repeat(s) per row after a warm-up episode (the gradient check), "
        "contenders alternating; ratio = mean of the per-pair ratios ours / floor, ± its 95 % CI. "
        "ours = an episode's meta-gradient as `MetaLearner.meta_step` gets it; floor = the bare passes "
        "(K support forwards, the first shared with the prototype head, K support grads, query "
        "forward + backward to the init); tokenisation inside both. Target: first order <= "
        f"{TARGET_FIRST_ORDER:.2f}x its floor, met when the CI's upper bound is.",
        "",
        "| order | shots | K | ours s/episode | floor s/episode | ratio ± 95 % CI | pairs | target "
        "| tokenise ms | max abs grad diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.order} | {r.shots} | {r.inner_steps} | {r.episode_s:.3f} | {r.floor_s:.3f} | "
            f"**{r.ratio:.3f}** ± {r.ratio_ci95:.3f} | {r.pairs} | {r.verdict or '—'} | "
            f"{1000 * r.tokenize_s:.1f} | {r.grad_max_abs_diff:.1e} |"
        )
    return "\n".join([*lines, "", summary(rows)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    p.add_argument("--episodes", type=int, default=3, help="fixed episodes per row")
    p.add_argument("--repeats", type=int, default=5, help="passes over the episodes per row")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where inner_loop.{json,md} go")
    args = p.parse_args()
    set_threads(args.threads)
    t0 = time.perf_counter()
    rows: list[Row] = []
    for order in args.orders:
        cfg = workload(
            f"meta.first_order={'true' if order == 'first' else 'false'}", f"model.device={args.device}"
        )
        encoder, params = meta_encoder(cfg)
        for shots in args.shots:
            episodes = fixed_episodes(cfg, args.episodes, k_shot=shots)
            for steps in args.inner_steps:
                row = measure(
                    cfg,
                    encoder,
                    params,
                    episodes,
                    order=order,
                    shots=shots,
                    steps=steps,
                    repeats=args.repeats,
                )
                print(
                    f"{order} {shots}s K={steps}: ratio {row.ratio:.3f} ± {row.ratio_ci95:.3f} "
                    f"({row.pairs} pairs) {row.verdict or ''}",
                    flush=True,
                )
                rows.append(row)
    print(f"total {time.perf_counter() - t0:.0f} s")
    payload = {
        "rows": [asdict(r) for r in rows],
        "target_first_order": TARGET_FIRST_ORDER,
        "episodes": args.episodes,
        "repeats": args.repeats,
        "summary": summary(rows),
    }
    write_result("inner_loop", payload, markdown(rows, args, cfg), args.out_dir)


if __name__ == "__main__":
    main()

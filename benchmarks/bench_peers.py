"""Our meta-gradient against the meta-learning libraries that install on Python 3.11 (higher,
torchopt), on a peft LoRA MiniLM.

    pip install higher==0.2.1 torchopt==0.7.3
    python benchmarks/bench_peers.py                      # 8 episodes, 1 thread, device auto
    python benchmarks/bench_peers.py --episodes 16 --device cuda

Workload: packaged all-MiniLM-L6-v2 with LoRA (peft), Banking77 fold 0 test classes, 5-way 5-shot,
5 queries per class, 2 inner SGD steps on the adapter tensors and the Proto-MAML head, second and
first order. Each contender first tries what a new user would (``higher.innerloop_ctx``,
``higher.monkeypatch``, ``torchopt.MetaSGD`` on the peft model) and records the exception. Then
the documented workarounds that run: higher's differentiable SGD stepped on explicit tensors
(``get_diff_optim(...).step(loss, params=...)``) and torchopt's functional SGD
(``torchopt.sgd`` + ``apply_updates``), both on a dict of the adapter tensors substituted with
``torch.func.functional_call`` (the encoder's `embed`), computing exactly `metapeft_ray.core.meta`'s
objective. First order is each library's documented way: higher ``track_higher_grads=False`` and
the query gradient w.r.t. the adapted weights (the maintainers' answer in higher issue #63),
torchopt inner gradients without ``create_graph``.

The workarounds do one encoder forward more per episode than ours: they run the support set once
for the prototype head and once per inner step, where ours reuses the prototypes' forward for the
first step. So a control runs their loop with the update ``p - lr * g`` written by hand: the
same forwards as the peers by construction (each contender's encoder forwards per episode are
counted, not assumed), so a peer's ratio to the control is what the library costs, and the
control's ratio to ours is what the shared forward saves.

Each contender runs in a fresh process beside ours and the control of the same order, on the
same episodes: one untimed warm-up episode each (where the forwards are counted), then per
episode the three in turn, the one going first rotating (so the time ratios hold on a loaded
machine; ours beside ours gives the noise floor). Per contender: median wall time of the whole
meta-gradient per episode; its time ratio to ours and to the control, the mean of the
per-episode ratios with a 95 % CI; peak memory per episode (max over episodes); agreement with
ours (max abs difference and cosine similarity of the flattened meta-gradient, the worst over
episodes). Faster or slower is said only where the CI excludes 1. Writes ``peers.{json,md}``
under ``--out-dir`` (default ``results/``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from metapeft_ray.core.config import Config
from metapeft_ray.core.episodes import Episode
from metapeft_ray.core.meta import InnerLoop, Params, episode_tensors, head_logits, proto_head, run_episode
from metapeft_ray.core.model import Encoder

from common import (
    RESULTS,
    against,
    fixed_episodes,
    meta_encoder,
    paired_ratio,
    peak_memory,
    set_threads,
    workload,
    write_result,
)

EpisodeFn = Callable[[Episode], Params]


def cfg_for(order: str, device: str, extra: Sequence[str] = ()) -> Config:
    overrides = ["episode.k_shot=5", "episode.q_query=5", "meta.inner_steps=2", f"model.device={device}"]
    # Second order loads eager attention (SDPA has no double backward); first order keeps SDPA.
    return workload(*overrides, *extra, f"meta.first_order={'true' if order == 'first' else 'false'}")


def ours(encoder: Encoder, params: Params, cfg: Config, order: str) -> EpisodeFn:
    def episode_grads(episode: Episode) -> Params:
        m = cfg.meta
        inner = InnerLoop(m.inner_steps, m.inner_lr, cfg.head.scale, first_order=order == "first")
        result = run_episode(encoder, params, episode, inner, meta_gradient=True, track_support_after=False)
        assert result.grads is not None
        return result.grads

    return episode_grads


Step = Callable[[Tensor, list[Tensor]], list[Tensor]]
"""One inner SGD step: (support loss, fast tensors) -> updated fast tensors."""


def unrolled(
    encoder: Encoder,
    params: Params,
    cfg: Config,
    make_step: Callable[[list[Tensor]], Step],
    *,
    wrt_adapted: bool,
) -> EpisodeFn:
    """`metapeft_ray.core.meta.run_episode`'s objective with a library's optimizer doing the inner steps
    on ``[*adapter tensors, W, b]``; the meta-gradient w.r.t. the init (or, ``wrt_adapted``, w.r.t.
    the adapted adapter tensors: textbook first-order MAML)."""
    names, scale = list(params), cfg.head.scale

    def loss(fast: list[Tensor], batch: dict[str, Tensor], labels: Tensor) -> Tensor:
        embeddings = encoder.embed(dict(zip(names, fast[:-2], strict=True)), batch)
        return F.cross_entropy(head_logits(embeddings, fast[-2], fast[-1], scale), labels)

    def episode_grads(episode: Episode) -> Params:
        support, s_labels, query, q_labels = episode_tensors(encoder, episode)
        weight, bias = proto_head(encoder.embed(params, support), s_labels, len(episode.class_names))
        # As in meta.adapt: fresh views, so the inner gradient treats the head as an independent leaf.
        fast = [p.view_as(p) for p in params.values()] + [weight, bias]
        step = make_step(fast)
        for _ in range(cfg.meta.inner_steps):
            fast = step(loss(fast, support, s_labels), fast)
        wrt = fast[:-2] if wrt_adapted else list(params.values())
        return dict(zip(names, torch.autograd.grad(loss(fast, query, q_labels), wrt), strict=True))

    return episode_grads


def higher_diffopt(encoder: Encoder, params: Params, cfg: Config, order: str) -> EpisodeFn:
    import higher

    def make_step(fast: list[Tensor]) -> Step:
        slots = [t.detach().requires_grad_() for t in fast]  # SGD wants leaves; step() gets the real ones
        diffopt = higher.optim.get_diff_optim(
            torch.optim.SGD(slots, lr=cfg.meta.inner_lr), slots, track_higher_grads=order == "second"
        )
        return lambda loss, fast: diffopt.step(loss, params=fast)

    return unrolled(encoder, params, cfg, make_step, wrt_adapted=order == "first")


def torchopt_functional(encoder: Encoder, params: Params, cfg: Config, order: str) -> EpisodeFn:
    import torchopt

    optimizer = torchopt.sgd(cfg.meta.inner_lr)

    def make_step(fast: list[Tensor]) -> Step:
        state = optimizer.init(fast)

        def step(loss: Tensor, fast: list[Tensor]) -> list[Tensor]:
            nonlocal state
            grads = list(torch.autograd.grad(loss, fast, create_graph=order == "second"))
            updates, state = optimizer.update(grads, state, inplace=False)
            return torchopt.apply_updates(fast, updates, inplace=False)

        return step

    return unrolled(encoder, params, cfg, make_step, wrt_adapted=False)


def control(encoder: Encoder, params: Params, cfg: Config, order: str) -> EpisodeFn:
    """The peers' loop (the same forwards) with the update ``p - lr * g`` written by hand."""

    def make_step(fast: list[Tensor]) -> Step:
        def step(loss: Tensor, fast: list[Tensor]) -> list[Tensor]:
            grads = torch.autograd.grad(loss, fast, create_graph=order == "second")
            return [p - cfg.meta.inner_lr * g for p, g in zip(fast, grads, strict=True)]

        return step

    return unrolled(encoder, params, cfg, make_step, wrt_adapted=False)


def support_loss(encoder: Encoder, params: Params, episode: Episode, cfg: Config) -> Tensor:
    """The support loss of the module as it stands (``embed({})``: no substitution)."""
    support, s_labels, _, _ = episode_tensors(encoder, episode)
    weight, bias = proto_head(encoder.embed(params, support), s_labels, len(episode.class_names))
    logits = head_logits(encoder.embed({}, support), weight, bias, cfg.head.scale)
    return F.cross_entropy(logits, s_labels)


class OutOfTheBoxWorks(RuntimeError):
    """An out-of-the-box probe got past the call that fails on a peft model today (the library
    was fixed): the row then says so, and the probe deserves a full contender."""

    def __init__(self, api: str) -> None:
        super().__init__(f"{api} now runs on a peft model; measure it as a full contender")


def higher_innerloop_ctx(encoder: Encoder, params: Params, cfg: Config, order: str) -> EpisodeFn:
    import higher

    def attempt(episode: Episode) -> Params:
        opt = torch.optim.SGD(list(params.values()), lr=cfg.meta.inner_lr)
        track = order == "second"
        with higher.innerloop_ctx(encoder.model, opt, track_higher_grads=track) as (fmodel, diffopt):
            raise OutOfTheBoxWorks("higher.innerloop_ctx")

    return attempt


def higher_monkeypatch(encoder: Encoder, params: Params, cfg: Config, order: str) -> EpisodeFn:
    import higher

    def attempt(episode: Episode) -> Params:
        higher.monkeypatch(encoder.model.get_base_model(), track_higher_grads=order == "second")
        raise OutOfTheBoxWorks("higher.monkeypatch")

    return attempt


def torchopt_metasgd(encoder: Encoder, params: Params, cfg: Config, order: str) -> EpisodeFn:
    import torchopt

    def attempt(episode: Episode) -> Params:
        opt = torchopt.MetaSGD(encoder.model, lr=cfg.meta.inner_lr)
        opt.step(support_loss(encoder, params, episode, cfg))
        raise OutOfTheBoxWorks("torchopt.MetaSGD")

    return attempt


@dataclass(frozen=True)
class Contender:
    library: str
    api: str
    order: str
    build: Callable[[Encoder, Params, Config, str], EpisodeFn]


CONTENDERS = {
    f"{c.library}-{c.build.__name__}-{c.order}": c
    for c in [
        Contender("ours", "meta.run_episode", "second", ours),
        Contender("ours", "meta.run_episode", "first", ours),
        Contender("control", "the peers' loop, p - lr * g by hand", "second", control),
        Contender(
            "control",
            "the peers' loop, p - lr * g by hand, inner grads without create_graph",
            "first",
            control,
        ),
        Contender("higher", "innerloop_ctx(peft_model, SGD(adapter params))", "second", higher_innerloop_ctx),
        Contender("higher", "monkeypatch(peft_model.get_base_model())", "second", higher_monkeypatch),
        Contender(
            "higher", "get_diff_optim(SGD).step(loss, params=...) + functional_call", "second", higher_diffopt
        ),
        Contender(
            "higher",
            "get_diff_optim(SGD, track_higher_grads=False), grad w.r.t. adapted",
            "first",
            higher_diffopt,
        ),
        Contender("torchopt", "MetaSGD(peft_model).step(loss)", "second", torchopt_metasgd),
        Contender("torchopt", "sgd + apply_updates + functional_call", "second", torchopt_functional),
        Contender(
            "torchopt", "sgd + apply_updates, inner grads without create_graph", "first", torchopt_functional
        ),
    ]
}


def short_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]


def timed(fn: EpisodeFn, episode: Episode, device: torch.device) -> tuple[Params, float, float]:
    """The meta-gradient of one episode, its wall time and its peak memory (MiB)."""
    with peak_memory(device) as peak:
        t = time.perf_counter()
        grads = fn(episode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t
    return grads, seconds, peak.mib


def counted_forwards(fn: EpisodeFn, episode: Episode, encoder: Encoder) -> int:
    """``fn(episode)``, returning how many times it ran the encoder's model forward."""
    count = 0

    def hook(*_: Any) -> None:
        nonlocal count
        count += 1

    handle = encoder.model.register_forward_pre_hook(hook)
    try:
        fn(episode)
    finally:
        handle.remove()
    return count


def agreement(grads: Params, reference: Params) -> tuple[float, float]:
    """Max abs difference and cosine similarity of the flattened meta-gradients."""
    a, b = (torch.cat([g[k].flatten() for k in reference]).double() for g in (grads, reference))
    return (a - b).abs().max().item(), F.cosine_similarity(a, b, dim=0).item()


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One contender in this (fresh) process, beside ours and the control of the same order on the
    same episodes (interleaved, so the time ratios hold on a loaded machine): encoder forwards per
    episode, median time, per-episode time ratios (mean ± 95 % CI), max peak memory, worst
    agreement."""
    set_threads(args.threads)
    contender = CONTENDERS[name]
    cfg = cfg_for(contender.order, args.device, args.set)
    encoder, params = meta_encoder(cfg)
    episodes = fixed_episodes(cfg, args.episodes)
    try:
        fns = {
            "contender": contender.build(encoder, params, cfg, contender.order),
            "ours": ours(encoder, params, cfg, contender.order),
            "control": control(encoder, params, cfg, contender.order),
        }
        # warm-up (the contender first: where a new user's attempt fails), counting the forwards
        forwards = {k: counted_forwards(fn, episodes[0], encoder) for k, fn in fns.items()}
        names, times = list(fns), {k: [] for k in fns}
        peaks, diffs, cosines = [], [], []
        for i, episode in enumerate(episodes):
            grads = {}
            for k in names[i % 3 :] + names[: i % 3]:
                grads[k], seconds, mib = timed(fns[k], episode, encoder.device)
                times[k].append(seconds)
                if k == "contender":
                    peaks.append(mib)
            diff, cosine = agreement(grads["contender"], grads["ours"])
            diffs.append(diff)
            cosines.append(cosine)
    except Exception as err:  # noqa: BLE001 - recording what the library does is the point
        return {"status": "error", "error": short_error(err)}
    vs_ours, vs_control = (paired_ratio(times["contender"], times[k]) for k in ("ours", "control"))
    return {
        "status": "ok",
        "error": None,
        "forwards": forwards["contender"],
        "ours_forwards": forwards["ours"],
        "control_forwards": forwards["control"],
        "episode_s": median(times["contender"]),
        "pairs": vs_ours["pairs"],
        "time_ratio_vs_ours": vs_ours["ratio"],
        "time_ratio_vs_ours_ci95": vs_ours["ci95"],
        "time_ratio_vs_control": vs_control["ratio"],
        "time_ratio_vs_control_ci95": vs_control["ci95"],
        "peak_mib": max(peaks),
        "max_abs_diff": max(diffs),
        "cosine": min(cosines),
    }


def run_isolated(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{name}.json"
    options = ["--episodes", str(args.episodes), "--threads", str(args.threads), "--device", args.device]
    options += ["--set", *args.set] if args.set else []
    subprocess.run([sys.executable, __file__, "--contender", name, "--out", str(out), *options], check=True)
    return json.loads(out.read_text())


def speed(r: dict[str, Any], than: str) -> str:
    """``r``'s time ratio to ``than`` ("ours" or "control") ± its CI, and what the CI allows to say."""
    ratio, ci = r[f"time_ratio_vs_{than}"], r[f"time_ratio_vs_{than}_ci95"]
    word = {"above": "slower", "below": "faster", "straddles": "no measurable difference"}
    return f"{ratio:.2f} ± {ci:.2f}x ({word[against(ratio, ci, 1.0)]})"


def work(r: dict[str, Any], than: str) -> str:
    """Equal forwards only where the counts are."""
    mine, theirs = r["forwards"], r[f"{than}_forwards"]
    return f"equal forwards, {mine}" if mine == theirs else f"{mine} encoder forwards against {theirs}"


def findings(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The reading of the table, from its numbers."""
    out = []
    missing = sorted({r["library"] for r in rows.values() if (r["error"] or "").startswith("ModuleNotFound")})
    if missing:
        out.append(
            f"Not installed here: {', '.join(missing)} (`pip install -e '.[bench]'`): no numbers for them."
        )
    probes = [
        n
        for n, c in CONTENDERS.items()
        if c.build in (higher_innerloop_ctx, higher_monkeypatch, torchopt_metasgd)
    ]
    if not missing and all(rows[n]["status"] == "error" for n in probes):
        out.append(
            "Out of the box neither library runs on a peft model: higher patches each submodule by "
            "subclassing it, and peft's LoRA layers (an `nn.Module` with an `ABC` base) admit no "
            "consistent MRO for that subclass (also through `monkeypatch` of the base model, which "
            "holds the same layers); `torchopt.MetaSGD` differentiates every parameter of the module, "
            "the frozen backbone's included."
        )
    ok = {(r["library"], r["order"]): r for r in rows.values() if r["status"] == "ok"}
    ours_peak = {order: r["peak_mib"] for (library, order), r in ok.items() if library == "ours"}

    def summary(r: dict[str, Any]) -> str:
        exact = r["max_abs_diff"] == 0
        agrees = "bit for bit" if exact else f"to {r['max_abs_diff']:.0e} max abs (cosine {r['cosine']:.6f})"
        return (
            f"{r['library']} ({r['order']} order) agrees {agrees}, at {speed(r, 'ours')} our time "
            f"({work(r, 'ours')}) and {speed(r, 'control')} the control's ({work(r, 'control')}), "
            f"{r['peak_mib']:.0f} MiB peak (ours {ours_peak.get(r['order'], float('nan')):.0f})"
        )

    peers = [summary(r) for (library, _), r in ok.items() if library not in ("ours", "control")]
    if peers:
        out.append(
            "Given the adapter tensors explicitly (substituted with `torch.func.functional_call`, as our "
            f"encoder does), against ours of the same order: {'; '.join(peers)}."
        )
    hf, tf = ok.get(("higher", "first")), ok.get(("torchopt", "first"))
    if hf and tf and hf["cosine"] < 0.999 <= tf["cosine"]:
        out.append(
            "First order is where they differ: higher's documented way (`track_higher_grads=False`) "
            "detaches the fast weights, so its meta-gradient is the query gradient at the adapted "
            "adapter and drops the path through the prototype-initialised head (cosine "
            f"{hf['cosine']:.2f} with ours), while torchopt's inner gradients without `create_graph` "
            f"keep that path (cosine {tf['cosine']:.6f})."
        )
    controls = [
        f"{speed(r, 'ours')} at {order} order ({work(r, 'ours')})"
        for (lib, order), r in ok.items()
        if lib == "control"
    ]
    if controls:
        out.append(
            "The control (the peers' loop with the update `p - lr * g` written by hand) against ours: "
            f"{'; '.join(controls)}. It differs from ours in not reusing the prototypes' support forward "
            "for the first inner step."
        )
    floor = [f"{speed(r, 'ours')} at {order} order" for (lib, order), r in ok.items() if lib == "ours"]
    out.append(
        f"Ours beside ours timed {' and '.join(floor)} (load {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs): the noise floor of the ratios."
    )
    out.append(
        "What either library adds once the tensors are explicit is the update `p - lr * g` that "
        "`meta.adapt` writes in one line (the control writes it by hand); the functional substitution, "
        "the Proto-MAML head and the partial inner gradient (the head as an independent leaf) remain "
        "the user's to write."
    )
    return out


def markdown(rows: list[dict[str, Any]], workload_text: str, notes: list[str]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    def ratio(r: dict[str, Any], than: str) -> str:
        v = r[f"time_ratio_vs_{than}"]
        return "—" if v is None else f"{v:.2f} ± {r[f'time_ratio_vs_{than}_ci95']:.2f}"

    lines = [
        "# Against the peers: higher and torchopt on a peft LoRA MiniLM",
        "",
        workload_text,
        "",
        "| library | API | order | status | forwards | s/episode | × ours (95 % CI) | × control (95 % CI) "
        "| peak MiB | max abs diff | cosine |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for r in rows:
        status = r["status"]
        if r["error"]:
            errors.append(f"{len(errors) + 1}. {r['library']} `{r['api']}`: `{r['error']}`")
            status = f"error ({len(errors)})"
        lines.append(
            f"| {r['library']} | `{r['api']}` | {r['order']} | {status} | {num(r['forwards'], 'd')} "
            f"| {num(r['episode_s'], '.2f')} | {ratio(r, 'ours')} | {ratio(r, 'control')} "
            f"| {num(r['peak_mib'], '.0f')} | {num(r['max_abs_diff'], '.1e')} | {num(r['cosine'], '.6f')} |"
        )
    return "\n".join([*lines, "", "Errors, verbatim:", "", *errors, "", " ".join(notes), ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides (smoke runs)")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where peers.{json,md} go")
    p.add_argument("--contender", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.contender:
        args.out.write_text(json.dumps(measure(args.contender, args)))
        return
    set_threads(args.threads)  # for the environment record; each contender sets its own
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_isolated(name, args, Path(tmp)) for name in CONTENDERS}
    empty = dict.fromkeys(
        [
            "forwards",
            "ours_forwards",
            "control_forwards",
            "episode_s",
            "pairs",
            "time_ratio_vs_ours",
            "time_ratio_vs_ours_ci95",
            "time_ratio_vs_control",
            "time_ratio_vs_control_ci95",
            "peak_mib",
            "max_abs_diff",
            "cosine",
        ]
    )
    rows = {
        name: {"library": c.library, "api": c.api, "order": c.order, **empty, **results[name]}
        for name, c in CONTENDERS.items()
    }
    cfg = cfg_for("second", args.device, args.set)
    e, m = cfg.episode, cfg.meta
    overrides = f" (overrides: {' '.join(args.set)})" if args.set else ""
    workload_text = (
        f"{cfg.model.backbone} (frozen) + {cfg.peft.method} r={cfg.peft.rank} (peft), Banking77 fold 0 "
        f"test classes, {args.episodes} episodes of {e.n_way}-way {e.k_shot}-shot, {e.q_query} "
        f"queries/class, {m.inner_steps} inner SGD steps (lr {m.inner_lr}) on the adapter tensors and the "
        f"Proto-MAML head{overrides}. Each contender in "
        "a fresh process beside ours and the control of the same order (ours vs ours: the noise floor): "
        "one warm-up episode each (forwards = encoder forwards per episode, counted there), then per "
        "episode the three in turn, the first rotating. s/episode: median, meta-gradient included; "
        "× ours, × control: mean ± 95 % CI of the per-episode time ratios in the same process; max "
        f"peak memory per episode, worst agreement with ours over episodes. "
        f"Total {time.perf_counter() - started:.0f} s."
    )
    notes = findings(rows)
    payload = {
        "workload": workload_text,
        "episodes": args.episodes,
        "rows": list(rows.values()),
        "findings": notes,
    }
    write_result("peers", payload, markdown(list(rows.values()), workload_text, notes), args.out_dir)


if __name__ == "__main__":
    main()

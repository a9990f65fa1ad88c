"""The hybrids table: PEFT methods x meta-algorithms, meta-tested on Banking77 and HWU64.

Every (method, algorithm) is meta-trained from the same seed with the same budget (the same
number of meta-steps x meta-batch of training episodes, the same inner steps and rates), then
meta-tested on the same held-out-class episodes (paired) at N-way 1-shot and 5-shot, beside the
frozen-backbone baselines (prototypes, logistic regression) and each method's plain fine-tune
from peft's default init. Cells: mean query accuracy ± 95 % CI; also the trainable parameter
count (Meta-SGD's learned rates counted separately), the wall time of adapting to one task and
scoring it, and the meta-training time.

    python benchmarks/hybrids.py --meta-steps 30 --episodes 100            # everything
    python benchmarks/hybrids.py --combos lora:maml,ia3:reptile --episodes 20   # a subset
    python benchmarks/hybrids.py --config fewshot --first-order ...             # on the recipe

Each meta-learned row is meta-tested adapted (its inner loop at meta-test) and unadapted (the
init alone, "init" rows): Δinit is what the inner loop adds, paired on the same episodes.

Writes ``benchmarks/results/hybrids.md`` (the table, with the command that produced it) and
``hybrids.json`` (every number). A run keeps what it has done in ``hybrids.partial-<dataset>.json``
as it goes; ``--resume`` (the same command) takes those rows and runs only the pairs they lack, so
the whole table can be built over several sittings; a run of some of the datasets adds them to a
table of the same settings already at ``--out``. Single process, no Ray: the same
`MetaLearner` and `meta_test` the CLI runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metapeft_ray.core import registry
from metapeft_ray.core.config import Config, load_config
from metapeft_ray.core.evaluate import METHOD_LABELS, meta_test, paired
from metapeft_ray.core.recipes import build_scorers
from metapeft_ray.core.train import MetaLearner, prepare_sampler

METHODS = list(registry.METHODS)
ALGORITHMS = list(registry.ALGORITHMS)
DATASET_LABELS = {"banking77": "Banking77", "hwu64": "HWU64"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        default=None,
        help="base config (a file or a shipped name, e.g. fewshot) under the options below",
    )
    p.add_argument("--datasets", nargs="+", default=["banking77", "hwu64"])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--algorithms", nargs="+", default=ALGORITHMS, choices=ALGORITHMS)
    p.add_argument(
        "--combos",
        default="",
        help="comma-separated method:algorithm pairs to run instead of --methods x --algorithms",
    )
    p.add_argument("--meta-steps", type=int, default=30)
    p.add_argument("--meta-batch", type=int, default=2)
    p.add_argument("--episodes", type=int, default=100, help="meta-test episodes per cell")
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--train-shot", type=int, default=1, help="k_shot of the meta-training episodes")
    p.add_argument(
        "--train-way", type=int, default=None, help="n_way of the meta-training episodes (--n-way)"
    )
    p.add_argument("--q-query", type=int, default=5)
    p.add_argument("--inner-steps", type=int, default=1, help="inner steps (training and meta-test)")
    p.add_argument("--inner-lr", type=float, default=0.05)
    p.add_argument(
        "--eval-inner-steps", type=int, default=None, help="inner steps at meta-test (--inner-steps)"
    )
    p.add_argument("--eval-inner-lr", type=float, default=None, help="inner lr at meta-test (--inner-lr)")
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--first-order", action="store_true", help="first-order MAML / Meta-SGD")
    p.add_argument(
        "--protonet-eval-steps",
        type=int,
        default=0,
        help="inner steps at meta-test for ProtoNet inits (0: prototypes of the adapted encoder)",
    )
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--finetune",
        nargs="*",
        default=None,
        help="methods whose plain fine-tune row to run (default: every method in the runs)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process; 1 is several times faster on a busy machine (no OpenMP spinning)",
    )
    p.add_argument("--processes", type=int, default=1, help="datasets run in this many processes at once")
    p.add_argument("--set", nargs="*", default=[], help="extra dotted overrides for every run")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "hybrids.md")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows a stopped run left in its .partial-<dataset>.json files; run only the rest",
    )
    return p.parse_args(argv)


# Options that say which rows to run and how fast, not what a row measures: a stopped run resumes
# under other values of these, never of the others.
NOT_SETTINGS = {
    *("datasets", "methods", "algorithms", "combos", "finetune"),
    *("processes", "threads", "out", "resume"),
}


def run_settings(args: argparse.Namespace) -> dict[str, str]:
    return {k: str(v) for k, v in vars(args).items() if k not in NOT_SETTINGS}


def partial_path(args: argparse.Namespace, dataset: str) -> Path:
    return args.out.with_suffix(f".partial-{Path(dataset).stem}.json")


def resumed_rows(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    """The rows a stopped run left for ``dataset`` (with ``--resume``; else none), refused if it
    measured with other settings."""
    path = partial_path(args, dataset)
    if not args.resume or not path.exists():
        return {}
    saved, mine = json.loads(path.read_text()), run_settings(args)
    theirs = saved["settings"]
    if diff := sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)):
        what = "; ".join(f"{k}: {theirs.get(k)} there, {mine.get(k)} here" for k in diff)
        raise SystemExit(
            f"--resume: {path} was made with other settings ({what}); run with the same ones, "
            "or delete the file to start that dataset afresh"
        )
    return saved["rows"]


def combos(args: argparse.Namespace) -> list[tuple[str, str]]:
    if not args.combos:
        return [(m, a) for m in args.methods for a in args.algorithms]
    pairs = [tuple(c.split(":")) for c in args.combos.split(",") if c]
    bad = [c for c in pairs if len(c) != 2 or c[0] not in METHODS or c[1] not in ALGORITHMS]
    if bad:
        raise SystemExit(f"--combos: {bad} are not method:algorithm pairs of {METHODS} x {ALGORITHMS}")
    return pairs  # type: ignore[return-value]


def make_cfg(args: argparse.Namespace, dataset: str, method: str, algorithm: str) -> Config:
    o: dict[str, Any] = {
        "run.name": f"hybrids-{Path(dataset).stem}-{method}-{algorithm}",
        "run.seed": args.seed,
        "data.dataset": dataset,
        "data.fold": args.fold,
        "episode.n_way": args.train_way or args.n_way,
        "episode.k_shot": args.train_shot,
        "episode.q_query": args.q_query,
        "peft.method": method,
        "meta.algorithm": algorithm,
        "meta.first_order": args.first_order,
        "meta.inner_steps": 0 if algorithm == "protonet" else args.inner_steps,
        "meta.inner_lr": args.inner_lr,
        "meta.outer_lr": args.outer_lr,
        "meta.meta_batch_size": args.meta_batch,
        "meta.meta_steps": args.meta_steps,
        "meta.val_every": max(1, args.meta_steps),
        "meta.val_episodes": 1,
        "eval.episodes": args.episodes,
        "eval.n_way": args.n_way,
        "eval.shots": args.shots,
        "eval.q_query": args.q_query,
        "eval.inner_steps": args.inner_steps if args.eval_inner_steps is None else args.eval_inner_steps,
        "eval.inner_lr": args.eval_inner_lr or args.inner_lr,
    }
    # head.learn as asked, less what the algorithm cannot learn: Reptile takes no query gradient
    # (no head value), first-order MAML and ProtoNet cannot move the inner temperature (it acts
    # only through second-order terms)
    raw = load_config(
        args.config, [f"{k}={json.dumps(v)}" for k, v in o.items() if k != "meta.algorithm"] + args.set
    )
    learn = [] if algorithm == "reptile" else list(raw.head.learn)
    if algorithm == "protonet" or args.first_order:
        learn = [v for v in learn if v != "inner_scale"]
    return raw.with_overrides({"meta.algorithm": algorithm, "head.learn": learn})


def _paired(result: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
    """Each cell of ``result`` with its paired difference from frozen logistic regression."""
    return {
        cell: {**stats, "paired": paired(stats["per_episode"], frozen["logreg"][cell]["per_episode"])}
        for cell, stats in result.items()
    }


def _test(cfg: Config, learner: MetaLearner, methods: list[str], steps: int):  # noqa: ANN202
    """Meta-test ``methods`` (the same episodes for every call) with ``steps`` adaptation steps."""
    cfg = cfg.with_overrides({"eval.methods": methods, "eval.inner_steps": steps})
    scorers = build_scorers(cfg, learner.encoder, learner.params, learner.default_init, learner.inner_lrs())
    ev = cfg.eval
    return meta_test(
        scorers,
        learner.sampler,
        cells=ev.cells,
        q_query=ev.q_query,
        episodes=ev.episodes,
        costly_episodes=ev.costly_episodes,
        seed=cfg.run.seed,
        reference=None,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    pairs = combos(args)
    rows: dict[str, dict[str, Any]] = {}  # row key -> {"params":..., dataset: {setting: cell}}

    def row(key: str, **info: Any) -> dict[str, Any]:
        return rows.setdefault(key, {"info": info, "cells": {}})

    def save(dataset: str) -> None:  # what is done so far, in case the run is stopped
        partial_path(args, dataset).write_text(json.dumps({"settings": run_settings(args), "rows": rows}))

    frozen: dict[str, Any] = {}  # dataset -> the frozen rows' results (the paired reference)
    for dataset in args.datasets:
        for key, r in resumed_rows(args, dataset).items():
            row(key, **r["info"])["cells"].update(r["cells"])
        if dataset in rows.get("logreg", {}).get("cells", {}):  # the paired reference, resumed
            frozen[dataset] = {"logreg": rows["logreg"]["cells"][dataset]}
        done_methods = {m for m in METHODS if dataset in rows.get(f"{m}/finetune", {}).get("cells", {})}
        for method, algorithm in pairs:
            if dataset in rows.get(f"{method}/{algorithm}", {}).get("cells", {}):
                continue  # resumed
            cfg = make_cfg(args, dataset, method, algorithm)
            sampler = prepare_sampler(cfg)
            learner = MetaLearner.from_config(cfg, sampler, device=torch.device("cpu"))
            n_adapter = sum(p.numel() for p in learner.params.values())
            n_extra = sum(p.numel() for p in learner.extra.values())
            if dataset not in row("proto", label=METHOD_LABELS["proto"], params=0)["cells"]:
                names = ["proto_names", "logreg_names"] if cfg.head.label_names else []
                frozen[dataset] = _test(cfg, learner, ["proto", "logreg", *names], 0)
                for m in ["proto", "logreg", *names]:
                    row(m, label=METHOD_LABELS[m], params=0)["cells"][dataset] = frozen[dataset][m]
                save(dataset)
            wanted = args.finetune is None or method in args.finetune
            if wanted and method not in done_methods:  # the method's plain fine-tune, once per method
                ft = _test(cfg, learner, ["finetune"], 0)  # its own steps: eval.finetune
                row(
                    f"{method}/finetune",
                    method=method,
                    algorithm="fine-tune (peft default init)",
                    params=n_adapter,
                )
                rows[f"{method}/finetune"]["cells"][dataset] = _paired(ft["finetune"], frozen[dataset])
                done_methods.add(method)
                save(dataset)
            t0 = time.perf_counter()
            history = list(learner.iterate(cfg.meta.meta_steps, val_every=cfg.meta.val_every))
            train_s = time.perf_counter() - t0
            steps = args.protonet_eval_steps if algorithm == "protonet" else cfg.eval.inner_steps
            res = _test(cfg, learner, ["meta", "meta_init"], steps)
            r = row(
                f"{method}/{algorithm}", method=method, algorithm=algorithm, params=n_adapter, extra=n_extra
            )
            r["cells"][dataset] = _paired(res["meta"], frozen[dataset]) | {
                "train_s": train_s,
                "final_meta_loss": history[-1]["meta_loss"],
            }
            if steps:  # the init alone beside it, and what the inner loop adds (with 0 steps, nothing)
                for c, stats in res["meta"].items():
                    r["cells"][dataset][c]["paired_vs_init"] = paired(
                        stats["per_episode"], res["meta_init"][c]["per_episode"]
                    )
                init = row(
                    f"{method}/{algorithm}/init",
                    method=method,
                    algorithm=f"{algorithm}, init alone",
                    params=n_adapter,
                )
                init["cells"][dataset] = _paired(res["meta_init"], frozen[dataset])
            cell = ", ".join(f"{k} {100 * v['mean']:.1f}" for k, v in res["meta"].items())
            print(f"{dataset} {method}/{algorithm}: {cell} (train {train_s:.0f}s)", flush=True)
            save(dataset)
    return rows


def markdown(
    args: argparse.Namespace, rows: dict[str, Any], command: str, wall_s: float, resumed: bool = False
) -> str:
    cfg = make_cfg(args, args.datasets[0], "lora", "maml")
    settings = [f"{args.n_way}w{k}s" for k in args.shots]
    cols = [(d, s) for d in args.datasets for s in settings]
    head = " | ".join(f"{DATASET_LABELS.get(d, d)} {s}" for d, s in cols)
    ms_head = " / ".join(settings)
    lines = [
        "# Hybrids: PEFT methods x meta-algorithms on one backbone",
        "",
        f"Reproduce: `{command}`",
        "",
        f"all-MiniLM-L6-v2 (frozen), fold {args.fold} of {cfg.data.folds} (held-out test classes), "
        f"seed {args.seed}{f', config {args.config}' if args.config else ''}. "
        f"Meta-training: {args.meta_steps} meta-steps x {args.meta_batch} episodes of "
        f"{cfg.episode.n_way}-way {args.train_shot}-shot, {args.q_query} queries/class, "
        f"{args.inner_steps} inner step(s) at lr {args.inner_lr} "
        f"({'first' if args.first_order else 'second'}-order MAML/Meta-SGD), outer Adam lr {args.outer_lr}. "
        f"Meta-test: {args.episodes} episodes per cell, the same episodes for every row, "
        f"{args.q_query} queries/class, {cfg.eval.inner_steps} adaptation step(s) at lr {cfg.eval.inner_lr} "
        f"(ProtoNet rows: {args.protonet_eval_steps}); fine-tune rows: {cfg.eval.finetune.steps} Adam steps "
        f"at lr {cfg.eval.finetune.lr}. Cells: accuracy % mean ± 95 % CI, Δ: the "
        "paired difference from frozen + logistic regression on the same episodes (points ± 95 % CI), "
        "and Δinit: an adapted row's paired difference from its init alone (the next row). "
        f"Extra settings: `{' '.join(args.set) or 'none'}` (Reptile, which takes no query gradient, "
        "learns no head values). "
        f"{'Wall time of the last sitting (the other rows resumed)' if resumed else 'Total wall time'} "
        f"{wall_s / 60:.1f} min on this machine (2 shared CPU cores, "
        f"{args.processes} process(es) x {args.threads} thread(s)).",
        "",
        f"| method | algorithm | trainable params | {head} | adapt ms/task ({ms_head}) | meta-train s |",
        "|---|---|---|" + "---|" * len(cols) + "---|---|",
    ]
    for r in rows.values():
        info = r["info"]
        cells = []
        for d, s in cols:
            c = r["cells"].get(d, {}).get(s)
            text = f"{100 * c['mean']:.1f} ± {100 * c['ci95']:.1f}" if c else "—"
            for key, name in (("paired", "Δ"), ("paired_vs_init", "Δinit")):
                if c and key in c:
                    text += f"<br>{name} {100 * c[key]['diff']:+.1f} ± {100 * c[key]['ci95']:.1f}"
            cells.append(text)
        ms = []
        for s in settings:
            vals = [
                r["cells"][d][s]["ms_per_task"]
                for d in args.datasets
                if "ms_per_task" in r["cells"].get(d, {}).get(s, {})
            ]
            ms.append(f"{sum(vals) / len(vals):.0f}" if vals else "—")
        train = [r["cells"][d]["train_s"] for d in args.datasets if "train_s" in r["cells"].get(d, {})]
        params = f"{info.get('params', 0):,}" + (
            f" + {info['extra']:,} lrs/head values" if info.get("extra") else ""
        )
        label = info.get("label")
        method, algo = (label, "—") if label else (info["method"], info["algorithm"])
        lines.append(
            f"| {method} | {algo} | {params} | "
            + " | ".join(cells)
            + f" | {' / '.join(ms)} | "
            + (f"{sum(train) / len(train):.0f}" if train else "—")
            + " |"
        )
    return "\n".join(lines) + "\n"


def _run_one_dataset(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    return run(argparse.Namespace(**{**vars(args), "datasets": [dataset]}))


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """All datasets, ``--processes`` at a time; rows merged in the order of the first dataset."""
    if args.processes <= 1 or len(args.datasets) == 1:
        return run(args)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.processes, mp_context=ctx) as pool:
        parts = list(pool.map(_run_one_dataset, [args] * len(args.datasets), args.datasets))
    rows: dict[str, Any] = {}
    for part in parts:
        for key, r in part.items():
            rows.setdefault(key, {"info": r["info"], "cells": {}})["cells"].update(r["cells"])
    return rows


def keep_earlier(args: argparse.Namespace, rows: dict[str, Any]) -> list[str]:
    """The datasets of the table already at ``--out`` that this run did not cover, their cells added
    to ``rows``, when that table was measured with the same settings: a run of one dataset completes
    the table instead of replacing it."""
    path = args.out.with_suffix(".json")
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    if {k: v for k, v in saved["args"].items() if k not in NOT_SETTINGS} != run_settings(args):
        return []
    cells_of = [d for r in saved["rows"].values() for d in r["cells"]]
    earlier = [d for d in dict.fromkeys(cells_of) if d not in args.datasets]
    for key, r in saved["rows"].items():
        if cells := {d: c for d, c in r["cells"].items() if d in earlier}:
            rows.setdefault(key, {"info": r["info"], "cells": {}})["cells"].update(cells)
    return earlier


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for dataset in args.datasets:  # every dataset's episodes can be drawn, before any process starts
        prepare_sampler(make_cfg(args, dataset, *combos(args)[0]))
    command = "python benchmarks/hybrids.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    resumed = any([resumed_rows(args, d) for d in args.datasets])  # a mismatch refused before any run
    t0 = time.perf_counter()
    rows = run_all(args)
    wall = time.perf_counter() - t0
    ran, earlier = args.datasets, keep_earlier(args, rows)
    args.datasets = [*earlier, *ran]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(args, rows, command.strip(), wall, resumed or bool(earlier))
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"command": command.strip(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
            indent=2,
        )
    )
    for dataset in ran:
        partial_path(args, dataset).unlink(missing_ok=True)  # in the table now
    print(text)


if __name__ == "__main__":
    main()

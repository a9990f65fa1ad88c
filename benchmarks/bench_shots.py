"""Meta-test accuracy ± 95 % CI against the number of shots, averaged over class-split folds.

    python benchmarks/bench_shots.py                                   # folds 0 1 under runs/
    python benchmarks/bench_shots.py --runs-dir runs --folds 0 1 2 --episodes 200

For each fold it meta-tests the exported Banking77 init ``RUNS/banking77_fold<F>/adapter`` (the
run `benchmarks/banking77_folds.sh` writes; a missing fold is meta-trained first with
``metapeft train --local --config banking77`` and ``--train`` overrides) at 5-way K-shot for every
``--shots`` K, with the baselines, on the same episodes for every method. The fold average is the
mean of the fold means; its CI combines the folds' CIs as independent estimates,
``sqrt(sum ci_f^2) / F``.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from metapeft_ray.core.evaluate import METHOD_LABELS
from metapeft_ray.core.recipes import evaluate_adapter

from common import write_result


def adapter_of_fold(runs: Path, fold: int, train: list[str]) -> Path:
    adapter = runs / f"banking77_fold{fold}" / "adapter"
    if not adapter.is_dir():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "metapeft_ray.cli",
                "train",
                "--local",
                "--config",
                "banking77",
                f"data.fold={fold}",
                f"run.name=banking77_fold{fold}",
                f"run.output_dir={runs}",
                *train,
            ],
            check=True,
        )
    return adapter


def fold_average(
    per_fold: list[dict[str, dict[str, dict[str, float]]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {setting: {mean, ci95}}}`` averaged over folds (equal weight per fold)."""
    n = len(per_fold)
    return {
        m: {
            s: {
                "mean": sum(f[m][s]["mean"] for f in per_fold) / n,
                "ci95": math.sqrt(sum(f[m][s]["ci95"] ** 2 for f in per_fold)) / n,
                "episodes": sum(f[m][s]["episodes"] for f in per_fold),
            }
            for s in per_fold[0][m]
        }
        for m in per_fold[0]
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5, 10])
    p.add_argument("--episodes", type=int, default=100, help="meta-test episodes per cell and fold")
    p.add_argument("--train", nargs="*", default=["meta.meta_steps=60"], help="overrides for a missing fold")
    args = p.parse_args(argv)

    per_fold = []
    with tempfile.TemporaryDirectory() as tmp:
        for fold in args.folds:
            adapter = adapter_of_fold(args.runs_dir, fold, args.train)
            overrides = {"eval.shots": args.shots, "eval.episodes": args.episodes}
            report = evaluate_adapter(str(adapter), overrides, f"{tmp}/fold{fold}", progress=False)
            per_fold.append(report["results"])
    avg = fold_average(per_fold)

    settings = list(next(iter(avg.values())))
    md = [
        f"Banking77, folds {', '.join(map(str, args.folds))} (held-out test classes), 5-way K-shot, "
        f"{args.episodes} episodes per cell and fold; mean of the fold means ± 95 % CI.",
        "",
        "| method | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for m, per in avg.items():
        cells = [f"{100 * per[s]['mean']:.1f} ± {100 * per[s]['ci95']:.1f}" for s in settings]
        md.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    payload: dict[str, Any] = {"folds": args.folds, "shots": args.shots, "average": avg, "per_fold": per_fold}
    write_result("shots", payload, "\n".join(md))


if __name__ == "__main__":
    main()

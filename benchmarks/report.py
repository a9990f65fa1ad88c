"""One command for the whole benchmark report: run every benchmark, draw the plots, write
``results/report.md``.

    pip install -e ".[bench]"                       # higher and torchopt, for bench_peers.py
    python benchmarks/report.py                     # everything: ~1 h on 2 busy CPU cores
    python benchmarks/report.py --only memory peers # rerun two, redraw everything
    python benchmarks/report.py --render-only       # plots + report from results/*.json

Each benchmark is its own script (run it alone for its options) that writes
``results/<name>.json`` and ``results/<name>.md``; this script runs them in turn as new
processes (clean memory high-water marks, no state shared) and assembles their Markdown with
three plots: the meta-training curves of the Banking77 runs, accuracy against shots, and the
time/memory bars. ``--runs-dir`` holds the Banking77 fold runs (`banking77_folds.sh` writes them
under ``runs/``; `bench_shots.py` trains a missing fold).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import RESULTS

HERE = Path(__file__).resolve().parent

# name -> (script, title, what it answers); the order of the report.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "inner_loop": ("bench_inner_loop.py", "Inner-loop efficiency against the bare passes"),
    "memory": ("bench_memory.py", "Memory: second-order MAML over LoRA only vs the whole backbone"),
    "peers": ("bench_peers.py", "Against the peers: higher and torchopt"),
    "distributed": ("bench_distributed.py", "Scaling, measured: single process vs Ray workers"),
    "scaling": ("bench_scaling.py", "Scaling, modelled: bytes per meta-step and GPU speed-up"),
    "latency": ("bench_latency.py", "Adaptation latency on CPU"),
    "shots": ("bench_shots.py", "Accuracy against shots, over folds"),
}


def run(names: list[str], runs_dir: Path) -> None:
    for name in names:
        script = HERE / BENCHMARKS[name][0]
        extra = {
            "shots": ["--runs-dir", str(runs_dir)],
            # the meta-learned init of fold 0 when it is there (latency does not depend on values)
            "latency": ["--adapter", str(fold0)]
            if (fold0 := runs_dir / "banking77_fold0" / "adapter").is_dir()
            else [],
        }.get(name, [])
        print(f"== {script.name}", flush=True)
        subprocess.run([sys.executable, str(script), *extra], check=True)


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def plot_training_curves(runs_dir: Path, path: Path) -> bool:
    import matplotlib.pyplot as plt

    runs = sorted(runs_dir.glob("banking77_fold*/metrics.jsonl"))
    if not runs:
        return False
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for run_file in runs:
        rows = [json.loads(line) for line in run_file.read_text().splitlines() if line.strip()]
        steps = [r["meta_step"] for r in rows]
        loss = [r["meta_loss"] for r in rows]
        smooth = [
            sum(loss[max(0, i - 9) : i + 1]) / len(loss[max(0, i - 9) : i + 1]) for i in range(len(loss))
        ]
        label = run_file.parent.name.replace("banking77_", "")
        (line,) = loss_ax.plot(steps, smooth, label=f"{label} (10-step mean)")
        loss_ax.plot(steps, loss, alpha=0.25, color=line.get_color())
        val = [(r["meta_step"], 100 * r["meta_val_accuracy"]) for r in rows if "meta_val_accuracy" in r]
        if val:
            acc_ax.plot(*zip(*val, strict=True), marker="o", color=line.get_color(), label=label)
    loss_ax.set(xlabel="meta-step", ylabel="meta-loss (query cross-entropy)", title="Meta-training loss")
    acc_ax.set(xlabel="meta-step", ylabel="meta-val accuracy %", title="Meta-validation (held-out classes)")
    loss_ax.legend(fontsize=8)
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_shots(shots: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    from metapeft_ray.core.evaluate import METHOD_LABELS

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, per in shots["average"].items():
        ks = [int(s.split("w")[1].rstrip("s")) for s in per]
        ax.errorbar(
            ks,
            [100 * v["mean"] for v in per.values()],
            yerr=[100 * v["ci95"] for v in per.values()],
            marker="o",
            capsize=3,
            label=METHOD_LABELS.get(method, method),
        )
    ax.set(xscale="log", xlabel="shots per class (5-way)", ylabel="meta-test accuracy % (95 % CI)")
    ax.set_xticks(shots["shots"], [str(k) for k in shots["shots"]])
    ax.set_title(f"Banking77, mean over folds {shots['folds']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_time_memory(results: dict[str, dict[str, Any] | None], path: Path) -> bool:
    import matplotlib.pyplot as plt

    panels = [(name, results[name]) for name in ("inner_loop", "memory", "latency", "distributed")]
    panels = [(n, r) for n, r in panels if r]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, r) in zip(axes[0], panels, strict=True):
        if name == "inner_loop":
            rows = r["rows"]
            labels = [f"{x['order'][0].upper()}O {x['shots']}s K={x['inner_steps']}" for x in rows]
            ax.bar(labels, [x["ratio"] for x in rows], color="tab:blue")
            ax.axhline(r.get("target_first_order", 1.1), color="tab:red", ls="--", label="FO target")
            ax.set(ylabel="episode time / bare passes", title="Inner loop vs its floor")
            ax.legend(fontsize=8)
        elif name == "memory":
            rows = r["rows"]
            short = {
                "all-MiniLM-L6-v2": "MiniLM",
                "bert-base-random": "BERT-base",
                "bert-large-random": "BERT-large",
            }
            labels = [
                f"{short.get(x['backbone'], x['backbone'])} {x['params']} K={x['inner_steps']}" for x in rows
            ]
            palette = {"lora": "tab:green", "lora+ckpt": "tab:olive"}
            colors = [palette.get(x["params"], "tab:gray") for x in rows]
            ax.bar(labels, [x["peak_mib"] for x in rows], color=colors)
            ax.set(ylabel="peak MiB above the loaded model", title="Second-order MAML memory")
        elif name == "latency":
            rows = r["rows"]
            labels = [f"K={x['inner_steps']} {x['threads']}t" for x in rows]
            ax.bar(labels, [x["adapt_s"] for x in rows], label="adapt")
            ax.bar(
                labels, [x["predict_s"] for x in rows], bottom=[x["adapt_s"] for x in rows], label="predict"
            )
            ax.axhline(r.get("target_s", 2.0), color="tab:red", ls="--", label="target")
            ax.set(ylabel="seconds per 5-way 5-shot task", title="Adaptation latency (CPU)")
            ax.legend(fontsize=8)
        else:
            rows = r["rows"]
            ax.bar(list(rows), [1 / x["wall_per_step"] for x in rows.values()], color="tab:purple")
            ax.set(ylabel="meta-steps / s", title="Single process vs Ray workers")
        ax.tick_params(axis="x", labelrotation=40, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def render(runs_dir: Path) -> Path:
    results = {name: load(name) for name in BENCHMARKS}
    md = [
        "# metapeft_ray benchmarks",
        "",
        "Regenerate: `python benchmarks/report.py` (each section names its own script and command). "
        "Times measured on CPU are ratios measured side by side in one process; absolute CPU times "
        "hold only for the machine and its load, given under each table.",
        "",
    ]
    if plot_training_curves(runs_dir, RESULTS / "training_curves.png"):
        md += ["## Meta-training curves (Banking77 runs)", "", "![training curves](training_curves.png)", ""]
    if plot_time_memory(results, RESULTS / "time_memory.png"):
        md += ["## Time and memory at a glance", "", "![time and memory](time_memory.png)", ""]
    for name, (script, title) in BENCHMARKS.items():
        md += [f"## {title}", ""]
        if results[name] is None:
            md += [f"Not run yet: `python benchmarks/{script}`.", ""]
            continue
        md += [(RESULTS / f"{name}.md").read_text().strip(), ""]
        if name == "shots":
            plot_shots(results[name], RESULTS / "accuracy_vs_shots.png")
            md += ["![accuracy vs shots](accuracy_vs_shots.png)", ""]
    out = RESULTS / "report.md"
    out.write_text("\n".join(md))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run these benchmarks only")
    p.add_argument("--render-only", action="store_true", help="run nothing; redraw from results/")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="the banking77_fold<F> runs")
    args = p.parse_args(argv)
    if not args.render_only:
        run(args.only or list(BENCHMARKS), args.runs_dir)
    print(f"report: {render(args.runs_dir)}")


if __name__ == "__main__":
    main()

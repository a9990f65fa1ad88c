"""Pool meta-test reports into ``results/accuracy.{json,md}``: one object per (protocol, test
dataset, cell, method), folds pooled episode by episode, every row paired with logistic
regression on the frozen backbone.

    python benchmarks/accuracy.py runs/b77_f0/report.json runs/b77_f1/report.json ... \\
        runs/clinc_x/eval_banking77/report.json [PATH:ALIAS ...]

Reports of the same protocol, test data and fold are merged by method and cell (they must share
``run.seed``, ``eval.q_query`` and the test classes, so their episodes are the same: e.g. the
5-way cells of a training run and the 20-way cell of a later ``metapeft evaluate``); ``PATH:ALIAS``
renames that report's ``meta`` and ``meta_init`` rows to ``ALIAS`` and ``ALIAS_init`` (to keep an
earlier recipe or another meta-test inner loop beside the shipped one). A row that two reports give
with the same values (a frozen baseline scored on the same episodes) is kept once; different values
of a method's cell in one fold are refused, except an aliased report's other rows: those are left
out with a note (the report was given for its renamed rows). An adapted row (``meta``,
``ALIAS``) is also paired with its own init without adaptation (``meta_init``, ``ALIAS_init``):
what the inner loop adds on the same episodes; the recipe's row (``meta``) also with each fine-tuning
baseline, on the episodes that baseline scored. Cells of several folds pool the per-episode values; the
paired difference of a row uses, in each fold, the reference's values on the episodes the row
scored (a costly baseline's prefix). Reports meta-tested on unbalanced query batches
(``eval.query_alpha``) hold other episodes: their rows get a protocol of their own.

The JSON keeps every fold's per-episode values (``folds``), and a previous ``accuracy.json`` is
an input like a report: a later run adds its cells to the table without the runs behind the
earlier ones (``python benchmarks/accuracy.py benchmarks/results/accuracy.json NEW/report.json``).
Rows of a table written before the values were kept are carried as they are; a report of a
cell such a row holds is refused (the two cannot be pooled). ``--replace`` re-runs cells: a later
input's values of a method's cell in a fold replace an earlier input's, and a report replaces a
carried row of its cell (then give every run behind it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from metapeft_ray.core.config import COSTLY_METHODS
from metapeft_ray.core.evaluate import METHOD_LABELS, mean_ci95, paired

from common import RESULTS, environment

REFERENCE = "logreg"
INIT = "init"  # stands for an adapted row's own init, no adaptation (meta -> meta_init)
# The frozen baseline a user who has the class names would pick: every row is also paired with it,
# so a gain that the names alone give is not credited to meta-learning.
NAMES_REFERENCE = "logreg_names"
RECIPE = "meta"  # the shipped recipe's row: also paired with each fine-tuning baseline, on its prefix


Key = tuple[str, str, str]  # (protocol, test dataset, fold)
ROW_KEY = ("protocol", "dataset", "n_way", "k_shot", "method")  # one row of the table


def shape(cell: str) -> tuple[int, int]:
    """``"20w1s"`` -> (20, 1)."""
    n_way, k_shot = (int(x) for x in cell.rstrip("s").split("w"))
    return n_way, k_shot


def load(arg: str) -> tuple[list[tuple[Key, dict[str, Any]]], list[dict[str, Any]]]:
    """The folds an input holds (a report: one; a previous table: its kept folds) and, from a
    table written before the folds were kept, its rows."""
    path, _, alias = arg.partition(":")
    report = json.loads(Path(path).read_text())
    if "cells" in report:  # a previous accuracy.json
        parts, computed = [], set()
        for f in report.get("folds", []):
            results = {m: {c: {"per_episode": v} for c, v in per.items()} for m, per in f["results"].items()}
            where = f"{path} ({f['dataset']} fold {f['fold']})"
            parts.append(((f["protocol"], f["dataset"], f["fold"]), {**f, "results": results, "path": where}))
            computed |= {(f["protocol"], f["dataset"], *shape(c), m) for m in results for c in results[m]}
        # its rows that no kept fold gives: those carried from a table before the values were kept
        return parts, [r for r in report["cells"] if tuple(r[k] for k in ROW_KEY) not in computed]
    results = dict(report["results"])
    if alias:
        results = {{"meta": alias, "meta_init": f"{alias}_init"}.get(m, m): v for m, v in results.items()}
    protocol = report.get("protocol", "in-domain")
    fold = "all" if protocol == "cross-dataset" else str(report["splits"].get("fold", 0))
    if alpha := report["config"]["eval"].get("query_alpha"):  # other episodes: rows of their own
        protocol = f"{protocol}, queries Dirichlet({alpha:g})"
    key = (protocol, report.get("test_dataset", report["splits"]["dataset"]), fold)
    cfg = report["config"]
    identity = {
        "seed": cfg["run"]["seed"],
        "q_query": cfg["eval"]["q_query"],
        "classes": report.get("test_classes"),
    }
    return [(key, {"results": results, "identity": identity, "path": path, "alias": alias})], []


def gather(
    inputs: list[str], *, replace: bool = False
) -> tuple[dict[Key, dict[str, Any]], list[dict[str, Any]]]:
    """Every input's folds merged by (protocol, test dataset, fold), and the carried rows. A
    method's cell of one fold given twice with other values is refused, or with ``replace`` the
    later one kept (the same values, to the 4 decimals a table keeps, are one row given twice)."""
    folds: dict[Key, dict[str, Any]] = {}
    carried: list[dict[str, Any]] = []
    for arg in inputs:
        parts, rows = load(arg)
        carried += rows
        for key, rep in parts:
            merged = folds.setdefault(key, {"results": {}, "identity": rep["identity"], "paths": []})
            if merged["identity"] != rep["identity"]:
                raise SystemExit(
                    f"{rep['path']}: other episodes than {merged['paths']} (seed, q_query or classes)"
                )
            for method, per_cell in rep["results"].items():
                mine = merged["results"].setdefault(method, {})
                clash = {c for c in set(mine) & set(per_cell) if not _same(mine[c], per_cell[c])}
                if clash and rep.get("alias") and not method.startswith(rep["alias"]) and not replace:
                    print(
                        f"{rep['path']}: {method} {sorted(clash)} left out (differs from {merged['paths']})"
                    )
                    per_cell = {c: v for c, v in per_cell.items() if c not in clash}
                elif clash and not replace:
                    raise SystemExit(
                        f"{rep['path']}: {method} {sorted(clash)} already come from {merged['paths']} "
                        "(--replace keeps the later)"
                    )
                mine.update(per_cell)
            merged["paths"].append(rep["path"])
    return folds, carried


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    x, y = a["per_episode"], b["per_episode"]
    return len(x) == len(y) and all(abs(u - v) < 1e-4 for u, v in zip(x, y, strict=True))


def kept(folds: dict[Key, dict[str, Any]]) -> list[dict[str, Any]]:
    """The folds as the JSON keeps them: per-episode values (4 decimals) by method and cell."""
    return [
        {
            "protocol": protocol,
            "dataset": dataset,
            "fold": fold,
            "identity": f["identity"],
            "results": {
                m: {c: [round(v, 4) for v in stats["per_episode"]] for c, stats in per.items()}
                for m, per in f["results"].items()
            },
        }
        for (protocol, dataset, fold), f in sorted(folds.items())
    ]


def pool(inputs: list[str]) -> list[dict[str, Any]]:
    return table(*gather(inputs))


def table(
    folds: dict[Key, dict[str, Any]], carried: list[dict[str, Any]], *, replace: bool = False
) -> list[dict[str, Any]]:
    """One row per (protocol, test dataset, cell, method): folds pooled, paired with the references.
    A carried row that the folds give again is refused, or with ``replace`` dropped (the runs
    given are then every run behind it)."""
    # (protocol, dataset, cell, method) -> per fold: (values, {reference: its values})
    Fold = tuple[list[float], dict[str, list[float]]]
    cells: dict[tuple[str, str, str, str], list[Fold]] = defaultdict(list)
    for (protocol, dataset, _fold), merged in sorted(folds.items()):
        results = merged["results"]
        for method, per_cell in results.items():
            for cell, stats in per_cell.items():
                refs = {
                    ref: results.get(ref, {}).get(cell, {}).get("per_episode", [])
                    for ref in (REFERENCE, NAMES_REFERENCE, *(COSTLY_METHODS if method == RECIPE else ()))
                }
                refs[INIT] = results.get(f"{method}_init", {}).get(cell, {}).get("per_episode", [])
                cells[(protocol, dataset, cell, method)].append((stats["per_episode"], refs))
    rows = []
    for (protocol, dataset, cell, method), per_fold in cells.items():
        n_way, k_shot = shape(cell)
        values = [v for vals, _ in per_fold for v in vals]
        row = {
            "protocol": protocol,
            "dataset": dataset,
            "n_way": n_way,
            "k_shot": k_shot,
            "method": method,
            **mean_ci95(values),
            "folds": len(per_fold),
        }
        for ref in per_fold[0][1]:
            suffix = "" if ref == REFERENCE else f"_vs_{ref}"
            if method == ref or not all(refs[ref] for _, refs in per_fold):
                continue
            # a costly row scored a prefix of each fold's episodes: pair the two on that prefix
            mine = [v for vals, refs in per_fold for v in vals[: len(refs[ref])]]
            theirs = [r for vals, refs in per_fold for r in refs[ref][: len(vals)]]
            p = paired(mine, theirs)
            row |= {
                f"paired_diff_vs_{ref}": p["diff"],
                f"paired_ci95{suffix}": p["ci95"],
                f"error_reduction_vs_{ref}": p["error_reduction"],
                f"{ref}_mean_on_these_episodes": p["reference_mean"],
            }
            if len(mine) != len(values):
                row[f"paired_episodes{suffix}"] = p["episodes"]
        rows.append(row)

    def keys(rs: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
        return {tuple(r[k] for k in ROW_KEY) for r in rs}

    if (clash := keys(rows) & keys(carried)) and not replace:
        raise SystemExit(
            f"{sorted(clash)[:3]}: given by a report and by a table without per-episode values, which "
            "cannot be pooled; leave the report out, or give every run behind that row and --replace"
        )
    return rows + [r for r in carried if tuple(r[k] for k in ROW_KEY) not in clash]


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per cell: the recipe (``meta``) against logistic regression without and with the
    label names, and the best fine-tuning baseline (by its paired difference from logreg)."""

    def pct(r: dict[str, Any] | None, key: str = "mean", ci: str = "ci95", sign: str = "") -> str:
        return "—" if r is None or key not in r else f"{100 * r[key]:{sign}.1f} ± {100 * r[ci]:.1f}"

    out = [
        "",
        "## Summary",
        "",
        "| protocol | test data | cell | logreg | logreg + names | meta | meta Δ vs logreg (err↓) "
        "| meta Δ vs logreg + names | best fine-tune baseline Δ vs logreg | meta Δ vs it |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_cell: dict[tuple[str, str, int, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_cell[(r["protocol"], r["dataset"], r["k_shot"], r["n_way"])][r["method"]] = r
    for (protocol, dataset, k, n), m in sorted(by_cell.items()):
        meta = m.get("meta")
        costly = [m[c] for c in COSTLY_METHODS if c in m and "paired_diff_vs_logreg" in m[c]]
        best = max(costly, key=lambda r: r["paired_diff_vs_logreg"], default=None)
        err = (
            ""
            if meta is None or "error_reduction_vs_logreg" not in meta
            else (f" ({100 * meta['error_reduction_vs_logreg']:+.0f} %)")
        )
        best_text = versus_best = "—"
        if best is not None:
            diff = pct(best, "paired_diff_vs_logreg", "paired_ci95", "+")
            best_text = f"{best['method']}: {diff} (n={best['episodes']})"
            versus_best = pct(
                meta, f"paired_diff_vs_{best['method']}", f"paired_ci95_vs_{best['method']}", "+"
            )
        out.append(
            f"| {protocol} | {dataset} | {n}w{k}s | {pct(m.get('logreg'))} | {pct(m.get(NAMES_REFERENCE))} "
            f"| {pct(meta)} | {pct(meta, 'paired_diff_vs_logreg', 'paired_ci95', '+')}{err} "
            f"| {pct(meta, f'paired_diff_vs_{NAMES_REFERENCE}', f'paired_ci95_vs_{NAMES_REFERENCE}', '+')} "
            f"| {best_text} | {versus_best} |"
        )
    return out


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    out = [
        "# Accuracy: the meta-learned init against what a user would do instead",
        "",
        f"`{command}`",
        "",
        "Accuracy % ± 95 % CI over the pooled test episodes; Δ = paired difference from logistic",
        "regression on the frozen backbone on the same episodes (points ± 95 % CI); err↓ = error",
        "reduction 1 − err/err_logreg; Δnames = the same paired difference from logistic regression with",
        "the label names (the frozen baseline that uses what the recipe uses); Δinit = an adapted row's",
        "paired difference from its own init with no adaptation (what the inner loop adds). Rows with",
        "fewer episodes ran on a prefix of each fold's episodes; Δfinetune, Δfull_finetune, Δsetfit = the",
        "recipe's paired difference from that fine-tuning baseline on the baseline's episodes.",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["protocol"], r["dataset"])].append(r)
    out += summary(rows)
    for (protocol, dataset), group in groups.items():
        cells = sorted({(r["n_way"], r["k_shot"]) for r in group}, key=lambda c: (c[1], c[0]))
        folds = max(r["folds"] for r in group)
        out += ["", f"## {protocol}: {dataset} ({folds} fold{'s' * (folds > 1)})", ""]
        out += [
            "| method | " + " | ".join(f"{n}w{k}s" for n, k in cells) + " |",
            "|---|" + "---|" * len(cells),
        ]
        methods = list(dict.fromkeys(r["method"] for r in group))
        for m in methods:
            texts = []
            for n, k in cells:
                r = next((r for r in group if r["method"] == m and (r["n_way"], r["k_shot"]) == (n, k)), None)
                if r is None:
                    texts.append("—")
                    continue
                t = f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f} (n={r['episodes']})"
                if "paired_diff_vs_logreg" in r:
                    t += (
                        f"<br>Δ {100 * r['paired_diff_vs_logreg']:+.1f} ± {100 * r['paired_ci95']:.1f},"
                        f" err↓ {100 * r['error_reduction_vs_logreg']:+.0f} %"
                    )
                for ref, name in (
                    (NAMES_REFERENCE, "names"),
                    (INIT, "init"),
                    *((c, c) for c in COSTLY_METHODS),
                ):
                    if f"paired_diff_vs_{ref}" in r:
                        t += (
                            f"<br>Δ{name} {100 * r[f'paired_diff_vs_{ref}']:+.1f}"
                            f" ± {100 * r[f'paired_ci95_vs_{ref}']:.1f}"
                        )
                        if f"paired_episodes_vs_{ref}" in r:
                            t += f" (n={r[f'paired_episodes_vs_{ref}']})"
                texts.append(t)
            out.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(texts) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "reports",
        nargs="+",
        help="report.json paths (PATH:ALIAS renames its meta rows), a previous accuracy.json",
    )
    p.add_argument("--out", default=str(RESULTS / "accuracy"), help="output path without suffix")
    p.add_argument(
        "--replace",
        action="store_true",
        help="a later input's values of a method's cell in a fold replace an earlier input's, and a "
        "table's row without per-episode values that the inputs give again is replaced by theirs "
        "(then give every run behind it): to re-run a cell with a new recipe",
    )
    args = p.parse_args()
    folds, carried = gather(args.reports, replace=args.replace)
    rows = table(folds, carried, replace=args.replace)
    command = environment()["command"]
    out = Path(args.out)
    body = {"environment": environment(), "cells": rows, "folds": kept(folds)}
    out.with_suffix(".json").write_text(json.dumps(body, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, command))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    sys.exit(main())

"""Rows of meta-test reports scored on the same episodes, paired: ``A:B`` is row A's per-episode
accuracy minus row B's on the episodes both scored (points ± 95 % CI, and the error reduction).

    python benchmarks/paired.py --name test_head \\
        --pair meta_lrhead:meta --pair meta_lrhead:logreg_names --pair meta_lrhead:meta_lrhead_init \\
        runs/refit/banking77_5w5s_protos/report.json runs/refit/banking77_5w5s/report.json:meta_lrhead

Reports are merged as `accuracy.py` merges them (``PATH:ALIAS`` renames a report's ``meta`` and
``meta_init`` rows; reports of one test dataset and fold must share the seed, the queries and the
test classes, so their episodes are the same), and ``results/accuracy.json`` is an input too: its
kept per-episode values, so a row of the table can be paired with a new report without the runs
behind the table (its rows carried without values cannot be paired and are left out). Each (test
dataset, fold, cell) that holds a pair is its own table (so the whole table can be an input beside
one new report): a comparison of two heads or two inner loops on one init, not a pooled accuracy
(that is `accuracy.py`'s).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from accuracy import gather

from metapeft_ray.core.evaluate import METHOD_LABELS, mean_ci95, paired

from common import write_result


def compare(
    folds: dict[tuple[str, str, str], dict[str, Any]], pairs: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    """One entry per (protocol, dataset, fold, cell) that holds both rows of a pair: every row's
    mean ± CI and those pairs."""
    out = []
    for (protocol, dataset, fold), merged in sorted(folds.items()):
        results = merged["results"]
        for cell in sorted({c for per in results.values() for c in per}):
            values = {m: per[cell]["per_episode"] for m, per in results.items() if cell in per}
            if not any(a in values and b in values for a, b in pairs):
                continue
            out.append(
                {
                    "protocol": protocol,
                    "dataset": dataset,
                    "fold": fold,
                    "cell": cell,
                    "rows": {m: mean_ci95(v) for m, v in values.items()},
                    "pairs": {
                        f"{a}:{b}": paired(values[a], values[b])
                        for a, b in pairs
                        if a in values and b in values
                    },
                    "support_loss": {
                        m: [per[cell][k] for k in ("support_loss_before", "support_loss_after")]
                        for m, per in results.items()
                        if cell in per and "support_loss_after" in per[cell]
                    },
                }
            )
    return out


def markdown(entries: list[dict[str, Any]]) -> str:
    out = ["# Paired comparisons on the same episodes"]
    for e in entries:
        out += ["", f"## {e['protocol']}: {e['dataset']} fold {e['fold']}, {e['cell']}", ""]
        out += ["| row | accuracy % | episodes | support loss before → after |", "|---|---|---|---|"]
        for m, r in e["rows"].items():
            loss = " → ".join(f"{v:.3f}" for v in e["support_loss"].get(m, [])) or "—"
            out.append(
                f"| {METHOD_LABELS.get(m, m)} | {100 * r['mean']:.1f} ± {100 * r['ci95']:.1f} "
                f"| {r['episodes']} | {loss} |"
            )
        if e["pairs"]:
            out += ["", "| pair | Δ points (95 % CI) | error reduction | episodes |", "|---|---|---|---|"]
            for name, p in e["pairs"].items():
                a, b = name.split(":")
                out.append(
                    f"| {a} − {b} | {100 * p['diff']:+.1f} ± {100 * p['ci95']:.1f} "
                    f"| {100 * p['error_reduction']:+.0f} % | {p['episodes']} |"
                )
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "reports", nargs="+", help="report.json paths (PATH:ALIAS renames its meta rows), an accuracy.json"
    )
    p.add_argument(
        "--pair", action="append", default=[], metavar="A:B", help="row A minus row B, per episode (repeat)"
    )
    p.add_argument("--name", required=True, help="writes results/NAME.json and results/NAME.md")
    args = p.parse_args()
    pairs = [tuple(x.split(":", 1)) for x in args.pair]
    if bad := [x for x, pair in zip(args.pair, pairs, strict=True) if len(pair) != 2]:
        raise SystemExit(f"--pair {bad}: give each pair as ROW:REFERENCE, e.g. meta:logreg")
    folds, _rows_without_values = gather(args.reports)
    entries = compare(folds, pairs)  # type: ignore[arg-type]
    write_result(args.name, {"cells": entries}, markdown(entries))


if __name__ == "__main__":
    sys.exit(main())

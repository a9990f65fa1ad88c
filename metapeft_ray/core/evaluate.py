"""Meta-test on held-out classes: the meta-learned init and the baselines on the same episodes,
each compared with a frozen reference (logistic regression by default) by paired statistics.

A method is a scorer, ``episode -> query accuracy`` (`metapeft_ray.core.baselines`); every scorer
sees the identical episodes, rebuilt from their specs, so per-episode differences are paired.
The costly baselines (``eval.costly_episodes``) score a fixed prefix of each cell's episodes and
are compared with the reference on that same prefix.

For a cell with per-episode accuracies ``a_i`` (method) and ``r_i`` (reference), ``i = 1..n``:
``mean ± 1.96 sd(a) / sqrt(n)``; paired difference ``d_i = a_i - r_i``, ``mean(d) ± 1.96 sd(d) /
sqrt(n)``; error reduction ``1 - (1 - mean a) / (1 - mean r)`` (how accuracy goals are stated).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metapeft_ray.core.baselines import Scorer
from metapeft_ray.core.config import COSTLY_METHODS
from metapeft_ray.core.episodes import EpisodeSampler, Split

METHOD_LABELS = {
    "meta": "meta-learned init + adaptation",
    "meta_init": "meta-learned init, no adaptation",
    "meta_logreg": "meta-learned encoder + logistic regression",
    "proto": "frozen backbone + prototypes",
    "logreg": "frozen backbone + logistic regression",
    "proto_names": "frozen backbone + prototypes with label names",
    "logreg_names": "frozen backbone + logistic regression with label names",
    "finetune": "adapter fine-tune from peft default init (Adam)",
    "full_finetune": "full fine-tune of the backbone (Adam)",
    "setfit": "SetFit (contrastive fine-tune + logistic regression)",
}
_TIMED = ("meta", *COSTLY_METHODS)
"""Methods whose wall time per task is reported (the frozen ones read a cache)."""

Results = dict[str, dict[str, dict[str, Any]]]
"""``{method: {"5w1s": {mean, ci95, episodes, per_episode[, ms_per_task][, paired][, support_loss_before,
support_loss_after]}}}`` (the support losses: means over the episodes, for the adapted rows)."""


def cell_name(n_way: int, k_shot: int) -> str:
    return f"{n_way}w{k_shot}s"


def mean_ci95(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {"mean": float(a.mean()), "ci95": 1.96 * sd / math.sqrt(a.size), "episodes": int(a.size)}


def paired(values: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """The method against the reference on the episodes both scored (a costly row's prefix):
    ``diff`` ± ``ci95`` of the per-episode differences, and the error reduction."""
    n = min(len(values), len(reference))
    a, r = np.asarray(values[:n], dtype=np.float64), np.asarray(reference[:n], dtype=np.float64)
    diff = mean_ci95(a - r)
    err, ref_err = 1.0 - a.mean(), 1.0 - r.mean()
    return {
        "diff": diff["mean"],
        "ci95": diff["ci95"],
        "episodes": n,
        "reference_mean": float(r.mean()),
        "error_reduction": float(1.0 - err / ref_err) if ref_err > 0 else float("nan"),
    }


def meta_test(
    scorers: Mapping[str, Scorer],
    sampler: EpisodeSampler,
    *,
    cells: Sequence[tuple[int, int]],
    q_query: int,
    episodes: int,
    costly_episodes: int,
    seed: int,
    reference: str | None = "logreg",
    progress: bool = False,
    split: Split = "test",
) -> Results:
    """Score every method on the same ``episodes`` test episodes of each (n_way, k_shot) cell
    (the costly baselines on the first ``costly_episodes``), then pair each row with
    ``reference`` (skipped when it is not among the scorers). ``split="val"`` scores meta-val
    episodes instead (to choose a baseline's settings without looking at the test classes)."""
    from tqdm.auto import tqdm

    results: Results = {m: {} for m in scorers}
    for n_way, k_shot in cells:
        key = cell_name(n_way, k_shot)
        specs = sampler.specs(split, episodes, seed=seed, step=0, n_way=n_way, k_shot=k_shot, q_query=q_query)
        scores: dict[str, list[float]] = {m: [] for m in scorers}
        extras: dict[str, dict[str, list[float]]] = {m: {} for m in scorers}
        seconds: dict[str, list[float]] = {m: [] for m in scorers}
        for i, spec in enumerate(tqdm(specs, desc=f"meta-test {key}", disable=not progress, leave=False)):
            episode = sampler.build(spec)
            for m, score in scorers.items():
                if m in COSTLY_METHODS and i >= costly_episodes:
                    continue
                t0 = time.perf_counter()
                measured = score(episode)
                seconds[m].append(time.perf_counter() - t0)
                if isinstance(measured, dict):
                    for name, value in measured.items():
                        if name != "accuracy":
                            extras[m].setdefault(name, []).append(value)
                    measured = measured["accuracy"]
                scores[m].append(measured)
        for m, values in scores.items():
            results[m][key] = {**mean_ci95(values), "per_episode": values}
            results[m][key] |= {name: float(np.mean(v)) for name, v in extras[m].items()}
            if m in _TIMED:
                results[m][key]["ms_per_task"] = 1000 * float(np.mean(seconds[m]))
            if reference in scorers and m != reference:
                results[m][key]["paired"] = {"vs": reference, **paired(values, scores[reference])}
    return results


def markdown_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str = "") -> str:
    """Rows = methods (or any labels), columns = cells, ``mean ± ci95`` in percent; then, when the
    rows were paired with a reference, the paired differences and error reductions, and for the
    adapted rows the support loss before and after adaptation."""
    first = next(iter(results.values()))
    settings = list(first)
    n = first[settings[0]]["episodes"]

    def table(key: str | None, cell: Any, label: Any = lambda m, per: METHOD_LABELS.get(m, m)) -> list[str]:
        rows = {m: per for m, per in results.items() if key is None or key in per[settings[0]]}
        return ["", "| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)] + [
            f"| {label(m, per)} | " + " | ".join(cell(per[s]) for s in settings) + " |"
            for m, per in rows.items()
        ]

    def marked(m: str, per: Mapping[str, Any]) -> str:
        k = per[settings[0]]["episodes"]
        return METHOD_LABELS.get(m, m) + (f" (first {k} episodes)" if k != n else "")

    lines = [f"{title} ({n} episodes per cell unless marked, mean ± 95 % CI)" if title else ""]
    lines += table(None, lambda c: f"{100 * c['mean']:.1f} ± {100 * c['ci95']:.1f}", marked)
    pairs = [per[settings[0]]["paired"]["vs"] for per in results.values() if "paired" in per[settings[0]]]
    if pairs:
        lines += [
            "",
            f"Paired against {METHOD_LABELS.get(pairs[0], pairs[0])} on the same episodes: accuracy "
            "difference in points ± 95 % CI, and the error reduction 1 − err/err_ref.",
        ]
        lines += table(
            "paired",
            lambda c: (
                f"{100 * c['paired']['diff']:+.1f} ± {100 * c['paired']['ci95']:.1f} "
                f"({100 * c['paired']['error_reduction']:+.0f} %)"
            ),
        )
    if any("support_loss_before" in per[settings[0]] for per in results.values()):
        lines += [
            "",
            "Support loss (the inner loop's objective) before → after adaptation, mean over the episodes.",
        ]
        lines += table(
            "support_loss_before", lambda c: f"{c['support_loss_before']:.3g} → {c['support_loss_after']:.3g}"
        )
    return "\n".join(lines).lstrip("\n") + "\n"

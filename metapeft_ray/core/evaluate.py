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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from metapeft_ray.core.baselines import Scorer
from metapeft_ray.core.config import COSTLY_METHODS
from metapeft_ray.core.episodes import EpisodeSampler, EpisodeSpec, Split

METHOD_LABELS = {
    "meta": "meta-learned init + adaptation",
    "meta_init": "meta-learned init, no adaptation",
    "meta_logreg": "meta-learned encoder + logistic regression",
    "proto": "frozen backbone + prototypes",
    "logreg": "frozen backbone + logistic regression",
    "proto_names": "frozen backbone + prototypes with label names",
    "logreg_names": "frozen backbone + logistic regression with label names",
    "proto_names_refined": "frozen backbone + prototypes with label names, refined on the queries",
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


EpisodeScores = dict[str, dict[str, dict[int, dict[str, float]]]]
"""What part of a meta-test measured, episode by episode: ``{cell: {method: {episode index:
{"accuracy": a, "seconds": s[, what else the scorer measured]}}}}``. Parts scored in any processes
(`score_episodes` with their ``indices``) merge into `Results` with `merge_scores`."""


def meta_test_specs(
    sampler: EpisodeSampler,
    *,
    cells: Sequence[tuple[int, int]],
    q_query: int,
    episodes: int,
    seed: int,
    split: Split = "test",
    query_alpha: float = 0.0,
) -> dict[str, list[EpisodeSpec]]:
    """The specs of every meta-test episode, ``{cell: [spec of episode 0, 1, ...]}``: the same in
    every process, so any process can score any of them."""
    shape = {"q_query": q_query, "query_alpha": query_alpha}
    return {
        cell_name(n, k): sampler.specs(split, episodes, seed=seed, step=0, n_way=n, k_shot=k, **shape)
        for n, k in cells
    }


def episode_texts(sampler: EpisodeSampler, specs: Mapping[str, Sequence[EpisodeSpec]]) -> list[str]:
    """Every text those episodes hold (support, query, class names), each once, in a fixed order:
    what an `EmbeddingCache` embeds up front so that a text's embedding never depends on which
    episodes a process happens to score."""
    texts: dict[str, None] = {}
    for spec in (s for cell in specs.values() for s in cell):
        episode = sampler.build(spec)
        texts.update(dict.fromkeys([*episode.support_texts, *episode.query_texts, *episode.name_texts]))
    return list(texts)


def score_episodes(
    scorers: Mapping[str, Scorer],
    sampler: EpisodeSampler,
    specs: Mapping[str, Sequence[EpisodeSpec]],
    *,
    costly_episodes: int,
    indices: Iterable[int] | None = None,
    progress: bool = False,
) -> EpisodeScores:
    """Score every method on episodes ``indices`` (all when None) of each cell of ``specs``
    (`meta_test_specs`), the costly baselines only on those below ``costly_episodes``. An
    episode's scores depend on that episode alone: a part scored here equals the same episodes
    of the whole meta-test."""
    from tqdm.auto import tqdm

    chosen = None if indices is None else set(indices)
    scores: EpisodeScores = {}
    for key, cell in specs.items():
        scores[key] = {m: {} for m in scorers}
        mine = [s for s in cell if chosen is None or s.index in chosen]
        for spec in tqdm(mine, desc=f"meta-test {key}", disable=not progress, leave=False):
            episode = sampler.build(spec)
            for m, score in scorers.items():
                if m in COSTLY_METHODS and spec.index >= costly_episodes:
                    continue
                t0 = time.perf_counter()
                measured = score(episode)
                seconds = time.perf_counter() - t0
                if not isinstance(measured, dict):
                    measured = {"accuracy": measured}
                scores[key][m][spec.index] = {**measured, "seconds": seconds}
    return scores


def merge_scores(parts: Iterable[EpisodeScores], reference: str | None = "logreg") -> Results:
    """The `Results` of a meta-test from its parts (disjoint episode indices, in any order):
    per-episode values in episode order, means with 95 % CIs, and each row paired with
    ``reference`` (skipped when it is not among the methods). Every cell must hold episodes
    0..n-1 of each method exactly once: a part lost or scored twice is an error, not a smaller
    table."""
    merged: EpisodeScores = {}
    for part in parts:
        for key, per_method in part.items():
            cell = merged.setdefault(key, {})
            for m, episodes in per_method.items():
                into = cell.setdefault(m, {})
                if twice := sorted(set(into) & set(episodes)):
                    raise ValueError(f"meta-test {key}, {m}: episodes {twice[:5]} were scored twice")
                into.update(episodes)
    if not merged:
        raise ValueError("no meta-test scores to merge")
    methods = list(next(iter(merged.values())))
    results: Results = {m: {} for m in methods}
    for key, cell in merged.items():
        values: dict[str, list[float]] = {}
        for m in methods:
            episodes = cell.get(m, {})
            if sorted(episodes) != list(range(len(episodes))) or not episodes:
                raise ValueError(
                    f"meta-test {key}, {m}: the parts hold episodes {sorted(episodes)[:10]}, not "
                    "0..n-1 (a part is missing)"
                )
            rows = [episodes[i] for i in range(len(episodes))]
            values[m] = [r["accuracy"] for r in rows]
            results[m][key] = {**mean_ci95(values[m]), "per_episode": values[m]}
            extras = [name for name in rows[0] if name not in ("accuracy", "seconds")]
            results[m][key] |= {name: float(np.mean([r[name] for r in rows])) for name in extras}
            if m in _TIMED:
                results[m][key]["ms_per_task"] = 1000 * float(np.mean([r["seconds"] for r in rows]))
        for m in methods:
            if reference in values and m != reference:
                results[m][key]["paired"] = {"vs": reference, **paired(values[m], values[reference])}
    return results


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
    episodes instead (to choose a baseline's settings without looking at the test classes).
    All in this process: `score_episodes` + `merge_scores` with one part."""
    specs = meta_test_specs(sampler, cells=cells, q_query=q_query, episodes=episodes, seed=seed, split=split)
    part = score_episodes(scorers, sampler, specs, costly_episodes=costly_episodes, progress=progress)
    return merge_scores([part], reference)


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

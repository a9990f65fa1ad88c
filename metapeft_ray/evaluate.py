"""Meta-test on held-out classes: the meta-learned init and the baselines on the same episodes.

Methods (all scored on identical episode specs, so the comparison is paired):
- ``meta``     the meta-learned adapter init, adapted with the shared inner loop (`adapt`) —
               with Meta-SGD's learned per-tensor learning rates when there are some;
- ``finetune`` (b) the same PEFT method from its default init (LoRA/DoRA B = 0, IA3 ones,
               bottleneck up-projection 0 — all the identity; prompt/prefix peft's random init),
               same steps, learning rate and head;
- ``proto``    (a) the frozen backbone with a prototype classifier, no training;
- ``logreg``   (a') the frozen backbone with logistic regression fit on the support embeddings.
Each cell is the mean query accuracy with a 95 % confidence interval, 1.96 * sd / sqrt(n), and
for the adapted methods the mean wall time of adapting to one task and scoring its queries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metapeft_ray.episodes import Episode, EpisodeSampler
from metapeft_ray.meta import episode_tensors, head_logits, proto_head, run_episode
from metapeft_ray.model import Encoder

METHOD_LABELS = {
    "meta": "meta-learned adapter init + adaptation",
    "finetune": "(b) adapter fine-tune from peft default init",
    "proto": "(a) frozen backbone + prototypes",
    "logreg": "(a') frozen backbone + logistic regression",
}


def mean_ci95(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {"mean": float(a.mean()), "ci95": 1.96 * sd / math.sqrt(a.size), "episodes": int(a.size)}


def _frozen_scores(encoder: Encoder, episode: Episode, scale: float) -> dict[str, float]:
    """(a) and (a') from one pass of the frozen backbone over support and query."""
    from sklearn.linear_model import LogisticRegression

    support, s_labels, query, q_labels = episode_tensors(encoder, episode)
    with torch.no_grad():
        e_s, e_q = encoder.embed(None, support), encoder.embed(None, query)
    weight, bias = proto_head(e_s, s_labels, len(episode.class_names))
    proto = (head_logits(e_q, weight, bias, scale).argmax(-1) == q_labels).float().mean().item()
    # C=10: the embeddings are unit-norm, so sklearn's default C=1 regularises them into mush.
    clf = LogisticRegression(C=10.0, max_iter=1000).fit(e_s.cpu().numpy(), s_labels.cpu().numpy())
    logreg = float((clf.predict(e_q.cpu().numpy()) == q_labels.cpu().numpy()).mean())
    return {"proto": proto, "logreg": logreg}


def meta_test(
    encoder: Encoder,
    inits: Mapping[str, Mapping[str, Tensor]],
    sampler: EpisodeSampler,
    *,
    methods: Iterable[str],
    seed: int,
    n_way: int,
    shots: Sequence[int],
    q_query: int,
    episodes: int,
    steps: int,
    lr: float,
    scale: float,
    progress: bool = False,
    inner_lrs: Mapping[str, Mapping[str, Tensor] | None] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy per method and shot: ``{method: {"5w1s": {mean, ci95, episodes[, ms_per_task]}}}``.

    ``inits`` maps the adapted methods (``meta``, ``finetune``) to their adapter init;
    ``inner_lrs`` optionally maps them to per-tensor learning rates (Meta-SGD's learned ones).
    """
    methods = list(methods)
    scores: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    seconds: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    inner_lrs = inner_lrs or {}
    from tqdm.auto import tqdm

    for k in shots:
        key = f"{n_way}w{k}s"
        specs = sampler.specs("test", episodes, seed=seed, step=0, n_way=n_way, k_shot=k, q_query=q_query)
        for spec in tqdm(specs, desc=f"meta-test {key}", disable=not progress, leave=False):
            episode = sampler.build(spec)
            acc: dict[str, float] = {}
            if {"proto", "logreg"} & set(methods):
                acc |= _frozen_scores(encoder, episode, scale)
            for m in methods:
                if m in inits:
                    t0 = time.perf_counter()
                    acc[m] = run_episode(
                        encoder,
                        inits[m],
                        episode,
                        steps=steps,
                        lr=lr,
                        scale=scale,
                        first_order=True,
                        meta_gradient=False,
                        track_support_after=False,
                        param_lrs=inner_lrs.get(m),
                    ).query_accuracy
                    seconds[m].setdefault(key, []).append(time.perf_counter() - t0)
                scores[m].setdefault(key, []).append(acc[m])
    results: dict[str, dict[str, dict[str, float]]] = {}
    for m, per in scores.items():
        results[m] = {}
        for key, v in per.items():
            results[m][key] = mean_ci95(v)
            if seconds[m].get(key):
                results[m][key]["ms_per_task"] = 1000 * float(np.mean(seconds[m][key]))
    return results


def markdown_table(results: Mapping[str, Mapping[str, Mapping[str, float]]], title: str = "") -> str:
    """Rows = methods, columns = settings, cells = ``mean ± ci95`` in percent."""
    settings = list(next(iter(results.values())))
    n = next(iter(next(iter(results.values())).values()))["episodes"]
    lines = [f"{title} ({n} episodes per cell, mean ± 95 % CI)" if title else f"{n} episodes per cell"]
    lines += ["", "| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for m, per in results.items():
        cells = [f"{100 * per[s]['mean']:.1f} ± {100 * per[s]['ci95']:.1f}" for s in settings]
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(results: Mapping[str, Any]) -> dict[str, float]:
    """Flat ``{method/setting: mean}`` for logs and Tune."""
    return {f"{m}/{s}": v["mean"] for m, per in results.items() for s, v in per.items()}

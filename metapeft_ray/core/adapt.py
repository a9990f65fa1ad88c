"""Adapt an exported meta-init to a user's labelled support set and classify new texts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from metapeft_ray.core.data import LabelledTexts, label_text
from metapeft_ray.core.episodes import word_dropout_views
from metapeft_ray.core.meta import (
    Adapted,
    InnerLoop,
    adapt,
    class_sums,
    embed_support,
    head_logits,
    refine_head,
    refit_head,
)
from metapeft_ray.core.model import Encoder


@dataclass(frozen=True)
class AdaptedTask:
    """An init adapted to one support set: its classes (sorted label names, the head's rows in
    order), the adapted adapter and head, and the temperature the head scores with. ``refine``:
    `refine_head` iterations on the texts `classify` is given together, from the adapted
    support's `class_sums` (``support_sums``)."""

    classes: tuple[str, ...]
    adapted: Adapted
    scale: float
    refine: int = 0
    refine_prior: float | None = None
    support_sums: tuple[Tensor, Tensor] | None = None


def adapt_to_support(
    encoder: Encoder,
    init: dict[str, torch.Tensor],
    support: LabelledTexts,
    inner: InnerLoop,
    *,
    param_lrs: dict[str, torch.Tensor] | None = None,
) -> AdaptedTask:
    """The ``inner`` loop on the support set (the same `adapt` as training, first order), with the
    support labels' names joining the prototypes when ``inner.name_weight`` is set and the
    augmented views drawn with seed 0; the task's head is ``inner.test_head``. ``param_lrs``:
    Meta-SGD's learned per-tensor learning rates of the init (`export.load_inner_lrs`)."""
    classes = sorted(set(support.labels))
    labels = torch.tensor([classes.index(y) for y in support.labels], device=encoder.device)
    params = {k: v.detach().requires_grad_() for k, v in init.items()}
    views = inner.views
    tokens = encoder.tokenize(support.texts)
    names = None if inner.name_weight is None else encoder.tokenize([label_text(c) for c in classes])
    adapted = adapt(
        encoder,
        params,
        tokens,
        labels,
        len(classes),
        steps=inner.steps,
        lr=inner.lr,
        scale=inner.scale,
        first_order=True,
        param_lrs=param_lrs,
        optimizer=inner.optimizer,
        inner_scale=inner.inner_scale,
        names=names,
        name_weight=inner.names_weight,
        views=encoder.tokenize(word_dropout_views(support.texts, views, inner.view_drop, 0))
        if views
        else None,
        leave_one_out=inner.leave_one_out,
    )
    sums = None
    if inner.test_head == "logreg" or inner.query_refine:
        embedded, named = embed_support(encoder, adapted.params, tokens, names)
        if inner.test_head == "logreg":
            head = refit_head(embedded, labels, len(classes), named, inner)
            adapted = replace(adapted, weight=head[0], bias=head[1])
        if inner.query_refine:
            sums = class_sums(embedded, labels, len(classes), named, float(inner.names_weight))
    return AdaptedTask(
        tuple(classes), adapted, float(inner.scale), inner.query_refine, inner.refine_prior, sums
    )


def classify(
    encoder: Encoder, task: AdaptedTask, texts: Iterable[str], *, batch_size: int = 64, top_k: int = 0
) -> Iterator[dict[str, Any]]:
    """One prediction per text, ``{"text", "label", "confidence"}`` (the softmax probability of
    the label), plus ``"top"``: the ``top_k`` most probable ``{"label", "probability"}`` when
    ``top_k`` > 0. Texts are embedded at most ``batch_size`` at a time, in batches of similar
    length (`Encoder.embed_texts`); with ``task.refine`` the head is refined on all of them
    together first (transductive: each text's prediction depends on the others)."""
    a, texts = task.adapted, list(texts)
    if not texts:
        return
    embedded = encoder.embed_texts(a.params, texts, batch_size=batch_size)
    weight, bias = a.weight, a.bias
    with torch.no_grad():
        if task.refine and task.support_sums is not None:
            weight, bias = refine_head(
                weight, bias, embedded, *task.support_sums, task.scale, task.refine, task.refine_prior
            )
        probs = F.softmax(head_logits(embedded, weight, bias, task.scale), -1)
    top_p, top_i = probs.topk(max(1, min(top_k, len(task.classes))), -1)
    for t, ps, ids in zip(texts, top_p.tolist(), top_i.tolist(), strict=True):
        pred = {"text": t, "label": task.classes[ids[0]], "confidence": round(ps[0], 4)}
        if top_k > 0:
            pred["top"] = [
                {"label": task.classes[i], "probability": round(p, 4)} for p, i in zip(ps, ids, strict=True)
            ]
        yield pred


def adapt_and_predict(
    encoder: Encoder,
    init: dict[str, torch.Tensor],
    support: LabelledTexts,
    queries: Iterable[str],
    inner: InnerLoop,
    *,
    param_lrs: dict[str, torch.Tensor] | None = None,
    batch_size: int = 64,
) -> Iterator[dict[str, Any]]:
    """`adapt_to_support` on the first ``next``, then `classify` each query: ``{"text", "label",
    "confidence"}``."""
    task = adapt_to_support(encoder, init, support, inner, param_lrs=param_lrs)
    yield from classify(encoder, task, queries, batch_size=batch_size)

"""Adapt an exported meta-init to a user's labelled support set and classify new texts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.nn import functional as F

from metapeft_ray.data import LabelledTexts, label_text
from metapeft_ray.episodes import word_dropout_views
from metapeft_ray.meta import adapt, head_logits
from metapeft_ray.model import Encoder


def adapt_and_predict(
    encoder: Encoder,
    init: dict[str, torch.Tensor],
    support: LabelledTexts,
    queries: Iterable[str],
    *,
    steps: int,
    lr: float,
    scale: float,
    batch_size: int = 64,
    param_lrs: dict[str, torch.Tensor] | None = None,
    inner_scale: float | None = None,
    name_weight: float | None = None,
    views: int = 0,
    view_drop: float = 0.3,
) -> Iterator[dict[str, Any]]:
    """``steps`` inner steps on the support set (the same `adapt` as training), then one
    prediction per query text: ``{"text", "label", "confidence"}``. ``param_lrs``: Meta-SGD's
    learned per-tensor learning rates of the init (`export.load_inner_lrs`); ``inner_scale`` and
    ``name_weight`` (the support labels' names join the prototypes; None: not) and ``views``
    (augmented support views in the support loss, drawn with seed 0) as in training."""
    classes = sorted(set(support.labels))
    labels = torch.tensor([classes.index(y) for y in support.labels], device=encoder.device)
    params = {k: v.detach().requires_grad_() for k, v in init.items()}
    adapted = adapt(
        encoder,
        params,
        encoder.tokenize(support.texts),
        labels,
        len(classes),
        steps=steps,
        lr=lr,
        scale=scale,
        first_order=True,
        param_lrs=param_lrs,
        inner_scale=inner_scale,
        names=None if name_weight is None else encoder.tokenize([label_text(c) for c in classes]),
        name_weight=1.0 if name_weight is None else name_weight,
        views=encoder.tokenize(word_dropout_views(support.texts, views, view_drop, 0)) if views else None,
    )
    batch: list[str] = []
    for text in [*queries, None]:
        if text is not None:
            batch.append(text)
        if batch and (text is None or len(batch) == batch_size):
            with torch.no_grad():
                emb = encoder.embed(adapted.params, encoder.tokenize(batch))
                probs = F.softmax(head_logits(emb, adapted.weight, adapted.bias, scale), -1)
            conf, idx = probs.max(-1)
            for t, c, i in zip(batch, conf.tolist(), idx.tolist(), strict=True):
                yield {"text": t, "label": classes[i], "confidence": round(c, 4)}
            batch = []

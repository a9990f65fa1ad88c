"""What a user would do instead of meta-learning, each as a per-episode scorer (Ray-free).

A scorer maps an episode to its query accuracy. Every method of the meta-test is one, so all are
scored on the same episodes and compared paired (`metapeft_ray.core.evaluate`):

- ``proto`` / ``logreg``: the frozen backbone's embeddings (cached by text: the backbone never
  changes) with a prototype classifier / logistic regression fit on the support embeddings;
  ``proto_names`` / ``logreg_names``: the same with each class name's embedding as one more
  support example (what label names alone give, next to a meta-init that uses them);
  ``proto_names_refined``: those prototypes refined on the unlabelled queries (transductive,
  next to a meta-init meta-tested with ``head.query_refine``);
- ``finetune``: the same PEFT method from peft's default init (LoRA B = 0, IA3 ones, ...),
  trained with Adam on the support loss, head initialised from the support prototypes;
- ``full_finetune``: every backbone weight, Adam, the same head — through the same inner loop
  (`metapeft_ray.core.meta.adapt` on `Encoder.backbone_view`);
- ``setfit``: SetFit (PyPI ``setfit``): contrastive fine-tuning of the sentence-transformers body
  on support pairs, then logistic regression on its embeddings, with the library's defaults.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from metapeft_ray.core.episodes import Episode
from metapeft_ray.core.meta import (
    InnerLoop,
    class_sums,
    head_logits,
    logreg_head,
    prototype_weights,
    refine_head,
    run_episode,
)
from metapeft_ray.core.model import Encoder

Scorer = Callable[[Episode], float | dict[str, float]]
"""Episode -> query accuracy, or ``{"accuracy": ..., other per-episode measurements}``."""


class EmbeddingCache:
    """Embeddings of texts under a fixed encoder — the frozen backbone, or the backbone with a fixed
    adapter (``params``, e.g. the meta-learned init before adaptation) — computed once per text.

    A meta-test draws the same texts again and again (600 episodes of 5-way 5-shot sample every
    text of a 27-class split several times), so these rows cost one pass over the data.

    ``texts``: every text the cache will be asked for (`evaluate.episode_texts`), embedded on the
    first call in batches of similar length (`Encoder.embed_texts`). A text's embedding depends on the
    batch it is padded in (~1e-7 here), so without them a process that scores only some episodes
    (a part of a fanned-out meta-test) could score an episode differently from one process
    scoring them all; with them every process gets the same numbers. Other texts are embedded
    as they come."""

    def __init__(
        self,
        encoder: Encoder,
        params: Mapping[str, Tensor] | None = None,
        batch_size: int = 64,
        texts: Sequence[str] = (),
    ) -> None:
        self.encoder, self.batch_size = encoder, batch_size
        self.params = None if params is None else {k: v.detach() for k, v in params.items()}
        self._cache: dict[str, Tensor] = {}
        self._upfront = list(dict.fromkeys(texts))

    def __call__(self, texts: Sequence[str]) -> Tensor:
        if self._upfront:
            upfront, self._upfront = self._upfront, []
            self._embed(upfront)
        self._embed(list(dict.fromkeys(t for t in texts if t not in self._cache)))
        return torch.stack([self._cache[t] for t in texts])

    def _embed(self, missing: list[str]) -> None:
        if missing:
            emb = self.encoder.embed_texts(self.params, missing, batch_size=self.batch_size).cpu()
            self._cache.update(zip(missing, emb, strict=True))


def _frozen(cache: EmbeddingCache, episode: Episode) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        cache(episode.support_texts),
        torch.tensor(episode.support_labels),
        cache(episode.query_texts),
        torch.tensor(episode.query_labels),
    )


def prototype_scorer(
    cache: EmbeddingCache,
    *,
    label_names: bool = False,
    name_weight: float = 1.0,
    refine: int = 0,
    scale: float = 1.0,
    refine_prior: float | None = None,
) -> Scorer:
    """Nearest prototype (mean support embedding) of the cache's encoder; with ``label_names`` each
    class name's embedding counts as ``name_weight`` more support examples; ``refine``: that many
    `meta.refine_head` iterations on the episode's queries, at temperature ``scale`` (estimating
    their class shares, with ``refine_prior`` pseudo-queries of each class, unless None)."""

    def score(episode: Episode) -> float:
        e_s, y_s, e_q, y_q = _frozen(cache, episode)
        n_way = len(episode.class_names)
        names = cache(episode.name_texts) if label_names else None
        sums, counts = class_sums(e_s, y_s, n_way, names, name_weight)
        weight, bias = prototype_weights(sums / counts.unsqueeze(1))  # `proto_head`, from the sums once
        weight, bias = refine_head(weight, bias, e_q, sums, counts, scale, refine, refine_prior)
        return (head_logits(e_q, weight, bias, 1.0).argmax(-1) == y_q).float().mean().item()

    return score


def logreg_scorer(cache: EmbeddingCache, *, label_names: bool = False, name_weight: float = 1.0) -> Scorer:
    """Logistic regression (`meta.logreg_head`) on the cache encoder's support embeddings (with
    ``label_names``, plus each class name's embedding as ``name_weight`` more examples)."""

    def score(episode: Episode) -> float:
        e_s, y_s, e_q, y_q = _frozen(cache, episode)
        names = cache(episode.name_texts) if label_names else None
        weight, bias = logreg_head(e_s, y_s, len(episode.class_names), names, name_weight)
        return (head_logits(e_q, weight, bias, 1.0).argmax(-1) == y_q).float().mean().item()

    return score


def adapted_scorer(
    encoder: Encoder,
    init: Mapping[str, Tensor],
    inner: InnerLoop,
    *,
    param_lrs: Mapping[str, Tensor] | None = None,
) -> Scorer:
    """The ``inner`` loop on the support set from ``init``, then the query accuracy and the
    support loss before and after adaptation: the meta-learned init (SGD, Meta-SGD's rates if
    any, its head settings; 0 steps = no adaptation) and the fine-tuning baselines (Adam from the
    method's default init, or every backbone weight)."""

    def score(episode: Episode) -> dict[str, float]:
        r = run_episode(encoder, init, episode, inner, meta_gradient=False, param_lrs=param_lrs)
        if not inner.steps:
            return {"accuracy": r.query_accuracy}
        return {
            "accuracy": r.query_accuracy,
            "support_loss_before": r.support_loss_before,
            "support_loss_after": r.support_loss_after,
        }

    return score


def full_finetune_scorer(encoder: Encoder, inner: InnerLoop) -> Scorer:
    """Every backbone weight fine-tuned by the ``inner`` loop (`InnerLoop.finetune`: Adam), the
    adapter switched off, same head."""
    view = encoder.backbone_view()
    return adapted_scorer(view, view.backbone_params(), inner)


def setfit_scorer(
    backbone_path: str,
    *,
    max_length: int,
    iterations: int | None,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> Scorer:
    """SetFit with its own defaults (pair sampling, cosine-similarity loss, logistic-regression
    head), on a fresh copy of the backbone per episode. ``iterations=None``: SetFit's default
    sampling (every unique pair, positives oversampled to balance the negatives)."""
    try:
        from datasets import Dataset, disable_progress_bars
        from setfit import SetFitModel, Trainer, TrainingArguments
        from setfit import logging as setfit_logging
    except ImportError:
        raise ValueError(
            "eval.methods includes setfit, which needs `pip install metapeft_ray[baselines]` "
            "(setfit and datasets); or drop setfit from eval.methods"
        ) from None
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    setfit_logging.set_verbosity_error()
    hf_logging.set_verbosity_error()
    base = SetFitModel.from_pretrained(backbone_path)
    base.model_body.max_seq_length = max_length

    def score(episode: Episode) -> float:
        model = copy.deepcopy(base)
        with tempfile.TemporaryDirectory(prefix="metapeft-setfit-") as out:
            args = TrainingArguments(
                output_dir=out,
                batch_size=batch_size,
                num_epochs=epochs,
                num_iterations=iterations,
                body_learning_rate=lr,
                seed=seed + episode.spec.index,
                report_to="none",
                show_progress_bar=False,
                logging_strategy="no",
                save_strategy="no",
                eval_strategy="no",
            )
            data = {"text": list(episode.support_texts), "label": list(episode.support_labels)}
            Trainer(model=model, args=args, train_dataset=Dataset.from_dict(data)).train()
        predicted = np.asarray(model.predict(list(episode.query_texts), as_numpy=True))
        return float((predicted == np.asarray(episode.query_labels)).mean())

    return score

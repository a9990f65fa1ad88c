"""The maths: one functional inner loop on adapter parameters, and the per-episode meta-gradient.

No Ray here. Training, validation, meta-test and the fine-tuning baseline all call `adapt`;
the algorithms (`metapeft_ray.core.algorithms`) turn one episode into a meta-gradient, and the
learner (`train.MetaLearner`) sums them over a meta-batch, on one process or across Ray workers.

Head (Proto-MAML, Triantafillou et al. 2020): each episode's N-way linear head is initialised
from the support prototypes c_k of the current encoder, ``W_k = 2 c_k, b_k = -|c_k|^2``, so
``logits_k(x) = s (2 c_k.x - |c_k|^2)`` equals ``-s |x - c_k|^2`` up to a per-example constant.
It is therefore right for any per-episode label permutation, needs no meta-learned head, and the
meta-gradient flows through the prototypes into the adapter init.

Inner update (MAML, Finn et al. 2017) on ``phi = (adapter params, W, b)``:
``phi_{t+1} = phi_t - alpha * grad L_support(phi_t)``; the meta-gradient is
``d L_query(phi_T) / d phi_0``. First-order MAML drops the second-order terms by treating
``grad L_support`` as a constant (the graph of the inner gradients is not built). Meta-SGD
(Li et al. 2017) replaces the scalar ``alpha`` of each adapter tensor by a learned one
(``param_lrs``: a scalar or an elementwise tensor per adapter tensor, or one per inner step);
the head keeps ``alpha``.
How an episode becomes a contribution to the outer update (MAML, Meta-SGD, Reptile, ProtoNet)
is `metapeft_ray.core.algorithms`; all of them call `run_episode`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from metapeft_ray.core.episodes import Episode, word_dropout_views
from metapeft_ray.core.model import Encoder

Params = dict[str, Tensor]
Scalar = float | Tensor
"""A head value: a number, or a 0-d tensor when it is meta-learned (differentiable)."""

HEAD_PREFIX = "head/log_"
"""Meta-parameter names of the learned head values: ``head/log_scale``, ``head/log_name_weight``..."""


@dataclass(frozen=True)
class InnerLoop:
    """The inner loop's settings, passed whole from the config (`train.inner_loop`) to every
    adaptation: training and validation episodes (`run_episode`), the meta-test scorers,
    ``metapeft adapt`` and Serve (`adapt.adapt_to_support`). ``name_weight`` None: the head does
    not use the class names; ``optimizer``: the inner update (`adapt`; ``"adam"`` for the
    fine-tuning baselines)."""

    steps: int
    lr: float
    scale: Scalar
    first_order: bool
    inner_scale: Scalar | None = None
    name_weight: Scalar | None = None
    views: int = 0
    view_drop: float = 0.3
    optimizer: Literal["sgd", "adam"] = "sgd"
    leave_one_out: bool = False
    """The support loss leaves each example out of its own prototype (`leave_one_out_logits`)."""
    test_head: Literal["prototypes", "logreg"] = "prototypes"
    """The query head of an adaptation no gradient goes back through (validation, meta-test,
    serving): the adapted prototypes, or `logreg_head` fitted on the adapted encoder's support."""
    query_refine: int = 0
    """Transductive: `refine_head` iterations of that query head on the unlabelled queries
    (where no gradient goes back, like ``test_head``; with ``train_refined`` in meta-training too)."""
    refine_prior: float | None = None
    """Not None: the refinement estimates the queries' class shares, with that many pseudo-queries
    of every class (`refine_head`'s ``prior``)."""
    train_refined: bool = False
    """Meta-training differentiates the refined head (the queries' assignments and their pull on
    the prototypes), not the inner loop's own."""

    @property
    def names_weight(self) -> Scalar:
        """What a class name counts as in the prototypes (1 where the head uses no names: unused)."""
        return 1.0 if self.name_weight is None else self.name_weight

    @classmethod
    def finetune(cls, steps: int, lr: float, scale: float) -> InnerLoop:
        """Plain fine-tuning, the baselines' inner loop: Adam, first order, no head extras."""
        return cls(steps, lr, scale, first_order=True, optimizer="adam")

    def head_meta_params(self, learn: Sequence[str], device: torch.device | None = None) -> Params:
        """Fresh log-parametrised leaves for the head values in ``learn``, at their set values
        (an unset inner scale starts at the scale), on ``device`` (the adapter's)."""
        start = {"inner_scale": self.scale if self.inner_scale is None else self.inner_scale}
        return {
            HEAD_PREFIX + k: torch.tensor(
                math.log(start.get(k, getattr(self, k))), device=device, requires_grad=True
            )
            for k in learn
        }

    def with_learned(self, extra: Mapping[str, Tensor]) -> InnerLoop:
        """These settings with the learned head values of ``extra`` (``exp`` of the leaves, so the
        query loss is differentiable w.r.t. them) in place of the set ones."""
        learned = {
            k.removeprefix(HEAD_PREFIX): v.exp() for k, v in extra.items() if k.startswith(HEAD_PREFIX)
        }
        return replace(self, **learned) if learned else self

    def detached(self) -> InnerLoop:
        """First order, the learned head values detached: an adaptation no gradient goes back
        through (validation, meta-test, serving)."""
        learned = {
            k: v.detach()
            for k in ("scale", "inner_scale", "name_weight")
            if isinstance(v := getattr(self, k), Tensor)
        }
        return replace(self, first_order=True, **learned)


def class_sums(
    embeddings: Tensor,
    labels: Tensor,
    n_way: int,
    names: Tensor | None = None,
    name_weight: Scalar = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per class k: ``sum_{i: y_i = k} x_i + w n_k`` [N, D] and ``K_k + w`` [N] (without ``names``:
    the plain sums and counts), the class names' embeddings ``n_k`` worth ``w = name_weight``
    examples each."""
    onehot = F.one_hot(labels, n_way).to(embeddings.dtype)
    sums, counts = onehot.T @ embeddings, onehot.sum(0)
    if names is not None:
        sums, counts = sums + name_weight * names, counts + name_weight
    return sums, counts


def proto_head(
    embeddings: Tensor,
    labels: Tensor,
    n_way: int,
    names: Tensor | None = None,
    name_weight: Scalar = 1.0,
) -> tuple[Tensor, Tensor]:
    """``W_k = 2 c_k``, ``b_k = -|c_k|^2`` with c_k the mean support embedding of class k, or with
    the class names' embeddings ``n_k`` as a prior worth ``w = name_weight`` examples:
    ``c_k = (sum_{i: y_i = k} x_i + w n_k) / (K_k + w)`` (`class_sums`)."""
    sums, counts = class_sums(embeddings, labels, n_way, names, name_weight)
    return prototype_weights(sums / counts.unsqueeze(1))


def prototype_weights(protos: Tensor) -> tuple[Tensor, Tensor]:
    """The linear head ``W_k = 2 c_k``, ``b_k = -|c_k|^2`` of prototypes ``c`` [N, D]."""
    return 2 * protos, -(protos * protos).sum(-1)


def refine_head(
    weight: Tensor,
    bias: Tensor,
    queries: Tensor,
    sums: Tensor,
    counts: Tensor,
    scale: Scalar,
    iterations: int,
    prior: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Transductive soft k-means (Ren et al. 2018): each iteration assigns the unlabelled
    ``queries`` to the classes by the softmax of the head's logits at temperature ``scale`` (the
    first by the given head, prototypes or logistic regression) and makes the prototypes
    ``c_k = (sums_k + sum_q p_qk x_q) / (counts_k + sum_q p_qk)`` from the support's `class_sums`
    and the queries. The queries classified together inform each other's prediction. ``prior``
    (not None): the batch's class shares are estimated too, their logarithm added to the logits
    through the bias, so a batch that holds few or no texts of a class does not pull other
    classes' texts into its prototype: EM mixture weights under a symmetric Dirichlet prior,
    ``pi_k = (sum_q p_qk + prior) / (Q + N prior)``, ``prior`` pseudo-queries of every class (0:
    the maximum-likelihood shares; the larger, the nearer the even shares of plain soft k-means)."""
    for _ in range(iterations):
        p = F.softmax(head_logits(queries, weight, bias, scale), -1)
        weight, bias = prototype_weights((sums + p.T @ queries) / (counts + p.sum(0)).unsqueeze(1))
        if prior is not None:
            shares = (p.sum(0) + prior) / (p.shape[0] + p.shape[1] * prior)
            bias = bias + shares.clamp_min(1e-6).log() / scale
    return weight, bias


def leave_one_out_logits(
    embeddings: Tensor,
    labels: Tensor,
    n_way: int,
    scale: Scalar,
    names: Tensor | None = None,
    name_weight: Scalar = 1.0,
) -> Tensor:
    """Each support example scored against the prototypes of `proto_head` with itself left out of
    its own class's: at 1 shot with the class names that prototype is the name alone, so the loss
    asks the encoder to bring each example to its name, not to itself (which is ~0 loss)."""
    onehot = F.one_hot(labels, n_way).to(embeddings.dtype)  # [S, N]
    sums, counts = class_sums(embeddings, labels, n_way, names, name_weight)
    if bool((counts - onehot.max(0).values <= 0).any()):
        raise ValueError(
            "the leave-one-out support loss needs a second example or the class name in every class "
            "(k_shot >= 2 or head.label_names=true)"
        )
    # example i's prototypes: its own class's sum less itself; the others' as they are
    without_self = sums - onehot.unsqueeze(2) * embeddings.unsqueeze(1)  # [S, N, D]
    protos = without_self / (counts - onehot).unsqueeze(2)
    return scale * (2 * torch.einsum("sd,snd->sn", embeddings, protos) - (protos * protos).sum(-1))


def logreg_head(
    embeddings: Tensor,
    labels: Tensor,
    n_way: int,
    names: Tensor | None = None,
    name_weight: Scalar = 1.0,
    scale: Scalar = 1.0,
) -> tuple[Tensor, Tensor]:
    """Logistic regression (scikit-learn, C = 10, the ``logreg`` baseline's) on the support
    embeddings, each class name's embedding one more example of weight ``name_weight``: the
    weight and bias that `head_logits` at temperature ``scale`` turns into its logits. Not
    differentiable: a head for adaptations no meta-gradient goes through. C = 10: the embeddings
    are unit-norm, so scikit-learn's default C = 1 regularises them into mush."""
    from sklearn.linear_model import LogisticRegression

    x, y = embeddings.detach(), labels
    w = torch.ones(len(y), device=x.device)
    if names is not None:
        x, y = torch.cat([x, names.detach()]), torch.cat([y, torch.arange(n_way, device=y.device)])
        w = torch.cat([w, torch.full((n_way,), float(name_weight), device=x.device)])
    clf = LogisticRegression(C=10.0, max_iter=1000)
    clf.fit(x.cpu().double().numpy(), y.cpu().numpy(), sample_weight=w.cpu().numpy())
    coef = torch.as_tensor(clf.coef_, dtype=x.dtype, device=x.device)
    intercept = torch.as_tensor(clf.intercept_, dtype=x.dtype, device=x.device)
    if n_way == 2:  # sklearn's binary model: the logit of class 1 against a class 0 at logit 0
        coef = torch.cat([torch.zeros_like(coef), coef])
        intercept = torch.cat([torch.zeros_like(intercept), intercept])
    return coef / scale, intercept / scale


def names_head_loss(
    encoder: Encoder, params: Mapping[str, Tensor], episode: Episode, scale: Scalar
) -> tuple[Tensor, int]:
    """Supervised pre-meta-training's objective on a 0-shot episode (`EpisodeSampler.labelled_batch`):
    every query scored against every class's name embedding, the name-prior head with no support,
    at temperature ``scale``; the summed cross-entropy and the number classified right."""
    names = encoder.embed(params, encoder.tokenize(episode.name_texts))
    queries = encoder.embed(params, encoder.tokenize(episode.query_texts))
    labels = torch.tensor(episode.query_labels, device=encoder.device)
    logits = head_logits(queries, *prototype_weights(names), scale)
    return F.cross_entropy(logits, labels, reduction="sum"), int((logits.argmax(-1) == labels).sum())


def head_logits(embeddings: Tensor, weight: Tensor, bias: Tensor, scale: Scalar) -> Tensor:
    # Written out rather than torch.cdist: cdist has no double backward.
    return scale * (embeddings @ weight.T + bias)


@dataclass
class Adapted:
    """Result of the inner loop: adapted adapter params, adapted head, support losses per step."""

    params: Params
    weight: Tensor
    bias: Tensor
    support_losses: list[float] = field(default_factory=list)


def adapt(
    encoder: Encoder,
    params: Mapping[str, Tensor],
    support: Mapping[str, Tensor],
    support_labels: Tensor,
    n_way: int,
    *,
    steps: int,
    lr: float,
    scale: Scalar,
    first_order: bool,
    param_lrs: Mapping[str, Tensor] | None = None,
    optimizer: Literal["sgd", "adam"] = "sgd",
    inner_scale: Scalar | None = None,
    names: Mapping[str, Tensor] | None = None,
    name_weight: Scalar = 1.0,
    views: Mapping[str, Tensor] | None = None,
    leave_one_out: bool = False,
) -> Adapted:
    """The one inner loop: ``steps`` gradient steps on the support loss over ``params`` + head.

    With ``first_order=False`` the returned tensors stay differentiable w.r.t. ``params``
    (second-order MAML); with ``first_order=True`` the inner gradients are constants.
    ``param_lrs`` (Meta-SGD) gives each adapter tensor its own learning rate, a scalar, an
    elementwise tensor or one of these per step (a leading step axis: `_step_rate`); the result
    stays differentiable w.r.t. them in every case.
    ``optimizer="adam"`` replaces the SGD step ``-lr g`` by Adam's ``-lr m_hat / (sqrt(v_hat) + eps)``
    (the fine-tuning baselines: plain fine-tuning uses Adam, and its step size does not depend
    on the scale of a nearly-zero 1-shot support loss). The support loss uses ``inner_scale``
    (default ``scale``); ``names`` (the tokenised class names) make the head's prototypes start
    from the names' embeddings as ``name_weight`` examples each (`proto_head`). ``views`` (the
    tokenised augmented views of the support examples, view-major) join the support loss, scored
    against the clean support's prototypes. ``leave_one_out``: the support loss scores each
    example against prototypes without itself (`leave_one_out_logits`), recomputed from the
    adapted encoder at every step, and the returned head is the adapted encoder's prototypes.
    """
    embedded = encoder.embed(params, support)
    named = None if names is None else encoder.embed(params, names)
    weight, bias = proto_head(embedded, support_labels, n_way, named, name_weight)
    inner_scale = scale if inner_scale is None else inner_scale
    n_views = 0 if views is None else len(next(iter(views.values()))) // len(support_labels)
    labels = support_labels.repeat(1 + n_views)
    fast = dict(params)
    losses: list[float] = []
    if optimizer == "adam" and not first_order:
        raise ValueError("the Adam inner loop (fine-tuning baselines) is first order; use optimizer='sgd'")
    if leave_one_out and (views is not None or optimizer == "adam"):
        raise ValueError("the leave-one-out support loss takes no views and the SGD step only")
    adam = _Adam() if optimizer == "adam" else None
    for step in range(steps):
        if leave_one_out:  # prototypes without each example, from the encoder as it is now
            if step:
                embedded = encoder.embed(fast, support)
                named = None if names is None else encoder.embed(fast, names)
            logits = leave_one_out_logits(embedded, support_labels, n_way, inner_scale, named, name_weight)
            loss = F.cross_entropy(logits, labels)
            losses.append(loss.item())
            fast = _sgd(
                fast,
                torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order),
                lr,
                param_lrs,
                step,
            )
            continue
        # The inner gradient is the partial derivative w.r.t. the adapter with the head held fixed
        # (not the total one through the prototype init of the head). At step 0 the support
        # embedding is the one the prototypes came from: no second forward; its gradient, taken at
        # a fresh node, goes back through the encoder as a vector-Jacobian product.
        emb = embedded.view_as(embedded) if step == 0 else encoder.embed(fast, support)
        view_emb = [] if views is None else [encoder.embed(fast, views)]
        loss = F.cross_entropy(head_logits(torch.cat([emb, *view_emb]), weight, bias, inner_scale), labels)
        losses.append(loss.item())
        if step == 0:
            g_emb, *g_views, g_weight, g_bias = torch.autograd.grad(
                loss, [emb, *view_emb, weight, bias], create_graph=not first_order
            )
            # the encoder's graph stays: the head, hence the query loss, depends on `embedded`
            g_params = torch.autograd.grad(
                [embedded, *view_emb],
                list(fast.values()),
                [g_emb, *g_views],
                create_graph=not first_order,
                retain_graph=True,
            )
        else:
            grads = torch.autograd.grad(loss, [*fast.values(), weight, bias], create_graph=not first_order)
            *g_params, g_weight, g_bias = grads
        grads = [*g_params, g_weight, g_bias]
        if adam is not None:
            grads = adam.directions(grads, step + 1)
        *g_params, g_weight, g_bias = grads
        fast = _sgd(fast, g_params, lr, param_lrs, step)
        weight, bias = weight - lr * g_weight, bias - lr * g_bias
    if leave_one_out and steps:  # the adapted encoder's prototypes
        named = None if names is None else encoder.embed(fast, names)
        weight, bias = proto_head(encoder.embed(fast, support), support_labels, n_way, named, name_weight)
    return Adapted(fast, weight, bias, losses)


def _sgd(
    params: dict[str, Tensor],
    grads: Sequence[Tensor],
    lr: float,
    param_lrs: Mapping[str, Tensor] | None,
    step: int,
) -> dict[str, Tensor]:
    """Inner step ``step``: ``p - lr g``, or ``p - lr_p g`` with Meta-SGD's learned rates."""
    if not param_lrs:
        return {name: torch.add(p, g, alpha=-lr) for (name, p), g in zip(params.items(), grads, strict=True)}
    return {
        name: p - _step_rate(param_lrs[name], p, step) * g
        for (name, p), g in zip(params.items(), grads, strict=True)
    }


def _step_rate(rate: Tensor, p: Tensor, step: int) -> Tensor:
    """A learned rate at inner step ``step``: one axis more than the tensor it moves is a step
    axis (per-step rates; past the last one the last rate holds), otherwise the rate of every step."""
    return rate[min(step, len(rate) - 1)] if rate.dim() > p.dim() else rate


class _Adam:
    """Adam's update direction ``m_hat / (sqrt(v_hat) + eps)`` (Kingma & Ba 2015) for a fixed list
    of tensors, kept outside autograd (the fine-tuning baselines are first order) and in place: a
    full fine-tune updates 22 M weights per step, where temporaries would cost more than the step."""

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.betas, self.eps = betas, eps
        self.m: list[Tensor] = []
        self.v: list[Tensor] = []

    @torch.no_grad()
    def directions(self, grads: list[Tensor], t: int) -> list[Tensor]:
        b1, b2 = self.betas
        if not self.m:
            self.m = [torch.zeros_like(g) for g in grads]
            self.v = [torch.zeros_like(g) for g in grads]
        out = []
        for m, v, g in zip(self.m, self.v, grads, strict=True):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.sqrt().div_(math.sqrt(1 - b2**t)).add_(self.eps)
            out.append(m.div(denom).div_(1 - b1**t))
        return out


def episode_tensors(
    encoder: Encoder, episode: Episode
) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor], Tensor]:
    """Tokenised support and query batches with their label tensors, on the encoder's device."""
    dev = encoder.device
    return (
        encoder.tokenize(episode.support_texts),
        torch.tensor(episode.support_labels, device=dev),
        encoder.tokenize(episode.query_texts),
        torch.tensor(episode.query_labels, device=dev),
    )


@dataclass
class EpisodeResult:
    """One episode's meta-gradient (None at evaluation) and what it measured."""

    grads: Params | None
    query_loss: float
    query_accuracy: float
    support_loss_before: float
    support_loss_after: float
    adapted: Params | None = None
    """The adapted adapter tensors, detached (only with ``keep_adapted``; Reptile uses them)."""


def run_episode(
    encoder: Encoder,
    params: Mapping[str, Tensor],
    episode: Episode,
    inner: InnerLoop,
    *,
    meta_gradient: bool,
    track_support_after: bool = True,
    param_lrs: Mapping[str, Tensor] | None = None,
    grad_wrt: Mapping[str, Tensor] | None = None,
    keep_adapted: bool = False,
) -> EpisodeResult:
    """Adapt on the support set with the ``inner`` loop, score the query set; with
    ``meta_gradient`` also return ``d L_query / d params`` (the episode's contribution to the outer
    update; without it the inner loop is first order).

    ``param_lrs``: per-tensor inner learning rates (Meta-SGD). ``grad_wrt``: the tensors to
    differentiate the query loss w.r.t. when they are more than ``params`` (Meta-SGD adds its
    log learning rates); the gradients come back under the same names. The support loss's
    temperature, the class names and the augmented views (`word_dropout_views`, seeded by the
    episode, so every process draws the same ones) are the ``inner`` loop's (`adapt`).
    """
    support, s_labels, query, q_labels = episode_tensors(encoder, episode)
    names = None if inner.name_weight is None else encoder.tokenize(episode.name_texts)
    seed = _episode_seed(episode)
    views = inner.views
    view_batch = (
        encoder.tokenize(word_dropout_views(episode.support_texts, views, inner.view_drop, seed))
        if views
        else None
    )
    n_way = len(episode.class_names)
    if not meta_gradient:  # adapt a detached copy: no graph back into the caller's init
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        if param_lrs is not None:
            param_lrs = {k: v.detach() for k, v in param_lrs.items()}
        inner = inner.detached()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.enable_grad():
            adapted = adapt(
                encoder,
                params,
                support,
                s_labels,
                n_way,
                steps=inner.steps,
                lr=inner.lr,
                scale=inner.scale,
                first_order=inner.first_order,
                param_lrs=param_lrs,
                optimizer=inner.optimizer,
                inner_scale=inner.inner_scale,
                names=names,
                name_weight=inner.names_weight,
                views=view_batch,
                leave_one_out=inner.leave_one_out,
            )
        weight, bias = adapted.weight, adapted.bias
        refit = inner.test_head == "logreg" and not meta_gradient
        refine = inner.query_refine if inner.train_refined or not meta_gradient else 0
        track = track_support_after and inner.steps
        if refine and meta_gradient:  # the refined prototypes' sums, differentiably
            embedded = encoder.embed(adapted.params, support)
            named = None if names is None else encoder.embed(adapted.params, names)
        elif refit or track or refine:  # the adapted support (and names) embedded once for all
            embedded, named = embed_support(encoder, adapted.params, support, names)
        if refit:
            weight, bias = refit_head(embedded, s_labels, n_way, named, inner)
        with torch.set_grad_enabled(meta_gradient):
            embedded_query = encoder.embed(adapted.params, query)
            if refine:
                sums = class_sums(embedded, s_labels, n_way, named, inner.names_weight)
                weight, bias = refine_head(
                    weight, bias, embedded_query, *sums, inner.scale, refine, inner.refine_prior
                )
            logits = head_logits(embedded_query, weight, bias, inner.scale)
            loss = F.cross_entropy(logits, q_labels)
        grads = None
        if meta_gradient:
            wrt = params if grad_wrt is None else grad_wrt
            grads = dict(zip(wrt, torch.autograd.grad(loss, list(wrt.values())), strict=True))
        after = float("nan")
        if track:
            with torch.no_grad():  # the inner loop's objective, views included
                embs = (
                    [embedded]
                    if view_batch is None
                    else [embedded, encoder.embed(adapted.params, view_batch)]
                )
                s_scale = inner.scale if inner.inner_scale is None else inner.inner_scale
                if inner.leave_one_out:
                    s_logits = leave_one_out_logits(
                        embedded, s_labels, n_way, s_scale, named, inner.names_weight
                    )
                else:
                    s_logits = head_logits(torch.cat(embs), adapted.weight, adapted.bias, s_scale)
                after = F.cross_entropy(s_logits, s_labels.repeat(1 + views)).item()
    before = adapted.support_losses[0] if adapted.support_losses else float("nan")
    accuracy = (logits.argmax(-1) == q_labels).float().mean().item()
    kept = {k: v.detach() for k, v in adapted.params.items()} if keep_adapted else None
    return EpisodeResult(grads, loss.item(), accuracy, before, after, kept)


def embed_support(
    encoder: Encoder,
    params: Mapping[str, Tensor],
    support: Mapping[str, Tensor],
    names: Mapping[str, Tensor] | None,
) -> tuple[Tensor, Tensor | None]:
    """The tokenised support (and class names, when given) embedded by ``params``, no gradients."""
    with torch.no_grad():
        return encoder.embed(params, support), None if names is None else encoder.embed(params, names)


def refit_head(
    embedded: Tensor, labels: Tensor, n_way: int, named: Tensor | None, inner: InnerLoop
) -> tuple[Tensor, Tensor]:
    """`logreg_head` on the support embedded by the adapted encoder (and the class names, when
    ``named`` holds their embeddings), at the inner loop's name weight and query temperature."""
    return logreg_head(embedded, labels, n_way, named, float(inner.names_weight), float(inner.scale))


def _episode_seed(episode: Episode) -> int:
    # Adapter dropout draws from the global RNG; seeding it from the episode identity keeps a
    # distributed or resumed run equal to a single-process one.
    return int(np.random.SeedSequence(episode.spec.rng_key()).generate_state(1)[0])

"""One typed config tree: YAML file + dotted overrides -> validated `Config`, all errors at once.

The same dotted paths (``meta.inner_steps``) address the tree from the command line, from Ray
Tune search spaces and from job submission, so there is exactly one vocabulary of settings.
Maths functions never take this object; recipes unpack it into flat arguments.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from metapeft_ray.core import registry

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """Raised for a config that cannot run; the message lists every problem, one per line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = Field("quickstart", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "runs"
    """Local directory or ``s3://bucket/prefix``; the run writes under ``output_dir/name``."""
    seed: int = 0


class DataSection(_Section):
    dataset: str = "banking77"
    """A packaged dataset name (banking77, hwu64, clinc150, ...), a local .jsonl/.csv/.tsv file,
    an ``s3://`` URI of such a file, or ``hf://NAME`` for a Hugging Face dataset."""
    text_column: str = "text"
    label_column: str = "label"
    folds: int = Field(5, ge=2)
    fold: int = Field(0, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the non-test classes held out as meta-validation classes."""
    split_seed: int = 0
    splits: str | None = None
    """The meta-train / meta-val / meta-test classes, as a published benchmark fixes them (local
    or ``s3://``): a .yaml/.yml/.json file ``{train: [...], val: [...], test: [...]}`` (``valid``
    = ``val``), or a folder of ``labels.train.txt``, ``labels.valid.txt``, ``labels.test.txt``
    (one class per line). When set, data.folds, data.fold and data.val_fraction are not used."""
    exclude_classes: list[str] = Field(default_factory=list)
    """Class names or glob patterns (case-sensitive) removed from meta-train and meta-val; never
    from meta-test, so a fold's test classes stay the same. A pattern that matches nothing fails."""

    @model_validator(mode="after")
    def _fold_in_range(self) -> DataSection:
        if self.fold >= self.folds:
            raise ValueError(
                f"data.fold={self.fold} is out of range for data.folds={self.folds}; use 0..{self.folds - 1}"
            )
        return self


class EpisodeSection(_Section):
    n_way: int = Field(5, ge=2)
    k_shot: int = Field(1, ge=1)
    q_query: int = Field(5, ge=1)
    train_shots: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    """Mixed-shot meta-training: the shots of the training episodes, dealt in turn over each
    meta-batch (``[1, 5]``: every other episode 5-shot). Empty: every training episode is
    ``k_shot``. Meta-validation stays at ``k_shot``."""
    query_alpha: float = Field(0.0, ge=0)
    """Unbalanced query batches in meta-training and meta-validation, as ``eval.query_alpha`` at
    meta-test: the n_way x q_query queries split by Dirichlet(query_alpha) class shares. 0:
    q_query queries of every class."""


class ModelSection(_Section):
    backbone: str = "all-MiniLM-L6-v2"
    """``all-MiniLM-L6-v2`` (packaged, offline), a local Hugging Face model directory, or a hub id."""
    max_length: int = Field(64, ge=8, le=4096)
    normalize: bool = True
    """L2-normalise the mean-pooled sentence embedding (as sentence-transformers does)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False
    """bf16 autocast of the backbone forward (on the run's device: a GPU, or the CPU, where it is
    slower than fp32 and only useful to test the path)."""
    activation_checkpointing: bool = False
    """Keep only each transformer block's input for the backward and recompute the block there
    (non-reentrant checkpointing, exact through second-order MAML's double backward): less
    memory for the activations, one more forward of the backbone per backward."""


HeadValue = Literal["scale", "inner_scale", "name_weight"]


class HeadSection(_Section):
    """Each episode's classifier (Proto-MAML): prototypes ``c_k`` of the support embeddings,
    logits ``s (2 c_k.x - |c_k|^2)``, adapted with the encoder in the inner loop."""

    scale: float = Field(10.0, gt=0)
    """Temperature s of the query logits (and of the support loss unless ``inner_scale``)."""
    inner_scale: float | None = Field(None, gt=0)
    """Temperature of the support loss in the inner loop (unset: ``scale``). At 1 shot a support
    example is its own prototype and the loss at s = 10 is ~1e-5, so the inner loop moves nothing;
    a lower inner temperature keeps it informative."""
    label_names: bool = False
    """Class names are text: embed each name (``_`` and ``-`` read as spaces) with the encoder and
    add it to its prototype as ``name_weight`` support examples, ``c_k = (sum_i x_ki + w n_k) /
    (K + w)``. Needs meaningful class names (card_arrival, alarm_set, ...)."""
    name_weight: float = Field(1.0, gt=0)
    """w: how many support examples a class name counts as."""
    views: int = Field(0, ge=0)
    """Augmented views of each support example (each word deleted with probability ``view_drop``)
    that join the support loss, scored against the clean support's prototypes. At 1 shot an
    example is its own prototype and its loss is ~0; its views' loss is not, so the inner loop
    has something to fit."""
    view_drop: float = Field(0.3, gt=0, lt=1)
    support_loss: Literal["prototypes", "leave_one_out"] = "prototypes"
    """The inner loop's loss: ``prototypes`` scores each support example against the prototypes it
    is part of (at 1 shot its own; with a fixed head adapted by SGD); ``leave_one_out`` leaves it
    out of its own class's prototype (at 1 shot that is the class name alone: needs
    ``label_names``) and re-computes the prototypes from the adapted encoder at every step."""
    test_head: Literal["prototypes", "logreg"] = "prototypes"
    """The query classifier once the inner loop is done, where no meta-gradient goes back
    (validation, meta-test, ``metapeft adapt``, Serve): ``prototypes``, the adapted head that
    meta-training differentiates, or ``logreg``, logistic regression (C = 10) fitted on the
    adapted encoder's support embeddings, the class names as ``name_weight`` examples each (ahead
    of or level with the prototypes at 1, 5 and 10 shots in every cell measured: README)."""
    query_refine: int = Field(0, ge=0)
    """Transductive adaptation: after the inner loop, refine that query head this many times on
    the unlabelled queries classified together (soft k-means, Ren et al. 2018: each class's
    prototype takes in the queries weighted by their probability of it; `meta.refine_head`), at
    validation, meta-test, ``metapeft adapt`` and Serve (on the texts of one request). 0: each
    query is classified on its own (inductive). Compare it with the ``proto_names_refined``
    baseline, the frozen backbone refined the same way."""
    refine_prior: bool = False
    """The refinement also estimates the class shares of the texts classified together (EM
    mixture weights): for batches that are not one class in turn (``eval.query_alpha`` measures
    them), where plain soft k-means pulls other classes' texts into a class the batch lacks."""
    refine_prior_counts: float = Field(0.0, ge=0)
    """With ``refine_prior``: pseudo-texts of every class added to the estimated class shares (a
    symmetric Dirichlet prior on them). 0: the shares the batch alone gives; larger values keep
    the shares nearer even, which costs less on balanced batches and gains less on skewed ones."""
    train_refined: bool = False
    """Meta-train through the refinement too (differentiable: the queries' soft assignments and
    their pull on the prototypes), so the init learns for the transductive meta-test; false:
    meta-training differentiates the unrefined head. Needs head.query_refine > 0."""
    learn: list[HeadValue] = Field(default_factory=list)
    """Head values meta-learned with the adapter init (log-parametrised, so they stay positive),
    exported with the adapter and used at meta-test and by ``metapeft adapt``."""
    outer_lr: float = Field(0.01, gt=0)
    """Adam learning rate of the learned head values (of their logarithms)."""

    @model_validator(mode="after")
    def _learned_values_exist(self) -> HeadSection:
        if self.train_refined and not self.query_refine:
            raise ValueError(
                "head.train_refined=true meta-trains through head.query_refine iterations, but "
                "head.query_refine=0; set head.query_refine (e.g. 10) or head.train_refined=false"
            )
        if self.refine_prior_counts and not self.refine_prior:
            raise ValueError(
                f"head.refine_prior_counts={self.refine_prior_counts:g} smooths the class shares that "
                "head.refine_prior estimates, but head.refine_prior=false; set head.refine_prior=true "
                "or drop head.refine_prior_counts"
            )
        if self.refine_prior and not self.query_refine:
            raise ValueError(
                "head.refine_prior=true estimates class shares in the refinement, but "
                "head.query_refine=0; set head.query_refine (e.g. 3, as measured) or head.refine_prior=false"
            )
        if "name_weight" in self.learn and not self.label_names:
            raise ValueError(
                "head.learn has name_weight but head.label_names is false; set head.label_names=true"
            )
        if len(set(self.learn)) != len(self.learn):
            raise ValueError(f"head.learn lists a value twice: {self.learn}")
        if self.support_loss == "leave_one_out" and self.views:
            raise ValueError(
                f"head.views={self.views} does not combine with head.support_loss=leave_one_out (the "
                "views are scored against the clean support's prototypes); set head.views=0"
            )
        return self


# Which roles each placement key adapts (roles are expanded per architecture family in
# `metapeft_ray.core.placements`). Plain data here, so the config can check cross-field rules at load.
PLACEMENTS: dict[str, tuple[str, ...]] = {
    "attn_q": ("q",),
    "attn_v": ("v",),
    "attn_qv": ("q", "v"),
    "attn_kv": ("k", "v"),
    "attn_qkv": ("q", "k", "v"),
    "attn_all": ("q", "k", "v", "o"),
    "attn_out": ("o",),
    "ffn": ("ffn_in", "ffn_out"),
    "ffn_out": ("ffn_out",),
    "attn_ffn_out": ("o", "ffn_out"),
    "attn_kv_ffn_out": ("k", "v", "ffn_out"),
    "all_linear": ("q", "k", "v", "o", "ffn_in", "ffn_out"),
}


def _error(key: str, value: Any, message: str) -> InitErrorDetails:
    return {"type": PydanticCustomError("value_error", message), "loc": (key,), "input": value}


def _details(err: ValidationError) -> list[InitErrorDetails]:
    """``err``'s errors as they read, to raise again with others."""
    return [
        {"type": PydanticCustomError(e["type"], e["msg"]), "loc": e["loc"], "input": e["input"]}
        for e in err.errors()
    ]


def _nearest(key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean peft.{near[0]}?" if near else f"; the peft keys are {', '.join(known)}"


def _registered(kind: str, name: str, known: Mapping[str, object]) -> str:
    if name not in known:
        raise ValueError(f"not a registered {kind}; choose one of {', '.join(known)}")
    return name


class PeftSection(_Section):
    """The PEFT method, where it goes, and the methods' own options (`registry.MethodInfo.options`;
    shipped: ``rank``, ``alpha``, ``dropout``, ``init_b_std`` of lora/dora, ``num_virtual_tokens``
    of prompt/prefix, ``bottleneck_dim``, ``init_b_std`` of bottleneck), set and read flat
    (``peft.rank=4``, ``cfg.peft.rank``); `options` holds the chosen method's. Every registered
    method's options are kept (the others' unused), so a saved config holds them all."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str = "lora"
    """A registered method (`registry.METHODS`): lora, dora (LoRA with peft's weight
    decomposition), ia3, prompt (prompt tuning), prefix (prefix tuning), bottleneck (our residual
    down/up adapter after attention and/or FFN blocks)."""
    placement: str | None = None
    """Key for which modules carry adapters: attn_q, attn_v, attn_qv, attn_kv, attn_qkv, attn_all,
    attn_out, ffn, ffn_out, attn_ffn_out, attn_kv_ffn_out, all_linear — or ``custom`` with
    ``target_modules``. Unset: the method's default (lora/dora attn_qv, ia3 attn_kv_ffn_out,
    bottleneck ffn_out); prompt and prefix tuning have no placement."""
    layers: str = "all"
    """Which transformer layers: all, top_half, bottom_half, top_N, bottom_N, or a range 0-2."""
    target_modules: list[str] | None = None

    @property
    def options(self) -> registry.MethodOptions:
        """The chosen method's own options (what its `AdapterSpec` carries)."""
        declared = registry.METHODS[self.method].options
        return declared(**{k: getattr(self, k) for k in declared.model_fields})

    @model_validator(mode="wrap")
    @classmethod
    def _method_options(
        cls, data: Any, handler: ModelWrapValidatorHandler[PeftSection], info: ValidationInfo
    ) -> PeftSection:
        """Every other key is an option, validated by the chosen method's options if they have it,
        else by the first registered method's that do (kept, unused). Set by an override (the
        command line, Tune, ``with_overrides``) to anything but its default, an option the chosen
        method does not take is refused: it would change nothing. Files and saved configs are not
        overrides, so a saved config, which holds every option, loads as it was written."""
        if not isinstance(data, dict):
            return handler(data)
        chosen = registry.METHODS.get(data.get("method", "lora"))
        own = chosen.options.model_fields if chosen else {}
        overridden = (info.context or {}).get("overridden", ())
        owners = registry.option_owners()
        given = {k: v for k, v in data.items() if k not in cls.model_fields}
        known = [*cls.model_fields, *owners]
        errors = [
            _error(k, v, f"unknown key{_nearest(k, known)}") for k, v in given.items() if k not in owners
        ]
        options: dict[str, Any] = {}
        if chosen:
            mine = {k: given[k] for k in own if k in given}
            try:
                options |= chosen.options.model_validate(mine).model_dump()
            except ValidationError as err:
                errors += _details(err)
        for key, infos in owners.items():
            if key in own:
                continue
            model = infos[0].options
            try:
                valid = model.model_validate({key: given[key]} if key in given else {})
            except ValidationError as err:
                errors += _details(err)
                continue
            options[key] = value = getattr(valid, key)
            default = model.model_fields[key].default
            if chosen and f"peft.{key}" in overridden and value != default:
                takes = "/".join(i.name for i in infos)
                errors.append(
                    _error(
                        key,
                        value,
                        f"peft.{key}={value} applies to {takes} only, not to peft.method={chosen.name}; "
                        f"drop it (or set peft.{key}={default})",
                    )
                )
        try:
            section = handler({**{k: v for k, v in data.items() if k in cls.model_fields}, **options})
        except ValidationError as err:
            errors = _details(err) + errors
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return section

    @field_validator("method")
    @classmethod
    def _method_is_registered(cls, method: str) -> str:
        return _registered("PEFT method", method, registry.METHODS)

    @model_validator(mode="before")
    @classmethod
    def _method_default_placement(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("placement") is None:
            info = registry.METHODS.get(data.get("method", "lora"))
            if info is not None:
                data = {**data, "placement": info.default_placement}
        return data

    @model_validator(mode="after")
    def _cross_field_rules(self) -> PeftSection:
        m, info = self.method, registry.METHODS[self.method]
        if info.virtual_tokens_at:
            where = info.virtual_tokens_at
            problems = []
            if self.placement is not None or self.target_modules:
                problems.append(
                    f"peft.placement={self.placement!r} does not apply to peft.method={m} (its virtual "
                    f"tokens are prepended to {where}, not placed in modules); set peft.placement=null"
                )
            if self.layers != "all":
                problems.append(
                    f"peft.layers={self.layers!r} does not apply to peft.method={m}: peft prepends the "
                    f"virtual tokens to {where} and offers no per-layer selection; use peft.layers=all"
                )
            if problems:
                raise ValueError("; ".join(problems))
            return self
        if self.placement == "custom" and not self.target_modules:
            raise ValueError("peft.placement=custom needs peft.target_modules (a list of names)")
        if self.placement != "custom" and self.target_modules:
            raise ValueError(
                f"peft.target_modules is only used with peft.placement=custom "
                f"(got placement={self.placement!r}); drop one of them"
            )
        if info.roles is not None and self.placement in PLACEMENTS:
            roles = PLACEMENTS[self.placement]
            if not set(roles) <= info.roles:
                raise ValueError(
                    f"peft.method={m} {info.roles_why}, but peft.placement={self.placement} adapts "
                    f"{', '.join(roles)}; {info.roles_fix}"
                )
        return self


class MetaSection(_Section):
    algorithm: str = "maml"
    """A registered algorithm (`registry.ALGORITHMS`): maml (Proto-MAML head; second order unless
    first_order), metasgd (MAML with learned per-tensor/per-parameter inner learning rates),
    reptile (first-order, no query gradient), protonet (prototypical loss on the PEFT-adapted
    encoder, no inner steps at training)."""
    first_order: bool = False
    """maml / metasgd: drop the second-order terms. Reptile and protonet never need them."""
    inner_steps: int = Field(1, ge=0)
    inner_lr: float = Field(0.05, gt=0)
    meta_batch_size: int = Field(4, ge=1)
    outer_lr: float = Field(1e-3, gt=0)
    outer_optimizer: Literal["adam", "sgd"] = "adam"
    """The outer update of the meta-parameters. Reptile with sgd and outer_lr = epsilon is classic
    Reptile, phi_0 <- phi_0 + epsilon (mean phi_K - phi_0)."""
    metasgd_granularity: Literal["tensor", "parameter", "step"] = "tensor"
    """Meta-SGD: one learned learning rate per adapter tensor, one per adapter parameter, or one per
    adapter tensor and inner step (MAML++'s per-layer per-step rates, LSLR)."""
    metasgd_lr_init: float | None = Field(None, gt=0)
    """Meta-SGD: initial inner learning rates (default meta.inner_lr)."""
    metasgd_outer_lr: float = Field(0.01, gt=0)
    """Meta-SGD: outer learning rate of the log learning rates (an Adam step of 0.01 changes a
    learning rate by about 1 %)."""
    meta_steps: int = Field(50, ge=0)
    pretrain_steps: int = Field(0, ge=0)
    """Supervised pre-meta-training (IntentBERT-style): the first pretrain_steps of the meta_steps
    outer updates each score meta.pretrain_batch meta-train texts against every meta-train class's
    name (the name-prior head with no support: needs head.label_names), the rest are episodic."""
    pretrain_batch: int = Field(64, ge=1)
    """The labelled texts of one supervised step, drawn from all the meta-train classes."""
    val_every: int = Field(25, ge=1)
    val_episodes: int = Field(20, ge=1)
    checkpoint_every: int = Field(25, ge=1)
    keep: Literal["last", "best"] = "last"
    """The meta-parameters a run exports and meta-tests: those of the last meta-step, or (best)
    those of the validation with the highest meta_val_accuracy (every meta.val_every steps and at
    the last; the earliest of equal ones), so a long run is not judged by where it drifted to.
    Checkpoints carry the best so far, so a resumed run keeps it."""
    patience: int | None = Field(None, ge=1)
    """Early stopping: end training once meta_val_accuracy has not beaten its best for this many
    validations (patience x meta.val_every steps); None trains to meta.meta_steps. A stopped run
    is finished (``stopped_early`` in ``training.json``); pair it with meta.keep=best."""

    @field_validator("algorithm")
    @classmethod
    def _algorithm_is_registered(cls, algorithm: str) -> str:
        return _registered("meta-algorithm", algorithm, registry.ALGORITHMS)

    @model_validator(mode="after")
    def _steps_fit_the_algorithm(self) -> MetaSection:
        a, k = self.algorithm, self.inner_steps
        info = registry.ALGORITHMS[a]
        low, high = info.inner_steps
        if k < low:
            raise ValueError(
                f"meta.algorithm={a} {info.steps_why} and needs meta.inner_steps >= {low} (got {k})"
            )
        if high is not None and k > high:
            most = "no" if high == 0 else f"at most {high}"
            raise ValueError(
                f"meta.algorithm={a} {info.steps_why} and takes {most} inner steps, but "
                f"meta.inner_steps={k}; set meta.inner_steps={high}"
            )
        return self

    @property
    def second_order(self) -> bool:
        """Whether the inner loop's graph is differentiated (then the backbone needs eager
        attention): MAML and Meta-SGD unless first_order; Reptile and ProtoNet never."""
        return registry.ALGORITHMS[self.algorithm].second_order and not self.first_order


EvalMethod = Literal[
    "meta",
    "meta_init",
    "meta_logreg",
    "proto",
    "logreg",
    "proto_names",
    "logreg_names",
    "proto_names_refined",
    "finetune",
    "full_finetune",
    "setfit",
]
COSTLY_METHODS = ("finetune", "full_finetune", "setfit")
"""Baselines that train per episode; they run on the first ``eval.costly_episodes`` of a cell."""


class FinetuneSettings(_Section):
    """A per-episode fine-tuning baseline: Adam on the support loss for ``steps`` full-batch steps,
    head initialised from the support prototypes."""

    steps: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)


class SetFitSettings(_Section):
    """SetFit (Tunstall et al. 2022) on the frozen backbone's sentence-transformers body:
    contrastive fine-tuning on support pairs, then logistic regression (PyPI ``setfit``)."""

    iterations: int = Field(20, ge=1)
    """Pairs drawn per support example (SetFit's ``num_iterations``; its documented default)."""
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-5, gt=0)


class EvalSection(_Section):
    episodes: int = Field(100, ge=1)
    n_way: int | list[int] = 5
    """Ways of the meta-test cells (one value or a list); every way is run at every shot."""
    shots: list[int] = Field(default_factory=lambda: [1, 5], min_length=1)
    q_query: int = Field(5, ge=1)
    query_alpha: float = Field(0.0, ge=0)
    """0: every class of a test episode has q_query queries. > 0: the episode's n_way x q_query
    queries are split among its classes by proportions drawn from a symmetric Dirichlet of this
    concentration (2 in Veilleux et al. 2021, "Realistic evaluation of transductive few-shot
    learning"), the test of a transductive head (head.query_refine) on batches that are not one
    class in turn. Inductive rows classify each query alone: for them only which queries count changes."""
    dataset: str | None = None
    """Meta-test on another dataset (packaged name, local file, ``s3://``, ``hf://``) instead of
    the held-out test classes of ``data.dataset``; the training data then keeps all its classes
    for meta-train and meta-val (cross-dataset protocol)."""
    classes: list[str] | None = None
    """With ``eval.dataset``: the classes to meta-test on (names or glob patterns); unset = all."""
    inner_steps: int | None = Field(None, ge=0)
    """Adaptation steps at meta-test; defaults to meta.inner_steps."""
    inner_lr: float | None = Field(None, gt=0)
    methods: list[EvalMethod] = Field(
        default_factory=lambda: ["meta", "meta_init", "proto", "logreg", "finetune"], min_length=1
    )
    """meta (the meta-learned init + adaptation), meta_init (the same init, no adaptation),
    meta_logreg (logistic regression on the meta-learned encoder's support embeddings, with the
    class names as examples when head.label_names),
    proto / logreg (frozen backbone + prototypes / logistic regression), proto_names /
    logreg_names (the same with each class name's embedding as one more support example: the
    fair comparison for head.label_names), proto_names_refined (proto_names refined on the
    unlabelled queries like head.query_refine: the fair comparison for it), finetune (the PEFT
    method from peft's default init, fine-tuned with Adam), full_finetune (every backbone weight,
    Adam), setfit (needs ``pip install metapeft_ray[baselines]``)."""
    reference: Literal["proto", "logreg"] = "logreg"
    """The frozen baseline every other row is compared with, paired on the same episodes (when
    it is one of ``eval.methods``)."""
    costly_episodes: int = Field(100, ge=1)
    """finetune, full_finetune and setfit run on the first N episodes of each cell (paired
    statistics against the reference use the same prefix)."""
    # Defaults chosen on meta-val classes (benchmarks/baseline_grid.py, results/baseline_grid.md).
    finetune: FinetuneSettings = Field(default_factory=lambda: FinetuneSettings(steps=20, lr=3e-3))
    full_finetune: FinetuneSettings = Field(default_factory=lambda: FinetuneSettings(steps=10, lr=3e-5))
    setfit: SetFitSettings = Field(default_factory=SetFitSettings)

    @model_validator(mode="after")
    def _cells_valid(self) -> EvalSection:
        problems = []
        if bad := [k for k in self.shots if k < 1]:
            problems.append(f"eval.shots must be >= 1, got {bad}")
        if bad := [n for n in self.ways if n < 2]:
            problems.append(f"eval.n_way must be >= 2, got {bad}")
        if self.classes is not None and self.dataset is None:
            problems.append(
                "eval.classes picks classes of eval.dataset, which is not set; set eval.dataset "
                "(cross-dataset), or name the test classes of data.dataset with data.splits"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def ways(self) -> list[int]:
        return [self.n_way] if isinstance(self.n_way, int) else list(self.n_way)

    @property
    def cells(self) -> list[tuple[int, int]]:
        """(n_way, k_shot) of every meta-test cell, in report order."""
        return [(n, k) for n in self.ways for k in self.shots]


class DistributedSection(_Section):
    """How `metapeft train` uses Ray (ignored with ``--local``)."""

    workers: int = Field(2, ge=1)
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    """auto: one GPU per worker when the cluster has GPUs, or its autoscaler publishes node
    types that have them; else CPUs. yes on an autoscaling cluster whose autoscaler does not
    publish its node types (Ray 2.60's KubeRay and cluster-launcher autoscalers) and whose GPU
    nodes are not up yet."""
    cpus_per_worker: float = Field(1.0, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Extra custom Ray resources per worker, e.g. {"meta_worker": 1}."""
    max_failures: int = Field(3, ge=0)
    """Worker-group restarts from the last checkpoint before the run fails."""
    local_num_cpus: int | None = Field(None, ge=1)
    """CPUs of the embedded local Ray started when no address is given (default: all)."""
    local_object_store_mb: int = Field(512, ge=64)

    @model_validator(mode="before")
    @classmethod
    def _yaml_booleans(cls, data: Any) -> Any:
        """YAML reads ``use_gpu: yes`` and the override ``distributed.use_gpu=yes`` as true."""
        if isinstance(data, dict) and isinstance(data.get("use_gpu"), bool):
            data = {**data, "use_gpu": "yes" if data["use_gpu"] else "no"}
        return data


class Config(_Section):
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    episode: EpisodeSection = Field(default_factory=EpisodeSection)
    model: ModelSection = Field(default_factory=ModelSection)
    peft: PeftSection = Field(default_factory=PeftSection)
    head: HeadSection = Field(default_factory=HeadSection)
    meta: MetaSection = Field(default_factory=MetaSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    @model_validator(mode="after")
    def _leave_one_out_needs_a_second_example(self) -> Config:
        one_shot = [k for k in (self.episode.k_shot, *self.episode.train_shots, *self.eval.shots) if k < 2]
        if self.head.support_loss == "leave_one_out" and not self.head.label_names and one_shot:
            raise ValueError(
                "head.support_loss=leave_one_out leaves a 1-shot example nothing to be scored against "
                f"(episode.k_shot={self.episode.k_shot}, eval.shots={self.eval.shots}); set "
                "head.label_names=true (its class name is then its prototype) or use k_shot >= 2"
            )
        return self

    @model_validator(mode="after")
    def _pretraining_scores_against_the_names(self) -> Config:
        m = self.meta
        if m.pretrain_steps and not self.head.label_names:
            raise ValueError(
                f"meta.pretrain_steps={m.pretrain_steps} scores each text against the class names, "
                "but head.label_names=false; set head.label_names=true or meta.pretrain_steps=0"
            )
        if m.pretrain_steps > m.meta_steps:
            raise ValueError(
                f"meta.pretrain_steps={m.pretrain_steps} counts within meta.meta_steps={m.meta_steps} "
                f"(the first {m.pretrain_steps} outer updates are supervised); raise meta.meta_steps "
                f"to {m.pretrain_steps} + the episodic steps you want"
            )
        return self

    @model_validator(mode="after")
    def _refined_baseline_needs_iterations(self) -> Config:
        if "proto_names_refined" in self.eval.methods and not self.head.query_refine:
            raise ValueError(
                "eval.methods has proto_names_refined, which refines the frozen prototypes "
                "head.query_refine times on the queries, but head.query_refine=0; set "
                "head.query_refine (e.g. 10) or drop proto_names_refined from eval.methods"
            )
        return self

    @model_validator(mode="after")
    def _learned_head_needs_a_query_gradient(self) -> Config:
        if self.head.learn and not registry.ALGORITHMS[self.meta.algorithm].query_gradient:
            use = ", ".join(n for n, a in registry.ALGORITHMS.items() if a.query_gradient)
            raise ValueError(
                f"head.learn={self.head.learn} needs the query loss's gradient, which "
                f"meta.algorithm={self.meta.algorithm} never takes; use {use}, or set head.learn=[]"
            )
        if "inner_scale" in self.head.learn and not self.meta.second_order:
            raise ValueError(
                "head.learn has inner_scale, which acts on the query loss only through the inner "
                "gradients: first-order MAML and ProtoNet treat those as constants, so it would never "
                "move; use second-order maml/metasgd (meta.first_order=false) or drop inner_scale"
            )
        return self

    @model_validator(mode="after")
    def _checkpointing_fits_the_method(self) -> Config:
        why = registry.METHODS[self.peft.method].no_activation_checkpointing
        if self.model.activation_checkpointing and why:
            raise ValueError(
                f"model.activation_checkpointing=true does not work with peft.method={self.peft.method}: "
                f"{why}; use another method or set model.activation_checkpointing=false"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A re-validated copy with dotted-path overrides applied (used by Tune trials)."""
        return validate_config(apply_overrides(self.to_dict(), overrides), overridden=overrides)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<config>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (check the spelling; see configs/*.yaml)")
        elif isinstance(e.get("input"), dict):  # a rule across a section's keys: the message names them
            lines.append(f"  {path}: {msg}")
        else:
            lines.append(f"  {path}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def validate_config(raw: Mapping[str, Any], overridden: Iterable[str] = ()) -> Config:
    """``overridden``: the dotted keys an override set (the rest were written in a file, or saved
    with a run): `PeftSection` refuses an override of an option the method does not take."""
    try:
        return Config.model_validate(raw, context={"overridden": frozenset(overridden)})
    except ValidationError as err:
        raise ConfigError(f"invalid config, {err.error_count()} problem(s):\n{_format_errors(err)}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """``meta.inner_steps=3`` -> ("meta.inner_steps", 3); the value is read as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    tree = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {part!r} is a value, not a section")
            node = child
        node[leaf] = value
    return tree


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a shipped config (``quickstart`` -> configs/quickstart.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = PACKAGED_CONFIGS / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml", ".yml") and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config {str(name_or_path)!r} not found; give a path or one of: {names}")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        file = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{file}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
        raw = loaded
    parsed = dict(parse_override(o) for o in overrides)
    return validate_config(apply_overrides(raw, parsed), overridden=parsed)

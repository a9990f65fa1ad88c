"""The search space of ``metapeft tune`` (Ray-free): its schema, its loading and its checks.

A space file has ``search:`` (dotted config paths, each with one distribution) and ``tune:``
(the search's settings, `TuneSettings`). `load_space` checks every dotted path against the
config tree, all problems at once, so ``metapeft submit --command tune`` (`metapeft_ray.on_ray.jobs`)
rejects a bad space on the client without importing Ray Tune; `metapeft_ray.on_ray.tune` turns a
checked space into Tune's samplers and runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from metapeft_ray.core import registry
from metapeft_ray.core.config import PACKAGED_CONFIGS, Config, ConfigError

__all__ = ["Distribution", "SearchSpace", "TuneSettings", "base_point", "load_space", "trial_config"]


class Distribution(BaseModel):
    """Exactly one of: ``choice: [..]``, ``uniform: [lo, hi]``, ``loguniform: [lo, hi]``,
    ``randint: [lo, hi]`` (hi exclusive)."""

    model_config = ConfigDict(extra="forbid")
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k, v in self if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of choice, uniform, loguniform, randint (got {given or 'none'})"
            )
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        return self

    def contains(self, value: Any) -> bool:
        if self.choice is not None:
            return value in self.choice
        if self.randint is not None:
            return isinstance(value, int) and self.randint[0] <= value < self.randint[1]
        lo, hi = self.uniform or self.loguniform  # type: ignore[misc]
        return isinstance(value, int | float) and lo <= value <= hi

    def sample_value(self) -> Any:
        """A value of the right type, to check the dotted path against the config tree."""
        return self.choice[0] if self.choice is not None else next(v for _, v in self if v is not None)[0]


class TuneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_samples: int = Field(8, ge=1)
    searcher: Literal["optuna", "random", "grid"] = "optuna"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    """In validation reports (one every ``meta.val_every`` meta-steps)."""
    reduction_factor: float = Field(2.0, gt=1)
    max_concurrent: int | None = Field(None, ge=1)
    trial_cpus: float = Field(1.0, gt=0)
    """CPUs of a single-process trial (``trial_workers: 1``)."""
    trial_gpus: float | Literal["auto"] = "auto"
    """GPUs of a single-process trial: a fraction (0.25: four trials share a GPU) or a whole
    number. auto: 1 when the cluster has GPUs or can scale to nodes that have them, else 0. A
    distributed trial's workers take theirs from ``distributed.use_gpu`` instead."""
    trial_workers: int = Field(1, ge=1)
    """Ray Train workers per trial. 1: a trial meta-trains in its own process (cheap, many in
    parallel). More: each trial runs a `TorchTrainer` with that many workers (resources from
    ``distributed.*``), Tune receives its reports through `TuneReportCallback`, the trial's own
    process only waits (no CPU, ``tune.DRIVER_MEMORY``), and as many trials run at once as the
    cluster holds workers for. Needs the cluster's state API (the dashboard), checked before
    the search starts."""
    second_objective: Literal["trainable_params", "adapt_ms"] | None = "trainable_params"
    compare_base: bool = True
    """Run the base config's own values as the first trial and meta-test it next to the best one,
    so the report says what the search gained over where it started (same budget, same
    episodes). Skipped when a base value lies outside the space."""
    seed: int = 0

    @model_validator(mode="after")
    def _gpus_valid(self) -> TuneSettings:
        g = self.trial_gpus
        if g == "auto":
            return self
        if g < 0 or (g > 1 and g != int(g)):
            raise ValueError(
                f"tune.trial_gpus={g!r}: give a fraction of one GPU (0 to 1) or a whole number of "
                "GPUs (Ray cannot place e.g. 1.5), or auto"
            )
        if g > 0 and self.trial_workers > 1:
            raise ValueError(
                f"tune.trial_gpus={g!r} sizes a single-process trial, but tune.trial_workers="
                f"{self.trial_workers} makes each trial a distributed run whose workers take GPUs "
                "from distributed.use_gpu; drop tune.trial_gpus (or set it to auto)"
            )
        return self


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    search: dict[str, Distribution] = Field(min_length=1)
    tune: TuneSettings = Field(default_factory=TuneSettings)


def load_space(path: str | Path, base: Config) -> SearchSpace:
    """Parse and check a space file: every dotted path must exist in the config tree and take
    the sampled type (all problems listed at once)."""
    file = Path(path)
    if not file.is_file() and (PACKAGED_CONFIGS / "spaces" / f"{file.stem}.yaml").is_file():
        file = PACKAGED_CONFIGS / "spaces" / f"{file.stem}.yaml"
    if not file.is_file():
        raise ConfigError(f"search space {str(path)!r} not found (give a path, or `default`)")
    try:
        space = SearchSpace.model_validate(yaml.safe_load(file.read_text()) or {})
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{file}: invalid search space:\n" + "\n".join(lines)) from None
    problems = []
    for key, dist in space.search.items():
        try:
            base.with_overrides({key: dist.sample_value()})
        except ConfigError as err:
            problems.append(f"  search.{key}: {str(err).splitlines()[-1].strip()}")
    if problems:
        raise ConfigError(f"{file}: search keys that do not fit the config tree:\n" + "\n".join(problems))
    return space


def base_point(base: Config, space: SearchSpace) -> dict[str, Any] | None:
    """The base config's value of every searched key, or None if one lies outside the space."""
    point = {}
    for key, dist in space.search.items():
        node: Any = base.to_dict()
        for part in key.split("."):
            node = node[part]
        if not dist.contains(node):
            return None
        point[key] = node
    return point


def trial_config(base: Config, point: Mapping[str, Any]) -> Config:
    """``base`` with a sampled point applied, less the ``peft.*`` options the trial's method does
    not take: a space that searches ``peft.method`` with ``peft.rank`` runs its IA3 trials
    without a rank, where a plain override of it would be refused."""
    method = registry.METHODS.get(point.get("peft.method", base.peft.method))
    unused = set(registry.option_owners()) - set(method.options.model_fields if method else ())
    return base.with_overrides({k: v for k, v in point.items() if k.removeprefix("peft.") not in unused})

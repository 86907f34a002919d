"""Study spec: one YAML file -> a validated `Spec` -> the list of trials it asks for.

The spec's sections `data`, `model`, `pretrain`, `finetune` and `runtime` are the training
core's own configs (model/config.py), so a YAML key, a `--set` key, an MLflow param and the
core's argument are the same dotted name. `search` maps dotted paths to grid values
(`finetune.label_fraction: [0.1, 1.0]`); a trial is a method, a seed and one value per axis,
resolved with the same `Spec` model (`Trial.resolve`).

Validation happens once, here, at the edge. A bad spec raises `SpecError` whose message names
the file, the key path (`search.finetune.label_fraction[1]`), what is allowed, and, for a
misspelt key or value, the closest valid one. `python -m harness.sweep` prints it and exits
with status 2 before it starts Ray or touches MLflow. docs/harness.md lists every section.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.spec_errors import SpecError, at, describe, reject_old_keys, unknown
from model import arms, names
from model.config import (
    DataConfig,
    FinetuneConfig,
    ModelChoice,
    PretrainConfig,
    RuntimeConfig,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Annotated[int, Field(ge=1)]

# The keys that describe the grid, not one trial's settings (a trial's spec drops them).
GRID_KEYS = ("search", "optuna", "exclude")
# Sections a search axis may vary (dotted paths into them: `finetune.label_fraction`).
SEARCHABLE = ("data", "model", "pretrain", "finetune")


class Distribution(_Section):
    """One Optuna search dimension: `uniform` / `loguniform` in [low, high], or `choice`."""

    type: Literal["uniform", "loguniform", "choice"]
    low: float | None = Field(default=None, allow_inf_nan=False)
    high: float | None = Field(default=None, allow_inf_nan=False)
    values: list[float] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Distribution:
        if self.type == "choice":
            if not self.values:
                raise at(("values",), "a non-empty list is required for type 'choice'")
            return self
        if self.low is None or self.high is None:
            missing = "low" if self.low is None else "high"
            raise at((missing,), f"required for type {self.type!r}")
        if not self.low < self.high:
            raise at(("high",), f"must be greater than low ({self.low})")
        if self.type == "loguniform" and self.low <= 0:
            raise at(("low",), "must be > 0 for type 'loguniform'")
        return self


class OptunaSearch(_Section):
    """Optuna samples these dotted paths (e.g. `pretrain.w_reproj`) for `num_samples` trials."""

    num_samples: Annotated[int, Field(ge=1, le=100_000)] = 8
    seed: int = 0
    params: dict[str, Distribution]

    @field_validator("params")
    @classmethod
    def _some(cls, params: dict) -> dict:
        if not params:
            raise ValueError("give at least one dotted path to sample, e.g. pretrain.w_reproj")
        return params


class ResourcesSection(_Section):
    # Per worker. With workers > 1 each trial is a Ray Train data-parallel job of that many
    # workers (harness.distributed; docs/scaling.md); 1: the trial trains in its own process.
    cpu: Annotated[float, Field(gt=0, le=1024, allow_inf_nan=False)] = 1.0
    gpu: Annotated[float, Field(ge=0, le=64, allow_inf_nan=False)] = 0.0
    workers: Annotated[int, Field(ge=1, le=4096)] = 1


class SequentialSeeds(_Section):
    """Seeds in rounds with a group-sequential design (analysis.sequential): seeds 0, 1, ...
    run `first` at once, then `step` more per round, `max` at most. After each round every
    comparison with the reference cell (default: supervised at 100 % labels) is looked at
    with boundaries from `spending` at two-sided level `alpha`; one that is decided (better,
    worse, equivalent within `margin`, or with `futility` futile) runs no more seeds."""

    first: Annotated[int, Field(ge=2, le=10_000)]
    step: Annotated[int, Field(ge=1, le=10_000)] = 1
    max: Annotated[int, Field(ge=2, le=10_000)]
    alpha: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 0.05
    spending: Literal["obrien_fleming", "pocock"] = "obrien_fleming"
    futility: bool = False
    margin: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    reference: str | None = None  # a cell VARIANT@FRACTION, e.g. supervised@1.0

    @model_validator(mode="after")
    def _rounds(self) -> SequentialSeeds:
        if self.max < self.first:
            raise at(("max",), f"must be >= first ({self.first}), got {self.max}")
        if self.reference is not None:
            from analysis.stats import parse_cell  # the analysis CLIs' own cell syntax

            try:
                parse_cell(self.reference)
            except ValueError as exc:
                raise at(("reference",), f"{exc} (e.g. supervised@1.0)") from None
        return self

    def design(self):
        """The analysis.sequential.SequentialDesign these settings describe."""
        from analysis.sequential import SequentialDesign

        return SequentialDesign(**self.model_dump(exclude={"reference"}))

    def rounds(self) -> list[list[int]]:
        """The seeds of each round: 0 .. first-1, then `step` more each, the last ending at max."""
        ends = self.design().rounds()
        return [list(range(start, end)) for start, end in zip((0, *ends), ends, strict=False)]


class SeedRounds(_Section):
    """`seeds: {sequential: {...}}`: the sweep decides how many seeds each comparison needs."""

    sequential: SequentialSeeds


def _seeds_kind(value: Any) -> str:
    return "(rounds)" if isinstance(value, (dict, SeedRounds)) else "(list)"


# `seeds`: a fixed list, or sequential rounds. The union's tags ("(list)", "(rounds)") are
# dropped from the key paths of error messages (harness.spec_errors).
SeedList = Annotated[list[int], Tag("(list)"), Field(min_length=1)]
Seeds = Annotated[SeedList | Annotated[SeedRounds, Tag("(rounds)")], Discriminator(_seeds_kind)]


class SchedulerSection(_Section):
    type: Literal["none", "asha"] = "none"
    grace_period: PositiveInt = 1  # reporting periods (epochs, or budget.every steps) first
    reduction_factor: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 2.0


class MlflowSection(_Section):
    tracking_uri: str | None = None  # default sqlite:///<storage_path>/mlflow.db
    experiment: str | None = None  # default: the study name
    system_metrics: bool = True
    system_metrics_interval_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 10.0
    # Upload each finished trial's fine-tuned checkpoint (model/finetune.pt, tag
    # bev.model_artifact) and a BEV prediction image per validation.
    log_checkpoint: bool = True
    log_images: bool = True


class RaySection(_Section):
    address: str | None = None  # an existing cluster ("auto", "host:port"); default: local
    # A trial's worker process runs the next trial too (Ray Tune's `reuse_actors`), instead of
    # a fresh process paying the imports again (about 8 s of torch, the model and MLflow).
    reuse_workers: bool = True


class Spec(_Section):
    study: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str = ""
    # The training core's own configs (model/config.py), validated as they are.
    data: DataConfig = DataConfig()
    model: ModelChoice = ModelChoice()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    # Grid axes: dotted path -> values; every combination runs (see expand_trials). A value
    # that is a mapping sets several keys of the section at that path together (one axis:
    # `data: [{pseudo_label_source: oracle}, {pseudo_label_noise: clean}]`).
    search: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    # Grid points not to run: each entry a `method` and/or axis values; a trial matching all
    # of an entry's keys is left out (`{method: pretrained, finetune.label_fraction: 1.0}`).
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    optuna: OptunaSearch | None = None
    # The arms of model.arms to run (`supervised`, `pretrained`, `pct`, ...).
    methods: list[str] = Field(
        default_factory=lambda: list(arms.DEFAULT_METHODS), min_length=1, validate_default=True
    )
    # What a compute-matched arm gets on top of its budget: the optimiser steps of its twin's
    # whole pretraining, or that divided among the trials sharing it.
    compute_matched: Literal["whole", "amortised"] = "whole"
    # A list of seeds, or `{sequential: {first, step, max, ...}}` (SequentialSeeds).
    seeds: Seeds = Field(default_factory=lambda: [0])
    resources: ResourcesSection = ResourcesSection()
    scheduler: SchedulerSection = SchedulerSection()
    retries: Annotated[int, Field(ge=0, le=100)] = 1  # Ray Tune FailureConfig.max_failures
    max_concurrent: PositiveInt | None = None
    mlflow: MlflowSection = MlflowSection()
    ray: RaySection = RaySection()
    storage_path: str | None = None  # default studies/<study>, relative to the working dir

    @field_validator("methods")
    @classmethod
    def _known_arms(cls, values: list) -> list:
        for i, value in enumerate(values):
            if value not in arms.names():
                raise at((i,), unknown("value", value, arms.names()))
        return values

    @field_validator("methods", "seeds")
    @classmethod
    def _unique(cls, values: list | SeedRounds) -> list | SeedRounds:
        if isinstance(values, SeedRounds):
            return values
        duplicates = sorted({v for v in values if values.count(v) > 1}, key=str)
        if duplicates:
            raise ValueError(f"duplicate entries {duplicates}")
        return values

    @field_validator("search")
    @classmethod
    def _axes(cls, search: dict) -> dict:
        for path, values in search.items():
            _check_path((path,), path, values)
            seen: list = []
            for i, value in enumerate(values):
                if value in seen:
                    raise at((path, i), f"duplicate value {value!r}")
                seen.append(value)
        return search

    @model_validator(mode="after")
    def _search_rules(self) -> Spec:
        if self.resources.gpu > 0 and self.runtime.device == "cpu":
            what = "GPUs" if self.resources.workers > 1 else "GPU"
            raise at(("runtime", "device"), f"'cpu' with resources.gpu > 0 wastes the {what}")
        base = self.model_dump(mode="json", exclude=set(GRID_KEYS))
        lengths = self.search.get(names.PRETRAIN_EPOCHS, [])
        if self.pretrain.optim.schedule == "wsd":  # the lengths of one trunk, shortest first
            for i, value in enumerate(lengths):
                if type(value) is not int:
                    raise at(
                        ("search", names.PRETRAIN_EPOCHS, i), f"{value!r}: wsd lengths are integers"
                    )
                if i and value <= lengths[i - 1]:
                    raise at(
                        ("search", names.PRETRAIN_EPOCHS, i),
                        f"wsd lengths must increase: {value} after {lengths[i - 1]}",
                    )
        for path, values in self.search.items():
            for i, value in enumerate(values):
                _validate_override(base, path, value, ("search", path, i))
        self._exclude_rules()
        optuna = self.optuna
        if optuna is not None:
            if self.exclude:
                raise at(("exclude",), "an Optuna search samples its trials: no grid to exclude")
            if len(self.methods) != 1 or not arms.get(self.methods[0]).pretrains:
                pretraining = ", ".join(a.name for a in arms.all_arms() if a.pretrains)
                raise at(("methods",), f"an Optuna search needs methods: [{pretraining}]")
            if len(self.seed_list) != 1 or self.sequential is not None:
                raise at(("seeds",), "an Optuna search takes a single seed (grid seeds by study)")
            for path, values in self.search.items():
                if len(values) != 1:
                    raise at(("search", path), "an Optuna search takes a single value here")
            for path, dist in optuna.params.items():
                _check_path(("optuna", "params", path), path)
                if path in self.search:
                    raise at(("search", path), f"sampled by optuna.params.{path} already")
                probe = dist.values[0] if dist.type == "choice" else dist.low
                _validate_override(base, path, probe, ("optuna", "params", path))
        if self.scheduler.type == "asha" and self.sequential is not None:
            raise at(("seeds", "sequential"), "compares finished trials; ASHA stops them early")
        if self.scheduler.type == "asha":
            periods = self.finetune.budget.periods(self.finetune.batch_size, self.resources.workers)
            if self.scheduler.grace_period > periods:
                raise at(
                    ("scheduler", "grace_period"),
                    f"must be <= the {periods} reporting periods of finetune.budget",
                )
            for i, method in enumerate(self.methods):
                if arms.get(method).matched_to is not None:
                    raise at(("methods", i), f"{method} runs longer than ASHA's max_t")
        return self

    def _exclude_rules(self) -> None:
        """Each entry names the method or search axes it matches, with values they take."""
        for i, entry in enumerate(self.exclude):
            if not entry:
                raise at(("exclude", i), "an entry names a method and/or search axis values")
            for key, value in entry.items():
                allowed = self.methods if key == "method" else self.search.get(key)
                if allowed is None:
                    axes = ", ".join(["method", *self.search])
                    raise at(("exclude", i, key), f"not a search axis; allowed: {axes}")
                if value not in allowed:
                    raise at(("exclude", i, key), f"{value!r} is none of its values {allowed}")

    @property
    def seed_list(self) -> list[int]:
        """Every seed the study may run: the list, or 0 .. max-1 of sequential rounds."""
        if isinstance(self.seeds, SeedRounds):
            return list(range(self.seeds.sequential.max))
        return list(self.seeds)

    @property
    def sequential(self) -> SequentialSeeds | None:
        return self.seeds.sequential if isinstance(self.seeds, SeedRounds) else None

    def seed_rounds(self) -> list[list[int]]:
        """The seeds of each round; a fixed list is one round."""
        return self.sequential.rounds() if self.sequential else [self.seed_list]

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.study

    def storage_dir(self) -> Path:
        """The study folder: Ray Tune storage, caches, synthetic data, default MLflow store."""
        return Path(self.storage_path or f"studies/{self.study}").expanduser().resolve()

    def config_hash(self) -> str:
        return stable_hash(self.model_dump(mode="json"))


def _check_path(loc: tuple, path: str, values: list | None = None) -> None:
    head = path.split(".", 1)[0]
    whole_section = path in SEARCHABLE and values and all(isinstance(v, dict) for v in values)
    if head not in SEARCHABLE or ("." not in path and not whole_section):
        raise at(
            loc[:-1] + (path,),
            f"a search axis is a dotted path into {', '.join(SEARCHABLE)} "
            "(e.g. finetune.label_fraction)",
        )


def _validate_override(base: dict, path: str, value: Any, loc: tuple) -> None:
    """Raise at `loc` unless the spec with `path` set to `value` is valid."""
    raw = copy.deepcopy(base)
    try:
        set_path(raw, path, value)
        Spec.model_validate(raw)
    except (ValidationError, KeyError, TypeError) as exc:
        if isinstance(exc, ValidationError):
            detail = describe(exc.errors()[0], Spec)
        else:
            detail = f"no key {path}"
        raise at(loc, f"{value!r} is not valid here: {detail}") from None


def set_path(raw: dict, path: str, value: Any) -> None:
    """Set dotted `path` in the nested dict `raw`, creating sections on the way; a mapping
    set on a section sets its keys (recursively), leaving the section's other keys as they are."""
    parts = path.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TypeError(f"{part} is not a section")
        node = child
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        for key, item in value.items():
            set_path(node[parts[-1]], key, item)
    else:
        node[parts[-1]] = value


# --- loading -------------------------------------------------------------------------------------


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> Spec:
    """Read, override (``--set key.path=value``, value parsed as YAML) and validate a spec."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: cannot read the spec: not UTF-8 text (a YAML file?)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{path}: not valid YAML{where}: {problem}") from None
    if not raw:
        raise SpecError(f"{path}: the spec is empty; see experiments/quick.yaml for a start")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("study", path.stem)
    for item in overrides:
        _apply_override(raw, item, path)
    reject_old_keys(raw, path)
    return validate_spec(raw, source=str(path))


def validate_spec(raw: dict, source: str = "<spec>") -> Spec:
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelt key is one problem, not also "required key is missing" beside it.
        misspelt = {e["loc"][:-1] for e in errors if e["type"] == "extra_forbidden"}
        errors = [e for e in errors if not (e["type"] == "missing" and e["loc"][:-1] in misspelt)]
        lines = [f"{source}: {describe(error, Spec)}" for error in errors]
        raise SpecError("\n".join(lines)) from None


def _apply_override(raw: dict, item: str, path: Path) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"{path}: --set {item!r}: expected key.path=value")
    parts = key.strip().split(".")
    if parts[0] == "search" and len(parts) > 2:  # search keys are dotted paths themselves
        parts = ["search", ".".join(parts[1:])]
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise SpecError(f"{path}: --set {item!r}: {where} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value


def stable_hash(value: Any, length: int = 16) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]

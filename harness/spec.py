"""Study spec: one YAML file -> a validated `Spec` -> the list of trials it asks for.

Validation happens once, here, at the edge. A bad spec raises `SpecError` whose message names
the file, the key path (``search.label_fraction[1]``), what is allowed, and, for a misspelt key
or value, the closest valid one. `python -m harness.sweep` prints it and exits with status 2
before it starts Ray or touches MLflow. docs/harness.md lists every section and the messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METHODS = ("supervised", "pretrained")
# Parameters an Optuna search may sample; everything else stays a grid axis or a constant.
OPTUNA_PARAMS = ("w_reproj", "w_temporal", "w_bev")

Fraction = Annotated[float, Field(gt=0, le=1)]
PositiveInt = Annotated[int, Field(ge=1)]
Weight = Annotated[float, Field(ge=0)]


class SpecError(Exception):
    """A spec the user must fix; `str()` is the full message, one problem per line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticData(_Section):
    """Arguments of `model.data.synthetic.generate_dataset`; they key the generated dataroot."""

    scenes: Annotated[int, Field(ge=3)] = 8
    samples_per_scene: Annotated[int, Field(ge=2)] = 6
    image_size: tuple[Annotated[int, Field(ge=16)], Annotated[int, Field(ge=16)]] = (90, 160)
    seed: int = 0


class DataSection(_Section):
    source: Literal["synthetic", "nuscenes"] = "synthetic"
    # nuscenes: required; synthetic: generated under <storage_path>/data/ unless given.
    dataroot: str | None = None
    version: str | None = None  # default v1.0-mini (synthetic writes that), v1.0-trainval
    protocol: Literal["hdmapnet", "fine"] = "hdmapnet"
    pseudo_labels: Literal["synthetic", "mask2former"] | None = None  # default per source
    synthetic: SyntheticData = SyntheticData()
    num_workers: Annotated[int, Field(ge=0)] = 0
    # Evaluate on at most this many val samples (None: the whole split); keeps CPU studies quick.
    max_val_samples: PositiveInt | None = None

    @model_validator(mode="after")
    def _source_rules(self) -> DataSection:
        if self.source == "nuscenes":
            if not self.dataroot:
                raise _at(("dataroot",), "required when data.source is 'nuscenes'")
            if self.pseudo_labels == "synthetic":
                raise _at(
                    ("pseudo_labels",),
                    "'synthetic' pseudo-labels exist only for synthetic data; allowed: mask2former",
                )
        return self

    @property
    def resolved_version(self) -> str:
        if self.version:
            return self.version
        return "v1.0-mini" if self.source == "synthetic" else "v1.0-trainval"

    @property
    def resolved_pseudo_labels(self) -> str:
        if self.pseudo_labels:
            return self.pseudo_labels
        return "synthetic" if self.source == "synthetic" else "mask2former"


class ModelSection(_Section):
    preset: str = "nano"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        from model.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(_unknown("value", name, sorted(PRESETS)))
        return name

    @model_validator(mode="after")
    def _known_overrides(self) -> ModelSection:
        from model.presets import ModelConfig, get_preset

        fields = [f.name for f in dataclasses.fields(ModelConfig)]
        for key in self.overrides:
            if key not in fields:
                raise _at(("overrides", key), _unknown("key", key, fields))
        try:
            get_preset(self.preset, **self.overrides)
        except (TypeError, ValueError) as exc:
            raise _at(("overrides",), f"not a valid model: {exc}") from None
        return self


class TrainingSection(_Section):
    pretrain_epochs: PositiveInt = 2
    finetune_epochs: PositiveInt = 2
    batch_size: PositiveInt = 2
    lr: Annotated[float, Field(gt=0)] = 2e-4
    weight_decay: Weight = 1e-2
    w_bev: Weight = 1.0
    w_reproj: Weight = 1.0
    w_temporal: Weight = 0.1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Any other model.train.TrainConfig field (warmup_iters, backbone_lr_mult, reproj_loss, ...).
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_options(self) -> TrainingSection:
        if not self.options:
            return self
        from model.train import TrainConfig

        owned = set(type(self).model_fields) | {"seed", "progress"}
        fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in owned]
        for key in self.options:
            if key not in fields:
                raise _at(("options", key), _unknown("key", key, fields))
        try:
            TrainConfig(**self.options)
        except (TypeError, ValueError) as exc:
            raise _at(("options",), f"not a valid training config: {exc}") from None
        return self


class Distribution(_Section):
    """One Optuna search dimension: `uniform` / `loguniform` in [low, high], or `choice`."""

    type: Literal["uniform", "loguniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[float] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Distribution:
        if self.type == "choice":
            if not self.values:
                raise _at(("values",), "a non-empty list is required for type 'choice'")
            return self
        if self.low is None or self.high is None:
            missing = "low" if self.low is None else "high"
            raise _at((missing,), f"required for type {self.type!r}")
        if not self.low < self.high:
            raise _at(("high",), f"must be greater than low ({self.low})")
        if self.type == "loguniform" and self.low <= 0:
            raise _at(("low",), "must be > 0 for type 'loguniform'")
        return self


class OptunaSearch(_Section):
    num_samples: PositiveInt = 8
    seed: int = 0
    params: dict[Literal["w_reproj", "w_temporal", "w_bev"], Distribution]

    @field_validator("params")
    @classmethod
    def _some(cls, params: dict) -> dict:
        if not params:
            raise ValueError(f"give at least one of {', '.join(OPTUNA_PARAMS)}")
        return params


class SearchSection(_Section):
    """Grid axes (every combination runs) and an optional Optuna search over loss weights."""

    label_fraction: list[Fraction] = Field(default_factory=lambda: [1.0], min_length=1)
    pretrain_epochs: list[PositiveInt] | None = None
    w_reproj: list[Weight] | None = None
    w_temporal: list[Weight] | None = None
    optuna: OptunaSearch | None = None


class ResourcesSection(_Section):
    cpu: Annotated[float, Field(gt=0)] = 1.0
    gpu: Annotated[float, Field(ge=0)] = 0.0


class SchedulerSection(_Section):
    type: Literal["none", "asha"] = "none"
    grace_period: PositiveInt = 1  # fine-tuning epochs before ASHA may stop a trial
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0


class MlflowSection(_Section):
    tracking_uri: str | None = None  # default sqlite:///<storage_path>/mlflow.db
    experiment: str | None = None  # default: the study name
    system_metrics: bool = True
    system_metrics_interval_s: Annotated[float, Field(gt=0)] = 10.0


class RaySection(_Section):
    address: str | None = None  # an existing cluster ("auto", "host:port"); default: local


class Spec(_Section):
    study: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str = ""
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    training: TrainingSection = TrainingSection()
    search: SearchSection = SearchSection()
    methods: list[Literal["supervised", "pretrained"]] = Field(
        default_factory=lambda: list(METHODS), min_length=1
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    resources: ResourcesSection = ResourcesSection()
    scheduler: SchedulerSection = SchedulerSection()
    retries: Annotated[int, Field(ge=0)] = 1  # Ray Tune FailureConfig.max_failures per trial
    max_concurrent: PositiveInt | None = None
    mlflow: MlflowSection = MlflowSection()
    ray: RaySection = RaySection()
    storage_path: str | None = None  # default studies/<study>, relative to the working dir

    @field_validator("methods", "seeds")
    @classmethod
    def _unique(cls, values: list) -> list:
        duplicates = sorted({v for v in values if values.count(v) > 1}, key=str)
        if duplicates:
            raise ValueError(f"duplicate entries {duplicates}")
        return values

    @model_validator(mode="after")
    def _search_rules(self) -> Spec:
        optuna = self.search.optuna
        if optuna is not None:
            if self.methods != ["pretrained"]:
                raise _at(
                    ("methods",), "an Optuna search over loss weights needs methods: [pretrained]"
                )
            for axis, values in (
                ("label_fraction", self.search.label_fraction),
                ("seeds", self.seeds),
            ):
                if len(values) != 1:
                    path = ("search", axis) if axis == "label_fraction" else (axis,)
                    raise _at(path, "an Optuna search takes a single value here (grid it by study)")
            for name in optuna.params:
                if getattr(self.search, name, None):
                    raise _at(("search", name), f"searched by search.optuna.params.{name} already")
        if (
            self.scheduler.type == "asha"
            and self.scheduler.grace_period > self.training.finetune_epochs
        ):
            raise _at(("scheduler", "grace_period"), "must be <= training.finetune_epochs")
        if self.resources.gpu > 0 and self.training.device == "cpu":
            raise _at(("training", "device"), "'cpu' with resources.gpu > 0 wastes the GPU")
        return self

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.study

    def storage_dir(self) -> Path:
        """The study folder: Ray Tune storage, caches, synthetic data, default MLflow store."""
        return Path(self.storage_path or f"studies/{self.study}").expanduser().resolve()

    def config_hash(self) -> str:
        return stable_hash(self.model_dump(mode="json"))


# --- trials --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialSpec:
    """One trial of the grid: a method at one label fraction and seed, with its loss weights."""

    method: str
    label_fraction: float
    seed: int
    pretrain_epochs: int  # 0 for the supervised baseline
    finetune_epochs: int
    w_bev: float
    w_reproj: float  # 0 for the supervised baseline: it never sees the pretraining losses
    w_temporal: float

    @property
    def name(self) -> str:
        parts = [self.method, f"f{self.label_fraction:g}", f"s{self.seed}"]
        if self.method == "pretrained":
            parts.insert(1, f"p{self.pretrain_epochs}-r{self.w_reproj:g}-t{self.w_temporal:g}")
        return "-".join(parts)

    @property
    def pretrain_group(self) -> tuple | None:
        """What, beyond the study's fixed settings, decides this trial's pretraining."""
        if self.method != "pretrained":
            return None
        return (self.pretrain_epochs, self.w_reproj, self.w_temporal, self.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def expand_trials(spec: Spec) -> list[TrialSpec]:
    """Every trial of a grid study (an Optuna study's trials are sampled while it runs).

    Ordered fraction by fraction, pretrained first and seeds interleaved, so trials running at
    the same time rarely wait on the same pretraining, and the first results cover all methods.
    """
    t, s = spec.training, spec.search
    trials: list[TrialSpec] = []
    for fraction in sorted(s.label_fraction):
        for method in sorted(spec.methods, key=lambda m: m != "pretrained"):
            if method == "supervised":
                combos: Iterable[tuple] = [(0, 0.0, 0.0)]
            else:
                combos = [
                    (p, r, tw)
                    for p in s.pretrain_epochs or [t.pretrain_epochs]
                    for r in s.w_reproj or [t.w_reproj]
                    for tw in s.w_temporal or [t.w_temporal]
                ]
            for combo in combos:
                for seed in spec.seeds:
                    trials.append(
                        TrialSpec(
                            method=method,
                            label_fraction=fraction,
                            seed=seed,
                            pretrain_epochs=combo[0],
                            finetune_epochs=t.finetune_epochs,
                            w_bev=t.w_bev,
                            w_reproj=combo[1],
                            w_temporal=combo[2],
                        )
                    )
    return trials


def pretrain_groups(trials: Iterable[TrialSpec]) -> dict[tuple, int]:
    """Distinct pretrainings the trials need, with how many trials share each."""
    groups: dict[tuple, int] = {}
    for trial in trials:
        if trial.pretrain_group is not None:
            groups[trial.pretrain_group] = groups.get(trial.pretrain_group, 0) + 1
    return groups


def stable_hash(value: Any, length: int = 16) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# --- loading -------------------------------------------------------------------------------------


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> Spec:
    """Read, override (``--set key.path=value``, value parsed as YAML) and validate a spec."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{path}: not valid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("study", path.stem)
    for item in overrides:
        _apply_override(raw, item, path)
    return validate_spec(raw, source=str(path))


def validate_spec(raw: dict, source: str = "<spec>") -> Spec:
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {_describe(error)}" for error in exc.errors()]
        raise SpecError("\n".join(lines)) from None


def _apply_override(raw: dict, item: str, path: Path) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"{path}: --set {item!r}: expected key.path=value")
    parts = key.strip().split(".")
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


# --- error messages ------------------------------------------------------------------------------


class _LocatedError(ValueError):
    """A validator's error for a key below the validated model (pydantic only knows the model)."""

    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message


def _at(loc: tuple, message: str) -> ValueError:
    # Pydantic keeps the exception object in the error's ctx: `_describe` reads loc from it.
    return _LocatedError(loc, message)


def _unknown(kind: str, name: Any, allowed: Iterable[Any]) -> str:
    allowed = [str(a) for a in allowed]
    message = f"unknown {kind} {name!r}; allowed: {', '.join(allowed)}"
    close = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.5)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return message


def _format_loc(loc: Iterable) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "(top level)"


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    located = ctx.get("error")
    if isinstance(located, _LocatedError):
        return f"{_format_loc(loc + located.loc)}: {located.message}"
    if kind == "extra_forbidden":
        allowed = _keys_at(loc[:-1])
        return f"{_format_loc(loc)}: {_unknown('key', loc[-1], allowed)}"
    if kind == "missing":
        return f"{_format_loc(loc)}: required key is missing"
    if kind in ("literal_error", "enum"):
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        if loc and loc[-1] == "[key]":  # a mapping key restricted to literals
            return f"{_format_loc(loc[:-1])}: {_unknown('key', value, allowed)}"
        return f"{_format_loc(loc)}: {_unknown('value', value, allowed)}"
    if kind == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
        return f"{_format_loc(loc)}: {message}"
    bounds = {
        "greater_than": ("> ", "gt"),
        "greater_than_equal": (">= ", "ge"),
        "less_than": ("< ", "lt"),
        "less_than_equal": ("<= ", "le"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"{_format_loc(loc)}: must be {op}{ctx[key]}, got {value!r}"
    if kind == "string_pattern_mismatch":
        return (
            f"{_format_loc(loc)}: {value!r} is not allowed; use letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    message = str(error["msg"])
    message = message[0].lower() + message[1:] if message else message
    return f"{_format_loc(loc)}: {message}, got {value!r}"


def _keys_at(loc: tuple) -> list[str]:
    """Field names of the spec section at `loc` (for "did you mean" on an unknown key)."""
    node: Any = Spec
    for part in loc:
        node = _unwrap(node)
        if isinstance(part, int) or part == "[key]":
            args = typing.get_args(node)
            node = args[-1] if args else Any
        elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return []
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X; `Annotated[X, ...]` -> X."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return annotation

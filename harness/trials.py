"""The trials of a study: a method, a seed and one value per search axis, resolved with the spec.

trials = expand_trials(spec)              # the grid
resolved = trials[0].resolve(spec)        # the spec with the trial's values set, validated
resolved.pretrain, resolved.finetune      # the core's configs for this trial
resolved.pretrain_key(fingerprint)        # which shared pretraining it uses (None: none)
resolved.trunk_key(fingerprint)           # which WSD trunk that pretraining branches off
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from harness.spec import GRID_KEYS, Spec, set_path, stable_hash, validate_spec
from model import arms, names, objectives
from model.config import PSEUDO_LABEL_FIELDS, WEIGHT_PREFIX, FinetuneConfig, PretrainConfig


@dataclass(frozen=True)
class Trial:
    """One trial: a method, a seed and the values of the search axes (dotted path -> value).

    Everything else comes from the spec; `resolve` applies the overrides and validates with the
    same `Spec` model, so a trial's settings are exactly a spec's.
    """

    method: str
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(sorted(self.overrides)))

    @classmethod
    def from_dict(cls, value: dict) -> Trial:
        return cls(value["method"], int(value["seed"]), tuple(value["overrides"].items()))

    def to_dict(self) -> dict:
        return {"method": self.method, "seed": self.seed, "overrides": dict(self.overrides)}

    @property
    def label(self) -> str:
        """A readable name from the trial alone: `pretrained-label_fraction=0.5-s0`."""
        axes = [f"{path.rsplit('.', 1)[-1]}={short_value(v)}" for path, v in self.overrides]
        return "-".join([self.method, *axes, f"s{self.seed}"])

    @property
    def key(self) -> str:
        """The trial's identity (`bev.trial_id`): stable across retries, resumes, processes."""
        return stable_hash(self.to_dict(), 12)

    @property
    def arm(self) -> arms.Arm:
        return arms.get(self.method)

    def resolve(self, spec: Spec | dict) -> ResolvedTrial:
        """The spec with the trial's values set and its arm's fine-tuning objectives: the
        weights of objectives the arm does not use are 0, and those it adds are on. ``spec``
        may be a validated spec's JSON (what a trial worker receives): validated once, here."""
        if isinstance(spec, Spec):
            spec = spec.model_dump(mode="json")
        raw = copy.deepcopy({k: v for k, v in spec.items() if k not in GRID_KEYS})
        for path, value in self.overrides:
            set_path(raw, path, value)
        finetune = raw["finetune"]
        for name in [n for n in finetune if n.startswith(WEIGHT_PREFIX)]:
            if name[len(WEIGHT_PREFIX) :] not in self.arm.finetune:
                finetune[name] = 0.0
        for objective, weight in self.arm.weights:  # on at the arm's weight unless set
            field = WEIGHT_PREFIX + objective
            if not finetune.get(field):
                finetune[field] = weight
        return ResolvedTrial(self, validate_spec(raw, source=f"trial {self.to_dict()}"))


@dataclass(frozen=True)
class ResolvedTrial:
    """A trial with its settings: the spec's sections after the trial's overrides."""

    trial: Trial
    spec: Spec

    @property
    def pretrain(self) -> PretrainConfig | None:
        """The shared pretraining it fine-tunes from (its arm's ``pretrains``), or None."""
        return self.spec.pretrain if self.trial.arm.pretrains else None

    @property
    def twin(self) -> ResolvedTrial | None:
        """The trial whose pretraining a compute-matched arm is given the steps of. Arms
        differ in their fine-tuning only, so the twin's pretraining is this spec's."""
        matched_to = self.trial.arm.matched_to
        if matched_to is None:
            return None
        return ResolvedTrial(Trial(matched_to, self.trial.seed, self.trial.overrides), self.spec)

    @property
    def needs_pseudo_labels(self) -> bool:
        """Whether its pretraining or its fine-tuning reads pseudo-labels."""
        phases = [self.finetune, *([self.pretrain] if self.pretrain is not None else [])]
        return any("pseudo_labels" in objectives.needs(p.weights) for p in phases)

    @property
    def finetune(self) -> FinetuneConfig:
        return self.spec.finetune

    @property
    def variant(self) -> str:
        """The trial's arm and label fraction, e.g. `pretrained@0.5`."""
        return f"{self.trial.method}@{fraction_text(self.finetune.label_fraction)}"

    @property
    def axes(self) -> list[str]:
        """Its other search-axis values, e.g. `budget=2` for `pretrain.budget.value: 2`."""
        return [
            f"{_axis_name(path)}={short_value(value)}"
            for path, value in self.trial.overrides
            if path != names.LABEL_FRACTION
        ]

    @property
    def cell(self) -> str:
        """The trial's cell, what its seeds are averaged over: the variant and its other axis
        values, e.g. `pretrained@0.5 budget=2` (the MLflow param `variant`; the study view
        groups by it)."""
        return " ".join([self.variant, *self.axes])

    @property
    def name(self) -> str:
        return "-".join([self.variant, *self.axes, f"s{self.trial.seed}"])

    def pretrain_key(self, dataset_fingerprint: str) -> str | None:
        """What decides the pretraining's weights, hashed: trials with equal keys share it.
        By construction the pretraining, data and model configs and the seed (plus the
        dataset's content and the cache version), nothing about fine-tuning or the runtime."""
        if self.pretrain is None:
            return None
        return stable_hash(self._pretrain_identity(dataset_fingerprint))

    def trunk_key(self, dataset_fingerprint: str) -> str | None:
        """A WSD pretraining's trunk: its key without the length, which its prefix does not
        depend on (``model.config.OptimConfig``). None for cosine and supervised trials."""
        if self.pretrain is None or self.pretrain.optim.schedule != "wsd":
            return None
        identity = self._pretrain_identity(dataset_fingerprint)
        del identity["pretrain"]["budget"]["value"]
        return stable_hash({**identity, "wsd_trunk": True})

    def _pretrain_identity(self, dataset_fingerprint: str) -> dict:
        return {
            # A changed objective (its inputs, its sample rule, its loss) is another key.
            "objectives": objectives.identity(self.pretrain.weights),
            "pretrain": self.pretrain.model_dump(mode="json"),
            "data": self.spec.data.model_dump(mode="json"),
            "dataset": dataset_fingerprint,
            "model": self.spec.model.build().to_dict(),
            "seed": self.trial.seed,
        }


def fraction_text(fraction: float) -> str:
    """A label fraction as every MLflow name, tag and param shows it: `1.0`, `0.5` (the
    param's own `str(float)` form, so one view never reads `1`, `1.0` and `@1` for one cell)."""
    return str(float(fraction))


def _axis_name(path: str) -> str:
    """An axis as names show it: its last key, or the one before a generic `value`."""
    keys = path.split(".")
    return keys[-2] if keys[-1] == "value" and len(keys) > 1 else keys[-1]


def short_value(value: Any) -> str:
    """An axis value as trial names and tables show it."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict) and all(isinstance(v, str | int | float) for v in value.values()):
        return "+".join(short_value(v) for v in value.values())  # {pseudo_label_noise: high}: high
    if isinstance(value, dict | list):  # a section as an axis value: a short stable tag
        return stable_hash(value, 6)
    return str(value)


def _pseudo_labels_only(path: str, values: list) -> bool:
    """Whether an axis changes only which pseudo-labels are read (``data.pseudo_label_*``)."""
    fields = {f"data.{name}" for name in PSEUDO_LABEL_FIELDS}
    if path in fields:
        return True
    head = f"{path}." if path else ""
    return all(
        isinstance(v, dict) and all(f"{head}{key}" in fields for key in v) for v in values
    )


def _axes_of(spec: Spec, method: str) -> dict[str, list]:
    """The search axes that change a method's trials: a `pretrain` or `pretrain.*` axis does
    not when the arm does not pretrain, a pseudo-label axis does not when no phase of it reads
    them (one supervised trial per cell serves every pretraining variant)."""
    reads = Trial(method, spec.seed_list[0]).resolve(spec).needs_pseudo_labels
    return {
        path: values
        for path, values in spec.search.items()
        if (arms.get(method).pretrains or path.split(".", 1)[0] != "pretrain")
        and (reads or not _pseudo_labels_only(path, values))
    }


def _excluded(trial: Trial, exclude: list[dict]) -> bool:
    values = {"method": trial.method, **dict(trial.overrides)}
    return any(all(k in values and values[k] == v for k, v in e.items()) for e in exclude)


def expand_trials(spec: Spec) -> list[Trial]:
    """Every trial of a grid study (an Optuna study's trials are sampled while it runs).

    An arm takes only the axes that change its trials (`_axes_of`); the spec's `exclude`
    entries leave grid points out. Ordered fraction by fraction, arms that pretrain first (then
    the others in reverse display order) and seeds interleaved, so trials running at the same
    time rarely wait on the same pretraining, and the first results cover all arms.
    """
    trials: list[Trial] = []
    for method in spec.methods:
        axes = _axes_of(spec, method)
        for combo in itertools.product(*axes.values()):
            overrides = tuple(sorted(zip(axes, combo, strict=True)))
            trials.extend(Trial(method, seed, overrides) for seed in spec.seed_list)
    trials = [trial for trial in trials if not _excluded(trial, spec.exclude)]
    fraction = dict(spec.search).get(names.LABEL_FRACTION)

    def order(trial: Trial) -> tuple:
        value = dict(trial.overrides).get(names.LABEL_FRACTION, spec.finetune.label_fraction)
        return (value if fraction else 0.0, not trial.arm.pretrains, -arms.order(trial.method))

    return sorted(trials, key=order)


def needs_pseudo_labels(spec: Spec) -> bool:
    """Whether any arm of the spec reads pseudo-labels (the spec's values, no search axis)."""
    return any(Trial(m, spec.seed_list[0]).resolve(spec).needs_pseudo_labels for m in spec.methods)


def pseudo_label_specs(resolved: Iterable[ResolvedTrial]) -> list[Spec]:
    """One spec per distinct data and model section among the trials that read pseudo-labels
    (trials mostly share them: their pseudo-label sets are checked and made once)."""
    distinct = {
        stable_hash(r.spec.model_dump(mode="json", include={"data", "model"})): r.spec
        for r in resolved
        if r.needs_pseudo_labels
    }
    return list(distinct.values())


def pretrain_shares(resolved: Iterable[ResolvedTrial], fingerprint: str) -> dict[str, int]:
    """Distinct pretrainings the trials need (by key), with how many trials share each."""
    shares: dict[str, int] = {}
    for trial in resolved:
        key = trial.pretrain_key(fingerprint)
        if key is not None:
            shares[key] = shares.get(key, 0) + 1
    return shares


def wsd_trunks(resolved: Iterable[ResolvedTrial], fingerprint: str) -> dict[str, list[int]]:
    """WSD trunk key -> the lengths (``pretrain.budget.value``, increasing) branching off it."""
    trunks: dict[str, set[int]] = {}
    for trial in resolved:
        key = trial.trunk_key(fingerprint)
        if key is not None:
            trunks.setdefault(key, set()).add(trial.pretrain.budget.value)
    return {key: sorted(lengths) for key, lengths in trunks.items()}


@dataclass(frozen=True)
class PretrainPlan:
    """What the distinct pretrainings of a grid cost, in their budget's unit (epochs, ...)."""

    runs: int  # pretrainings run from scratch (cosine)
    trunks: int  # WSD trunks ...
    branches: int  # ... and the lengths branching off them
    alone: float  # every pretraining run on its own
    shared: float  # with WSD lengths sharing their trunk

    @property
    def saved(self) -> float:
        return self.alone - self.shared


def pretrain_plan(resolved: Iterable[ResolvedTrial], fingerprint: str) -> PretrainPlan:
    """The pretraining compute of a grid. A WSD trunk runs to its longest length's decay start
    and each length adds its decay: ``max(L) (1 - f) + f sum(L)`` instead of ``sum(L)``
    (step rounding aside)."""
    distinct = {t.pretrain_key(fingerprint): t for t in resolved if t.pretrain is not None}
    cosine = [t for t in distinct.values() if t.trunk_key(fingerprint) is None]
    trunks: dict[str, list[PretrainConfig]] = {}
    for trial in distinct.values():
        if trial.trunk_key(fingerprint) is not None:
            trunks.setdefault(trial.trunk_key(fingerprint), []).append(trial.pretrain)
    shared = sum(t.pretrain.budget.value for t in cosine)
    for configs in trunks.values():
        f = configs[0].optim.decay_fraction
        shared += max(c.budget.value for c in configs) * (1 - f)
        shared += f * sum(c.budget.value for c in configs)
    return PretrainPlan(
        runs=len(cosine),
        trunks=len(trunks),
        branches=sum(len(c) for c in trunks.values()),
        alone=float(sum(t.pretrain.budget.value for t in distinct.values())),
        shared=float(shared),
    )

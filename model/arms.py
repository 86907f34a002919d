"""The study's arms, one row each: everything the harness and the analysis know about a method.

    ARMS = (Arm("supervised", ...), Arm("pretrained", pretrains=True, ...), ...)

An arm says whether it fine-tunes from the shared self-supervised pretraining (the spec's
``pretrain`` section), which objectives its fine-tuning may optimise (``model.objectives``:
the spec's ``finetune.w_<objective>`` weights of the others are set to 0 for it) and which it
turns on (at its own weight, where the spec leaves that weight at 0), which arm's
pretraining steps it is given on top of its budget (the compute-matched baseline), whether it
is the reference of the paired verdicts, and how tables and figures show it (the row order is
the display order). The spec's ``methods``, the trial expansion, the sweep, the progress table
and the whole analysis read this table; no other module names an arm.

Standard library only: the harness, the analysis and the training core import it without
pulling in torch, Ray or MLflow.

Adding an arm is one row here, or, without editing this package, one row in a module of your
own named by ``BEVLABELS_ARMS`` (module names or ``.py`` paths, separated by ``os.pathsep``),
which is read on first use in every process, Ray's trial workers included::

    # my_arms.py                                    BEVLABELS_ARMS=my_arms.py python -m ...
    from model.arms import Arm
    ARMS = (Arm("pretrained_temporal", "pretrained + temporal fine-tuning", pretrains=True,
                weights=(("temporal", 0.1),)),)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

# The fine-tuning objectives every arm may use (their weights default to 0 but bev).
COMMON_FINETUNE = ("bev", "reproj", "temporal")
ENV = "BEVLABELS_ARMS"


@dataclass(frozen=True)
class Arm:
    name: str  # the spec's `methods` entry, the MLflow param `method`
    label: str  # how tables and legends call it
    # Fine-tunes from the shared pretraining of its seed (the spec's `pretrain` section).
    pretrains: bool = False
    # The objectives its fine-tuning may optimise; the others' finetune weights are 0 for it.
    finetune: tuple[str, ...] = COMMON_FINETUNE
    # Fine-tuning weights it turns on, (objective, weight), where the spec leaves them at 0.
    weights: tuple[tuple[str, float], ...] = ()
    # Fine-tunes for the optimiser steps of this arm's pretraining on top of its own budget.
    matched_to: str | None = None
    reference: bool = False  # the arm the paired verdicts and label savings compare against
    baseline: bool = False  # a supervised baseline (no label savings or time-to-target of its own)


ARMS: tuple[Arm, ...] = (
    Arm("supervised", "supervised", reference=True, baseline=True),
    # The supervised arm given the optimiser steps its pretrained twin spent in pretraining: it
    # separates "pretraining helps" from "more compute helps".
    Arm("supervised_matched", "compute-matched supervised", matched_to="pretrained", baseline=True),
    Arm("pretrained", "pretrained", pretrains=True),
    # Perspective Cue Training (arXiv 2403.12530): no pretraining; while fine-tuning, a
    # perspective head on the image features learns the pseudo-labels of every training sample.
    Arm(
        "pct",
        "PCT (perspective cues)",
        finetune=(*COMMON_FINETUNE, "perspective"),
        weights=(("perspective", 1.0),),
    ),
)

# A spec's `methods` when it names none: the reference and the method the harness was built for.
DEFAULT_METHODS: tuple[str, ...] = ("supervised", "pretrained")

_plugins: dict[str, tuple[Arm, ...]] = {}  # BEVLABELS_ARMS value -> the rows it adds


def _plugin_arms() -> tuple[Arm, ...]:
    """The rows of the modules named by ``BEVLABELS_ARMS`` (their ``ARMS`` tuples), read once
    per value of the variable."""
    value = os.environ.get(ENV, "")
    if value in _plugins:
        return _plugins[value]
    extra: list[Arm] = []
    for entry in filter(None, value.split(os.pathsep)):
        try:
            module = _load(entry)
        except (ImportError, OSError, SyntaxError) as exc:  # one line: the variable and entry
            raise ValueError(f"{ENV}: cannot load {entry}: {exc}") from None
        for arm in getattr(module, "ARMS", ()):
            if not isinstance(arm, Arm):
                raise ValueError(f"{ENV}: {entry}: ARMS holds {arm!r}, not an Arm row")
            if arm.name in {a.name for a in (*ARMS, *extra)}:
                raise ValueError(f"{ENV}: {entry}: arm {arm.name!r} is defined twice")
            extra.append(arm)
    _plugins[value] = tuple(extra)
    return _plugins[value]


def _load(entry: str):
    """A module name, or a ``.py`` file loaded as a module of its own."""
    if not entry.endswith(".py"):
        return importlib.import_module(entry)
    path = Path(entry).expanduser().resolve()
    spec = importlib.util.spec_from_file_location(f"bevlabels_arms_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError("not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def all_arms() -> tuple[Arm, ...]:
    """Every arm, in display order (this module's rows, then those of ``BEVLABELS_ARMS``)."""
    return ARMS + _plugin_arms()


def names() -> tuple[str, ...]:
    return tuple(a.name for a in all_arms())


def get(name: str) -> Arm:
    for arm in all_arms():
        if arm.name == name:
            return arm
    raise KeyError(f"unknown arm {name!r}; allowed: {', '.join(names())}")


def reference() -> Arm:
    return next(a for a in all_arms() if a.reference)


def order(name: str) -> int:
    """Display position of an arm (arms not in the table, e.g. from an old store, go last)."""
    known = names()
    return known.index(name) if name in known else len(known)


def label(name: str) -> str:
    known = {a.name: a.label for a in all_arms()}
    return known.get(name, name)


def methods_under_test() -> tuple[str, ...]:
    """The arms that are not supervised baselines: each gets label savings and time-to-target."""
    return tuple(a.name for a in all_arms() if not a.baseline)


def pretraining() -> tuple[str, ...]:
    """The arms that fine-tune from a pretraining (their trials carry its clocks and length)."""
    return tuple(a.name for a in all_arms() if a.pretrains)

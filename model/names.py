"""The study's vocabulary: every name that crosses a boundary (core -> MLflow -> analysis).

Standard library only, so the harness, the analysis and the training core import it without
pulling in torch or MLflow. The training core reports metrics under these final names; the
harness logs them unchanged; the analysis reads them from MLflow. Tags and params are the
MLflow run layout of docs/architecture.md.
"""

from __future__ import annotations

# --- label values --------------------------------------------------------------------------------

IGNORE = 255  # a label or pseudo-label value the losses and metrics skip

# --- run tags ------------------------------------------------------------------------------------

ROLE = "bev.role"  # sweep | pretrain | pretrain_trunk | trial
TRUNK = "pretrain_trunk"  # the role of a WSD trunk's run (its segments log into it)
TRUNK_KEY = "bev.trunk_key"  # on the trunk's run and on each length's pretraining run
TRIAL_ID = "bev.trial_id"
PRETRAIN_KEY = "bev.pretrain_key"
PARENT = "mlflow.parentRunId"
ERROR = "bev.error"
STUDY = "bev.study"

# --- trial params outside the config sections ----------------------------------------------------

METHOD, SEED = "method", "seed"
# The spec's dotted keys that the analysis groups by (a trial's config is logged flat, with the
# spec's own dotted names: YAML key = --set key = MLflow param).
LABEL_FRACTION = "finetune.label_fraction"
PRETRAIN_EPOCHS = "pretrain.budget.value"  # the length (unit: pretrain.budget.unit)
FINETUNE_EPOCHS = "finetune.budget.value"
W_REPROJ, W_TEMPORAL, W_BEV = "pretrain.w_reproj", "pretrain.w_temporal", "finetune.w_bev"
PRESET = "model.preset"
# The data fields that choose the pseudo-labels (model.config.PSEUDO_LABEL_FIELDS).
PSEUDO_LABELS = "data.pseudo_labels"  # the labeller; None: per data source
PSEUDO_LABEL_SOURCE, PSEUDO_LABEL_NOISE = "data.pseudo_label_source", "data.pseudo_label_noise"
VARIANT = "variant"  # a trial's cell: `<arm>@0.5`, plus other axis values (`budget=4`)
LABELLED_SAMPLES = "labelled_samples"


def pseudo_label_name(labeler: str | None, source: str | None, noise: str | None) -> str:
    """One word for the pseudo-labels a trial reads (the quality study's axis): ``oracle``,
    ``shuffled``, ``mask2former`` or the simulated labeller's noise level (``clean`` ...
    ``high``); a shuffled set of another level than medium: ``shuffled-high``."""
    if source == "oracle":
        return "oracle"
    own = "mask2former" if labeler == "mask2former" else (noise or "medium")
    if source == "shuffled":
        return "shuffled" if own in ("medium", "mask2former") else f"shuffled-{own}"
    return own

# Every class of every label protocol, in the order tables list them (model.data.labels).
CLASS_ORDER: tuple[str, ...] = (
    "background",
    "divider",
    "lane_divider",
    "road_divider",
    "ped_crossing",
    "stop_line",
    "boundary",
    "drivable_area",
)

# --- metrics -------------------------------------------------------------------------------------

MIOU = "mIoU"


def val_metric(phase: str, name: str) -> str:
    """A validation metric of a phase: ``val/mIoU``, ``val/IoU_divider`` (fine-tuning) or
    ``pretrain/val_mIoU``, ``pretrain/val_IoU_divider`` (the pretrained head alone)."""
    prefix = "val/" if phase == "finetune" else f"{phase}/val_"
    return f"{prefix}{name}"


def iou_name(class_name: str) -> str:
    """The per-class entry of a metrics dict (before ``val_metric``): ``IoU_divider``."""
    return f"IoU_{class_name}"


VAL_MIOU = val_metric("finetune", MIOU)  # the study's metric (final, no selection on val)
VAL_IOU_PREFIX = val_metric("finetune", "IoU_")
STEPS = "train/steps"  # optimiser steps so far (pretraining: pretrain/steps)
# Best-epoch metrics, only with early stopping: named apart so nobody mistakes them for final.
BEST_PREFIX, BEST_EPOCH = "best/", "best/epoch"


# A pretraining's target alignment on val (model.evaluation.diagnostics): ``align/reach``,
# ``align/ceiling_mIoU``, ``align/head_reached_mIoU``, ...
ALIGN_PREFIX = "align/"


def best_metric(name: str) -> str:
    """``val/mIoU`` -> ``best/val_mIoU``."""
    return BEST_PREFIX + name.replace("/", "_")


def loss_metric(phase: str, term: str) -> str:
    """``train/loss`` (the weighted total) or ``train/loss_bev``; ``pretrain/loss_reproj``."""
    prefix = "train" if phase == "finetune" else phase
    return f"{prefix}/{term if term == 'loss' else 'loss_' + term}"


# Clocks. ``time/cum_wall_s`` is the core's own training time of a run (its phase only); the
# suffixes add the trial's pretraining, whole or divided among the trials that share it.
CUM_WALL_S = "time/cum_wall_s"
CUM_GPU_S = "time/cum_gpu_s"
VAL_WALL_S = "time/val_wall_s"  # this epoch's validation pass
INCL_PRETRAIN, AMORTISED = "_incl_pretrain", "_amortised"

"""The training core's typed configs: one per concern, each the only owner of its fields.

    data      DataConfig        where the data comes from and what the labels are
    model     ModelChoice       a preset of ``model.presets`` plus field overrides
    pretrain  PretrainConfig    self-supervised pretraining (pseudo-labels only)
    finetune  FinetuneConfig    supervised fine-tuning on a label fraction
    runtime   RuntimeConfig     device, precision, threads, progress bars (not the maths)

A study spec (``harness.spec``) is made of these same models, so a YAML key, a ``--set`` key, an
MLflow param and the core's argument are one dotted name (``pretrain.w_reproj``). Pydantic
validates them once, at the edge; the core reads their fields and copies nothing.

Defaults follow the official BEVFormer configs: AdamW (lr 2e-4, weight decay 0.01), the image
backbone at ``backbone_lr_mult`` (0.1) times the lr, gradient clipping at max-norm 35, cosine
annealing to ``min_lr_ratio`` (1e-3) with a linear warmup from ``warmup_ratio`` (1/3) over
``warmup_iters`` (500) iterations, capped at ``warmup_max_fraction`` of a phase's iterations.
``optim.schedule: wsd`` is warmup-stable-decay instead (``OptimConfig``): the prefix of its
schedule does not depend on the length, so pretraining lengths can share one run.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.geometry import BevGrid, check_grid
from model.presets import PRESETS, ModelConfig, get_preset

# Label-grid resolution when DataConfig.grid is not given: HDMapNet's 60 m x 30 m at 0.15 m,
# coarser for the CPU preset (its 30 x 15 query grid could not use 400 x 200 cells anyway).
DEFAULT_LABEL_RESOLUTION_M = 0.15
PRESET_LABEL_RESOLUTION_M = {"nano": 0.5}

PositiveInt = Annotated[int, Field(ge=1, le=10**7)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Weight = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]
Ratio = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Side = Annotated[int, Field(ge=16, le=4096)]  # an image side in pixels
ClassWeights = tuple[Positive, ...] | Literal["auto"] | None
# Evaluate every N periods and after the last one (0: after the last only; None: never).
ValEvery = Annotated[int, Field(ge=0, le=10**7)] | None
# A phase config's field ``w_<objective>`` is that objective's weight (model.objectives).
WEIGHT_PREFIX = "w_"


class Config(BaseModel):
    """Frozen, typo-proof: an unknown key is an error, not a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- data ----------------------------------------------------------------------------------------


class SyntheticConfig(Config):
    """Arguments of ``model.data.synthetic.generate_dataset``; they key the generated dataroot."""

    scenes: Annotated[int, Field(ge=3, le=10_000)] = 8
    samples_per_scene: Annotated[int, Field(ge=2, le=1_000)] = 6
    image_size: tuple[Side, Side] = (90, 160)
    seed: int = 0


# The DataConfig fields that choose the pseudo-label set (model.data.pseudo_sources): a trial
# that reads no pseudo-labels is the same trial whatever they are.
PSEUDO_LABEL_FIELDS = ("pseudo_labels", "pseudo_label_source", "pseudo_label_noise")


class DataConfig(Config):
    """Where the data comes from and what the labels are (``model.data``)."""

    source: Literal["synthetic", "nuscenes"] = "synthetic"
    # nuscenes: required; synthetic: generated into the study folder when not given.
    dataroot: str | None = None
    version: str | None = None  # default v1.0-mini (synthetic writes that), v1.0-trainval
    protocol: Literal["hdmapnet", "hdmapnet_filled", "fine"] = "hdmapnet"  # docs/data.md
    # BEV labels from the map's geometry, or (synthetic data only) from the painted marks the
    # pseudo-labels see: measures how much of pretraining's benefit is target alignment.
    bev_label_source: Literal["map", "paint"] = "map"
    # None: model.data.labels.LabelConfig's own defaults (0.75 m lines, 0.3 m clearing margin).
    line_width_m: Annotated[float, Field(gt=0, le=20, allow_inf_nan=False)] | None = None
    clear_margin_m: Annotated[float, Field(ge=0, le=20, allow_inf_nan=False)] | None = None
    pseudo_labels: Literal["synthetic", "mask2former"] | None = None  # default per source
    # What the pseudo-label terms read (model.data.pseudo_sources): the labeller's own labels,
    # or a control (model.data.controls): "oracle", the BEV labels reprojected into the
    # cameras (the positive control), "shuffled", the labeller's labels of another keyframe
    # (the negative control).
    pseudo_label_source: Literal["labeler", "oracle", "shuffled"] = "labeler"
    # The simulated labeller's corruption preset (model.data.simulated_labeler.Corruption), read by
    # the sources "labeler" and "shuffled"; "oracle" has no labeller.
    pseudo_label_noise: Literal["clean", "low", "medium", "high"] = "medium"
    synthetic: SyntheticConfig = SyntheticConfig()
    num_workers: Annotated[int, Field(ge=0, le=256)] = 0
    # Evaluate on the first N val keyframes (None: the whole split); keeps CPU studies quick.
    max_val_samples: PositiveInt | None = None
    grid: BevGrid | None = None  # label grid; None: 60 m x 30 m, see label_grid()
    cache_dir: str | None = None  # BEV label cache (None: model.data's default)
    train_split: str = "train"
    val_split: str = "val"

    @model_validator(mode="after")
    def _source_rules(self) -> DataConfig:
        if self.grid is not None:
            try:
                check_grid(self.grid)
            except ValueError as exc:
                raise ValueError(f"data.{exc}") from None
        if self.source == "nuscenes":
            if not self.dataroot:
                raise ValueError("data.dataroot is required when data.source is 'nuscenes'")
            if self.bev_label_source == "paint":
                raise ValueError(
                    "data.bev_label_source: 'paint' labels exist only for synthetic data (their "
                    "painted marks are known exactly); nuScenes has map labels only: allowed: map"
                )
            if self.pseudo_labels == "synthetic":
                raise ValueError(
                    "data.pseudo_labels: 'synthetic' pseudo-labels exist only for synthetic data;"
                    " allowed: mask2former"
                )
        if self.resolved_pseudo_labels == "mask2former" and self.pseudo_label_noise != "medium":
            raise ValueError(
                f"data.pseudo_label_noise: {self.pseudo_label_noise!r} is a noise level of the "
                "simulated labeller (data.pseudo_labels: synthetic); mask2former pseudo-labels "
                "have none: allowed: medium"
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

    @property
    def root(self) -> Path:
        if not self.dataroot:
            raise ValueError("DataConfig.dataroot is not set")
        return Path(self.dataroot)

    def label_grid(self, model: ModelConfig) -> BevGrid:
        if self.grid is not None:
            return self.grid
        res = PRESET_LABEL_RESOLUTION_M.get(model.name, DEFAULT_LABEL_RESOLUTION_M)
        return BevGrid(-30.0, 30.0, -15.0, 15.0, res)


# --- model ---------------------------------------------------------------------------------------


class ModelChoice(Config):
    """A preset of ``model.presets`` with some of its ``ModelConfig`` fields overridden."""

    preset: str = "nano"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(sorted(PRESETS))}")
        return name

    @model_validator(mode="after")
    def _valid_overrides(self) -> ModelChoice:
        fields = [f.name for f in dataclasses.fields(ModelConfig)]
        unknown = [key for key in self.overrides if key not in fields]
        if unknown:
            raise ValueError(f"model.overrides: unknown key {unknown[0]!r}; allowed: {fields}")
        try:
            self.build()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model.overrides: not a valid model: {exc}") from None
        return self

    def build(self) -> ModelConfig:
        return get_preset(self.preset, **self.overrides)


# --- training ------------------------------------------------------------------------------------


class OptimConfig(Config):
    """AdamW with a per-iteration schedule and a linear warmup (module docstring).

    ``cosine`` (the default) anneals over the whole length, so each length is its own run.
    ``wsd`` (warmup-stable-decay) warms up over ``warmup_iters`` (uncapped: a cap taken from
    the length would make the prefix depend on it), stays at the lr, then decays linearly to
    ``min_lr_ratio`` over the last ``decay_fraction`` of the steps: every length's run is one
    shared trunk up to its decay start plus a short branch of its own (docs/harness.md).
    """

    lr: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 2e-4
    weight_decay: Weight = 1e-2
    backbone_lr_mult: Weight = 0.1
    grad_clip_norm: Positive = 35.0
    warmup_iters: Annotated[int, Field(ge=0, le=10**7)] = 500
    warmup_ratio: Ratio = 1.0 / 3.0
    warmup_max_fraction: Ratio = 0.1
    min_lr_ratio: Ratio = 1e-3
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: Annotated[float, Field(gt=0, le=0.5, allow_inf_nan=False)] = 0.1

    def warmup_steps(self, total_steps: int) -> int:
        if self.schedule == "wsd":
            return self.warmup_iters
        return min(self.warmup_iters, int(self.warmup_max_fraction * total_steps))

    def decay_start(self, total_steps: int) -> int:
        """WSD: the first step of the decay (the last ``decay_fraction``, at least one step)."""
        return total_steps - max(1, round(self.decay_fraction * total_steps))


class ReprojectionConfig(Config):
    """The reprojection term: BEV logits sampled at image pixels vs perspective pseudo-labels."""

    stride: PositiveInt = 4  # image pixels between reprojected samples
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = 2.0
    # CE class weights (single-label protocols): a tuple, None, or "auto": sqrt(f_background /
    # f_class) over the pseudo-labels' pixels (model.training.class_weights). Unweighted, the
    # ~90 % road pixels win and the pretrained head predicts background everywhere (measured:
    # marking recall under 3 % in perspective).
    class_weights: ClassWeights = "auto"


class Budget(Config):
    """How long a phase trains, in epochs, optimiser steps or samples.

    With ``steps`` (or ``samples``) every label fraction gets the same number of optimiser steps:
    the loader cycles over the labelled subset as often as it takes, and the learning-rate
    schedule follows the steps. A smaller fraction is then not also a shorter schedule, which
    an epoch budget makes it (10 % of the labels, 10 % of the steps). Progress is reported,
    checkpointed and validated per *period*: an epoch for ``epochs``, else ``every`` steps
    (samples) or, by default, a tenth of the budget.
    """

    unit: Literal["epochs", "steps", "samples"] = "epochs"
    value: PositiveInt = 2
    every: PositiveInt | None = None  # period length in `unit` (steps, samples); epochs: 1

    def steps(self, batch_size: int, workers: int = 1) -> tuple[int, int]:
        """A steps or samples budget as (optimiser steps, steps per reporting period); with
        ``workers`` processes a step reads ``workers x batch_size`` samples."""
        per_step = 1 if self.unit == "steps" else batch_size * workers
        every = self.every or math.ceil(self.value / 10)
        return math.ceil(self.value / per_step), max(1, math.ceil(every / per_step))

    def periods(self, batch_size: int, workers: int = 1) -> int:
        """Reporting periods (what a trial reports as its `epoch`): ASHA's time unit."""
        if self.unit == "epochs":
            return self.value
        total, period = self.steps(batch_size, workers)
        return max(1, math.ceil(total / period))

    @model_validator(mode="after")
    def _every(self) -> Budget:
        if self.every is not None and self.unit == "epochs":
            raise ValueError("budget.every is for steps and samples budgets (epochs report each)")
        if self.every is not None and self.every > self.value:
            raise ValueError(f"budget.every must be <= budget.value ({self.value})")
        return self


class EarlyStopping(Config):
    """Stop when val mIoU has not improved by ``min_delta`` for ``patience`` validations."""

    patience: PositiveInt = 3
    min_delta: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0


class PhaseConfig(Config):
    """What both phases set: schedule length, batch, optimiser, the shared loss settings."""

    budget: Budget = Budget()
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 2
    optim: OptimConfig = OptimConfig()
    reprojection: ReprojectionConfig = ReprojectionConfig()
    temporal_loss: Literal["kl", "mse"] = "kl"
    use_history: bool = True  # feed the previous keyframe's BEV to temporal self-attention
    # BEV augmentation (off in the official BEVFormer configs): rotate each training sample's
    # ego frame by a random yaw in [-d, d] degrees (extrinsics, ego motion and BEV label
    # together; label cells rotated in from outside the grid are ignored).
    bev_aug_yaw_deg: Annotated[float, Field(ge=0, le=180, allow_inf_nan=False)] = 0.0
    val_every: ValEvery = 1

    @property
    def weights(self) -> dict[str, float]:
        """Objective -> weight (``model.objectives``): every ``w_<objective>`` field above 0,
        in the order the fields are declared."""
        return {
            name[len(WEIGHT_PREFIX) :]: value
            for name, value in self
            if name.startswith(WEIGHT_PREFIX) and isinstance(value, float) and value
        }

    @model_validator(mode="after")
    def _wsd_budget(self) -> PhaseConfig:
        budget, optim = self.budget, self.optim
        if optim.schedule != "wsd" or budget.unit == "epochs":
            return self  # epochs: checked once the steps per epoch are known (model.training.loop)
        if budget.unit == "samples" and budget.value % self.batch_size:
            raise ValueError(
                f"budget.value: a wsd budget in samples must be a multiple of batch_size "
                f"({self.batch_size}), got {budget.value}"
            )
        steps = budget.value // (1 if budget.unit == "steps" else self.batch_size)
        if optim.warmup_iters > optim.decay_start(steps):
            raise ValueError(
                f"optim.warmup_iters: {optim.warmup_iters} warmup steps run past the wsd decay "
                f"start (step {optim.decay_start(steps)} of {steps})"
            )
        return self


class PretrainConfig(PhaseConfig):
    """Self-supervised pretraining: ``w_reproj * reprojection + w_temporal * temporal``."""

    w_reproj: Weight = 1.0
    w_temporal: Weight = 0.1
    # The pretrained head's val score is read once, at the end (the study's sanity ladder):
    # validating every epoch cost a quarter of a CPU study's time for curves nobody reads.
    val_every: ValEvery = 0

    @model_validator(mode="after")
    def _some_loss(self) -> PretrainConfig:
        if not (self.w_reproj > 0 or self.w_temporal > 0):
            raise ValueError("pretraining needs pretrain.w_reproj > 0 or pretrain.w_temporal > 0")
        return self


class FinetuneConfig(PhaseConfig):
    """Supervised fine-tuning on a nested label subset: ``w_bev * bev`` (+ optional pretraining
    terms on the same labelled scenes, off by default)."""

    label_fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    w_bev: Weight = 1.0
    w_reproj: Weight = 0.0
    w_temporal: Weight = 0.0
    # The perspective head's pseudo-label term (model.objectives "perspective"), on every
    # training sample; 0 here: the arm that uses it (model.arms "pct") sets it.
    w_perspective: Weight = 0.0
    # CE class weights (hdmapnet): a tuple, None, or "auto": sqrt(f_background / f_class) over
    # the labelled subset's BEV labels, clipped to [1, 10] (model.training.class_weights).
    bev_class_weights: ClassWeights = "auto"
    bev_pos_weight: tuple[Positive, ...] | None = None  # BCE positive weights (fine)
    # Off by default: the study reports final metrics (no selection on val). When on, the
    # best epoch's metrics are logged under their own names (best/val_mIoU, best/epoch).
    early_stopping: EarlyStopping | None = None
    # Optimiser steps added to the budget: what the compute-matched supervised arm gets for
    # its pretrained twin's pretraining (set by the harness, `supervised_matched`).
    extra_steps: Annotated[int, Field(ge=0, le=10**8)] = 0

    @model_validator(mode="after")
    def _some_loss(self) -> FinetuneConfig:
        if not self.weights:
            raise ValueError("fine-tuning needs finetune.w_bev (or finetune.w_reproj) > 0")
        if self.early_stopping is not None and self.val_every is None:
            raise ValueError(
                "finetune.early_stopping needs validation: set finetune.val_every (0 or more)"
            )
        return self


class RuntimeConfig(Config):
    """How a run executes, not what it computes (not part of any cache key)."""

    device: Literal["auto", "cpu", "cuda"] | Annotated[str, Field(pattern=r"^cuda:\d+$")] = "auto"
    # The speed switches of model.training.precision, on by default; they leave the method as it is.
    # bf16: autocast where the device computes bf16 natively (CUDA; CPUs with AVX512-BF16 or
    # AMX), float32 elsewhere; false: float32 everywhere.
    bf16: bool = True
    channels_last: bool = True  # image backbone + FPN in NHWC memory order
    fold_frozen_norms: bool = True  # frozen BatchNorms folded into their convolutions
    fused_adamw: bool = True  # one fused AdamW kernel (foreach where torch has none)
    keep_freed_memory: bool = True  # glibc keeps freed memory for the next step (process-wide)
    progress: bool = True  # tqdm bars (shown on terminals only)
    # torch's intra-op threads (inter-op: 1). CPU results are deterministic only for a fixed
    # thread count (the same trial moves by ~0.016 mIoU between 1 and 2 threads), so it is
    # pinned, not left to the machine.
    threads: Annotated[int, Field(ge=1, le=512)] = 1
    # After each validation, render the first val sample's BEV prediction beside its label
    # (EpochReport.preview), for a tracker to show how a trial learns.
    preview: bool = False
    # After a pretraining, measure its target alignment on the val split
    # (model.evaluation.diagnostics: reach, ceiling, the head on reached cells, perspective IoU):
    # one extra val pass.
    alignment: bool = True


# --- what the loops report -----------------------------------------------------------------------


@dataclasses.dataclass
class EpochReport:
    """What ``on_epoch`` receives after every epoch (docs/architecture.md). Metric keys are the
    final MLflow names of ``model.names`` (``val/mIoU``, ``pretrain/loss_reproj``, ...)."""

    phase: str  # pretrain | finetune
    epoch: int  # 1-based period (an epoch, or `budget.every` steps)
    epochs: int  # periods planned
    losses: dict[str, float]  # epoch means
    val: dict[str, float]  # empty when not evaluated
    cum_wall_s: float
    cum_gpu_s: float
    labelled_samples: int  # BEV-labelled training samples this phase used (0 for pretraining)
    checkpoint: str | None
    lr: float = 0.0  # learning rate at the end of the epoch (non-backbone group)
    epoch_wall_s: float = 0.0
    val_wall_s: float = 0.0
    steps: int = 0  # optimiser steps so far (cumulative)
    best: dict[str, float] = dataclasses.field(default_factory=dict)  # best/val_mIoU, best/epoch
    stopped_early: bool = False
    # (H, W, 3) uint8: label | prediction of the first val sample, with a class legend
    # (RuntimeConfig.preview; model.evaluation.legend)
    preview: Any = None

    def to_dict(self) -> dict:
        """Plain values (what a checkpoint stores): without the preview image."""
        out = dataclasses.asdict(self)
        out.pop("preview")
        return out


@dataclasses.dataclass
class FinetuneResult:
    val: dict[str, float]  # final val metrics (model.names)
    labelled_samples: int
    labelled_scenes: tuple[str, ...]
    epochs: int
    cum_wall_s: float
    cum_gpu_s: float
    checkpoint: Path | None
    history: list[EpochReport] = dataclasses.field(default_factory=list)

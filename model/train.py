"""Training loops: self-supervised pretraining, supervised fine-tuning, evaluation.

    ckpt = pretrain(data, model, train, out_dir)                    # pseudo-labels only
    result = finetune(data, model, train, out_dir, label_fraction=0.5, subset_seed=0,
                      init_checkpoint=ckpt)                         # BEV labels of a subset
    metrics = evaluate(net, loader, "hdmapnet", device)

One step (both phases), as BEVFormer trains with its history queue of length 2:

1. the previous keyframe's BEV is computed under ``no_grad`` with the model in eval mode
   (``obtain_history_bev`` in the official code); it feeds temporal self-attention and, warped
   by ego motion, is the target of the temporal loss;
2. forward on the current keyframe with that history, then the phase's loss terms:
   pretraining ``w_reproj * reprojection + w_temporal * temporal`` (no BEV label is read),
   fine-tuning ``w_bev * bev`` (+ ``finetune_w_reproj`` / ``finetune_w_temporal`` terms when
   those are > 0, on the same labelled scenes);
3. NaN/inf guard on every term and on the gradient norm (one host sync per step), gradient
   clipping, AdamW step with the learning rate of that step.

Optimisation follows the official BEVFormer configs: AdamW (lr 2e-4, weight decay 0.01), the
image backbone at ``backbone_lr_mult`` (0.1) times the lr, gradient clipping at max-norm 35,
cosine annealing to ``min_lr_ratio`` (1e-3) with a linear warmup from ``warmup_ratio`` (1/3)
over ``warmup_iters`` (500) iterations. Two deliberate differences: the cosine runs per
iteration, not per epoch (our runs are a few epochs long, and an epoch-wise cosine would be a
staircase), and the warmup is capped at ``warmup_max_fraction`` of the phase's iterations (500
warmup iterations would be the whole of a short CPU run).

Clocks: ``cum_wall_s`` is the wall time of the training epochs (data loading, steps), without
validation or checkpoint writes, summed over epochs and across resumes. ``cum_gpu_s`` is the GPU
time of the steps, measured with CUDA events around each step (forward, backward, optimiser);
on CPU it is 0.0 (there is no GPU time to report). bf16 autocast is used on CUDA only.

Determinism: the model is initialised from ``seed``; every epoch reseeds torch's global RNG and
the loader's shuffling generator from (seed, epoch), so a run resumed from a checkpoint sees
the same batches and random draws as an uninterrupted one (on the same device and thread count).

Checkpoints (``model.checkpoint``): ``<out_dir>/pretrain.pt`` or ``<out_dir>/finetune.pt``,
rewritten atomically after every epoch; calling the same function again with the same
``out_dir`` resumes after the last finished epoch (or returns at once if all are done).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from model.bevformer import BEVFormerSeg
from model.checkpoint import load_checkpoint, save_checkpoint
from model.data.labels import class_names, is_multilabel
from model.geometry import BevGrid
from model.losses import (
    NonFiniteLossError,
    bev_loss,
    check_finite,
    reprojection_bce_loss,
    reprojection_loss,
    temporal_consistency_loss,
    weighted_sum,
)
from model.metrics import make_metric
from model.presets import ModelConfig
from model.reprojection import IGNORE, reproject
from model.warp import warp_prev_to_current

log = logging.getLogger(__name__)

PHASES = ("pretrain", "finetune")
# Label-grid resolution when DataConfig.grid is not given: HDMapNet's 60 m x 30 m at 0.15 m,
# coarser for the CPU preset (its 30 x 15 query grid could not use 400 x 200 cells anyway).
DEFAULT_LABEL_RESOLUTION_M = 0.15
PRESET_LABEL_RESOLUTION_M = {"nano": 0.5}


# --- configs and reports -------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and what the labels are (``model.data``)."""

    dataroot: str
    version: str = "v1.0-mini"
    protocol: str = "hdmapnet"  # hdmapnet | fine
    pseudo_labels: str | None = "synthetic"  # synthetic | mask2former (pretraining needs one)
    num_workers: int = 0
    max_val_samples: int | None = None  # evaluate on the first N val keyframes (None: all)
    grid: BevGrid | None = None  # label grid; None: 60 m x 30 m, see label_grid()
    cache_dir: str | None = None  # BEV label cache (None: model.data's default)
    train_split: str = "train"
    val_split: str = "val"

    def __post_init__(self) -> None:
        if isinstance(self.grid, dict):
            object.__setattr__(self, "grid", BevGrid(**self.grid))
        object.__setattr__(self, "dataroot", str(self.dataroot))

    def label_grid(self, model: ModelConfig) -> BevGrid:
        if self.grid is not None:
            return self.grid
        res = PRESET_LABEL_RESOLUTION_M.get(model.name, DEFAULT_LABEL_RESOLUTION_M)
        return BevGrid(-30.0, 30.0, -15.0, 15.0, res)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loss settings of both phases (defaults: official BEVFormer configs)."""

    pretrain_epochs: int = 2
    finetune_epochs: int = 2
    batch_size: int = 2
    lr: float = 2e-4
    weight_decay: float = 0.01
    backbone_lr_mult: float = 0.1
    grad_clip_norm: float = 35.0
    warmup_iters: int = 500
    warmup_ratio: float = 1.0 / 3.0
    warmup_max_fraction: float = 0.1
    min_lr_ratio: float = 1e-3
    # Loss weights. w_reproj / w_temporal weigh the pretraining terms; fine-tuning uses w_bev
    # plus finetune_w_reproj / finetune_w_temporal (0 by default: fine-tuning is supervised).
    w_bev: float = 1.0
    w_reproj: float = 1.0
    w_temporal: float = 0.1
    finetune_w_reproj: float = 0.0
    finetune_w_temporal: float = 0.0
    reproj_stride: int = 4  # image pixels between reprojected samples
    reproj_loss: str = "ce"  # ce | focal
    focal_gamma: float = 2.0
    # CE class weights of the reprojection term (single-label protocols): a tuple, None, or
    # "auto": sqrt(f_background / f_class) over the pseudo-labels' pixels (see
    # pseudo_label_class_weights). Unweighted, the ~90 % road pixels win and the pretrained
    # head predicts background everywhere (measured: marking recall under 3 % in perspective).
    reproj_class_weights: tuple[float, ...] | str | None = "auto"
    # CE class weights (hdmapnet): a tuple, None, or "auto": sqrt(f_background / f_class) over
    # the labelled subset's BEV labels, clipped to [1, 10] (see balanced_class_weights).
    bev_class_weights: tuple[float, ...] | str | None = "auto"
    bev_pos_weight: tuple[float, ...] | None = None  # BCE positive weights (fine)
    temporal_loss: str = "kl"  # kl | mse
    # BEV augmentation (off in the official BEVFormer configs): rotate each training sample's
    # ego frame by a random yaw in [-d, d] degrees (extrinsics, ego motion and BEV label
    # together; label cells rotated in from outside the grid are ignored).
    bev_aug_yaw_deg: float = 0.0
    use_history: bool = True  # feed the previous keyframe's BEV to temporal self-attention
    pretrain_val: bool = True  # evaluate the pretrained head on val (pretraining epochs)
    val_every: int = 1  # evaluate every N epochs and after the last one (0: after the last only)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = True  # bf16 autocast on CUDA
    progress: bool = True  # tqdm bars (shown on terminals only)

    def __post_init__(self) -> None:
        for name in ("reproj_class_weights", "bev_class_weights", "bev_pos_weight"):
            value = getattr(self, name)
            if name != "bev_pos_weight" and isinstance(value, str):
                if value != "auto":
                    raise ValueError(f"{name} must be a tuple, None or 'auto', not {value!r}")
            elif value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.pretrain_epochs < 0 or self.finetune_epochs < 0:
            raise ValueError("epochs must be >= 0")
        if self.val_every < 0:
            raise ValueError("val_every must be >= 0")
        if self.batch_size < 1 or self.reproj_stride < 1:
            raise ValueError("batch_size and reproj_stride must be >= 1")
        if not (self.lr > 0 and self.grad_clip_norm > 0):
            raise ValueError("lr and grad_clip_norm must be > 0")
        weights = ("w_bev", "w_reproj", "w_temporal", "finetune_w_reproj", "finetune_w_temporal")
        for name in weights:
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EpochReport:
    """What ``on_epoch`` receives after every epoch (docs/architecture.md)."""

    phase: str  # pretrain | finetune
    epoch: int  # 1-based
    epochs: int
    losses: dict[str, float]  # epoch means: "loss" (weighted total), "loss_<term>"
    val: dict[str, float]  # {"mIoU", "IoU/<class>", ...}; empty when not evaluated
    cum_wall_s: float
    cum_gpu_s: float
    labelled_samples: int  # BEV-labelled training samples this phase used (0 for pretraining)
    checkpoint: str | None
    lr: float = 0.0  # learning rate at the end of the epoch (non-backbone group)
    epoch_wall_s: float = 0.0
    val_wall_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FinetuneResult:
    val: dict[str, float]  # final val metrics
    labelled_samples: int
    labelled_scenes: tuple[str, ...]
    epochs: int
    cum_wall_s: float
    cum_gpu_s: float
    checkpoint: Path | None
    history: list[EpochReport] = field(default_factory=list)


# --- small helpers -------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % 2**63


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at iteration ``step`` (0-based) of ``total_steps``."""
    progress = min(step / max(total_steps, 1), 1.0)
    factor = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (
        1.0 + math.cos(math.pi * progress)
    )
    warmup = min(cfg.warmup_iters, int(cfg.warmup_max_fraction * total_steps))
    if step < warmup:
        # mmcv's linear warmup: from warmup_ratio x the regular lr up to the regular lr.
        factor *= 1.0 - (1.0 - step / warmup) * (1.0 - cfg.warmup_ratio)
    return factor


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _eval_mode(net: torch.nn.Module):
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def _to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, dict):
            out[key] = _to_device(value, device)
        else:
            out[key] = value
    return out


def build_model(model: ModelConfig, num_classes: int, grid: BevGrid, seed: int) -> BEVFormerSeg:
    torch.manual_seed(seed)
    return BEVFormerSeg(model, num_classes=num_classes, label_grid=grid)


def _label_config(data: DataConfig, model: ModelConfig):
    from model.data.labels import LabelConfig

    return LabelConfig(protocol=data.protocol, grid=data.label_grid(model))


def _dataset(
    data: DataConfig,
    model: ModelConfig,
    split: str,
    pseudo_labels: str | None,
    load_prev: bool,
    scenes=None,
    progress: bool = False,
):
    from model.data.dataset import NuScenesBevDataset

    return NuScenesBevDataset(
        data.dataroot,
        data.version,
        split,
        image_size=model.image_size,
        label_cfg=_label_config(data, model),
        pseudo_labels=pseudo_labels,
        scenes=scenes,
        cache_dir=data.cache_dir,
        load_prev=load_prev,
        progress=progress,
    )


def ensure_pseudo_labels(data: DataConfig) -> None:
    """Simulated ("synthetic") pseudo-labels of a synthetic dataroot are made on first use
    (``model.data.pseudo_labels.run_synthetic``, seconds); Mask2Former ones must exist."""
    if data.pseudo_labels != "synthetic":
        return
    root = Path(data.dataroot)
    noise = root / "pseudo_labels" / "synthetic" / data.protocol / "noise.json"
    if not (root / "synthetic.json").is_file() or _complete(noise):
        return
    from filelock import FileLock

    from model.data.pseudo_labels import run_synthetic

    noise.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(noise.parent / ".generate.lock")):  # concurrent trials share a dataroot
        if not _complete(noise):
            log.info("writing simulated pseudo-labels into %s", noise.parent)
            run_synthetic(root, data.version, data.protocol, progress=False)


def _complete(noise_json: Path) -> bool:
    import json

    try:
        return bool(json.loads(noise_json.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def balanced_class_weights(dataset, max_weight: float = 10.0) -> tuple[float, ...]:
    """Class weights sqrt(f_0 / f_c) from the BEV class frequencies of ``dataset``'s labels
    (class 0, background, gets 1), clipped to [1, ``max_weight``]. Square-root balancing: full
    inverse frequency would weigh a 1 %-class 80x and make the background noisy; without any,
    a small labelled set collapses to all-background on unseen scenes."""
    n = dataset.label_cfg.num_classes
    counts = np.zeros(n, np.int64)
    for rec in dataset.records:
        label = dataset.label_cache.load(rec.sample_token)
        counts += np.bincount(label.reshape(-1).astype(np.int64), minlength=n)[:n]
    return _sqrt_balanced(counts, max_weight)


def pseudo_label_class_weights(
    dataset, max_weight: float = 10.0, max_images: int = 1200, seed: int = 0
) -> tuple[float, ...]:
    """``balanced_class_weights`` for the reprojection term: class frequencies over the
    pseudo-label pixels of ``dataset`` (ignore excluded), from at most ``max_images`` label
    images drawn at random (the frequencies of a large split settle long before its end)."""
    from model.data.pseudo_labels import IGNORE

    n = dataset.label_cfg.num_classes
    images = [p for rec in dataset.records for p in rec.image_paths]
    if len(images) > max_images:
        pick = np.random.default_rng(seed).choice(len(images), max_images, replace=False)
        images = [images[i] for i in sorted(pick)]
    counts = np.zeros(n, np.int64)
    for path in images:
        label = dataset.load_pseudo_label(path)
        counts += np.bincount(label[label != IGNORE].astype(np.int64), minlength=n)[:n]
    return _sqrt_balanced(counts, max_weight)


def _sqrt_balanced(counts: np.ndarray, max_weight: float) -> tuple[float, ...]:
    freq = counts.astype(np.float64) / max(counts.sum(), 1)
    weights = np.sqrt(freq[0] / np.maximum(freq, 1e-12))
    weights[0] = 1.0
    return tuple(float(w) for w in np.clip(weights, 1.0, max_weight))


def _class_weights(setting, protocol: str, compute: Callable[[], tuple[float, ...]], term: str):
    """A class-weight setting as a phase uses it: a tuple or None as given, "auto" computed
    (None for multi-label protocols, whose BCE terms take no class weights)."""
    if setting != "auto":
        return setting
    weights = None if is_multilabel(protocol) else compute()
    log.info("%s class weights (auto): %s", term, [round(w, 2) for w in weights or []])
    return weights


def _loader(dataset, batch_size: int, shuffle: bool, data: DataConfig, seed: int) -> DataLoader:
    from model.data.dataset import make_loader

    return make_loader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=data.num_workers, seed=seed
    )


def val_loader(data: DataConfig, model: ModelConfig, train: TrainConfig) -> DataLoader:
    """The validation loader: the first ``max_val_samples`` keyframes of the val split, in order."""
    dataset = _dataset(data, model, data.val_split, None, load_prev=train.use_history)
    if data.max_val_samples is not None and data.max_val_samples < len(dataset):
        dataset = Subset(dataset, range(data.max_val_samples))
    return _loader(dataset, train.batch_size, shuffle=False, data=data, seed=train.seed)


def rotate_ego_frame(
    batch: dict, grid: BevGrid, max_yaw_deg: float, yaw_rad: torch.Tensor | None = None
) -> dict:
    """A copy of ``batch`` whose ego frames (current and previous keyframe) are turned by a
    random yaw per sample (torch's global RNG): new_ego_from_ego = Rz(yaw). Cameras, ego
    motion, BEV labels (nearest neighbour; cells from outside the grid become IGNORE, or 0 for
    multi-hot labels) and anything else in the ego frame move together; images and
    perspective pseudo-labels do not change. ``yaw_rad`` (B,) fixes the yaws instead."""
    ego_from_cam = batch["ego_from_cam"]
    b = ego_from_cam.shape[0]
    if yaw_rad is None:
        yaw = (torch.rand(b, device=ego_from_cam.device) * 2 - 1) * math.radians(max_yaw_deg)
    else:
        yaw = yaw_rad.to(ego_from_cam.device, torch.float32)
    rot = torch.eye(4, device=ego_from_cam.device).repeat(b, 1, 1)
    rot[:, 0, 0], rot[:, 0, 1] = yaw.cos(), -yaw.sin()
    rot[:, 1, 0], rot[:, 1, 1] = yaw.sin(), yaw.cos()
    rot_inv = rot.transpose(1, 2)  # a pure rotation
    out = dict(batch)
    out["ego_from_cam"] = rot[:, None] @ ego_from_cam
    out["prev_ego_from_ego"] = rot @ batch["prev_ego_from_ego"] @ rot_inv
    if "prev" in batch:
        out["prev"] = dict(batch["prev"])
        out["prev"]["ego_from_cam"] = rot[:, None] @ batch["prev"]["ego_from_cam"]
    if "bev_label" in batch:
        label = batch["bev_label"]
        # new cell at p' shows old cell at R^-1 p': the warp with prev_from_cur = R^-1
        ids = label.dim() == 3
        src = label[:, None].float() if ids else label.float()
        fill = float(IGNORE) if ids else 0.0
        warped, valid = warp_prev_to_current(src - fill, rot_inv, grid, mode="nearest")
        warped = warped + fill
        warped = torch.where(valid[:, None], warped, torch.full_like(warped, fill))
        out["bev_label"] = warped[:, 0].to(label.dtype) if ids else warped.to(label.dtype)
    return out


# --- the forward pass shared by training and evaluation ------------------------------------


def _history(net: BEVFormerSeg, batch: dict, autocast) -> dict | None:
    """The previous keyframe's outputs under no_grad in eval mode (BEVFormer's history BEV)."""
    prev = batch.get("prev")
    if prev is None:
        return None
    with torch.no_grad(), _eval_mode(net), autocast:
        return net(prev["images"], prev["intrinsics"], prev["ego_from_cam"])


def _forward(net: BEVFormerSeg, batch: dict, history: dict | None, use_history: bool, autocast):
    prev_bev = history["bev_features"] if (history is not None and use_history) else None
    with autocast:
        return net(
            batch["images"],
            batch["intrinsics"],
            batch["ego_from_cam"],
            prev_bev=prev_bev,
            prev_ego_from_ego=batch["prev_ego_from_ego"] if prev_bev is not None else None,
            has_prev=batch["has_prev"] if prev_bev is not None else None,
        )


@torch.no_grad()
def evaluate(
    net: BEVFormerSeg,
    loader: DataLoader,
    protocol: str,
    device: torch.device | str,
    use_history: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of ``net`` over every batch of ``loader`` (``model.metrics``: HDMapNet argmax
    IoU for hdmapnet, best-threshold IoU for fine). With ``use_history`` and batches that carry
    ``prev``, the history BEV is the previous keyframe's, as in training."""
    device = torch.device(device)
    autocast = _autocast(device, True)
    metric = make_metric(protocol)
    with _eval_mode(net):
        for batch in tqdm(loader, desc="val", leave=False, disable=None if progress else True):
            batch = _to_device(batch, device)
            history = _history(net, batch, autocast) if use_history else None
            out = _forward(net, batch, history, use_history, autocast)
            metric.update(out["bev_logits"].float(), batch["bev_label"])
    return metric.compute()


# --- one phase -----------------------------------------------------------------------------


@dataclass
class _Phase:
    name: str
    net: BEVFormerSeg
    loader: DataLoader
    val: DataLoader | None
    weights: dict[str, float]  # loss term -> weight, only terms with weight > 0
    epochs: int
    labelled_samples: int
    protocol: str
    grid: BevGrid
    device: torch.device
    checkpoint_path: Path
    meta: dict  # plain values stored with the checkpoint (configs, subset)
    bev_class_weights: tuple[float, ...] | None = None
    reproj_class_weights: tuple[float, ...] | None = None


def _loss_terms(phase: _Phase, cfg: TrainConfig, batch: dict, autocast) -> dict[str, torch.Tensor]:
    net, weights = phase.net, phase.weights
    need_prev = cfg.use_history or "temporal" in weights
    history = _history(net, batch, autocast) if need_prev else None
    out = _forward(net, batch, history, cfg.use_history, autocast)
    logits = out["bev_logits"].float()
    multilabel = is_multilabel(phase.protocol)
    terms: dict[str, torch.Tensor] = {}
    if "bev" in weights:
        terms["bev"] = bev_loss(
            logits, batch["bev_label"], phase.bev_class_weights, cfg.bev_pos_weight
        )
    if "reproj" in weights:
        rep = reproject(
            logits,
            batch["intrinsics"],
            batch["ego_from_cam"],
            tuple(batch["images"].shape[-2:]),
            phase.grid,
            cfg.reproj_stride,
            batch["pseudo_labels"],
        )
        if multilabel:
            terms["reproj"] = reprojection_bce_loss(rep, _pseudo_groups(phase.protocol))
        else:
            terms["reproj"] = reprojection_loss(
                rep,
                kind=cfg.reproj_loss,
                class_weights=phase.reproj_class_weights,
                focal_gamma=cfg.focal_gamma,
            )
    if "temporal" in weights:
        if history is None:
            raise ValueError("the temporal loss needs the previous keyframe (load_prev)")
        terms["temporal"] = temporal_consistency_loss(
            logits,
            history["bev_logits"],
            batch["prev_ego_from_ego"],
            phase.grid,
            has_prev=batch["has_prev"],
            kind=cfg.temporal_loss,
            multilabel=multilabel,
        )
    return terms


def _pseudo_groups(protocol: str) -> list[list[int]]:
    """Perspective pseudo-label class -> the BEV channels it stands for (multi-label)."""
    from model.data.pseudo_labels import PSEUDO_CLASSES, PSEUDO_TO_BEV

    bev = class_names(protocol)
    return [[bev.index(c) for c in PSEUDO_TO_BEV[protocol][p]] for p in PSEUDO_CLASSES[protocol]]


def _optimizer(net: BEVFormerSeg, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = net.param_groups(cfg.lr, cfg.backbone_lr_mult)
    for group in groups:
        group["base_lr"] = group["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def _run_phase(phase: _Phase, cfg: TrainConfig, on_epoch: Callable | None) -> list[EpochReport]:
    """Train ``phase.epochs`` epochs, resuming from ``phase.checkpoint_path`` if it exists."""
    net, device = phase.net, phase.device
    net.to(device)
    optimizer = _optimizer(net, cfg)
    steps_per_epoch = len(phase.loader)
    total_steps = steps_per_epoch * phase.epochs
    history: list[EpochReport] = []
    start_epoch, cum_wall_s, cum_gpu_s = 0, 0.0, 0.0
    if phase.checkpoint_path.is_file():
        state = load_checkpoint(phase.checkpoint_path)
        _check_resumable(state, phase)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        cum_wall_s, cum_gpu_s = float(state["cum_wall_s"]), float(state["cum_gpu_s"])
        history = [EpochReport(**r) for r in state["history"]]
        log.info(
            "%s resumes after epoch %d from %s", phase.name, start_epoch, phase.checkpoint_path
        )
    autocast = _autocast(device, cfg.bf16)
    cuda = device.type == "cuda"
    for epoch in range(start_epoch + 1, phase.epochs + 1):
        torch.manual_seed(_epoch_seed(cfg.seed, epoch))
        if phase.loader.generator is not None:
            phase.loader.generator.manual_seed(_epoch_seed(cfg.seed, epoch))
        net.train()
        sums: dict[str, torch.Tensor] = {}
        events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        start = time.perf_counter()
        bar = tqdm(
            phase.loader,
            desc=f"{phase.name} {epoch}/{phase.epochs}",
            leave=False,
            disable=None if cfg.progress else True,
        )
        for i, batch in enumerate(bar):
            step = (epoch - 1) * steps_per_epoch + i
            _set_lr(optimizer, lr_factor(step, total_steps, cfg))
            batch = _to_device(batch, device)
            if cuda:
                events.append(_event_pair())
                events[-1][0].record()
            if cfg.bev_aug_yaw_deg > 0:
                batch = rotate_ego_frame(batch, phase.grid, cfg.bev_aug_yaw_deg)
            terms = _loss_terms(phase, cfg, batch, autocast)
            loss = weighted_sum(terms, phase.weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip_norm)
            where = f"{phase.name} epoch {epoch} step {i + 1}"
            check_finite({**terms, "loss": loss.detach()}, where)
            if not bool(torch.isfinite(grad_norm)):
                raise NonFiniteLossError(f"non-finite gradient norm {float(grad_norm)} at {where}")
            optimizer.step()
            if cuda:
                events[-1][1].record()
            for name, value in {"loss": loss, **terms}.items():
                key = "loss" if name == "loss" else f"loss_{name}"
                sums[key] = sums.get(key, 0.0) + value.detach()
        if cuda:
            torch.cuda.synchronize(device)
            cum_gpu_s += sum(a.elapsed_time(b) for a, b in events) / 1000.0
        epoch_wall_s = time.perf_counter() - start
        cum_wall_s += epoch_wall_s
        losses = {k: float(v) / max(steps_per_epoch, 1) for k, v in sums.items()}
        val: dict[str, float] = {}
        val_start = time.perf_counter()
        due = epoch == phase.epochs or (cfg.val_every > 0 and epoch % cfg.val_every == 0)
        if phase.val is not None and due:
            val = evaluate(net, phase.val, phase.protocol, device, cfg.use_history)
        report = EpochReport(
            phase=phase.name,
            epoch=epoch,
            epochs=phase.epochs,
            losses=losses,
            val=val,
            cum_wall_s=cum_wall_s,
            cum_gpu_s=cum_gpu_s,
            labelled_samples=phase.labelled_samples,
            checkpoint=str(phase.checkpoint_path),
            lr=optimizer.param_groups[-1]["lr"],
            epoch_wall_s=epoch_wall_s,
            val_wall_s=time.perf_counter() - val_start,
        )
        history.append(report)
        save_checkpoint(
            phase.checkpoint_path,
            {
                "phase": phase.name,
                "epoch": epoch,
                "epochs": phase.epochs,
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "cum_wall_s": cum_wall_s,
                "cum_gpu_s": cum_gpu_s,
                "history": [r.to_dict() for r in history],
                **phase.meta,
            },
        )
        log.info(
            "%s epoch %d/%d: %s; val mIoU %s; %.1f s",
            phase.name,
            epoch,
            phase.epochs,
            ", ".join(f"{k} {v:.4f}" for k, v in losses.items()),
            f"{val['mIoU']:.4f}" if "mIoU" in val else "-",
            epoch_wall_s,
        )
        if on_epoch is not None:
            on_epoch(report)
    return history


def _event_pair() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _check_resumable(state: dict, phase: _Phase) -> None:
    for key in ("phase", "model_cfg", "protocol", "grid", "num_classes", "subset"):
        if key in phase.meta or key == "phase":
            want = phase.name if key == "phase" else phase.meta[key]
            have = state.get(key)
            if _plain(have) != _plain(want):
                raise ValueError(
                    f"{phase.checkpoint_path} belongs to another run ({key}: {have!r} here, "
                    f"{want!r} requested); use a fresh out_dir"
                )


def _plain(value):
    """Tuples and lists compare equal (a checkpoint may hold either)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _meta(data: DataConfig, model: ModelConfig, train: TrainConfig, grid: BevGrid, num: int):
    return {
        "model_cfg": model.to_dict(),
        "num_classes": num,
        "protocol": data.protocol,
        "grid": dataclasses.asdict(grid),
        "train_cfg": train.to_dict(),
        "dataroot": data.dataroot,
        "version": data.version,
    }


# --- the public loops ----------------------------------------------------------------------


def pretrain(
    data: DataConfig,
    model: ModelConfig,
    train: TrainConfig,
    out_dir: Path | str,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> Path:
    """Self-supervised pretraining on the train split's pseudo-labels; no BEV label is used.

    Returns the checkpoint path (``<out_dir>/pretrain.pt``); resumes from it when it exists.
    """
    if data.pseudo_labels is None:
        raise ValueError("pretraining needs pseudo-labels: set DataConfig.pseudo_labels")
    if train.pretrain_epochs == 0:
        raise ValueError("pretrain_epochs is 0: there is nothing to pretrain")
    weights = {k: w for k, w in (("reproj", train.w_reproj), ("temporal", train.w_temporal)) if w}
    if not weights:
        raise ValueError("pretraining needs w_reproj > 0 or w_temporal > 0")
    device = resolve_device(train.device)
    seed_everything(train.seed)
    num_classes = len(class_names(data.protocol))
    grid = data.label_grid(model)
    load_prev = train.use_history or "temporal" in weights
    ensure_pseudo_labels(data)
    dataset = _dataset(data, model, data.train_split, data.pseudo_labels, load_prev)
    reproj_weights = _class_weights(
        train.reproj_class_weights,
        data.protocol,
        lambda: pseudo_label_class_weights(dataset),
        "reprojection",
    )
    meta = _meta(data, model, train, grid, num_classes)
    meta.update(reproj_class_weights=list(reproj_weights) if reproj_weights else None)
    phase = _Phase(
        name="pretrain",
        net=build_model(model, num_classes, grid, train.seed),
        loader=_loader(dataset, train.batch_size, True, data, train.seed),
        val=val_loader(data, model, train) if train.pretrain_val else None,
        weights=weights,
        epochs=train.pretrain_epochs,
        labelled_samples=0,
        protocol=data.protocol,
        grid=grid,
        device=device,
        checkpoint_path=Path(out_dir) / "pretrain.pt",
        meta=meta,
        reproj_class_weights=reproj_weights,
    )
    _run_phase(phase, train, on_epoch)
    return phase.checkpoint_path


def finetune(
    data: DataConfig,
    model: ModelConfig,
    train: TrainConfig,
    out_dir: Path | str,
    label_fraction: float,
    subset_seed: int,
    init_checkpoint: Path | str | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> FinetuneResult:
    """Supervised training on the BEV labels of a nested label subset of the train scenes
    (``model.data.subsets.label_subset(train scenes, label_fraction, subset_seed)``), from
    ``init_checkpoint`` (a pretraining) or from scratch. Validates after every epoch.

    ``finetune_epochs == 0`` evaluates ``init_checkpoint`` as it is (the pretrained head alone).
    """
    from model.data.dataset import split_scenes
    from model.data.subsets import label_subset

    device = resolve_device(train.device)
    seed_everything(train.seed)
    num_classes = len(class_names(data.protocol))
    grid = data.label_grid(model)
    train_scenes = split_scenes(data.dataroot, data.version, data.train_split)
    subset = label_subset(train_scenes, label_fraction, subset_seed)
    weights = {
        k: w
        for k, w in (
            ("bev", train.w_bev),
            ("reproj", train.finetune_w_reproj),
            ("temporal", train.finetune_w_temporal),
        )
        if w
    }
    if not weights:
        raise ValueError("fine-tuning needs w_bev (or a finetune_w_* weight) > 0")
    pseudo = data.pseudo_labels if "reproj" in weights else None
    if "reproj" in weights and pseudo is None:
        raise ValueError("finetune_w_reproj > 0 needs DataConfig.pseudo_labels")
    load_prev = train.use_history or "temporal" in weights
    if pseudo is not None:
        ensure_pseudo_labels(data)
    dataset = _dataset(data, model, data.train_split, pseudo, load_prev, scenes=subset.scenes)
    class_weights = _class_weights(
        train.bev_class_weights, data.protocol, lambda: balanced_class_weights(dataset), "BEV"
    )
    reproj_weights = (
        _class_weights(
            train.reproj_class_weights,
            data.protocol,
            lambda: pseudo_label_class_weights(dataset),
            "reprojection",
        )
        if pseudo
        else None
    )
    net = build_model(model, num_classes, grid, train.seed)
    if init_checkpoint is not None:
        _load_init(net, init_checkpoint, model, data.protocol, grid)
    meta = _meta(data, model, train, grid, num_classes)
    meta.update(
        subset={
            "fraction": float(label_fraction),
            "seed": int(subset_seed),
            "scenes": list(subset.scenes),
        },  # fmt: skip
        init_checkpoint=str(init_checkpoint) if init_checkpoint is not None else None,
        bev_class_weights=list(class_weights) if class_weights else None,
        reproj_class_weights=list(reproj_weights) if reproj_weights else None,
    )
    phase = _Phase(
        name="finetune",
        net=net,
        loader=_loader(dataset, train.batch_size, True, data, train.seed),
        val=val_loader(data, model, train),
        weights=weights,
        epochs=train.finetune_epochs,
        labelled_samples=len(dataset),
        protocol=data.protocol,
        grid=grid,
        device=device,
        checkpoint_path=Path(out_dir) / "finetune.pt",
        meta=meta,
        bev_class_weights=class_weights,
        reproj_class_weights=reproj_weights,
    )
    if train.finetune_epochs == 0:
        net.to(device)
        val = evaluate(net, phase.val, data.protocol, device, train.use_history)
        return FinetuneResult(val, len(dataset), subset.scenes, 0, 0.0, 0.0, None, [])
    history = _run_phase(phase, train, on_epoch)
    last = history[-1]
    return FinetuneResult(
        val=last.val,
        labelled_samples=len(dataset),
        labelled_scenes=subset.scenes,
        epochs=train.finetune_epochs,
        cum_wall_s=last.cum_wall_s,
        cum_gpu_s=last.cum_gpu_s,
        checkpoint=phase.checkpoint_path,
        history=history,
    )


def _load_init(net: BEVFormerSeg, path, model: ModelConfig, protocol: str, grid: BevGrid):
    state = load_checkpoint(path)
    for key, want in (
        ("model_cfg", model.to_dict()),
        ("protocol", protocol),
        ("grid", dataclasses.asdict(grid)),
    ):
        if key in state and _plain(state[key]) != _plain(want):
            raise ValueError(
                f"init checkpoint {path} was trained with another {key} "
                f"({state[key]!r}, this run: {want!r})"
            )
    net.load_state_dict(state["model"])


def load_model(checkpoint: Path | str, device: torch.device | str = "cpu") -> BEVFormerSeg:
    """The network of a checkpoint written by ``pretrain`` or ``finetune``, in eval mode."""
    state = load_checkpoint(checkpoint)
    net = BEVFormerSeg(
        ModelConfig.from_dict(state["model_cfg"]),
        num_classes=int(state["num_classes"]),
        label_grid=BevGrid(**state["grid"]),
    )
    net.load_state_dict(state["model"])
    return net.to(device).eval()


def evaluate_checkpoint(
    data: DataConfig, checkpoint: Path | str, train: TrainConfig | None = None
) -> dict[str, float]:
    """Val metrics of a checkpoint as it is, e.g. a pretraining's head with no fine-tuning
    (the "pretrained only" point of a study)."""
    train = train or TrainConfig()
    device = resolve_device(train.device)
    net = load_model(checkpoint, device)
    model = net.cfg
    if dataclasses.asdict(data.label_grid(model)) != dataclasses.asdict(net.label_grid):
        data = dataclasses.replace(data, grid=net.label_grid)
    return evaluate(net, val_loader(data, model, train), data.protocol, device, train.use_history)

"""Target alignment of a pretraining on the val split: what its supervision can reach, and how
much of that its head learnt.

``model.data.alignment_stats`` defines the statistics over labels alone (reach, ceiling,
perspective IoU of the BEV labels); this module adds the two that need the trained network and
runs all of them for a checkpoint, as the harness does at the end of every pretraining:

- ``head_reached``: the pretrained head's BEV prediction scored against the BEV labels on the
  cells a valid ray reaches only (the cells its reprojection loss ever saw);
- ``head_perspective``: the head's prediction reprojected into the cameras as the loss samples
  it, scored against the pseudo-labels over the valid pixels (what the loss optimised).

Every value is logged under ``align/<name>`` (``align/reach``, ``align/ceiling_mIoU``,
``align/head_reached_mIoU``, ...). Single-label protocols only (``fine`` is multi-label: its
perspective classes are channel groups, not the BEV classes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model import names
from model.config import DataConfig, PretrainConfig, RuntimeConfig
from model.data.alignment_stats import (
    AlignmentMeter,
    reached_cells,
    update_perspective_iou,
    update_reached_iou,
)
from model.data.labels import is_multilabel
from model.evaluation.forward import EvalForward, to_device
from model.evaluation.metrics import ArgmaxIoU
from model.network.reprojection import reprojection_grids
from model.training.loaders import label_config, make_dataset, make_loader, pseudo_label_set
from model.training.loop import prepare
from model.training.precision import autocast

PREFIX = names.ALIGN_PREFIX


def checkpoint_alignment(
    data: DataConfig, checkpoint: Path | str, cfg: PretrainConfig, runtime: RuntimeConfig
) -> dict[str, float]:
    """``align/*`` metrics of a pretraining checkpoint over the val split, with the
    pretraining's own reprojection stride and history setting; ``{}`` for multi-label
    protocols."""
    from model.training.train import ensure_pseudo_labels, load_model, resolve_device

    if is_multilabel(data.protocol):
        return {}
    device = resolve_device(runtime.device)
    net = prepare(load_model(checkpoint), device, runtime)
    if data.label_grid(net.cfg) != net.label_grid:
        data = data.model_copy(update={"grid": net.label_grid})
    ensure_pseudo_labels(data, net.cfg)
    return pretraining_alignment(data, net, cfg, autocast(device, runtime.bf16), device)


def pretraining_alignment(
    data: DataConfig, net: torch.nn.Module, cfg: PretrainConfig, amp, device: torch.device
) -> dict[str, float]:
    """``align/*`` metrics of ``net`` (a pretrained BEVFormerSeg, single-label protocol)."""
    label_cfg = label_config(data, net.cfg)
    dataset = make_dataset(
        data, net.cfg, data.val_split, pseudo_label_set(data, net.cfg), load_prev=cfg.use_history
    )
    if data.max_val_samples is not None and data.max_val_samples < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(data.max_val_samples))
    loader = make_loader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=data.num_workers, seed=0
    )
    meter = AlignmentMeter(label_cfg.class_names, label_cfg.grid)
    head_reached = ArgmaxIoU(label_cfg.class_names)
    head_perspective = ArgmaxIoU(label_cfg.class_names)
    forward = EvalForward(net, amp, cfg.use_history)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                batch = to_device(batch, device)
                logits = forward(batch)["bev_logits"].float()
                grids = reprojection_grids(
                    batch["intrinsics"], batch["ego_from_cam"],
                    tuple(batch["images"].shape[-2:]), label_cfg.grid, cfg.reprojection.stride,
                )  # fmt: skip
                pseudo = batch["pseudo_labels"]
                meter.update(grids, batch["bev_label"], pseudo)
                reached = reached_cells(grids, label_cfg.grid, pseudo)
                update_reached_iou(head_reached, logits, batch["bev_label"], reached)
                update_perspective_iou(head_perspective, logits, grids, pseudo)
    finally:
        net.train(was_training)
    out = meter.compute()
    out.update({f"head_reached_{k}": v for k, v in head_reached.compute().items()})
    out.update({f"head_perspective_{k}": v for k, v in head_perspective.compute().items()})
    return {PREFIX + k: float(v) for k, v in out.items()}

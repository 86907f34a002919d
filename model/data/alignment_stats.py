"""Target alignment statistics: how far the pseudo-labels the pretraining sees can carry the BEV
labels, measured batch by batch.

Pure functions over one batch, and a meter that pools them over a split:

- reach: the share of BEV cells a valid ray lands in (the cell containing the ray's ground
  point, for strided pixels whose ray meets the ground inside the grid and whose pseudo-label is
  not IGNORE: the rays the reprojection loss uses), overall and per BEV class;
- ceiling: the pseudo-labels splatted into the BEV (per cell the majority class of the rays
  landing in it, ties to the lower class id; cells no ray reaches are background), scored
  against the BEV labels with ``ArgmaxIoU``: what a head that reproduced the pseudo-labels
  exactly, and knew nothing else, would score; also on reached cells only;
- perspective: BEV logits (the one-hot BEV labels, or a model's prediction) reprojected into
  the images as the loss samples them (``model.network.reprojection``), argmax, scored against the
  pseudo-labels over the valid pixels;
- chance: the expected mIoU of a uniformly random prediction on the same BEV labels
  (``chance_miou``), the level a head that learned nothing scores.

For the training core: ``reached_cells`` and ``update_reached_iou`` (a pretrained head's mIoU
on the cells its supervision reaches), ``update_perspective_iou`` (a reprojected prediction
against the pseudo-labels). Single-label protocols only (the perspective classes are the BEV
classes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from model.evaluation.metrics import HDMAPNET_EXCLUDED, ArgmaxIoU
from model.geometry import BevGrid
from model.names import MIOU
from model.network.reprojection import (
    IGNORE,
    ReprojectionGrids,
    reproject_bev_logits,
    subsample_labels,
)

# --- one batch ------------------------------------------------------------------------------


def ray_cells(grids: ReprojectionGrids, grid: BevGrid, pseudo_labels: torch.Tensor | None = None):
    """(B, 6, h, w) int64: the flat BEV cell (``row * W + col``) each strided pixel's ray lands
    in, -1 where the ray is invalid (or, with ``pseudo_labels``, the pixel's label is IGNORE)."""
    u, v = grids.uv[..., 0], grids.uv[..., 1]  # grid_sample coordinates: -1, +1 = outer edges
    col = ((u + 1) * (grid.width / 2)).floor().long().clamp(0, grid.width - 1)
    row = ((v + 1) * (grid.height / 2)).floor().long().clamp(0, grid.height - 1)
    valid = grids.valid
    if pseudo_labels is not None:
        valid = valid & (_strided(pseudo_labels, grids).to(valid.device) != IGNORE)
    return torch.where(valid, row * grid.width + col, torch.full_like(row, -1))


def _strided(pseudo_labels: torch.Tensor, grids: ReprojectionGrids) -> torch.Tensor:
    if tuple(pseudo_labels.shape[-2:]) != tuple(grids.valid.shape[-2:]):
        pseudo_labels = subsample_labels(pseudo_labels, grids.stride)
    return pseudo_labels.long()


def reached_cells(
    grids: ReprojectionGrids, grid: BevGrid, pseudo_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, H, W) bool: cells at least one valid ray lands in."""
    cells = ray_cells(grids, grid, pseudo_labels).flatten(1)
    batch = cells.shape[0]
    hit = torch.zeros(batch, grid.height * grid.width + 1, dtype=torch.bool, device=cells.device)
    hit.scatter_(1, torch.where(cells < 0, grid.height * grid.width, cells), True)
    return hit[:, :-1].reshape(batch, grid.height, grid.width)


def splat_pseudo_labels(
    grids: ReprojectionGrids, grid: BevGrid, pseudo_labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(B, H, W) int64: per cell the majority pseudo-label of the valid rays landing in it (ties
    to the lower id), 0 (background) where none does."""
    labels = _strided(pseudo_labels, grids).to(grids.valid.device)
    cells = ray_cells(grids, grid, labels).flatten(1)
    labels = labels.flatten(1).clamp(max=num_classes - 1)
    batch, n = cells.shape[0], grid.height * grid.width
    keep = cells >= 0
    index = (torch.arange(batch, device=cells.device)[:, None] * n + cells) * num_classes + labels
    votes = torch.bincount(index[keep], minlength=batch * n * num_classes)
    votes = votes.reshape(batch, n, num_classes)
    out = votes.argmax(-1)  # argmax of all-zero votes is 0: background
    return out.reshape(batch, grid.height, grid.width)


def one_hot_logits(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) class ids -> (B, C, H, W) float logits whose argmax is the label."""
    return F.one_hot(label.long(), num_classes).permute(0, 3, 1, 2).float()


def update_reached_iou(
    metric: ArgmaxIoU, bev_logits: torch.Tensor, bev_label: torch.Tensor, reached: torch.Tensor
) -> None:
    """Score (B, C, H, W) BEV logits against (B, H, W) labels on the reached cells only."""
    target = torch.where(
        reached.to(bev_label.device), bev_label, torch.full_like(bev_label, IGNORE)
    )
    metric.update(bev_logits, target)


def update_perspective_iou(
    metric: ArgmaxIoU,
    bev_logits: torch.Tensor,
    grids: ReprojectionGrids,
    pseudo_labels: torch.Tensor,
) -> None:
    """Reproject (B, C, H, W) BEV logits into the cameras (as the loss does) and score their
    argmax against the pseudo-labels over the valid pixels."""
    rep = reproject_bev_logits(bev_logits, grids, pseudo_labels)
    target = torch.where(rep.valid, rep.labels, torch.full_like(rep.labels, IGNORE))
    logits = rep.logits.flatten(0, 1)  # (B * 6, C, h, w)
    metric.update(logits, target.flatten(0, 1))


def chance_miou(class_cells: Sequence[int], class_names: Sequence[str]) -> float:
    """Expected mIoU (the classes ``ArgmaxIoU`` averages) of a prediction drawn uniformly from
    the K classes, independently per cell, on labels with these per-class cell counts: for a
    class of frequency f, intersection f / K and union f + 1 / K - f / K (shares of the cells)."""
    total = sum(class_cells)
    k = len(class_names)
    ious = []
    for name, cells in zip(class_names, class_cells, strict=True):
        if name in HDMAPNET_EXCLUDED:
            continue
        f = cells / total if total else 0.0
        ious.append((f / k) / (f + 1 / k - f / k))
    return float(np.mean(ious)) if ious else math.nan


class AlignmentMeter:
    """Reach, ceiling and perspective IoU of BEV labels against pseudo-labels, over a split."""

    def __init__(self, class_names: Sequence[str], grid: BevGrid) -> None:
        self.class_names = list(class_names)
        self.grid = grid
        num = len(self.class_names)
        self.cells = self.reached = 0
        self.class_cells = torch.zeros(num, dtype=torch.int64)
        self.class_reached = torch.zeros(num, dtype=torch.int64)
        self.ceiling = ArgmaxIoU(self.class_names)
        self.ceiling_reached = ArgmaxIoU(self.class_names)
        self.perspective = ArgmaxIoU(self.class_names)

    def update(
        self, grids: ReprojectionGrids, bev_label: torch.Tensor, pseudo_labels: torch.Tensor
    ) -> None:
        """One batch: grids of its cameras, (B, H, W) BEV labels, (B, 6, H', W') pseudo-labels."""
        num = len(self.class_names)
        bev_label = bev_label.long().cpu()
        reached = reached_cells(grids, self.grid, pseudo_labels).cpu()
        self.cells += bev_label.numel()
        self.reached += int(reached.sum())
        self.class_cells += torch.bincount(bev_label.flatten(), minlength=num)[:num]
        self.class_reached += torch.bincount(bev_label[reached], minlength=num)[:num]
        splat = splat_pseudo_labels(grids, self.grid, pseudo_labels, num).cpu()
        self.ceiling.update(one_hot_logits(splat, num), bev_label)
        update_reached_iou(self.ceiling_reached, one_hot_logits(splat, num), bev_label, reached)
        update_perspective_iou(
            self.perspective, one_hot_logits(bev_label, num), grids, pseudo_labels
        )

    def compute(self) -> dict[str, float]:
        out = {"reach": self.reached / max(self.cells, 1)}
        out["chance_" + MIOU] = chance_miou(self.class_cells.tolist(), self.class_names)
        for c, name in enumerate(self.class_names):
            cells = int(self.class_cells[c])
            out[f"reach_{name}"] = int(self.class_reached[c]) / cells if cells else math.nan
        for prefix, metric in (
            ("ceiling", self.ceiling),
            ("ceiling_reached", self.ceiling_reached),
            ("perspective", self.perspective),
        ):
            out.update({f"{prefix}_{k}": v for k, v in metric.compute().items()})
        return out

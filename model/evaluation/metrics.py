"""BEV segmentation metrics, accumulated over a whole split.

Two protocols, two metrics, both returning ``{"mIoU": float, "IoU_<class>": float, ...}``:

- ``ArgmaxIoU`` (HDMapNet, mutually exclusive classes): the prediction is the argmax over the
  classes; per class, intersection and union are *summed over every cell of every sample of the
  split* and divided once at the end (HDMapNet's ``get_batch_iou`` + ``total_intersects /
  total_union``), not averaged per sample. ``mIoU`` is the mean over the foreground classes:
  for hdmapnet divider, ped_crossing and boundary, background excluded, as HDMapNet reports it.
  ``IoU_background`` is still reported.
- ``BestThresholdIoU`` (multi-label protocols, BEVFusion's ``BEVMapSegmentation`` metric): per
  class the sigmoid probability is thresholded at each of ``BEVFUSION_THRESHOLDS``; TP, FP and
  FN are summed over the split per (class, threshold); IoU = TP / (TP + FP + FN); a class's IoU
  is its maximum over the thresholds, and ``mIoU`` the mean of those maxima over all classes.
  The threshold is picked on the evaluated split itself, as BEVFusion does (optimistic by
  construction; ``threshold_<class>`` reports which one won).

A class that is absent from both the labels and the predictions of the whole split has no
defined IoU: it is reported as NaN and left out of ``mIoU`` (HDMapNet's 1e-7 in the
denominator would score it 0; only tiny splits ever hit this).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from model.names import IGNORE, MIOU, iou_name

BEVFUSION_THRESHOLDS: tuple[float, ...] = (0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65)
HDMAPNET_EXCLUDED: tuple[str, ...] = ("background",)


def _mean_defined(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(sum(defined) / len(defined)) if defined else float("nan")


class ArgmaxIoU:
    """Per-class IoU of argmax predictions; see the module docstring."""

    def __init__(self, class_names: Sequence[str], excluded: Sequence[str] = HDMAPNET_EXCLUDED):
        self.class_names = list(class_names)
        self.excluded = set(excluded)
        num = len(self.class_names)
        self.confusion = torch.zeros(num, num, dtype=torch.int64)  # [target, prediction]

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """logits (B, C, H, W), target (B, H, W) class ids (IGNORE cells skipped)."""
        num = len(self.class_names)
        if logits.shape[1] != num:
            raise ValueError(f"logits have {logits.shape[1]} classes, metric expects {num}")
        pred = logits.argmax(1)
        keep = target != IGNORE
        index = target[keep].long() * num + pred[keep]
        counts = torch.bincount(index, minlength=num * num).reshape(num, num)
        self.confusion += counts.cpu()

    def counts(self) -> list[torch.Tensor]:
        """The accumulated counts, which sum over disjoint parts of a split."""
        return [self.confusion]

    def compute(self) -> dict[str, float]:
        inter = self.confusion.diag().double()
        union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - inter
        out: dict[str, float] = {}
        for c, name in enumerate(self.class_names):
            out[iou_name(name)] = float(inter[c] / union[c]) if union[c] > 0 else float("nan")
        out[MIOU] = _mean_defined(
            [out[iou_name(n)] for n in self.class_names if n not in self.excluded]
        )
        return out


class BestThresholdIoU:
    """Per-class IoU at the best of several sigmoid thresholds; see the module docstring."""

    def __init__(
        self, class_names: Sequence[str], thresholds: Sequence[float] = BEVFUSION_THRESHOLDS
    ):
        self.class_names = list(class_names)
        self.threshold_values = [float(t) for t in thresholds]
        self.thresholds = torch.tensor(self.threshold_values, dtype=torch.float32)
        shape = (len(self.class_names), len(self.thresholds))
        self.tp = torch.zeros(shape, dtype=torch.int64)
        self.fp = torch.zeros(shape, dtype=torch.int64)
        self.fn = torch.zeros(shape, dtype=torch.int64)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """logits (B, C, H, W), target (B, C, H, W) multi-hot {0, 1}."""
        num = len(self.class_names)
        if logits.shape[1] != num or target.shape != logits.shape:
            raise ValueError(f"expected logits and multi-hot target (B, {num}, H, W)")
        prob = torch.sigmoid(logits.float()).transpose(0, 1).reshape(num, -1)
        label = (target > 0.5).transpose(0, 1).reshape(num, -1)
        thresholds = self.thresholds.to(prob.device)
        # One threshold at a time keeps memory at one (C, N) mask, not (C, N, T).
        for t, threshold in enumerate(thresholds):
            pred = prob >= threshold
            self.tp[:, t] += (pred & label).sum(1).cpu()
            self.fp[:, t] += (pred & ~label).sum(1).cpu()
            self.fn[:, t] += (~pred & label).sum(1).cpu()

    def counts(self) -> list[torch.Tensor]:
        """The accumulated counts, which sum over disjoint parts of a split."""
        return [self.tp, self.fp, self.fn]

    def compute(self) -> dict[str, float]:
        denom = (self.tp + self.fp + self.fn).double()
        ious = torch.where(denom > 0, self.tp.double() / denom.clamp_min(1), float("nan"))
        out: dict[str, float] = {}
        for c, name in enumerate(self.class_names):
            row = ious[c]
            if torch.isnan(row).all():
                out[iou_name(name)] = float("nan")
                continue
            best = int(torch.nan_to_num(row, nan=-1.0).argmax())
            out[iou_name(name)] = float(row[best])
            out[f"threshold_{name}"] = self.threshold_values[best]
        out[MIOU] = _mean_defined([out[iou_name(n)] for n in self.class_names])
        return out


def make_metric(protocol: str) -> ArgmaxIoU | BestThresholdIoU:
    """The metric a label protocol is evaluated with (``model.data.labels`` protocols)."""
    from model.data.labels import class_names, is_multilabel

    names = class_names(protocol)
    return BestThresholdIoU(names) if is_multilabel(protocol) else ArgmaxIoU(names)

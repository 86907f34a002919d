"""BEV metrics: HDMapNet argmax IoU and BEVFusion best-threshold IoU, accumulated over a split."""

from __future__ import annotations

import math

import torch

from model.evaluation.metrics import BEVFUSION_THRESHOLDS, ArgmaxIoU, BestThresholdIoU, make_metric

NAMES = ["background", "divider", "ped_crossing", "boundary"]


def one_hot_logits(pred: torch.Tensor, num: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, num).permute(0, 3, 1, 2).float()


def test_argmax_iou_sums_intersection_and_union_over_the_split_before_dividing():
    # Sample 1: divider 1 cell right out of 1 predicted/1 true; sample 2: 0 of 3 (1 true, 2
    # predicted elsewhere). Per-sample mean would be (1 + 0) / 2; split-level is 1 / 4.
    target1 = torch.tensor([[[1, 0, 0, 0]]])
    pred1 = torch.tensor([[[1, 0, 0, 0]]])
    target2 = torch.tensor([[[1, 0, 0, 0]]])
    pred2 = torch.tensor([[[0, 1, 1, 0]]])
    metric = ArgmaxIoU(NAMES)
    metric.update(one_hot_logits(pred1), target1)
    metric.update(one_hot_logits(pred2), target2)
    out = metric.compute()
    assert out["IoU_divider"] == 1 / 4


def test_argmax_miou_is_the_foreground_mean_without_background():
    target = torch.tensor([[[0, 0, 1, 1, 2, 2, 3, 3]]])
    pred = torch.tensor([[[0, 0, 1, 0, 2, 2, 3, 1]]])
    metric = ArgmaxIoU(NAMES)
    metric.update(one_hot_logits(pred), target)
    out = metric.compute()
    assert out["IoU_background"] == 2 / 3
    assert out["IoU_divider"] == 1 / 3
    assert out["IoU_ped_crossing"] == 1.0
    assert out["IoU_boundary"] == 1 / 2
    assert math.isclose(out["mIoU"], (1 / 3 + 1.0 + 1 / 2) / 3)


def test_argmax_iou_of_a_class_absent_everywhere_is_nan_and_left_out_of_the_mean():
    target = torch.tensor([[[0, 1, 1, 0]]])
    metric = ArgmaxIoU(NAMES)
    metric.update(one_hot_logits(target), target)
    out = metric.compute()
    assert math.isnan(out["IoU_ped_crossing"]) and math.isnan(out["IoU_boundary"])
    assert out["mIoU"] == 1.0


def test_argmax_iou_skips_ignored_cells():
    target = torch.tensor([[[1, 255, 255, 0]]])
    pred = torch.tensor([[[1, 1, 1, 0]]])
    metric = ArgmaxIoU(NAMES)
    metric.update(one_hot_logits(pred), target)
    assert metric.compute()["IoU_divider"] == 1.0


def test_best_threshold_iou_takes_the_best_threshold_per_class():
    # Class 0 is right at threshold >= 0.55 only; class 1 is right at <= 0.40 only.
    prob = torch.tensor([[[[0.6, 0.5]], [[0.45, 0.3]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])
    metric = BestThresholdIoU(["a", "b"])
    metric.update(torch.logit(prob), target)
    out = metric.compute()
    assert out["IoU_a"] == 1.0 and out["threshold_a"] in (0.55, 0.60)
    assert out["IoU_b"] == 1.0 and out["threshold_b"] == 0.35
    assert out["mIoU"] == 1.0


def test_best_threshold_iou_sweeps_the_bevfusion_thresholds():
    assert BestThresholdIoU(["a"]).threshold_values == [0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65]
    assert BEVFUSION_THRESHOLDS == (0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65)


def test_best_threshold_iou_accumulates_counts_over_the_split():
    metric = BestThresholdIoU(["a"], thresholds=[0.5])
    metric.update(torch.tensor([[[[5.0, 5.0]]]]), torch.tensor([[[[1.0, 0.0]]]]))  # TP, FP
    metric.update(torch.tensor([[[[-5.0, 5.0]]]]), torch.tensor([[[[1.0, 1.0]]]]))  # FN, TP
    assert metric.compute()["IoU_a"] == 2 / 4


def test_make_metric_follows_the_protocol():
    assert isinstance(make_metric("hdmapnet"), ArgmaxIoU)
    assert isinstance(make_metric("fine"), BestThresholdIoU)

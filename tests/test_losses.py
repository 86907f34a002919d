"""Losses: reprojection (with gradients into the model), temporal consistency and its warp,
supervised BEV loss, and the NaN guard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.geometry import BevGrid
from model.network.reprojection import IGNORE, Reprojection, reproject
from model.network.warp import warp_prev_to_current
from model.training.losses import (
    NonFiniteLossError,
    bev_loss,
    check_finite,
    reprojection_bce_loss,
    reprojection_loss,
    temporal_consistency_loss,
    weighted_sum,
)

GRID = BevGrid(-15.0, 15.0, -15.0, 15.0, 0.5)  # 60 x 60 square cells


def motion(dx_m: float = 0.0, dy_m: float = 0.0, yaw_deg: float = 0.0) -> torch.Tensor:
    """(1, 4, 4) prev_ego_from_ego for an ego that moved (dx, dy) and turned yaw since t-1."""
    yaw = math.radians(yaw_deg)
    out = torch.eye(4)
    out[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    out[0, 3], out[1, 3] = dx_m, dy_m
    return out[None]


def field_on_cells(fn, transform: torch.Tensor | None = None) -> torch.Tensor:
    """(1, 2, H, W) smooth two-channel field fn(x, y) evaluated at GRID's cell centres, where
    the centres are first mapped through ``transform`` (4x4) when given."""
    xy = torch.from_numpy(GRID.ego_xy_centres()).float()
    if transform is not None:
        xyz1 = torch.cat([xy, torch.zeros_like(xy[..., :1]), torch.ones_like(xy[..., :1])], -1)
        xy = (xyz1 @ transform[0].T)[..., :2]
    return fn(xy[..., 0], xy[..., 1]).permute(2, 0, 1)[None]


def smooth(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.sin(x / 4.0) + 0.1 * y, torch.cos(y / 5.0) * x / 10.0], -1)


# --- temporal warp ------------------------------------------------------------------------------


def test_warp_of_a_whole_cell_shift_recovers_the_original_exactly_where_valid():
    prev_bev = torch.randn(1, 3, *GRID.shape)
    # Ego drove 2 m (4 cells) forward: what was 2 m further ahead (4 rows up, row 0 is the
    # front edge) is now at the current cell, and the first 4 rows are new ground.
    warped, valid = warp_prev_to_current(prev_bev, motion(dx_m=2.0), GRID, mode="nearest")
    assert torch.equal(warped[0, :, 4:], prev_bev[0, :, :-4])
    assert valid[0, 4:].all() and not valid[0, :4].any()


@pytest.mark.parametrize(
    "dx_m, dy_m, yaw_deg", [(1.3, -0.4, 0.0), (0.0, 0.0, 7.0), (2.1, 0.6, -11.0)]
)
def test_warp_of_a_shifted_and_rotated_bev_recovers_the_field_where_valid(dx_m, dy_m, yaw_deg):
    prev_from_cur = motion(dx_m, dy_m, yaw_deg)
    prev_bev = field_on_cells(smooth)  # the field in the previous ego frame
    expected = field_on_cells(smooth, prev_from_cur)  # same world field, current frame
    warped, valid = warp_prev_to_current(prev_bev, prev_from_cur, GRID)
    assert valid.float().mean() > 0.8
    # Where the source lies at least one cell inside the previous grid (nearer the edge
    # bilinear sampling blends with the zero padding, as it should).
    source = field_on_cells(lambda x, y: torch.stack([x, y], -1), prev_from_cur)[0]
    res = GRID.resolution_m
    inner = (source[0] > GRID.x_min_m + res) & (source[0] < GRID.x_max_m - res)
    inner &= (source[1] > GRID.y_min_m + res) & (source[1] < GRID.y_max_m - res)
    assert (valid[0] >= inner).all() and inner.float().mean() > 0.8
    error = (warped - expected)[0].abs().amax(0)[inner]
    assert error.max() < 0.01  # bilinear on a field that is nearly linear over a cell


# --- temporal consistency loss ------------------------------------------------------------------


def test_temporal_loss_vanishes_when_the_prediction_follows_the_ego_motion():
    prev_from_cur = motion(1.5, 0.5, 5.0)
    prev_logits = 3.0 * field_on_cells(smooth)
    followed = 3.0 * field_on_cells(smooth, prev_from_cur)
    stayed = prev_logits
    for kind in ("kl", "mse"):
        good = temporal_consistency_loss(followed, prev_logits, prev_from_cur, GRID, kind=kind)
        bad = temporal_consistency_loss(stayed, prev_logits, prev_from_cur, GRID, kind=kind)
        assert good < 1e-3 and bad > 20 * good


def test_temporal_loss_skips_samples_without_a_previous_keyframe():
    logits = torch.randn(2, 4, *GRID.shape)
    prev_logits = torch.randn(2, 4, *GRID.shape)
    transform = torch.eye(4).repeat(2, 1, 1)
    both = temporal_consistency_loss(logits, prev_logits, transform, GRID)
    only_first = temporal_consistency_loss(
        logits, prev_logits, transform, GRID, has_prev=torch.tensor([True, False])
    )
    first = temporal_consistency_loss(logits[:1], prev_logits[:1], transform[:1], GRID)
    assert torch.isclose(only_first, first) and not torch.isclose(both, first)
    none = temporal_consistency_loss(
        logits.requires_grad_(), prev_logits, transform, GRID, has_prev=torch.tensor([0, 0])
    )
    assert none == 0 and none.requires_grad


def test_temporal_loss_treats_the_previous_prediction_as_a_fixed_target():
    logits = torch.randn(1, 4, *GRID.shape, requires_grad=True)
    prev_logits = torch.randn(1, 4, *GRID.shape, requires_grad=True)
    temporal_consistency_loss(logits, prev_logits, motion(1.0), GRID).backward()
    assert prev_logits.grad is None and logits.grad.abs().sum() > 0


def test_multilabel_temporal_loss_is_zero_for_identical_predictions():
    logits = torch.randn(1, 5, *GRID.shape)
    loss = temporal_consistency_loss(logits, logits, motion(), GRID, multilabel=True)
    assert loss.abs() < 1e-4


# --- reprojection loss ---------------------------------------------------------------------------


def test_reprojection_loss_averages_cross_entropy_over_valid_labelled_pixels_only():
    logits = torch.randn(1, 6, 4, 3, 5)
    labels = torch.randint(0, 4, (1, 6, 3, 5))
    labels[0, 0, 0] = IGNORE
    valid = torch.rand(1, 6, 3, 5) > 0.3
    rep = Reprojection(logits=logits, valid=valid, labels=labels, stride=1)
    keep = valid & (labels != IGNORE)
    expected = F.cross_entropy(logits.permute(0, 1, 3, 4, 2)[keep], labels[keep])
    assert torch.isclose(reprojection_loss(rep), expected)


def test_focal_reprojection_loss_with_gamma_zero_is_weighted_cross_entropy():
    logits = torch.randn(1, 6, 4, 3, 5)
    labels = torch.randint(0, 4, (1, 6, 3, 5))
    rep = Reprojection(logits, torch.ones(1, 6, 3, 5, dtype=torch.bool), labels, stride=1)
    weights = [0.2, 1.0, 2.0, 1.5]
    ce = reprojection_loss(rep, class_weights=weights)
    focal0 = reprojection_loss(rep, kind="focal", focal_gamma=0.0, class_weights=weights)
    assert torch.isclose(ce, focal0, rtol=1e-5)
    assert reprojection_loss(rep, kind="focal") < reprojection_loss(rep)


def test_reprojection_loss_subsamples_full_resolution_pseudo_labels():
    rep = Reprojection(
        torch.randn(1, 6, 4, 3, 5), torch.ones(1, 6, 3, 5, dtype=torch.bool), None, 4
    )
    full = torch.randint(0, 4, (1, 6, 12, 20))
    assert torch.isclose(
        reprojection_loss(rep, full),
        reprojection_loss(rep, full[..., 2::4, 2::4]),
    )


def test_reprojection_bce_loss_rewards_any_channel_of_a_group():
    # Perspective classes: 0 background, 1 "marking" = BEV channels {0, 1}.
    labels = torch.ones(1, 6, 2, 2, dtype=torch.long)
    valid = torch.ones(1, 6, 2, 2, dtype=torch.bool)
    first_on = torch.full((1, 6, 2, 2, 2), -8.0)
    first_on[:, :, 0] = 8.0
    none_on = torch.full((1, 6, 2, 2, 2), -8.0)
    groups = [[], [0, 1]]
    low = reprojection_bce_loss(Reprojection(first_on, valid, labels, 1), groups)
    high = reprojection_bce_loss(Reprojection(none_on, valid, labels, 1), groups)
    assert low < 1e-3 < 7.0 < high


def test_reprojection_loss_gradients_reach_the_bev_queries_and_the_backbone():
    from model.network.bevformer import BEVFormerSeg
    from model.presets import get_preset
    from model.tools.bench_step import synthetic_rig

    torch.manual_seed(0)
    cfg = get_preset("nano", image_size=(64, 96))
    grid = BevGrid(-30.0, 30.0, -15.0, 15.0, 1.0)
    net = BEVFormerSeg(cfg, num_classes=4, label_grid=grid)
    intrinsics, ego_from_cam = synthetic_rig(1, cfg.image_size, "cpu")
    images = torch.randn(1, 6, 3, *cfg.image_size)
    pseudo = torch.randint(0, 4, (1, 6, *cfg.image_size))
    out = net(images, intrinsics, ego_from_cam)
    rep = reproject(out["bev_logits"], intrinsics, ego_from_cam, cfg.image_size, grid, 4, pseudo)
    assert rep.valid.any()
    reprojection_loss(rep).backward()
    assert net.bev_queries.weight.grad.abs().sum() > 0
    assert net.backbone.body.conv1.weight.grad.abs().sum() > 0


# --- supervised BEV loss, sums, guard ------------------------------------------------------------


def test_bev_loss_is_cross_entropy_on_ids_and_bce_on_multi_hot():
    logits = torch.randn(2, 4, 6, 5)
    ids = torch.randint(0, 4, (2, 6, 5))
    assert torch.isclose(bev_loss(logits, ids), F.cross_entropy(logits, ids))
    multi_hot = (torch.rand(2, 4, 6, 5) > 0.5).float()
    assert torch.isclose(
        bev_loss(logits, multi_hot), F.binary_cross_entropy_with_logits(logits, multi_hot)
    )


def test_weighted_sum_applies_the_configured_weights():
    terms = {"reproj": torch.tensor(2.0), "temporal": torch.tensor(3.0)}
    assert weighted_sum(terms, {"reproj": 1.0, "temporal": 0.1}).item() == pytest.approx(2.3)


def test_non_finite_loss_raises_naming_the_term():
    terms = {"reproj": torch.tensor(1.0), "temporal": torch.tensor(float("nan"))}
    with pytest.raises(NonFiniteLossError, match=r"temporal=nan at pretrain epoch 1"):
        check_finite(terms, "pretrain epoch 1")
    check_finite({"bev": torch.tensor(np.float32(0.5))})

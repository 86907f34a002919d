"""Reprojection of BEV logits into the cameras: geometry checked against nuscenes-devkit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nuscenes.utils.geometry_utils import view_points

from model.geometry import BevGrid, invert_transform, scale_intrinsics, transform_from_pose
from model.network.reprojection import (
    GRID_CACHE,
    IGNORE,
    ground_xy_from_pixels,
    reproject,
    reproject_bev_logits,
    reprojection_grids,
    strided_pixel_centres,
    subsample_labels,
)

GRID = BevGrid(-30.0, 30.0, -15.0, 15.0, 0.15)
ORIGINAL_HW = (900, 1600)

# Calibrations of nuScenes v1.0-mini (scene-0061): translation, rotation (w, x, y, z), K.
CALIBRATIONS = {
    "CAM_FRONT": (
        [1.70079118954, 0.0159456324149, 1.51095763913],
        [0.4998015430569128, -0.5030316162024876, 0.4997798114386805, -0.49737083824542755],
        [[1266.417203046554, 0.0, 816.2670197447984], [0.0, 1266.417203046554, 491.50706579294757],
         [0.0, 0.0, 1.0]],
    ),
    "CAM_BACK": (
        [0.0283260309358, 0.00345136761476, 1.57910346144],
        [0.5037872666382278, -0.49740249788611096, -0.4941850223835201, 0.5045496097725578],
        [[809.2209905677063, 0.0, 829.2196003259838], [0.0, 809.2209905677063, 481.77842384512485],
         [0.0, 0.0, 1.0]],
    ),
}  # fmt: skip


def calibration(camera: str, image_hw: tuple[int, int] = ORIGINAL_HW):
    """(K (3, 3), ego_from_cam (4, 4)) float64 for images resized to ``image_hw``."""
    translation, rotation, intrinsic = CALIBRATIONS[camera]
    sy, sx = image_hw[0] / ORIGINAL_HW[0], image_hw[1] / ORIGINAL_HW[1]
    return scale_intrinsics(np.array(intrinsic), sx, sy), transform_from_pose(translation, rotation)


def devkit_pixels(xy_ego: np.ndarray, img_from_cam, ego_from_cam):
    """Ground points (N, 2) -> devkit (u, v) pixels (N, 2) and depth (N,)."""
    points = np.concatenate([xy_ego, np.zeros((len(xy_ego), 1)), np.ones((len(xy_ego), 1))], 1)
    points_cam = (invert_transform(ego_from_cam) @ points.T)[:3]
    return view_points(points_cam, img_from_cam, normalize=True)[:2].T, points_cam[2]


def ego_xy_from_uv(uv: torch.Tensor, grid: BevGrid) -> np.ndarray:
    """Inverse of ``BevGrid.bev_normalized_from_ego``."""
    uv = uv.double().numpy()
    y = grid.y_max_m - (uv[..., 0] + 1.0) / 2.0 * (grid.y_max_m - grid.y_min_m)
    x = grid.x_max_m - (uv[..., 1] + 1.0) / 2.0 * (grid.x_max_m - grid.x_min_m)
    return np.stack([x, y], -1)


def batch_of(cameras: list[str], image_hw: tuple[int, int]):
    pairs = [calibration(c, image_hw) for c in cameras]
    intrinsics = torch.tensor(np.stack([k for k, _ in pairs]), dtype=torch.float32)[None]
    ego_from_cam = torch.tensor(np.stack([e for _, e in pairs]), dtype=torch.float32)[None]
    return intrinsics, ego_from_cam


@pytest.mark.parametrize("camera", ["CAM_FRONT", "CAM_BACK"])
def test_devkit_projected_ground_points_map_back_within_half_a_bev_pixel(camera):
    img_from_cam, ego_from_cam = calibration(camera)
    xy = GRID.ego_xy_centres()[::7, ::5].reshape(-1, 2)
    pixels, depth = devkit_pixels(xy, img_from_cam, ego_from_cam)
    seen = (depth > 1.0) & (pixels[:, 0] >= 0) & (pixels[:, 0] < ORIGINAL_HW[1])
    seen &= (pixels[:, 1] >= 0) & (pixels[:, 1] < ORIGINAL_HW[0])
    assert seen.sum() > 100

    xy_back, valid = ground_xy_from_pixels(
        torch.from_numpy(pixels[seen]),
        torch.from_numpy(img_from_cam),
        torch.from_numpy(ego_from_cam),
    )
    assert valid.all()
    error_px = GRID.bev_pixel_from_ego(xy_back.numpy()) - GRID.bev_pixel_from_ego(xy[seen])
    assert np.abs(error_px).max() < 0.5


@pytest.mark.parametrize("stride", [1, 4, 5])
def test_strided_grid_pixels_are_devkit_projections_of_their_bev_points(stride):
    image_hw = (96, 160)
    intrinsics, ego_from_cam = batch_of(["CAM_FRONT", "CAM_BACK"], image_hw)
    grids = reprojection_grids(intrinsics, ego_from_cam, image_hw, GRID, stride, cache=False)
    rows, cols = strided_pixel_centres(image_hw, stride)
    assert grids.uv.shape == (1, 2, len(rows), len(cols), 2)
    vv, uu = np.meshgrid(rows.numpy(), cols.numpy(), indexing="ij")
    for cam in range(2):
        valid = grids.valid[0, cam].numpy()
        assert valid.sum() > 20
        xy = ego_xy_from_uv(grids.uv[0, cam], GRID)[valid]
        pixels, depth = devkit_pixels(xy, intrinsics[0, cam].double().numpy(),
                                      ego_from_cam[0, cam].double().numpy())  # fmt: skip
        assert (depth > 0).all()
        expected = np.stack([uu[valid], vv[valid]], -1)
        assert np.abs(pixels - expected).max() < 0.5


def test_pixels_above_the_horizon_or_beyond_the_bev_range_are_invalid():
    image_hw = (96, 160)
    intrinsics, ego_from_cam = batch_of(["CAM_FRONT"], image_hw)
    grids = reprojection_grids(intrinsics, ego_from_cam, image_hw, GRID, stride=1, cache=False)
    valid = grids.valid[0, 0]
    # The camera looks level, so its horizon is near the principal point's row (~52). Centre
    # column: row 10 is sky, row 55 meets the road ~60 m ahead (outside the 30 m grid), row 95
    # a few metres ahead.
    xy, hits = ground_xy_from_pixels(
        torch.tensor([[80.0, 10.0], [80.0, 55.0], [80.0, 95.0]]),
        intrinsics[0, 0],
        ego_from_cam[0, 0],
    )
    assert hits.tolist() == [False, True, True]
    assert xy[1, 0] > GRID.x_max_m and 0 < xy[2, 0] < GRID.x_max_m
    assert not valid[:52].any()
    assert not valid[55, 80] and valid[95, 80]
    assert valid[-1].all()


def test_reprojected_logits_read_the_bev_at_the_pixel_ground_point():
    # A BEV whose two channels are the ego x and y of each cell: bilinear sampling of a linear
    # field is exact, so each pixel must read the coordinates of its own ground point.
    image_hw = (96, 160)
    intrinsics, ego_from_cam = batch_of(["CAM_FRONT", "CAM_BACK"], image_hw)
    xy_cells = torch.from_numpy(GRID.ego_xy_centres()).float().permute(2, 0, 1)
    bev = torch.stack([xy_cells, 2.0 * xy_cells])  # sample 1 scaled: batch order must survive
    grids = reprojection_grids(
        intrinsics.expand(2, -1, -1, -1), ego_from_cam.expand(2, -1, -1, -1), image_hw, GRID, 4
    )
    out = reproject_bev_logits(bev, grids)
    assert out.logits.shape == (2, 2, 2, *grids.valid.shape[-2:])
    for cam in range(2):
        valid = grids.valid[0, cam]
        # keep away from the outermost half cell, where border padding clamps
        xy = torch.from_numpy(ego_xy_from_uv(grids.uv[0, cam], GRID)).float()
        inner = valid & (grids.uv[0, cam].abs() < 1.0 - 2.0 / GRID.height).all(-1)
        read = out.logits[0, cam].permute(1, 2, 0)
        assert torch.allclose(read[inner], xy[inner], atol=1e-3)
        assert torch.allclose(out.logits[1, cam].permute(1, 2, 0)[inner], 2 * xy[inner], atol=2e-3)


def test_ignored_pseudo_labels_leave_the_valid_mask_and_are_strided_like_the_grid():
    image_hw = (96, 160)
    intrinsics, ego_from_cam = batch_of(["CAM_FRONT"], image_hw)
    labels = torch.randint(0, 4, (1, 1, *image_hw))
    labels[..., 60:, :80] = IGNORE
    bev = torch.randn(1, 4, *GRID.shape)
    out = reproject(bev, intrinsics, ego_from_cam, image_hw, GRID, stride=4, pseudo_labels=labels)
    assert torch.equal(out.labels, labels[..., 2::4, 2::4])
    assert torch.equal(out.labels, subsample_labels(labels, 4))
    geometry = reprojection_grids(intrinsics, ego_from_cam, image_hw, GRID, 4).valid
    assert torch.equal(out.valid, geometry & (out.labels != IGNORE))
    assert not out.valid[..., 15:, :20].any() and out.valid[..., 15:, 20:].any()


def test_grids_are_cached_per_calibration_and_recomputed_for_a_new_one():
    image_hw = (48, 80)
    intrinsics, ego_from_cam = batch_of(["CAM_FRONT", "CAM_BACK"], image_hw)
    GRID_CACHE.clear()
    first = reprojection_grids(intrinsics, ego_from_cam, image_hw, GRID, 4)
    assert (GRID_CACHE.hits, GRID_CACHE.misses) == (0, 2)
    again = reprojection_grids(intrinsics, ego_from_cam, image_hw, GRID, 4)
    assert (GRID_CACHE.hits, GRID_CACHE.misses) == (2, 2)
    assert torch.equal(first.uv, again.uv)
    moved = ego_from_cam.clone()
    moved[0, 1, 0, 3] -= 1.0  # the back camera one metre further back
    reprojection_grids(intrinsics, moved, image_hw, GRID, 4)
    assert (GRID_CACHE.hits, GRID_CACHE.misses) == (3, 3)
    reprojection_grids(intrinsics, ego_from_cam, image_hw, GRID, 8)  # another stride
    assert GRID_CACHE.misses == 5

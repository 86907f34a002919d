"""Frames, the BEV grid and rigid transforms shared by data, labels and the model.

Conventions (nuScenes):
- ego frame: x forward, y left, z up, metres, origin at the rear axle on the ground.
- camera frame: x right, y down, z forward (optical axis).
- transforms are 4x4 homogeneous matrices named ``a_from_b``: ``p_a = a_from_b @ p_b``.

The BEV grid is stored like an image seen from above with the vehicle facing up:
row 0 is the far front edge (x = x_max), column 0 is the far left edge (y = y_max).
Integer pixel coordinates name pixel centres, so pixel (r, c) covers
x in [x_max - (r + 1) * res, x_max - r * res] and y in [y_max - (c + 1) * res, y_max - c * res].
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from pyquaternion import Quaternion

CAMERAS: tuple[str, ...] = (
    "CAM_FRONT_LEFT",
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_LEFT",
    "CAM_BACK",
    "CAM_BACK_RIGHT",
)


@dataclass(frozen=True)
class BevGrid:
    """Metric extent and resolution of a BEV raster in the ego frame."""

    x_min_m: float = -30.0
    x_max_m: float = 30.0
    y_min_m: float = -15.0
    y_max_m: float = 15.0
    resolution_m: float = 0.15

    @property
    def height(self) -> int:
        """Rows, along ego x."""
        return int(round((self.x_max_m - self.x_min_m) / self.resolution_m))

    @property
    def width(self) -> int:
        """Columns, along ego y."""
        return int(round((self.y_max_m - self.y_min_m) / self.resolution_m))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def bev_pixel_from_ego(self, xy_ego: np.ndarray) -> np.ndarray:
        """(..., 2) ego x, y in metres -> (..., 2) (row, col) float pixel coordinates."""
        xy_ego = np.asarray(xy_ego, dtype=np.float64)
        row = (self.x_max_m - xy_ego[..., 0]) / self.resolution_m - 0.5
        col = (self.y_max_m - xy_ego[..., 1]) / self.resolution_m - 0.5
        return np.stack([row, col], axis=-1)

    def ego_from_bev_pixel(self, rowcol: np.ndarray) -> np.ndarray:
        """(..., 2) (row, col) pixel coordinates -> (..., 2) ego x, y in metres."""
        rowcol = np.asarray(rowcol, dtype=np.float64)
        x = self.x_max_m - (rowcol[..., 0] + 0.5) * self.resolution_m
        y = self.y_max_m - (rowcol[..., 1] + 0.5) * self.resolution_m
        return np.stack([x, y], axis=-1)

    def bev_normalized_from_ego(self, xy_ego: torch.Tensor) -> torch.Tensor:
        """(..., 2) ego x, y -> (..., 2) grid_sample coordinates (u along columns, v along rows).

        For ``F.grid_sample(..., align_corners=False)``: -1 and +1 are the outer pixel edges.
        """
        u = (self.y_max_m - xy_ego[..., 1]) / (self.y_max_m - self.y_min_m) * 2.0 - 1.0
        v = (self.x_max_m - xy_ego[..., 0]) / (self.x_max_m - self.x_min_m) * 2.0 - 1.0
        return torch.stack([u, v], dim=-1)

    def ego_xy_centres(self) -> np.ndarray:
        """(H, W, 2) ego x, y of every pixel centre."""
        rows, cols = np.meshgrid(np.arange(self.height), np.arange(self.width), indexing="ij")
        return self.ego_from_bev_pixel(np.stack([rows, cols], axis=-1))


def transform_from_pose(translation, rotation_wxyz) -> np.ndarray:
    """nuScenes translation + quaternion (w, x, y, z) -> 4x4 float64 ``parent_from_child``."""
    out = np.eye(4)
    out[:3, :3] = Quaternion(rotation_wxyz).rotation_matrix
    out[:3, 3] = np.asarray(translation, dtype=np.float64)
    return out


def invert_transform(a_from_b: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform, exact for rotation + translation."""
    rot = a_from_b[:3, :3]
    out = np.eye(4, dtype=a_from_b.dtype)
    out[:3, :3] = rot.T
    out[:3, 3] = -rot.T @ a_from_b[:3, 3]
    return out


def scale_intrinsics(img_from_cam: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Intrinsics for an image resized by (sx, sy) (pixel-edge convention, as cv2/PIL resize)."""
    out = np.array(img_from_cam, dtype=np.float64, copy=True)
    out[0, 0] *= sx
    out[0, 2] = (out[0, 2] + 0.5) * sx - 0.5
    out[1, 1] *= sy
    out[1, 2] = (out[1, 2] + 0.5) * sy - 0.5
    return out


def check_number(name: str, value, minimum: float, strict: bool) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite real number above ``minimum``
    (or equal to it, without ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name}: must be {'>' if strict else '>='} {minimum:g}, got {value!r}")


def check_grid(grid) -> BevGrid:
    """``grid`` (a BevGrid or a mapping of its fields) checked: finite bounds, max > min, a
    resolution > 0 that divides both extents and leaves at least one cell; ValueError naming
    the field otherwise."""
    if isinstance(grid, dict):
        try:
            grid = BevGrid(**grid)
        except TypeError as exc:
            raise ValueError(f"grid: {exc}") from None
    if not isinstance(grid, BevGrid):
        raise ValueError(f"grid: must be a BevGrid or a mapping of its fields, got {grid!r}")
    for name in ("x_min_m", "x_max_m", "y_min_m", "y_max_m"):
        check_number(f"grid.{name}", getattr(grid, name), -math.inf, False)
    check_number("grid.resolution_m", grid.resolution_m, 0.0, True)
    for low, high in (("x_min_m", "x_max_m"), ("y_min_m", "y_max_m")):
        if getattr(grid, high) <= getattr(grid, low):
            raise ValueError(
                f"grid.{high}: must be > grid.{low} ({getattr(grid, low)!r}), "
                f"got {getattr(grid, high)!r}"
            )
    for axis, extent in (("x", grid.x_max_m - grid.x_min_m), ("y", grid.y_max_m - grid.y_min_m)):
        cells = extent / grid.resolution_m
        if cells >= 0.5 and abs(cells - round(cells)) > 1e-6 * max(cells, 1.0):
            raise ValueError(
                f"grid.resolution_m: {grid.resolution_m!r} m does not divide the grid's "
                f"{extent:g} m along {axis} ({cells:.2f} cells): cells would not be square"
            )
    if grid.height < 1 or grid.width < 1:
        raise ValueError(
            f"grid.resolution_m: {grid.resolution_m!r} m makes the grid empty "
            f"({grid.height} x {grid.width} cells over {grid.x_max_m - grid.x_min_m:g} m x "
            f"{grid.y_max_m - grid.y_min_m:g} m)"
        )
    return grid

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

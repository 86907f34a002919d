"""Warp a BEV map from the previous keyframe's ego frame into the current one.

Used twice: BEVFormer's temporal self-attention aligns the history BEV with it, and the
temporal-consistency loss compares the prediction at t with the warped prediction at t-1.
``rotate_ego_frame`` reuses it for the BEV yaw augmentation of a training batch.
The rotation is about the ego origin in metric coordinates, so it is right for any grid size
and any (also non-square) cell shape; only the grid's metric extent matters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.geometry import BevGrid
from model.names import IGNORE


def ego_xy_of_cells(grid: BevGrid, height: int, width: int, device=None) -> torch.Tensor:
    """(H, W, 2) ego x, y of the cell centres of an H x W raster over ``grid``'s extent."""
    rows = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    cols = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    x = grid.x_max_m - rows * (grid.x_max_m - grid.x_min_m) / height
    y = grid.y_max_m - cols * (grid.y_max_m - grid.y_min_m) / width
    xx, yy = torch.meshgrid(x, y, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def warp_prev_to_current(
    prev_bev: torch.Tensor,
    prev_ego_from_ego: torch.Tensor,
    grid: BevGrid,
    mode: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``prev_bev`` (B, C, H, W), defined in the previous ego frame, onto the current grid.

    ``prev_ego_from_ego`` (B, 4, 4) maps current ego coordinates to previous ego coordinates.
    Returns the warped map (B, C, H, W) and a (B, H, W) bool mask of cells whose source lies
    inside the previous grid.
    """
    batch, _, height, width = prev_bev.shape
    xy_cur = ego_xy_of_cells(grid, height, width, device=prev_bev.device)  # (H, W, 2)
    xyz1 = torch.cat(
        [xy_cur, torch.zeros_like(xy_cur[..., :1]), torch.ones_like(xy_cur[..., :1])], dim=-1
    )
    transform = prev_ego_from_ego.to(device=prev_bev.device, dtype=torch.float32)
    xy_prev = torch.einsum("bij,hwj->bhwi", transform, xyz1)[..., :2]
    uv = grid.bev_normalized_from_ego(xy_prev)  # (B, H, W, 2)
    valid = (uv.abs() <= 1.0).all(dim=-1)
    warped = F.grid_sample(
        prev_bev, uv.to(prev_bev.dtype), mode=mode, padding_mode="zeros", align_corners=False
    )
    return warped, valid


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

"""Warp a BEV map from the previous keyframe's ego frame into the current one.

Used twice: BEVFormer's temporal self-attention aligns the history BEV with it, and the
temporal-consistency loss compares the prediction at t with the warped prediction at t-1.
The rotation is about the ego origin in metric coordinates, so it is right for any grid size
and any (also non-square) cell shape; only the grid's metric extent matters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.geometry import BevGrid


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

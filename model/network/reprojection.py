"""Differentiable reprojection of BEV logits into the camera images.

Every camera pixel (at a stride) casts a ray ``ego_from_cam @ (t * K^-1 [u, v, 1])``; where the
ray meets the ego ground plane z = 0 in front of the camera, the BEV logits are read there with
``F.grid_sample``. The result is one logit map per camera that a per-pixel loss can compare with
perspective pseudo-labels, and whose gradient flows back into the BEV (and through it into the
queries and the image backbone).

Pixel convention (the one of ``model.geometry.scale_intrinsics``, and of nuScenes' intrinsics):
integer pixel coordinates name pixel centres. At stride ``s`` the pixels used are
``(s // 2 + s * i, s // 2 + s * j)``: real pixel centres, so the pseudo-label read there
(``subsample_labels``) is the label of exactly the pixel whose ray was cast; no label is
interpolated or voted.

A pixel is valid when its ray points downwards and meets the ground in front of the camera
(below the horizon), and the ground point lies inside the BEV grid. Pixels whose pseudo-label is
``IGNORE`` (255) are masked by the loss (``Reprojection.valid`` includes them when labels are
given). The ground-plane assumption is wrong for anything above the road (cars, poles): that is
why the pseudo-labels keep only flat-ground classes and ignore the rest.

Grids depend only on (intrinsics, ego_from_cam, image size, stride, BEV grid), so they are
computed once per camera calibration and kept in a small LRU cache. With nuScenes' per-keyframe
motion-compensated extrinsics the cache hits mostly across epochs; computing a grid is cheap
anyway (a few small matrix products per pixel).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.geometry import BevGrid
from model.names import IGNORE

# A ray must descend at least this much per metre along it to count as hitting the ground:
# rays grazing the horizon meet the plane kilometres away (outside any BEV grid anyway).
_MIN_DESCENT = 1e-6


@dataclass(frozen=True)
class ReprojectionGrids:
    """Where each strided camera pixel reads the BEV.

    ``uv``: (B, 6, h, w, 2) ``grid_sample`` coordinates (align_corners=False) into the BEV grid;
    ``valid``: (B, 6, h, w) bool, ray hits the ground in front of the camera inside the grid.
    """

    uv: torch.Tensor
    valid: torch.Tensor
    stride: int
    image_hw: tuple[int, int]


@dataclass(frozen=True)
class Reprojection:
    """BEV logits seen from the cameras.

    ``logits``: (B, 6, C, h, w); ``valid``: (B, 6, h, w) bool (geometry, and label != IGNORE
    when labels were given); ``labels``: (B, 6, h, w) int64 pseudo-labels at the same pixels,
    or None.
    """

    logits: torch.Tensor
    valid: torch.Tensor
    labels: torch.Tensor | None
    stride: int

    def float(self) -> Reprojection:
        """The same with float32 logits (after a bf16 autocast region)."""
        return dataclasses.replace(self, logits=self.logits.float())


def strided_pixel_centres(image_hw: tuple[int, int], stride: int) -> tuple[torch.Tensor, ...]:
    """(h,) row and (w,) column pixel coordinates used at ``stride`` (float64)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    height, width = image_hw
    rows = torch.arange(stride // 2, height, stride, dtype=torch.float64)
    cols = torch.arange(stride // 2, width, stride, dtype=torch.float64)
    return rows, cols


def subsample_labels(labels: torch.Tensor, stride: int) -> torch.Tensor:
    """(..., H, W) per-pixel labels -> the labels of the pixels ``reprojection_grids`` uses."""
    return labels[..., stride // 2 :: stride, stride // 2 :: stride]


def ground_xy_from_pixels(
    pixels_uv: torch.Tensor, img_from_cam: torch.Tensor, ego_from_cam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersect pixel rays with the ego ground plane z = 0.

    ``pixels_uv`` (..., N, 2) image (column, row) coordinates, ``img_from_cam`` (..., 3, 3),
    ``ego_from_cam`` (..., 4, 4). Returns (..., N, 2) ego x, y in metres and a (..., N) bool
    mask: the ray descends and meets the ground in front of the camera. Invalid rays get
    finite placeholder coordinates (far outside any grid).
    """
    dtype = torch.float64 if pixels_uv.device.type == "cpu" else torch.float32
    uv1 = torch.cat([pixels_uv.to(dtype), torch.ones_like(pixels_uv[..., :1], dtype=dtype)], -1)
    cam_from_img = torch.linalg.inv(img_from_cam.to(dtype))
    rays_cam = uv1 @ cam_from_img.transpose(-1, -2)  # (..., N, 3), z = 1: depth along the axis
    ego_rot = ego_from_cam[..., :3, :3].to(dtype)
    origin = ego_from_cam[..., None, :3, 3].to(dtype)  # (..., 1, 3) camera centre in ego
    rays_ego = rays_cam @ ego_rot.transpose(-1, -2)
    descent = -rays_ego[..., 2]
    height = origin[..., 2]
    valid = (descent > _MIN_DESCENT * rays_ego.norm(dim=-1)) & (height > 0)
    # Depth along the optical axis; positive by construction where valid (rays_cam z = 1).
    depth = torch.where(valid, height / descent.clamp_min(_MIN_DESCENT), torch.zeros_like(height))
    xy = origin[..., :2] + depth[..., None] * rays_ego[..., :2]
    xy = torch.where(valid[..., None], xy, torch.full_like(xy, 1e6))
    return xy, valid


def _compute_grids(
    img_from_cam: torch.Tensor,
    ego_from_cam: torch.Tensor,
    image_hw: tuple[int, int],
    stride: int,
    grid: BevGrid,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 3), (N, 4, 4) -> uv (N, h, w, 2) float32, valid (N, h, w)."""
    rows, cols = strided_pixel_centres(image_hw, stride)
    rows, cols = rows.to(img_from_cam.device), cols.to(img_from_cam.device)
    vv, uu = torch.meshgrid(rows, cols, indexing="ij")
    pixels = torch.stack([uu, vv], -1).reshape(1, -1, 2)  # (1, h*w, 2) as (u, v)
    xy, valid = ground_xy_from_pixels(pixels, img_from_cam, ego_from_cam)
    uv = grid.bev_normalized_from_ego(xy)
    valid = valid & (uv.abs() <= 1.0).all(-1)
    shape = (img_from_cam.shape[0], rows.numel(), cols.numel())
    return uv.to(torch.float32).reshape(*shape, 2), valid.reshape(shape)


def _nbytes(tensors: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _GridCache:
    """LRU cache of per-camera grids keyed on the calibration's bytes and the sampling setup."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(
        self,
        img_from_cam: torch.Tensor,  # (N, 3, 3)
        ego_from_cam: torch.Tensor,  # (N, 4, 4)
        image_hw: tuple[int, int],
        stride: int,
        grid: BevGrid,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        setup = (tuple(image_hw), stride, grid, str(img_from_cam.device))
        calib = torch.cat([img_from_cam.reshape(-1, 9), ego_from_cam.reshape(-1, 16)], 1)
        calib_bytes = calib.detach().to("cpu", torch.float32).numpy()
        keys = [(row.tobytes(), *setup) for row in calib_bytes]
        with self._lock:
            found = [self._entries.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            index = torch.tensor(missing, device=img_from_cam.device)
            uv, valid = _compute_grids(
                img_from_cam[index], ego_from_cam[index], image_hw, stride, grid
            )
            with self._lock:
                for j, i in enumerate(missing):
                    # clone: a view would keep the whole batch's storage alive
                    found[i] = (uv[j].clone(), valid[j].clone())
                    if keys[i] not in self._entries:
                        self._bytes += _nbytes(found[i])
                    self._entries[keys[i]] = found[i]
                while self._bytes > self.max_bytes and self._entries:
                    self._bytes -= _nbytes(self._entries.popitem(last=False)[1])
        with self._lock:
            for k in keys:
                if k in self._entries:
                    self._entries.move_to_end(k)
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
        return torch.stack([f[0] for f in found]), torch.stack([f[1] for f in found])


GRID_CACHE = _GridCache()


def reprojection_grids(
    intrinsics: torch.Tensor,
    ego_from_cam: torch.Tensor,
    image_hw: tuple[int, int],
    grid: BevGrid,
    stride: int = 4,
    cache: bool = True,
) -> ReprojectionGrids:
    """Sampling grids for a batch: intrinsics (B, 6, 3, 3) of the (resized) images, ego_from_cam
    (B, 6, 4, 4), image (H, W). Cached per camera calibration unless ``cache=False``."""
    batch, cams = intrinsics.shape[:2]
    img_from_cam = intrinsics.reshape(batch * cams, 3, 3).detach()
    cam_to_ego = ego_from_cam.reshape(batch * cams, 4, 4).detach()
    hw = (int(image_hw[0]), int(image_hw[1]))
    if cache:
        uv, valid = GRID_CACHE.get_many(img_from_cam, cam_to_ego, hw, stride, grid)
    else:
        uv, valid = _compute_grids(img_from_cam, cam_to_ego, hw, stride, grid)
    h, w = uv.shape[1:3]
    return ReprojectionGrids(
        uv=uv.reshape(batch, cams, h, w, 2),
        valid=valid.reshape(batch, cams, h, w),
        stride=stride,
        image_hw=hw,
    )


def reproject_bev_logits(
    bev_logits: torch.Tensor, grids: ReprojectionGrids, pseudo_labels: torch.Tensor | None = None
) -> Reprojection:
    """Sample (B, C, Hg, Wg) BEV logits at every grid pixel -> ``Reprojection``.

    ``pseudo_labels`` (B, 6, H, W) at full image resolution (or already strided, (B, 6, h, w))
    are subsampled to the grid's pixels, and their IGNORE pixels leave ``valid``.
    """
    batch, channels = bev_logits.shape[:2]
    _, cams, h, w, _ = grids.uv.shape
    uv = grids.uv.to(device=bev_logits.device, dtype=bev_logits.dtype)
    # Border padding: points between the outermost cell centre and the grid edge read the edge
    # cell instead of a blend with zeros (points beyond the edge are invalid anyway).
    sampled = F.grid_sample(
        bev_logits,
        uv.reshape(batch, cams * h, w, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )  # (B, C, 6*h, w)
    logits = sampled.reshape(batch, channels, cams, h, w).permute(0, 2, 1, 3, 4)
    valid = grids.valid.to(bev_logits.device)
    labels = None
    if pseudo_labels is not None:
        labels = pseudo_labels
        if tuple(labels.shape[-2:]) != (h, w):
            labels = subsample_labels(labels, grids.stride)
        if tuple(labels.shape[-2:]) != (h, w):
            raise ValueError(
                f"pseudo-labels of shape {tuple(pseudo_labels.shape)} do not match images "
                f"{grids.image_hw} at stride {grids.stride} ({h} x {w} pixels)"
            )
        labels = labels.to(bev_logits.device, torch.int64)
        valid = valid & (labels != IGNORE)
    return Reprojection(logits=logits, valid=valid, labels=labels, stride=grids.stride)


def reproject(
    bev_logits: torch.Tensor,
    intrinsics: torch.Tensor,
    ego_from_cam: torch.Tensor,
    image_hw: tuple[int, int],
    grid: BevGrid,
    stride: int = 4,
    pseudo_labels: torch.Tensor | None = None,
) -> Reprojection:
    """``reprojection_grids`` then ``reproject_bev_logits``: the one call the loops make."""
    grids = reprojection_grids(intrinsics, ego_from_cam, image_hw, grid, stride)
    return reproject_bev_logits(bev_logits, grids, pseudo_labels)

"""Camera images, perspective semantics and lidar points by ray casting onto the ground plane.

Every camera pixel's ray (through the same pinhole model the dataset's intrinsics describe) is
intersected with the ground plane z = 0. The ego pose is planar (z = 0, yaw only), so those
hits are fixed in the ego frame and computed once per camera; per frame they are moved into the
world and look up a ground texture rasterised from the world's geometry (``texture.py``;
mip-mapped by the pixel's ground footprint, bilinear). Vehicles are boxes, z-tested against the
ground depth. Above the horizon: a skyline of buildings and trees at infinity, then sky.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from model.data.synthetic.rig import Camera
from model.data.synthetic.texture import (
    CROSSWALK,
    MARKING,
    MIP_LEVELS,
    ROAD,
    TERRAIN,
    GroundTexture,
    Look,
    remap_points,
)
from model.data.synthetic.world import World, global_yaw, local_from_ego
from model.data.vistas import VISTAS_ID

VEGETATION = VISTAS_ID["Vegetation"]
BUILDING = VISTAS_ID["Building"]
SKY = VISTAS_ID["Sky"]
CAR = VISTAS_ID["Car"]


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``pts @ m.T`` for (N, k) points and a small matrix, without BLAS threads."""
    out = pts[:, :1] * m[:, 0]
    for j in range(1, pts.shape[1]):
        out = out + pts[:, j : j + 1] * m[:, j]
    return out


def rigid_inverse(a_from_b: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 with an orthogonal 3x3 block (rotations, and our mirrored frames)."""
    out = np.eye(4)
    out[:3, :3] = a_from_b[:3, :3].T
    out[:3, 3] = -a_from_b[:3, :3].T @ a_from_b[:3, 3]
    return out


class CameraRays:
    """Per-camera ray geometry (fixed in the ego frame) and per-scene shading terms."""

    def __init__(self, cam: Camera, texel_m: float, look: Look):
        h, w = cam.image_hw
        self.cam = cam
        u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
        pix = np.stack([u, v, np.ones_like(u)], axis=-1).reshape(-1, 3)
        self.dirs_cam = _apply(np.linalg.inv(cam.img_from_cam), pix)  # z = 1: t is depth
        rot, origin = cam.ego_from_cam[:3, :3], cam.ego_from_cam[:3, 3]
        dirs = _apply(rot, self.dirs_cam)
        self.cam_from_ego = rigid_inverse(cam.ego_from_cam)
        dz = dirs[:, 2]
        self.ground = dz < -1e-9
        t = np.where(self.ground, -origin[2] / np.where(self.ground, dz, -1.0), np.inf)
        self.depth = t
        hit = origin[None, :2] + np.where(self.ground, t, 0.0)[:, None] * dirs[:, :2]
        self.ground_idx = np.flatnonzero(self.ground)
        self.sky_idx = np.flatnonzero(~self.ground)
        self.hit_ego = hit[self.ground_idx]
        dist = np.hypot(*(self.hit_ego - origin[:2]).T)
        # Mip level from the ground footprint of a pixel (finite differences of the hit grid).
        hit_grid = np.where(self.ground[:, None], hit, np.nan).reshape(h, w, 2)
        du = np.gradient(hit_grid, axis=1)
        dv = np.gradient(hit_grid, axis=0)
        area = np.abs(du[..., 0] * dv[..., 1] - du[..., 1] * dv[..., 0]).reshape(-1)
        footprint = np.sqrt(np.nan_to_num(area, nan=1e6))[self.ground_idx]
        level = np.floor(np.log2(np.maximum(footprint / texel_m, 1e-6)) + 0.3)
        level = np.clip(level, 0, MIP_LEVELS - 1).astype(np.int64)
        # Positions within ground_idx of the pixels at each mip level.
        self.level_sel = [np.flatnonzero(level == lv) for lv in range(MIP_LEVELS)]
        # Per-scene terms: fog towards the horizon colour, light, vignetting, sky gradient.
        fog = (1.0 - np.exp(-dist / look.fog_m)).astype(np.float32)[:, None]
        self.ground_gain = (1 - fog) * look.light
        self.ground_fog = fog * look.sky_horizon
        r2 = ((u - w / 2) / w) ** 2 + ((v - h / 2) / h) ** 2
        self.vignette = (1.0 - 0.35 * r2).reshape(-1, 1).astype(np.float32)
        sky_dirs = dirs[self.sky_idx]
        self.elevation = np.arctan2(sky_dirs[:, 2], np.hypot(sky_dirs[:, 0], sky_dirs[:, 1]))
        self.azimuth_ego = np.arctan2(sky_dirs[:, 1], sky_dirs[:, 0])
        up = np.clip(self.elevation / 0.6, 0, 1).astype(np.float32)[:, None]
        self.sky_colour = look.sky_horizon * (1 - up) + look.sky_zenith * up
        # Sensor noise: one bank per camera, read at a random offset per frame.
        n = h * w * 3
        self.noise_bank = np.random.default_rng(0).standard_normal(2 * n, dtype=np.float32)
        self.noise_bank *= look.noise_sigma


class Skyline:
    """Buildings and trees at infinity around the scene, by world azimuth."""

    BINS = 2048

    def __init__(self, rng: np.random.Generator):
        kind = np.zeros(self.BINS, np.uint8)
        height = np.zeros(self.BINS)
        colour = np.zeros((self.BINS, 3))
        i = 0
        while i < self.BINS:
            n = int(rng.integers(15, 90))
            if self.BINS - (i + n) < 15:  # no sliver of a block where the circle closes
                n = self.BINS - i
            if rng.random() < 0.55:
                kind[i : i + n] = BUILDING
                height[i : i + n] = np.radians(rng.uniform(2.0, 16.0))
                colour[i : i + n] = rng.uniform(0.35, 0.8) * rng.uniform(0.85, 1.1, 3)
            else:
                kind[i : i + n] = VEGETATION
                height[i : i + n] = (
                    np.radians(rng.uniform(1.5, 7.0))
                    * (1 + 0.3 * np.sin(np.linspace(0, rng.uniform(3, 12), n)))[
                        : len(kind[i : i + n])
                    ]
                )
                colour[i : i + n] = np.array([0.18, 0.3, 0.12]) * rng.uniform(0.7, 1.3, 3)
            i += n
        self.kind, self.height, self.colour = kind, height, colour


@dataclass
class Frame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    semantic: np.ndarray  # (H, W) uint8 Vistas ids


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s], [s, c]])


def _pose4(x: float, y: float, z: float, yaw: float) -> np.ndarray:
    out = np.eye(4)
    out[:2, :2] = _yaw_matrix(yaw)
    out[:3, 3] = (x, y, z)
    return out


def render_camera(
    rays: CameraRays,
    tex: GroundTexture,
    sky: Skyline,
    look: Look,
    world: World,
    frame: int,
    rng: np.random.Generator,
) -> Frame:
    h, w = rays.cam.image_hw
    n = h * w
    lfe = local_from_ego(world, frame)
    ex, ey = lfe[:2, 3]
    colour = np.empty((n, 3), np.float32)
    label = np.empty(n, np.uint8)

    # Ground: bilinear lookups in the mip level that matches each pixel's footprint.
    gi = rays.ground_idx
    uv = (_apply(lfe[:2, :2], rays.hit_ego) + (lfe[:2, 3] - tex.origin)) / tex.res_m - 0.5
    border = tuple(float(c) for c in tex.far_colour * 255)
    ground = np.empty((len(gi), 3), np.float32)
    for lv, sel in enumerate(rays.level_sel):
        if len(sel) == 0:
            continue
        lvl = min(lv, len(tex.levels) - 1)
        scale = 2.0**lvl
        lu = (uv[sel, 0] + 0.5) / scale - 0.5
        lv_ = (uv[sel, 1] + 0.5) / scale - 0.5
        ground[sel] = remap_points(tex.levels[lvl], lu, lv_, cv2.INTER_LINEAR, border)
    colour[gi] = ground * (rays.ground_gain / 255.0) + rays.ground_fog
    label[gi] = remap_points(tex.label, uv[:, 0], uv[:, 1], cv2.INTER_NEAREST, TERRAIN)

    # Above the horizon: skyline at infinity (by world azimuth), then sky.
    si = rays.sky_idx
    az = (rays.azimuth_ego + global_yaw(world, world.ego_poses[frame, 2])) % (2 * np.pi)
    b = (az * (Skyline.BINS / (2 * np.pi))).astype(np.int64) % Skyline.BINS
    behind = rays.elevation < sky.height[b]
    colour[si] = rays.sky_colour
    label[si] = SKY
    bb = b[behind]
    el = rays.elevation[behind]
    windows = (np.sin(el * 300) > 0.3) & (np.sin(az[behind] * 250) > 0.0)
    windows &= sky.kind[bb] == BUILDING
    colour[si[behind]] = sky.colour[bb] * look.light * np.where(windows, 0.55, 1.0)[:, None]
    label[si[behind]] = sky.kind[bb]

    # Vehicles: shadows on the ground, then boxes z-tested against the depth so far.
    depth = rays.depth.copy()
    ego_from_local = rigid_inverse(lfe)
    k = rays.cam.img_from_cam
    for veh in world.vehicles:
        vx, vy, vyaw = veh.poses[frame]
        wid, length, hgt = veh.size_wlh
        if np.hypot(vx - ex, vy - ey) > 80:
            continue
        cam_from_box = rays.cam_from_ego @ ego_from_local @ _pose4(vx, vy, hgt / 2, vyaw)
        hl, hw, hh = length / 2 + 0.3, wid / 2 + 0.3, hgt / 2
        corners = np.array(
            [[sx * hl, sy * hw, sz * hh, 1.0] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
        )
        pc = corners @ cam_from_box.T
        if (pc[:, 2] < 0.05).all():
            continue
        if (pc[:, 2] < 0.05).any():
            u0, v0, u1, v1 = 0, 0, w, h
        else:
            pp = pc[:, :3] @ k.T
            pu, pv = pp[:, 0] / pp[:, 2], pp[:, 1] / pp[:, 2]
            u0, u1 = max(int(np.floor(pu.min())), 0), min(int(np.ceil(pu.max())) + 1, w)
            v0, v1 = max(int(np.floor(pv.min())), 0), min(int(np.ceil(pv.max())) + 1, h)
            if u0 >= u1 or v0 >= v1:
                continue
        idx = (np.arange(v0, v1)[:, None] * w + np.arange(u0, u1)[None, :]).reshape(-1)
        box_from_cam = rigid_inverse(cam_from_box)
        o = box_from_cam[:3, 3]
        d = _apply(box_from_cam[:3, :3], rays.dirs_cam[idx])
        # Shadow: ground points under the box footprint.
        on_ground = rays.ground[idx]
        t = np.where(on_ground, rays.depth[idx], 0.0)
        gx, gy = o[0] + t * d[:, 0], o[1] + t * d[:, 1]
        shadow = on_ground & (np.abs(gx) < length / 2 + 0.25) & (np.abs(gy) < wid / 2 + 0.2)
        colour[idx[shadow]] *= 0.45
        # Slab test.
        half = np.array([length / 2, wid / 2, hgt / 2])
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (-half - o) / d
            t2 = (half - o) / d
        tmin = np.nan_to_num(np.minimum(t1, t2), nan=-np.inf)
        tmax = np.nan_to_num(np.maximum(t1, t2), nan=np.inf)
        t_near = tmin.max(1)
        t_far = tmax.min(1)
        hit = (t_near <= t_far) & (t_near > 0) & (t_near < depth[idx])
        if not hit.any():
            continue
        hi = idx[hit]
        face = tmin[hit].argmax(1)
        z_rel = (o[2] + t_near[hit] * d[hit, 2]) + hgt / 2
        shade = np.array([0.62, 0.8, 1.0])[face]
        body = np.asarray(veh.colour) * shade[:, None]
        glass = (face != 2) & (z_rel > 0.55 * hgt) & (z_rel < 0.92 * hgt)
        body[glass] = np.array([0.12, 0.14, 0.17]) + 0.15 * look.sky_horizon
        body[z_rel < 0.35] *= 0.25
        colour[hi] = body * look.light
        label[hi] = CAR
        depth[hi] = t_near[hit]

    # Exposure, vignetting and sensor noise.
    gain = float(np.exp(rng.normal(0.0, look.exposure_jitter)))
    colour *= rays.vignette * gain
    offset = int(rng.integers(0, n * 3))
    colour += rays.noise_bank[offset : offset + n * 3].reshape(n, 3)
    image = cv2.convertScaleAbs(colour, alpha=255.0).reshape(h, w, 3)
    return Frame(image=image, semantic=label.reshape(h, w))


def lidar_points(
    world: World,
    tex: GroundTexture,
    frame: int,
    lidar_from_ego: np.ndarray,
    ego_from_lidar: np.ndarray,
) -> tuple[np.ndarray, list[int]]:
    """A sparse 16-beam sweep: (N, 5) float32 x, y, z, intensity, ring in the lidar frame.

    Also returns the number of points inside each vehicle box.
    """
    elev = np.radians(np.linspace(-25.0, 5.0, 16))
    azim = np.linspace(-np.pi, np.pi, 180, endpoint=False)
    el, az = np.meshgrid(elev, azim, indexing="ij")
    d_l = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(
        -1, 3
    )
    ring = np.repeat(np.arange(16), len(azim)).astype(np.float32)
    d = _apply(ego_from_lidar[:3, :3], d_l)
    o = ego_from_lidar[:3, 3]
    lfe = local_from_ego(world, frame)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d[:, 2] < -1e-6, -o[2] / d[:, 2], np.inf)
    t = np.where(t * np.hypot(d[:, 0], d[:, 1]) < 60.0, t, np.inf)
    kind = np.zeros(len(d), np.int64) - 1
    ego_from_local = rigid_inverse(lfe)
    for vi, veh in enumerate(world.vehicles):
        vx, vy, vyaw = veh.poses[frame]
        wid, length, hgt = veh.size_wlh
        box_from_ego = rigid_inverse(ego_from_local @ _pose4(vx, vy, hgt / 2, vyaw))
        ob = box_from_ego[:3, :3] @ o + box_from_ego[:3, 3]
        db = _apply(box_from_ego[:3, :3], d)
        half = np.array([length / 2, wid / 2, hgt / 2])
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (-half - ob) / db, (half - ob) / db
        tn = np.nan_to_num(np.minimum(t1, t2), nan=-np.inf).max(1)
        tf = np.nan_to_num(np.maximum(t1, t2), nan=np.inf).min(1)
        hit = (tn <= tf) & (tn > 0) & (tn < t)
        t = np.where(hit, tn, t)
        kind[hit] = vi
    keep = np.isfinite(t)
    p_ego = o + t[keep, None] * d[keep]
    local = _apply(lfe[:2, :2], p_ego[:, :2]) + lfe[:2, 3]
    lab = tex.lookup_label(local)
    intensity = np.select(
        [kind[keep] >= 0, (lab == MARKING) | (lab == CROSSWALK), lab == ROAD],
        [40.0, 120.0, 8.0],
        20.0,
    ).astype(np.float32)
    p_l = _apply(lidar_from_ego[:3, :3], p_ego) + lidar_from_ego[:3, 3]
    pts = np.concatenate([p_l, intensity[:, None], ring[keep, None]], axis=1).astype(np.float32)
    counts = np.bincount(kind[keep][kind[keep] >= 0], minlength=len(world.vehicles))
    return pts, [int(c) for c in counts]

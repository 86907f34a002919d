"""Camera images, perspective semantics and lidar points by ray casting onto the ground plane.

Every camera pixel's ray (through the same pinhole model the dataset's intrinsics describe) is
intersected with the ground plane z = 0. The ego pose is planar (z = 0, yaw only), so those
hits are fixed in the ego frame and computed once per camera; per frame they are moved into the
world and look up a ground texture rasterised from the world's geometry (mip-mapped by the
pixel's ground footprint, bilinear). Vehicles are boxes, z-tested against the ground depth.
Above the horizon: a skyline of buildings and trees at infinity, then sky.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from model.data.synthetic.rig import Camera
from model.data.synthetic.world import World, global_yaw, local_from_ego
from model.data.vistas import VISTAS_ID

TEXTURE_MARGIN_M = 60.0
TEXTURE_MAX_PIXELS = 16_000_000
MIP_LEVELS = 6

ROAD = VISTAS_ID["Road"]
MARKING = VISTAS_ID["Lane Marking - General"]
CROSSWALK = VISTAS_ID["Lane Marking - Crosswalk"]
CURB = VISTAS_ID["Curb"]
SIDEWALK = VISTAS_ID["Sidewalk"]
TERRAIN = VISTAS_ID["Terrain"]
VEGETATION = VISTAS_ID["Vegetation"]
BUILDING = VISTAS_ID["Building"]
SKY = VISTAS_ID["Sky"]
CAR = VISTAS_ID["Car"]


@dataclass
class Look:
    """Scene appearance: materials, light and sensor."""

    asphalt: np.ndarray
    terrain: np.ndarray
    terrain_alt: np.ndarray
    sidewalk: np.ndarray
    curb: np.ndarray
    sky_horizon: np.ndarray
    sky_zenith: np.ndarray
    light: np.ndarray  # RGB gain of the sun/overcast light
    exposure_jitter: float
    noise_sigma: float
    paint_strength: float
    wear: float
    fog_m: float
    tree_shadows: float
    tile_m: float

    def __post_init__(self):
        for name in (
            "asphalt",
            "terrain",
            "terrain_alt",
            "sidewalk",
            "curb",
            "sky_horizon",
            "sky_zenith",
            "light",
        ):
            setattr(self, name, np.asarray(getattr(self, name), np.float32))

    @staticmethod
    def draw(rng: np.random.Generator, wear: float) -> Look:
        grey = rng.uniform(0.22, 0.45)
        overcast = rng.random() < 0.35
        warm = rng.uniform(-0.08, 0.08)
        light = np.array([1.0 + warm, 1.0, 1.0 - warm]) * rng.uniform(0.75, 1.15)
        return Look(
            asphalt=np.array([grey, grey, grey * rng.uniform(0.95, 1.1)]),
            terrain=np.array([0.25, 0.38, 0.15]) * rng.uniform(0.7, 1.2, 3),
            terrain_alt=np.array([0.42, 0.36, 0.27]) * rng.uniform(0.8, 1.2, 3),
            sidewalk=np.full(3, rng.uniform(0.5, 0.7)) * rng.uniform(0.92, 1.08, 3),
            curb=np.full(3, rng.uniform(0.6, 0.8)),
            sky_horizon=np.array([0.8, 0.84, 0.88]) if overcast else np.array([0.75, 0.85, 0.95]),
            sky_zenith=np.array([0.62, 0.66, 0.7]) if overcast else np.array([0.3, 0.5, 0.85]),
            light=light * (0.85 if overcast else 1.0),
            exposure_jitter=float(rng.uniform(0.02, 0.12)),
            noise_sigma=float(rng.uniform(0.004, 0.03)),
            paint_strength=float(rng.uniform(0.7, 1.0)),
            wear=wear,
            fog_m=float(rng.uniform(120.0, 500.0)),
            tree_shadows=float(0.0 if rng.random() < 0.6 else rng.uniform(0.2, 0.5)),
            tile_m=float(rng.uniform(0.4, 1.0)),
        )


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """Smooth zero-mean, unit-ish noise with features about ``cell_px`` pixels wide."""
    h, w = shape
    gh, gw = int(h / cell_px) + 3, int(w / cell_px) + 3
    small = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(small, (int(gw * cell_px), int(gh * cell_px)), interpolation=cv2.INTER_CUBIC)
    return big[:h, :w]


class GroundTexture:
    """Colour (mip-mapped) and Vistas label rasters of the ground around a trajectory."""

    def __init__(self, world: World, look: Look, rng: np.random.Generator, res_m: float):
        xy = world.ego_poses[:, :2]
        x0, y0 = xy.min(0) - TEXTURE_MARGIN_M
        x1, y1 = xy.max(0) + TEXTURE_MARGIN_M
        # Long scenes get coarser texels rather than unbounded memory.
        res_m = max(res_m, float(np.sqrt((x1 - x0) * (y1 - y0) / TEXTURE_MAX_PIXELS)))
        self.res_m = res_m
        self.origin = np.array([x0, y0])
        w = int(np.ceil((x1 - x0) / res_m))
        h = int(np.ceil((y1 - y0) / res_m))
        self.shape = (h, w)

        # Materials as labels; one colour gather from two palettes blended by a terrain mix.
        label = np.full((h, w), TERRAIN, np.uint8)
        self._fill(label, world.walkways, SIDEWALK)
        self._fill(label, world.drivable, ROAD)
        self._fill(label, [world.curbs], CURB)
        pal_a = np.zeros((256, 3), np.float32)
        pal_b = np.zeros((256, 3), np.float32)
        pal_a[TERRAIN], pal_b[TERRAIN] = look.terrain, look.terrain_alt
        for cls, rgb in ((SIDEWALK, look.sidewalk), (ROAD, look.asphalt), (CURB, look.curb)):
            pal_a[cls] = pal_b[cls] = rgb
        is_terrain = label == TERRAIN
        is_road = label == ROAD
        mix = np.where(is_terrain, np.clip(_noise(rng, (h, w), 8.0 / res_m) * 0.8 + 0.5, 0, 1), 0)
        fine = _noise(rng, (h, w), 0.12 / res_m)
        # Brightness: asphalt grain, repaired patches, paving joints, grass texture, shadows.
        patches = np.minimum(np.clip(_noise(rng, (h, w), 4.0 / res_m) - 1.2, 0, 1) * 3, 1)
        road_mod = 0.07 * fine + 0.08 * _noise(rng, (h, w), 6.0 / res_m) - 0.35 * patches
        mod = np.where(is_road, road_mod, 0.1 * fine)
        mod -= 0.18 * (self._tile_joints(h, w, look.tile_m) * (label == SIDEWALK))
        mod += 1.0
        if look.tree_shadows > 0:
            shade = np.minimum(np.clip(_noise(rng, (h, w), 5.0 / res_m) - 0.6, 0, 1) * 2, 1)
            mod *= 1 - look.tree_shadows * shade
        colour = pal_a[label]
        colour += (pal_b[label] - colour) * mix[..., None]
        colour *= mod[..., None]

        # Paint, worn: low-frequency wear patches plus speckle, anti-aliased edges. The wear
        # field is only evaluated under paint.
        wear_grid = _noise(rng, (int(h * res_m / 3.0) + 4, int(w * res_m / 3.0) + 4), 1.0)
        flat = colour.reshape(-1, 3)
        flat_mod = mod.reshape(-1)
        for cls in (MARKING, CROSSWALK):
            for rgb in sorted({p.colour for p in world.paint if VISTAS_ID[p.vistas] == cls}):
                polys = [
                    p.polygon for p in world.paint if p.colour == rgb and VISTAS_ID[p.vistas] == cls
                ]
                cover = self._mask(polys).reshape(-1)
                nz = np.flatnonzero(cover)
                rows, cols = np.divmod(nz, w)
                patchy = _remap(
                    wear_grid, cols * (res_m / 3.0), rows * (res_m / 3.0), cv2.INTER_LINEAR, 0.0
                )
                speckle = rng.standard_normal(len(nz)).astype(np.float32)
                wear = np.clip(look.wear * (0.9 + 0.6 * patchy + 0.25 * speckle), 0.0, 1.0)
                strength = look.paint_strength * (1 - wear)
                alpha = (cover[nz] / 255.0 * strength)[:, None].astype(np.float32)
                paint = np.asarray(rgb, np.float32) * np.minimum(flat_mod[nz], 1.0)[:, None]
                flat[nz] = flat[nz] * (1 - alpha) + paint * alpha
                marked = nz[(cover[nz] > 127) & (strength > 0.25)]
                label.reshape(-1)[marked] = cls

        self.label = label
        base = cv2.convertScaleAbs(colour, alpha=255.0)
        self.levels = [base]
        for _ in range(MIP_LEVELS - 1):
            prev = self.levels[-1]
            if min(prev.shape[:2]) < 8:
                break
            self.levels.append(cv2.pyrDown(prev))
        self.far_colour = self.levels[-1].reshape(-1, 3).mean(0) / 255.0

    def _pixels(self, coords) -> np.ndarray:
        return (np.asarray(coords)[:, :2] - self.origin) / self.res_m - 0.5

    def _polygons(self, geoms: list[BaseGeometry]):
        """Each polygon's rings in 1/16 texture pixels (for cv2's ``shift=4``)."""
        for g in geoms:
            for poly in getattr(g, "geoms", [g]):
                if isinstance(poly, Polygon) and not poly.is_empty:
                    yield [
                        np.round(self._pixels(ring.coords) * 16).astype(np.int32)
                        for ring in [poly.exterior, *poly.interiors]
                    ]

    def _fill(self, raster: np.ndarray, geoms: list[BaseGeometry], value: int) -> None:
        """Fill polygons one by one (cv2 fills a polygon's rings by the even-odd rule: holes)."""
        for rings in self._polygons(geoms):
            cv2.fillPoly(raster, rings, value, shift=4)

    def _mask(self, geoms: list[BaseGeometry]) -> np.ndarray:
        """Anti-aliased uint8 coverage (0..255) of polygons."""
        mask = np.zeros(self.shape, np.uint8)
        for rings in self._polygons(geoms):
            cv2.fillPoly(mask, rings, 255, lineType=cv2.LINE_AA, shift=4)
        return mask

    def _tile_joints(self, h: int, w: int, tile_m: float) -> np.ndarray:
        xs = (np.arange(w) * self.res_m) % tile_m < self.res_m * 1.2
        ys = (np.arange(h) * self.res_m) % tile_m < self.res_m * 1.2
        return (xs[None, :] | ys[:, None]).astype(np.float32)

    def lookup_label(self, xy_local: np.ndarray) -> np.ndarray:
        """Nearest-texel labels at (N, 2) local points (terrain outside)."""
        pix = np.floor((xy_local - self.origin) / self.res_m).astype(np.int64)
        h, w = self.shape
        inside = (pix[:, 0] >= 0) & (pix[:, 0] < w) & (pix[:, 1] >= 0) & (pix[:, 1] < h)
        out = np.full(len(xy_local), TERRAIN, np.uint8)
        out[inside] = self.label[pix[inside, 1], pix[inside, 0]]
        return out


def _remap(img: np.ndarray, u: np.ndarray, v: np.ndarray, interp: int, border) -> np.ndarray:
    """cv2.remap at N scattered points (cv2 wants maps narrower than 32767)."""
    n = len(u)
    cols = 1024
    rows = -(-n // cols)
    pad = rows * cols - n
    mu = np.pad(u.astype(np.float32), (0, pad)).reshape(rows, cols)
    mv = np.pad(v.astype(np.float32), (0, pad)).reshape(rows, cols)
    out = cv2.remap(img, mu, mv, interp, borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    return out.reshape(rows * cols, *img.shape[2:])[:n]


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
        ground[sel] = _remap(tex.levels[lvl], lu, lv_, cv2.INTER_LINEAR, border)
    colour[gi] = ground * (rays.ground_gain / 255.0) + rays.ground_fog
    label[gi] = _remap(tex.label, uv[:, 0], uv[:, 1], cv2.INTER_NEAREST, TERRAIN)

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

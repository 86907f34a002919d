"""The ground the cameras see: a scene's look (materials, light, sensor) and the colour
(mip-mapped) and Vistas label rasters of the ground around a trajectory, drawn from the world's
geometry, paint worn by noise."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from model.data.synthetic.world import World
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
                patchy = remap_points(
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


def remap_points(img: np.ndarray, u: np.ndarray, v: np.ndarray, interp: int, border) -> np.ndarray:
    """cv2.remap at N scattered points (cv2 wants maps narrower than 32767)."""
    n = len(u)
    cols = 1024
    rows = -(-n // cols)
    pad = rows * cols - n
    mu = np.pad(u.astype(np.float32), (0, pad)).reshape(rows, cols)
    mv = np.pad(v.astype(np.float32), (0, pad)).reshape(rows, cols)
    out = cv2.remap(img, mu, mv, interp, borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    return out.reshape(rows * cols, *img.shape[2:])[:n]

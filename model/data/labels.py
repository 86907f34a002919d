"""BEV road-marking labels rasterised from the nuScenes vector map in the ego frame.

Two class protocols:

- ``hdmapnet`` (default): ``background, divider, ped_crossing, boundary``, one class per cell
  (``(H, W)`` uint8 ids). ``divider`` is road_divider + lane_divider drawn as lines
  ``divider_width_m`` wide, ``ped_crossing`` the crosswalk polygons, ``boundary`` the contour of
  union(road_segment, lane) drawn ``boundary_width_m`` wide. Where classes overlap the later one
  in ``HDMAPNET_PAINT_ORDER`` wins: ped_crossing < boundary < divider, so thin structures are
  never erased by the areas they cross.
- ``fine``: ``lane_divider, road_divider, ped_crossing, stop_line, drivable_area``, multi-label
  (``(C, H, W)`` uint8 multi-hot), because a stop line lies on the drivable area.

Rasterisation convention (the one ``NuScenesMap.get_map_mask`` uses, so labels can be checked
against it, see docs/data.md): geometry is moved into the ego frame with the ego pose's yaw only
(the map is 2-D), clipped to the grid, vertices are rounded to the nearest pixel centre and
filled with ``cv2.fillPoly`` (boundary pixels included). Vertex rounding moves edges by at most
half a cell. Lines are buffered to their metric width first and filled the same way. Every
multi-geometry is exploded into its parts, so the devkit's ``mask_for_lines`` (which crashes
on a ``MultiLineString``, nuscenes-devkit issue #870) is never called.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import weakref
from dataclasses import dataclass, field

import cv2
import numpy as np
import shapely
from nuscenes.map_expansion.map_api import NuScenesMap
from shapely.geometry import box

from model.geometry import BevGrid

PROTOCOLS: tuple[str, ...] = ("hdmapnet", "fine")

HDMAPNET_CLASSES: tuple[str, ...] = ("background", "divider", "ped_crossing", "boundary")
# Painted in this order onto background; a later class overwrites an earlier one.
HDMAPNET_PAINT_ORDER: tuple[str, ...] = ("ped_crossing", "boundary", "divider")

FINE_CLASSES: tuple[str, ...] = (
    "lane_divider",
    "road_divider",
    "ped_crossing",
    "stop_line",
    "drivable_area",
)

# Bump when the rasteriser changes in a way that changes labels: invalidates label caches.
LABEL_ALGORITHM_VERSION = 1

_LINE_LAYERS = ("road_divider", "lane_divider")
_POLYGON_LAYERS = ("ped_crossing", "stop_line", "drivable_area", "road_segment", "lane")


def class_names(protocol: str) -> list[str]:
    """The BEV classes of a protocol, in channel / id order."""
    if protocol == "hdmapnet":
        return list(HDMAPNET_CLASSES)
    if protocol == "fine":
        return list(FINE_CLASSES)
    raise ValueError(f"unknown label protocol {protocol!r}; expected one of {PROTOCOLS}")


def is_multilabel(protocol: str) -> bool:
    """True where the protocol's label is multi-hot ``(C, H, W)``, not class ids ``(H, W)``."""
    class_names(protocol)
    return protocol == "fine"


@dataclass(frozen=True)
class LabelConfig:
    """What a BEV label is: class protocol, grid and line widths."""

    protocol: str = "hdmapnet"
    grid: BevGrid = field(default_factory=BevGrid)
    divider_width_m: float = 0.75
    boundary_width_m: float = 0.75

    def __post_init__(self) -> None:
        class_names(self.protocol)
        if isinstance(self.grid, dict):
            object.__setattr__(self, "grid", BevGrid(**self.grid))
        for name in ("divider_width_m", "boundary_width_m"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of metres, got {value!r}")
        if self.grid.height < 1 or self.grid.width < 1:
            raise ValueError(f"BEV grid {self.grid} has no cells")

    @property
    def class_names(self) -> list[str]:
        return class_names(self.protocol)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def multilabel(self) -> bool:
        return is_multilabel(self.protocol)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def cache_key(self) -> str:
        """Short hash of everything that changes a label (config + rasteriser version)."""
        payload = json.dumps(
            {"config": self.to_dict(), "algorithm": LABEL_ALGORITHM_VERSION}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Map geometry, indexed once per NuScenesMap (a real map has thousands of records per layer).


class _LayerIndex:
    def __init__(self, geoms: list) -> None:
        self.geoms = np.asarray(geoms, dtype=object)
        self.tree = shapely.STRtree(self.geoms)

    def query(self, region) -> np.ndarray:
        return self.geoms[self.tree.query(region)]


_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _polygonal(geom):
    """A valid polygonal geometry (make_valid can return collections with stray lines)."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
        geom = shapely.union_all(
            [g for g in shapely.get_parts(geom) if g.geom_type in ("Polygon", "MultiPolygon")]
        )
    return geom


def _layer_geoms(nusc_map: NuScenesMap, layer: str) -> list:
    records = getattr(nusc_map, layer)
    if layer in _LINE_LAYERS:
        lines = (nusc_map.extract_line(r["line_token"]) for r in records)
        return [g for g in lines if not g.is_empty]
    if layer == "drivable_area":
        tokens = [t for r in records for t in r["polygon_tokens"]]
    else:
        tokens = [r["polygon_token"] for r in records]
    polygons = (_polygonal(nusc_map.extract_polygon(t)) for t in tokens)
    return [g for g in polygons if not g.is_empty]


def _layer_index(nusc_map: NuScenesMap, layer: str) -> _LayerIndex:
    per_map = _INDEXES.setdefault(nusc_map, {})
    if layer not in per_map:
        per_map[layer] = _LayerIndex(_layer_geoms(nusc_map, layer))
    return per_map[layer]


# ---------------------------------------------------------------------------------------------
# Frames. Rasterisation happens on a "canvas" laid out like get_map_mask's: columns along ego +x,
# rows along ego +y, integer coordinates on pixel centres. cv2's polygon fill is not symmetric
# under flips, so filling in the devkit's layout and then turning the canvas into ours
# (``bev_from_canvas``) is what makes both agree pixel for pixel.


def ego_yaw(global_from_ego: np.ndarray) -> float:
    """Heading of the ego x axis in the global frame, radians (pitch and roll dropped)."""
    rot = np.asarray(global_from_ego)[:3, :3]
    return float(math.atan2(rot[1, 0], rot[0, 0]))


def canvas_from_global_affine(global_from_ego: np.ndarray, grid: BevGrid) -> list[float]:
    """Shapely affine ``[a, b, d, e, xoff, yoff]``: global x, y -> canvas (u, v) pixels."""
    yaw = ego_yaw(global_from_ego)
    tx, ty = float(global_from_ego[0, 3]), float(global_from_ego[1, 3])
    c, s = math.cos(yaw), math.sin(yaw)
    res = grid.resolution_m
    # ego:    x_e = c (x - tx) + s (y - ty),   y_e = -s (x - tx) + c (y - ty)
    # canvas: u = (x_e - x_min) / res - 0.5,   v = (y_e - y_min) / res - 0.5
    u_0 = (-c * tx - s * ty - grid.x_min_m) / res - 0.5
    v_0 = (s * tx - c * ty - grid.y_min_m) / res - 0.5
    return [c / res, s / res, -s / res, c / res, u_0, v_0]


def bev_from_canvas(canvas: np.ndarray) -> np.ndarray:
    """Canvas (rows +y, cols +x) -> BevGrid layout (row 0 = x_max, col 0 = y_max)."""
    return np.ascontiguousarray(canvas.T[::-1, ::-1])


def _global_from_canvas_affine(canvas_from_global: list[float]) -> list[float]:
    a, b, d, e, xoff, yoff = canvas_from_global
    inv = np.linalg.inv(np.array([[a, b, xoff], [d, e, yoff], [0.0, 0.0, 1.0]]))
    return [inv[0, 0], inv[0, 1], inv[1, 0], inv[1, 1], inv[0, 2], inv[1, 2]]


# ---------------------------------------------------------------------------------------------
# Rasterisation.


def _round_coords(ring) -> np.ndarray:
    return np.asarray(ring.coords, dtype=np.float64)[:, :2].round().astype(np.int32)


def fill_polygons(mask: np.ndarray, geoms, value: int = 1) -> np.ndarray:
    """Fill polygonal geometries given in pixel coordinates (u = column, v = row) into ``mask``.

    Any geometry type is accepted and exploded; non-polygonal parts are ignored. A polygon with
    holes is filled like the devkit does (exterior, then holes cleared) on a scratch canvas and
    OR-ed in, so a hole never erases another polygon.
    """
    plain, holed = [], []
    for geom in geoms:
        for part in shapely.get_parts(geom):
            if part.geom_type == "MultiPolygon" or part.geom_type == "GeometryCollection":
                fill_polygons(mask, [part], value)
            elif part.geom_type != "Polygon" or part.is_empty:
                continue
            elif len(part.interiors):
                holed.append(part)
            else:
                plain.append(_round_coords(part.exterior))
    if plain:
        cv2.fillPoly(mask, plain, value)
    for poly in holed:
        scratch = np.zeros(mask.shape, np.uint8)
        cv2.fillPoly(scratch, [_round_coords(poly.exterior)], 1)
        cv2.fillPoly(scratch, [_round_coords(r) for r in poly.interiors], 0)
        mask[scratch > 0] = value
    return mask


def _in_pixels(geoms, affine: list[float]) -> np.ndarray:
    a, b, d, e, xoff, yoff = affine
    matrix = np.array([[a, d], [b, e]])
    offset = np.array([xoff, yoff])
    return shapely.transform(np.asarray(geoms, dtype=object), lambda xy: xy @ matrix + offset)


class _Patch:
    """One label's view of the map: query region and transforms."""

    def __init__(
        self, nusc_map: NuScenesMap, global_from_ego: np.ndarray, grid: BevGrid, margin_m: float
    ):
        self.nusc_map = nusc_map
        self.grid = grid
        self.affine = canvas_from_global_affine(global_from_ego, grid)
        # The grid's extent on the canvas: pixel centres 0 .. H-1 along u lie inside [-0.5,
        # H - 0.5]; the devkit clips to [0, H], and so do we, to agree with it exactly.
        self.clip = box(0.0, 0.0, float(grid.height), float(grid.width))
        # Query a slightly larger region: buffered lines and contours reach in from outside.
        self.region = shapely.affinity.affine_transform(
            self.clip.buffer(margin_m / grid.resolution_m + 2.0, join_style="mitre"),
            _global_from_canvas_affine(self.affine),
        )

    def empty(self) -> np.ndarray:
        return np.zeros((self.grid.width, self.grid.height), np.uint8)  # canvas layout

    def polygons(self, layers: tuple[str, ...]) -> np.ndarray:
        """Canvas-space, clipped polygons of the given map layers."""
        found = [_layer_index(self.nusc_map, layer).query(self.region) for layer in layers]
        geoms = np.concatenate(found) if found else np.zeros(0, dtype=object)
        if len(geoms) == 0:
            return geoms
        return shapely.intersection(_in_pixels(geoms, self.affine), self.clip)

    def polygon_mask(self, layers: tuple[str, ...]) -> np.ndarray:
        return fill_polygons(self.empty(), self.polygons(layers))

    def line_mask(self, lines, width_m: float) -> np.ndarray:
        """Rasterise lines (global frame, any line geometry) ``width_m`` wide."""
        if len(lines) == 0:
            return self.empty()
        half_width_px = 0.5 * width_m / self.grid.resolution_m
        buffered = shapely.buffer(_in_pixels(lines, self.affine), half_width_px)
        return fill_polygons(self.empty(), shapely.intersection(buffered, self.clip))

    def layer_line_mask(self, layers: tuple[str, ...], width_m: float) -> np.ndarray:
        found = [_layer_index(self.nusc_map, layer).query(self.region) for layer in layers]
        return self.line_mask(np.concatenate(found), width_m)

    def contour_mask(self, layers: tuple[str, ...], width_m: float) -> np.ndarray:
        """Contour of the union of the layers' polygons (not the patch edge), ``width_m`` wide."""
        found = np.concatenate(
            [_layer_index(self.nusc_map, layer).query(self.region) for layer in layers]
        )
        if len(found) == 0:
            return self.empty()
        # Only polygons near the patch can put a contour inside it, so a local union is exact.
        contour = shapely.union_all(found).boundary
        return self.line_mask([contour], width_m)


def rasterise_bev_label(
    nusc_map: NuScenesMap, global_from_ego: np.ndarray, cfg: LabelConfig
) -> np.ndarray:
    """The BEV label around one ego pose.

    hdmapnet: ``(H, W)`` uint8 class ids (mutually exclusive, paint order in the module doc);
    fine: ``(C, H, W)`` uint8 multi-hot in ``FINE_CLASSES`` order.
    """
    margin_m = 1.0 + max(cfg.divider_width_m, cfg.boundary_width_m)
    patch = _Patch(nusc_map, np.asarray(global_from_ego, dtype=np.float64), cfg.grid, margin_m)
    if cfg.protocol == "hdmapnet":
        masks = {
            "ped_crossing": patch.polygon_mask(("ped_crossing",)),
            "boundary": patch.contour_mask(("road_segment", "lane"), cfg.boundary_width_m),
            "divider": patch.layer_line_mask(_LINE_LAYERS, cfg.divider_width_m),
        }
        label = patch.empty()
        for name in HDMAPNET_PAINT_ORDER:
            label[masks[name] > 0] = HDMAPNET_CLASSES.index(name)
        return bev_from_canvas(label)
    channels = {
        "lane_divider": patch.layer_line_mask(("lane_divider",), cfg.divider_width_m),
        "road_divider": patch.layer_line_mask(("road_divider",), cfg.divider_width_m),
        "ped_crossing": patch.polygon_mask(("ped_crossing",)),
        "stop_line": patch.polygon_mask(("stop_line",)),
        "drivable_area": patch.polygon_mask(("drivable_area",)),
    }
    return np.stack([bev_from_canvas(channels[name]) for name in FINE_CLASSES]).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Storage: one single-channel uint8 image per label (multi-hot channels packed as bits).


def pack_label(label: np.ndarray, cfg: LabelConfig) -> np.ndarray:
    """Label -> ``(H, W)`` uint8 (class ids as is; multi-hot channel k as bit k)."""
    if not cfg.multilabel:
        return label.astype(np.uint8)
    if label.shape[0] > 8:
        raise ValueError("at most 8 multi-label channels fit in one uint8 image")
    bits = (1 << np.arange(label.shape[0], dtype=np.uint8))[:, None, None]
    return ((label > 0).astype(np.uint8) * bits).sum(axis=0).astype(np.uint8)


def unpack_label(packed: np.ndarray, cfg: LabelConfig) -> np.ndarray:
    """Inverse of ``pack_label``."""
    if not cfg.multilabel:
        return packed
    bits = (1 << np.arange(cfg.num_classes, dtype=np.uint8))[:, None, None]
    return ((packed[None] & bits) > 0).astype(np.uint8)

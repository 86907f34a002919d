"""BEV road-marking labels in the ego frame, from the nuScenes vector map or from the paint.

Protocols (the rules in full, with where each comes from: docs/data.md):

- ``hdmapnet`` (default): HDMapNet's rules (Tsinghua-MARS-Lab/HDMapNet, data/vector_map.py and
  data/rasterize.py), ``background, divider, ped_crossing, boundary`` as ``(H, W)`` uint8 ids.
  divider = road_divider + lane_divider lines; ped_crossing = the two longest exterior edges of
  each crossing polygon, as lines; boundary = the rings of union(road_segment, lane). All are
  clipped to the grid (boundary to the grid shrunk by 0.2 m) and drawn as bands
  ``line_width_m`` wide: a cell belongs to a band iff its centre lies within ``line_width_m / 2``
  of the line, so the band's width does not depend on the resolution. A higher class clears the
  lower ones (boundary > ped_crossing > divider) within a band ``clear_margin_m`` wider on each
  side (HDMapNet's ``thickness + 4`` px filter mask: 0.3 m per side at its 0.15 m).
- ``hdmapnet_filled``: the same classes under the rules this project used before: crossings as
  filled polygons, lines buffered and filled with the devkit's vertex rounding, paint order
  ped_crossing < boundary < divider (a later class overwrites).
- ``fine``: ``lane_divider, road_divider, ped_crossing, stop_line, drivable_area``, multi-hot
  ``(C, H, W)``, filled like ``hdmapnet_filled``, no priority.

Sources: ``map`` (the vector map, real nuScenes and synthetic alike) or ``paint`` (``hdmapnet``
on synthetic dataroots only): the painted marks and curbs as the cameras see them, read from
``DIR/maps/paint/<location>.json`` (``model.data.synthetic``), each mark widened to at least
``line_width_m`` and then drawn like the map's bands. Paint labels are what the pseudo-labels
can see: dashes without their gaps, zebra bars, stop lines (Vistas' "Lane Marking - General",
hence divider), curbs where the curb is.

Frames: geometry moves into the ego frame with the ego pose's yaw only (the map is 2-D), onto a
canvas laid out like ``NuScenesMap.get_map_mask``'s, so the filled protocols equal the devkit's
masks pixel for pixel (tests/test_data_labels.py). No line reaches the devkit's
``mask_for_lines``, which crashes on a ``MultiLineString`` (nuscenes-devkit issue #870): bands
are computed from the segments of every part, filled protocols explode multi-geometries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import shapely
from shapely.geometry import LineString, box

from model.geometry import BevGrid, check_grid, check_number

if TYPE_CHECKING:  # the devkit's import (tables, sklearn) is paid where labels are rasterised
    from nuscenes.map_expansion.map_api import NuScenesMap

PROTOCOLS: tuple[str, ...] = ("hdmapnet", "hdmapnet_filled", "fine")
SOURCES: tuple[str, ...] = ("map", "paint")

HDMAPNET_CLASSES: tuple[str, ...] = ("background", "divider", "ped_crossing", "boundary")
FINE_CLASSES: tuple[str, ...] = (
    "lane_divider",
    "road_divider",
    "ped_crossing",
    "stop_line",
    "drivable_area",
)
_CLASSES = {"hdmapnet": HDMAPNET_CLASSES, "hdmapnet_filled": HDMAPNET_CLASSES, "fine": FINE_CLASSES}

# Bump when the rasteriser changes in a way that changes labels: invalidates label caches.
LABEL_ALGORITHM_VERSION = 2

# The rules each protocol's rasteriser reads. They are part of the cache key: changing one
# rebuilds the labels.
HDMAPNET_RULES: dict = {
    "divider_layers": ("road_divider", "lane_divider"),  # vector_map.py line_classes
    "ped_crossing_edges": 2,  # get_ped_crossing_line: np.argsort(edge lengths)[-2:]
    "boundary_layers": ("road_segment", "lane"),  # contour_classes: rings of their union
    "boundary_inset_m": 0.2,  # poly_geoms_to_vectors: rings clipped to the patch less 0.2 m
    "priority": ("boundary", "ped_crossing", "divider"),  # rasterize.py overlap_filter
}
HDMAPNET_FILLED_RULES: dict = {
    "divider_layers": ("road_divider", "lane_divider"),
    "ped_crossing_layers": ("ped_crossing",),
    "boundary_layers": ("road_segment", "lane"),
    "paint_order": ("ped_crossing", "boundary", "divider"),  # a later class overwrites
}
FINE_RULES: dict = {
    "lines": {"lane_divider": ("lane_divider",), "road_divider": ("road_divider",)},
    "polygons": {n: (n,) for n in ("ped_crossing", "stop_line", "drivable_area")},
}
_RULES = {"hdmapnet": HDMAPNET_RULES, "hdmapnet_filled": HDMAPNET_FILLED_RULES, "fine": FINE_RULES}
# The perspective classes (pseudo-labels) a BEV protocol is trained against: hdmapnet_filled
# has hdmapnet's classes, so it shares hdmapnet's pseudo-labels.
PSEUDO_LABEL_PROTOCOL: dict[str, str] = {
    "hdmapnet": "hdmapnet",
    "hdmapnet_filled": "hdmapnet",
    "fine": "fine",
}
# A paint mark's Vistas class -> hdmapnet class: pseudo_labels.VISTAS_TO_PROTOCOL["hdmapnet"].
PAINT_CLASSES: dict[str, str] = {
    "Lane Marking - General": "divider",
    "Lane Marking - Crosswalk": "ped_crossing",
    "Curb": "boundary",
}

_LINE_LAYERS = ("road_divider", "lane_divider")


def class_names(protocol: str) -> list[str]:
    """The BEV classes of a protocol, in channel / id order."""
    if protocol not in _CLASSES:
        raise ValueError(
            f"protocol: unknown label protocol {protocol!r}; expected one of {PROTOCOLS}"
        )
    return list(_CLASSES[protocol])


def is_multilabel(protocol: str) -> bool:
    """True where the protocol's label is multi-hot ``(C, H, W)``, not class ids ``(H, W)``."""
    class_names(protocol)
    return protocol == "fine"


def paint_path(dataroot: Path | str, location: str) -> Path:
    """Where a synthetic dataroot keeps a location's painted marks."""
    return Path(dataroot) / "maps" / "paint" / f"{location}.json"


@dataclass(frozen=True)
class LabelConfig:
    """What a BEV label is: class protocol, grid, line width, overlap margin and source."""

    protocol: str = "hdmapnet"
    grid: BevGrid = field(default_factory=BevGrid)
    line_width_m: float = 0.75  # HDMapNet: thickness 5 px at 0.15 m
    clear_margin_m: float = 0.3  # hdmapnet: per side, HDMapNet's thickness + 4 px at 0.15 m
    source: str = "map"  # "map" | "paint" (synthetic dataroots, hdmapnet)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"protocol: must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source == "paint" and self.protocol != "hdmapnet":
            raise ValueError(
                f"source: 'paint' labels exist for protocol 'hdmapnet' only, got protocol "
                f"{self.protocol!r}"
            )
        object.__setattr__(self, "grid", check_grid(self.grid))
        check_number("line_width_m", self.line_width_m, 0.0, strict=True)
        check_number("clear_margin_m", self.clear_margin_m, 0.0, strict=False)

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

    def rules(self) -> dict:
        """The rules the rasteriser applies for this config (they key the cache)."""
        out = {"protocol": _RULES[self.protocol]}
        if self.source == "paint":
            from model.data.synthetic.tables import PAINT_FORMAT_VERSION

            out["paint"] = {"classes": PAINT_CLASSES, "format": PAINT_FORMAT_VERSION}
        return out

    def cache_key(self) -> str:
        """Short hash of everything that changes a label (config, rules, rasteriser version)."""
        payload = json.dumps(
            {"config": self.to_dict(), "rules": self.rules(), "algorithm": LABEL_ALGORITHM_VERSION},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Map and paint geometry, indexed once per NuScenesMap (a real map has thousands of records).


class _LayerIndex:
    def __init__(self, geoms: list, widths_m: list[float] | None = None) -> None:
        self.geoms = np.asarray(geoms, dtype=object)
        self.widths_m = np.asarray(widths_m if widths_m is not None else [], dtype=np.float64)
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


def longest_edges(polygon, count: int) -> list[LineString]:
    """The ``count`` longest edges of a polygon's exterior ring as stored, in ring order
    (HDMapNet's ``get_ped_crossing_line``; a tie goes to the later edge, numpy's stable sort)."""
    xy = np.asarray(polygon.exterior.coords)[:, :2]
    lengths = np.square(np.diff(xy, axis=0)).sum(axis=1)
    keep = np.sort(np.argsort(lengths, kind="stable")[-count:])
    return [LineString(xy[i : i + 2]) for i in keep]


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


def _crossing_edge_index(nusc_map: NuScenesMap, count: int) -> _LayerIndex:
    per_map = _INDEXES.setdefault(nusc_map, {})
    key = ("ped_crossing_edges", count)
    if key not in per_map:
        # The polygon as stored, before any repair: HDMapNet reads its exterior's vertex order.
        polygons = (nusc_map.extract_polygon(r["polygon_token"]) for r in nusc_map.ped_crossing)
        per_map[key] = _LayerIndex([e for p in polygons for e in longest_edges(p, count)])
    return per_map[key]


def _paint_index(nusc_map: NuScenesMap) -> dict[str, _LayerIndex]:
    per_map = _INDEXES.setdefault(nusc_map, {})
    if "paint" not in per_map:
        from model.data.synthetic.tables import PAINT_FORMAT_VERSION

        path = paint_path(nusc_map.dataroot, nusc_map.map_name)
        if not path.is_file():
            raise _no_paint(path)
        doc = json.loads(path.read_text())
        if doc.get("version") != PAINT_FORMAT_VERSION:
            raise ValueError(
                f"source: {path} has paint format {doc.get('version')!r}, this code reads "
                f"{PAINT_FORMAT_VERSION}; regenerate the dataroot"
            )
        found: dict[str, tuple[list, list]] = {name: ([], []) for name in HDMAPNET_CLASSES[1:]}
        for mark in doc["marks"]:
            name = PAINT_CLASSES.get(mark["vistas"])
            if name is not None:
                found[name][0].append(shapely.from_wkt(mark["wkt"]))
                found[name][1].append(float(mark["width_m"]))
        per_map["paint"] = {name: _LayerIndex(g, w) for name, (g, w) in found.items()}
    return per_map["paint"]


def _no_paint(path: Path) -> ValueError:
    return ValueError(
        f"source: 'paint' needs the painted marks of a synthetic dataroot, and {path} does not "
        "exist (real nuScenes has only source 'map'; a synthetic dataroot older than generator "
        "1.1.0 needs regenerating)"
    )


def check_source(dataroot: Path | str, locations, cfg: LabelConfig) -> None:
    """Raise the ValueError a label build would, before it starts: source 'paint' on a
    dataroot without painted marks for one of ``locations``."""
    if cfg.source == "paint":
        for location in sorted(set(locations)):
            if not paint_path(dataroot, location).is_file():
                raise _no_paint(paint_path(dataroot, location))


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
    det = a * e - b * d  # by hand: np.linalg.inv costs milliseconds under a busy BLAS
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    return [ia, ib, id_, ie, -(ia * xoff + ib * yoff), -(id_ * xoff + ie * yoff)]


# ---------------------------------------------------------------------------------------------
# Filled rasterisation (hdmapnet_filled, fine): the devkit's vertex rounding and cv2.fillPoly.


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


# ---------------------------------------------------------------------------------------------
# Bands (hdmapnet): the cells whose centre lies within a distance of a geometry, exactly.

_MAX_PAIRS = 1 << 21  # (segment, cell) candidates per numpy pass, bounds memory


def _segments(geoms, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every straight segment of line geometries and polygon rings: starts (N, 2), ends (N, 2)
    and the radius of the geometry it came from (N,)."""
    parts, owner = shapely.get_parts(np.asarray(geoms, dtype=object), return_index=True)
    polygon = shapely.get_type_id(parts) == 3
    rings, ring_owner = shapely.get_rings(parts[polygon], return_index=True)
    lines = np.concatenate([parts[~polygon], rings])
    line_owner = np.concatenate([owner[~polygon], owner[polygon][ring_owner]])
    coords, index = shapely.get_coordinates(lines, return_index=True)
    same = index[1:] == index[:-1]
    return coords[:-1][same], coords[1:][same], radii[line_owner[index[:-1][same]]]


def _mark_near(masks, a: np.ndarray, b: np.ndarray, r: np.ndarray, grow: Sequence[float]) -> None:
    """Set the cells of ``masks[k]`` (rows v, cols u) within ``r + grow[k]`` of segment a-b
    (canvas pixels)."""
    reach = (r + max(grow))[:, None]
    last = np.array([masks[0].shape[1] - 1, masks[0].shape[0] - 1])
    lo = np.maximum(np.ceil(np.minimum(a, b) - reach), 0).astype(np.int64)
    hi = np.minimum(np.floor(np.maximum(a, b) + reach), last).astype(np.int64)
    size = np.maximum(hi - lo + 1, 0)
    count = size[:, 0] * size[:, 1]
    seg = np.repeat(np.arange(len(a)), count)
    local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    u = lo[seg, 0] + local % size[seg, 0]
    v = lo[seg, 1] + local // size[seg, 0]
    d = b[seg] - a[seg]
    pu, pv = u - a[seg, 0], v - a[seg, 1]
    t = np.clip((pu * d[:, 0] + pv * d[:, 1]) / np.maximum((d * d).sum(1), 1e-12), 0.0, 1.0)
    squared = (pu - t * d[:, 0]) ** 2 + (pv - t * d[:, 1]) ** 2
    for mask, g in zip(masks, grow, strict=True):
        near = squared <= (r[seg] + g) ** 2
        mask[v[near], u[near]] = True


def _inside(shape: tuple[int, int], polygons: np.ndarray) -> np.ndarray:
    """Cells whose centre lies inside the union of polygons (canvas pixels), exactly: the
    winding number of a ray towards +u, every exterior ring counted +1 and every hole -1
    whatever its orientation. Centres on a ring are left to the distance test (0 <= r)."""
    rings, polygon_of = shapely.get_rings(polygons, return_index=True)
    exterior = np.r_[True, polygon_of[1:] != polygon_of[:-1]]
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    same = ring_of[1:] == ring_of[:-1]
    a, b, ring = coords[:-1][same], coords[1:][same], ring_of[:-1][same]
    twice_area = np.bincount(ring, a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1], minlength=len(rings))
    weight = np.where(b[:, 1] > a[:, 1], 1, -1) * (np.sign(twice_area) * (2 * exterior - 1))[ring]
    height, width = shape
    lo = np.clip(np.ceil(np.minimum(a[:, 1], b[:, 1])), 0, height).astype(np.int64)
    hi = np.clip(np.ceil(np.maximum(a[:, 1], b[:, 1])), 0, height).astype(np.int64)
    rows = np.maximum(hi - lo, 0)  # the rows v an edge crosses: min <= v < max
    edge = np.repeat(np.arange(len(a)), rows)
    v = lo[edge] + np.arange(rows.sum()) - np.repeat(np.cumsum(rows) - rows, rows)
    t = (v - a[edge, 1]) / (b[edge, 1] - a[edge, 1])
    u_cross = a[edge, 0] + t * (b[edge, 0] - a[edge, 0])
    # Cells u < u_cross of row v see the edge on their ray: +w from column 0 to ceil(u_cross).
    stop = np.clip(np.ceil(u_cross), 0, width).astype(np.int64)
    size = height * (width + 1)
    diff = np.bincount(v * (width + 1), weight[edge], size) - np.bincount(
        v * (width + 1) + stop, weight[edge], size
    )
    return np.cumsum(diff.reshape(height, width + 1), axis=1)[:, :width] > 0.5


def bands(shape: tuple[int, int], geoms, radius_px, grow_px: Sequence[float] = (0.0,)) -> list:
    """Bool canvases ``shape``, one per ``grow_px``: the cells whose centre (integer canvas
    coordinates) lies within ``radius_px + grow`` (radius: one value, or one per geometry) of
    line or polygon geometries in canvas pixels; a polygon's inside is at distance 0."""
    masks = [np.zeros(shape, bool) for _ in grow_px]
    geoms = np.asarray(geoms, dtype=object).reshape(-1)
    if len(geoms) == 0:
        return masks
    radii = np.broadcast_to(np.asarray(radius_px, np.float64), geoms.shape)
    a, b, r = _segments(geoms, radii)
    # Pieces at most 2 reach + 2 px long keep every piece's bounding box tight around its band.
    span = 2 * (r + max(grow_px)) + 2
    pieces = np.maximum(np.ceil(np.hypot(*(b - a).T) / span).astype(np.int64), 1)
    owner = np.repeat(np.arange(len(a)), pieces)
    k = (np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces))[:, None]
    step = (b - a)[owner] / pieces[owner, None]
    a, b, r = a[owner] + k * step, a[owner] + (k + 1) * step, r[owner]
    cells = np.cumsum(np.prod(np.ceil(np.abs(b - a) + span[owner, None]), axis=1))
    start = 0
    while start < len(a):
        base = cells[start - 1] if start else 0.0
        end = max(int(np.searchsorted(cells, base + _MAX_PAIRS, side="right")), start + 1)
        _mark_near(masks, a[start:end], b[start:end], r[start:end], grow_px)
        start = end
    polygons = shapely.get_parts(geoms)
    polygons = polygons[shapely.get_type_id(polygons) == 3]
    if len(polygons):
        inside = _inside(shape, polygons)
        for mask in masks:
            mask |= inside
    return masks


# ---------------------------------------------------------------------------------------------
# One label.


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
        # The devkit clips to [0, H] (pixel centres 0 .. H-1 lie inside [-0.5, H - 0.5]); the
        # filled protocols clip there too, to agree with it exactly. The bands clip to the grid.
        self.clip = box(0.0, 0.0, float(grid.height), float(grid.width))
        self.region = shapely.affinity.affine_transform(
            self.clip.buffer(margin_m / grid.resolution_m + 2.0, join_style="mitre"),
            _global_from_canvas_affine(self.affine),
        )

    def empty(self) -> np.ndarray:
        return np.zeros((self.grid.width, self.grid.height), np.uint8)  # canvas layout

    def grid_box(self, inset_m: float = 0.0):
        """The grid's extent on the canvas (cell edges half a cell beyond the outer centres)."""
        inset = inset_m / self.grid.resolution_m - 0.5
        return box(inset, inset, self.grid.height - 1 - inset, self.grid.width - 1 - inset)

    def query(self, index: _LayerIndex) -> np.ndarray:
        return index.tree.query(self.region)

    def found(self, layers: tuple[str, ...]) -> np.ndarray:
        found = [_layer_index(self.nusc_map, layer).query(self.region) for layer in layers]
        return np.concatenate(found) if found else np.zeros(0, dtype=object)

    def polygons(self, layers: tuple[str, ...]) -> np.ndarray:
        """Canvas-space, clipped polygons of the given map layers."""
        geoms = self.found(layers)
        if len(geoms) == 0:
            return geoms
        return shapely.intersection(_in_pixels(geoms, self.affine), self.clip)

    def polygon_mask(self, layers: tuple[str, ...]) -> np.ndarray:
        return fill_polygons(self.empty(), self.polygons(layers))

    def line_mask(self, lines, width_m: float) -> np.ndarray:
        """Rasterise lines (global frame, any line geometry) ``width_m`` wide, filled."""
        if len(lines) == 0:
            return self.empty()
        half_width_px = 0.5 * width_m / self.grid.resolution_m
        buffered = shapely.buffer(_in_pixels(lines, self.affine), half_width_px)
        return fill_polygons(self.empty(), shapely.intersection(buffered, self.clip))

    def layer_line_mask(self, layers: tuple[str, ...], width_m: float) -> np.ndarray:
        return self.line_mask(self.found(layers), width_m)

    def contour(self, layers: tuple[str, ...]) -> list:
        """Rings of the union of the layers' polygons (global frame; not the patch edge)."""
        found = self.found(layers)
        # Only polygons near the patch can put a ring inside it, so a local union is exact.
        return [shapely.union_all(found).boundary] if len(found) else []

    def contour_mask(self, layers: tuple[str, ...], width_m: float) -> np.ndarray:
        return self.line_mask(self.contour(layers), width_m)

    def clipped(self, geoms, inset_m: float = 0.0) -> np.ndarray:
        """Global geometries -> canvas pixels, clipped to the grid (shrunk by ``inset_m``)."""
        if len(geoms) == 0:
            return np.zeros(0, dtype=object)
        return shapely.intersection(_in_pixels(geoms, self.affine), self.grid_box(inset_m))


def _hdmapnet_shapes(patch: _Patch, cfg: LabelConfig) -> dict[str, tuple[np.ndarray, object]]:
    """Per class: canvas geometries clipped to the grid and the band radius in pixels."""
    rules, res = HDMAPNET_RULES, cfg.grid.resolution_m
    half_px = 0.5 * cfg.line_width_m / res
    if cfg.source == "paint":
        out = {}
        for name, index in _paint_index(patch.nusc_map).items():
            found = patch.query(index)
            # A mark narrower than the line is widened to it; a wider one is drawn as it is.
            radius_m = np.maximum(0.5 * (cfg.line_width_m - index.widths_m[found]), 0.0)
            out[name] = (patch.clipped(index.geoms[found]), radius_m / res)
        return out
    edges = _crossing_edge_index(patch.nusc_map, rules["ped_crossing_edges"])
    inset_m = rules["boundary_inset_m"]
    return {
        "divider": (patch.clipped(patch.found(rules["divider_layers"])), half_px),
        "ped_crossing": (patch.clipped(edges.query(patch.region)), half_px),
        "boundary": (patch.clipped(patch.contour(rules["boundary_layers"]), inset_m), half_px),
    }


def _hdmapnet_label(patch: _Patch, cfg: LabelConfig) -> np.ndarray:
    shapes = _hdmapnet_shapes(patch, cfg)
    clear_px = cfg.clear_margin_m / cfg.grid.resolution_m
    label = patch.empty()
    cleared = np.zeros(label.shape, bool)
    priority = HDMAPNET_RULES["priority"]
    for name in priority:
        # HDMapNet's filter mask: the band grown by the margin clears every lower class.
        mask, wider = bands(label.shape, *shapes[name], grow_px=(0.0, clear_px))
        label[mask & ~cleared] = HDMAPNET_CLASSES.index(name)
        cleared |= wider
    return label


def _filled_label(patch: _Patch, cfg: LabelConfig) -> np.ndarray:
    rules = HDMAPNET_FILLED_RULES
    masks = {
        "ped_crossing": patch.polygon_mask(rules["ped_crossing_layers"]),
        "boundary": patch.contour_mask(rules["boundary_layers"], cfg.line_width_m),
        "divider": patch.layer_line_mask(rules["divider_layers"], cfg.line_width_m),
    }
    label = patch.empty()
    for name in rules["paint_order"]:
        label[masks[name] > 0] = HDMAPNET_CLASSES.index(name)
    return label


def _fine_label(patch: _Patch, cfg: LabelConfig) -> np.ndarray:
    channels = {
        n: patch.layer_line_mask(ls, cfg.line_width_m) for n, ls in FINE_RULES["lines"].items()
    }
    channels.update({n: patch.polygon_mask(ls) for n, ls in FINE_RULES["polygons"].items()})
    return np.stack([channels[name] for name in FINE_CLASSES])


def rasterise_bev_label(
    nusc_map: NuScenesMap, global_from_ego: np.ndarray, cfg: LabelConfig
) -> np.ndarray:
    """The BEV label around one ego pose (rules in the module docstring and docs/data.md).

    hdmapnet, hdmapnet_filled: ``(H, W)`` uint8 class ids; fine: ``(C, H, W)`` uint8 multi-hot
    in ``FINE_CLASSES`` order. Source 'paint' raises ValueError where the dataroot of
    ``nusc_map`` has no painted marks (real nuScenes).
    """
    pose = np.asarray(global_from_ego, dtype=np.float64)
    margin_m = 0.0 if cfg.protocol == "hdmapnet" else 1.0 + cfg.line_width_m
    patch = _Patch(nusc_map, pose, cfg.grid, margin_m)
    if cfg.protocol == "hdmapnet":
        return bev_from_canvas(_hdmapnet_label(patch, cfg))
    if cfg.protocol == "hdmapnet_filled":
        return bev_from_canvas(_filled_label(patch, cfg))
    fine = _fine_label(patch, cfg)
    return np.stack([bev_from_canvas(c) for c in fine]).astype(np.uint8)


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

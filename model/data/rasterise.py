"""BEV labels around an ego pose, rasterised from the nuScenes vector map or from the paint.

The protocols, sources and rules are ``model.data.labels``' (in full, with where each comes
from: docs/data.md); this module reads the geometry they name, indexed once per ``NuScenesMap``,
and draws it with ``model.data.canvas``.

Frames: geometry moves into the ego frame with the ego pose's yaw only (the map is 2-D), onto a
canvas laid out like ``NuScenesMap.get_map_mask``'s, so the filled protocols equal the devkit's
masks pixel for pixel (tests/test_data_labels.py). No line reaches the devkit's
``mask_for_lines``, which crashes on a ``MultiLineString`` (nuscenes-devkit issue #870): bands
are computed from the segments of every part, filled protocols explode multi-geometries.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import shapely
from shapely.geometry import LineString, box

from model.data.canvas import (
    bands,
    bev_from_canvas,
    canvas_from_global_affine,
    fill_polygons,
    global_from_canvas_affine,
)
from model.data.labels import (
    FINE_CLASSES,
    FINE_RULES,
    HDMAPNET_CLASSES,
    HDMAPNET_FILLED_RULES,
    HDMAPNET_RULES,
    PAINT_CLASSES,
    LabelConfig,
    paint_path,
)
from model.geometry import BevGrid

if TYPE_CHECKING:  # the devkit's import (tables, sklearn) is paid where labels are rasterised
    from nuscenes.map_expansion.map_api import NuScenesMap

_LINE_LAYERS = ("road_divider", "lane_divider")


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
        from model.data.synthetic.maps import PAINT_FORMAT_VERSION

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
            global_from_canvas_affine(self.affine),
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


"""The map files of generated worlds: the map expansion JSON (version 1.3, what
``NuScenesMap`` reads), the painted marks as the cameras see them, and the raster basemap.

Field sets follow the nuScenes map expansion so that the unmodified devkit and the usual map
extraction (HDMapNet, MapTR) read them. Tokens come from ``model.data.synthetic.tables.Tokens``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import LineString, Polygon
from shapely.geometry.base import BaseGeometry

from model.data.synthetic.tables import Tokens, rounded
from model.data.synthetic.world import World

MAP_DIMS_M = {
    "singapore-onenorth": (1585.6, 2025.0),
    "singapore-hollandvillage": (2808.3, 2922.9),
    "singapore-queenstown": (3228.6, 3687.1),
    "boston-seaport": (2979.5, 2118.1),
}
BASEMAP_RES_M = 0.1  # the devkit's default map_resolution
SIMPLIFY_M = 0.005
BASEMAP_MAX_PIXELS = 120_000_000


def _affine(a: np.ndarray) -> list[float]:
    """shapely.affinity matrix [a, b, d, e, xoff, yoff] of a 3x3 2-D affine."""
    return [a[0, 0], a[0, 1], a[1, 0], a[1, 1], a[0, 2], a[1, 2]]


def to_global(world: World, geom: BaseGeometry) -> BaseGeometry:
    return affinity.affine_transform(geom, _affine(world.global_from_local))


class _MapWriter:
    """Accumulates map-expansion records (nodes, lines, polygons and the semantic layers)."""

    LAYERS = (
        "polygon", "line", "node", "drivable_area", "road_segment", "road_block", "lane",
        "ped_crossing", "walkway", "stop_line", "carpark_area", "road_divider", "lane_divider",
        "traffic_light", "lane_connector",
    )  # fmt: skip

    def __init__(self, tok: Tokens, location: str):
        self.tok = tok
        self.loc = location
        self.rec: dict[str, list[dict]] = {k: [] for k in self.LAYERS}
        self.arclines: dict[str, list[dict]] = {}
        self.connectivity: dict[str, dict] = {}

    def nodes(self, coords, key: str) -> list[str]:
        out = []
        for i, (x, y) in enumerate(np.asarray(coords)[:, :2]):
            token = self.tok("node", self.loc, key, i)
            self.rec["node"].append(
                {"token": token, "x": round(float(x), 3), "y": round(float(y), 3)}
            )
            out.append(token)
        return out

    def polygon(self, poly: Polygon, key: str) -> str:
        token = self.tok("polygon", self.loc, key)
        poly = poly.simplify(SIMPLIFY_M)  # drops the collinear vertices of straight edges
        ext = self.nodes(np.asarray(poly.exterior.coords)[:-1], f"{key}/ext")
        holes = [
            {"node_tokens": self.nodes(np.asarray(r.coords)[:-1], f"{key}/hole{i}")}
            for i, r in enumerate(poly.interiors)
        ]
        self.rec["polygon"].append({"token": token, "exterior_node_tokens": ext, "holes": holes})
        return token

    def line(self, line: LineString, key: str) -> tuple[str, list[str]]:
        token = self.tok("line", self.loc, key)
        line = line.simplify(SIMPLIFY_M)
        nodes = self.nodes(np.asarray(line.coords), key)
        self.rec["line"].append({"token": token, "node_tokens": nodes})
        return token, nodes

    def area(self, layer: str, scene_key: str, i: int, poly: Polygon, key: str, **fields) -> str:
        """Record `i` of a polygon layer for one scene; returns its token."""
        token = self.tok(layer, self.loc, scene_key, i)
        self.rec[layer].append({"token": token, "polygon_token": self.polygon(poly, key), **fields})
        return token

    def add_world(self, world: World, scene: int):
        g = lambda geom: to_global(world, geom)  # noqa: E731
        k = f"s{scene}"
        da = self.tok("drivable_area", self.loc, k)
        self.rec["drivable_area"].append(
            {
                "token": da,
                "polygon_tokens": [
                    self.polygon(g(p), f"{k}/drivable{i}") for i, p in enumerate(world.drivable)
                ],
            }
        )
        seg_tokens = [
            self.area("road_segment", k, i, g(poly), f"{k}/segment{i}",
                      is_intersection=bool(is_x), drivable_area_token=da)
            for i, (poly, is_x) in enumerate(world.road_segments)
        ]  # fmt: skip
        for i, lane in enumerate(world.lanes):
            centre = np.asarray(g(LineString(lane["centre"])).coords)
            poly = g(lane["polygon"])
            ends = [
                self.line(g(LineString(edge)), f"{k}/lane{i}/edge{j}")[0]
                for j, edge in enumerate(lane["edges"])
            ]
            token = self.area(
                "lane",
                k,
                i,
                poly,
                f"{k}/lane{i}",
                lane_type="CAR",
                from_edge_line_token=ends[0],
                to_edge_line_token=ends[1],
                left_lane_divider_segments=[],
                right_lane_divider_segments=[],
            )
            self.arclines[token] = arcline_path(centre)
            self.connectivity[token] = {"incoming": [], "outgoing": []}
        ped_tokens = [
            self.area("ped_crossing", k, i, g(poly), f"{k}/ped{i}",
                      road_segment_token=seg_tokens[seg])
            for i, (poly, seg) in enumerate(world.ped_crossings)
        ]  # fmt: skip
        for i, poly in enumerate(world.walkways):
            self.area("walkway", k, i, g(poly), f"{k}/walkway{i}")
        for i, (poly, ped) in enumerate(world.stop_lines):
            self.area("stop_line", k, i, g(poly), f"{k}/stop{i}",
                      stop_line_type="PED_CROSSING", ped_crossing_tokens=[ped_tokens[ped]],
                      traffic_light_tokens=[], road_block_token="")  # fmt: skip
        for i, (line, seg) in enumerate(world.road_dividers):
            line_token, _ = self.line(g(line), f"{k}/road_divider{i}")
            self.rec["road_divider"].append(
                {
                    "token": self.tok("road_divider", self.loc, k, i),
                    "line_token": line_token,
                    "road_segment_token": seg_tokens[seg],
                }
            )
        for i, (line, seg_type) in enumerate(world.lane_dividers):
            line_token, nodes = self.line(g(line), f"{k}/lane_divider{i}")
            self.rec["lane_divider"].append(
                {
                    "token": self.tok("lane_divider", self.loc, k, i),
                    "line_token": line_token,
                    "lane_divider_segments": [
                        {"node_token": n, "segment_type": seg_type} for n in nodes
                    ],
                }
            )

    def json(self) -> dict:
        w, h = MAP_DIMS_M[self.loc]
        out = {"version": "1.3", "canvas_edge": [w, h]}
        out.update(self.rec)
        out["arcline_path_3"] = self.arclines
        out["connectivity"] = self.connectivity
        return out


def arcline_path(centre: np.ndarray, piece_m: float = 5.0) -> list[dict]:
    """A lane centreline as nuScenes arcline paths: one constant-curvature arc per piece."""
    seg = np.diff(centre, axis=0)
    length = np.hypot(seg[:, 0], seg[:, 1])
    s = np.concatenate([[0.0], np.cumsum(length)])
    heading = np.unwrap(np.arctan2(seg[:, 1], seg[:, 0]))
    heading = np.concatenate([heading, heading[-1:]])
    out = []
    n_pieces = max(int(round(s[-1] / piece_m)), 1)
    bounds = np.linspace(0.0, s[-1], n_pieces + 1)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        xa, ya = np.interp(a, s, centre[:, 0]), np.interp(a, s, centre[:, 1])
        xb, yb = np.interp(b, s, centre[:, 0]), np.interp(b, s, centre[:, 1])
        ha, hb = np.interp(a, s, heading), np.interp(b, s, heading)
        turn, piece = float(hb - ha), float(b - a)
        if abs(turn) < 1e-4:
            shape, radius, lengths = "LSL", 999.999, [0.0, piece, 0.0]
        else:
            shape = "LSL" if turn > 0 else "RSR"
            radius, lengths = piece / abs(turn), [piece, 0.0, 0.0]
        out.append(
            {
                "start_pose": [round(float(xa), 3), round(float(ya), 3), round(float(ha), 6)],
                "end_pose": [round(float(xb), 3), round(float(yb), 3), round(float(hb), 6)],
                "shape": shape,
                "radius": round(float(radius), 3),
                "segment_length": [round(v, 4) for v in lengths],
            }
        )
    return out


def map_json(location: str, worlds: list[tuple[int, World]], tok: Tokens) -> dict:
    writer = _MapWriter(tok, location)
    for scene, world in worlds:
        writer.add_world(world, scene)
    return writer.json()


# The painted marks as the cameras see them (``maps/paint/<location>.json``), for BEV labels
# aligned with the pseudo-labels (``model.data.labels``, source "paint"). Bump on a format change.
PAINT_FORMAT_VERSION = 1
PAINT_KINDS = ("road_divider", "lane_divider", "stop_line", "ped_crossing", "curb")


def paint_json(location: str, worlds: list[World]) -> dict:
    """Every painted mark and curb of a location's worlds in the global frame: its kind, its
    Vistas class (what the semantic images call it), width across in metres, polygon as WKT."""
    marks = []
    for world in worlds:
        pieces = [(p.polygon, p.kind, p.vistas, p.width_m) for p in world.paint]
        curbs = getattr(world.curbs, "geoms", [world.curbs])
        pieces += [(c, "curb", "Curb", world.curb_width_m) for c in curbs if not c.is_empty]
        for poly, kind, vistas, width in pieces:
            wkt = shapely.to_wkt(to_global(world, poly), rounding_precision=3)
            marks.append({"kind": kind, "vistas": vistas, "width_m": rounded(width), "wkt": wkt})
    return {"version": PAINT_FORMAT_VERSION, "location": location, "marks": marks}


def basemap(worlds: list[World]) -> tuple[np.ndarray, float]:
    """Drivable area raster (255 = drivable) from the global origin, rows from the north edge.

    At the devkit's default 0.1 m/px unless that would exceed ``BASEMAP_MAX_PIXELS``; the
    resolution used is returned (and recorded in synthetic.json).
    """
    polys = [to_global(w, p) for w in worlds for p in w.drivable]
    x_max = max(p.bounds[2] for p in polys) + 10.0
    y_max = max(p.bounds[3] for p in polys) + 10.0
    res = BASEMAP_RES_M
    while (x_max / res) * (y_max / res) > BASEMAP_MAX_PIXELS:
        res *= 2
    h, w = int(math.ceil(y_max / res)), int(math.ceil(x_max / res))
    img = np.zeros((h, w), np.uint8)
    for p in polys:
        rings = []
        for ring in [p.exterior, *p.interiors]:
            xy = np.asarray(ring.coords)
            px = np.stack([xy[:, 0] / res, h - xy[:, 1] / res], 1)
            rings.append(np.round(px * 16).astype(np.int32))
        cv2.fillPoly(img, rings, 255, shift=4)
    return img, res

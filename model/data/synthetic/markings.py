"""The map elements and paint along a world's roads: lanes, road and lane dividers, zebra
crossings with their stop lines, and the painted marks the cameras see, from the same geometry
(``MapBuilder``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from shapely.geometry import LineString, Polygon

from model.data.synthetic.road import Road

WHITE = (0.92, 0.92, 0.90)
YELLOW = (0.95, 0.78, 0.20)


@dataclass
class Paint:
    """A painted marking: polygon, paint colour (RGB in [0, 1]), Vistas class name, what it
    marks (road_divider, lane_divider, stop_line or ped_crossing) and its width across (m)."""

    polygon: Polygon
    colour: tuple[float, float, float]
    vistas: str
    kind: str
    width_m: float


def _chunks(line: np.ndarray, max_len_m: float = 15.0, max_turn_rad: float = 0.1):
    """Split a polyline into nearly straight pieces.

    A nearly straight piece meets a convex map patch in one piece, so the devkit's
    ``mask_for_lines`` never sees a MultiLineString from our maps (nuscenes-devkit #870).
    """
    seg = np.diff(line, axis=0)
    seg_len = np.hypot(seg[:, 0], seg[:, 1])
    seg_head = np.unwrap(np.arctan2(seg[:, 1], seg[:, 0]))
    out, start, acc = [], 0, 0.0
    for i in range(len(seg)):
        acc += seg_len[i]
        if acc >= max_len_m or abs(seg_head[i] - seg_head[start]) > max_turn_rad:
            out.append(line[start : i + 2])
            start, acc = i + 1, 0.0
    if start < len(seg):
        out.append(line[start:])
    return [c for c in out if len(c) >= 2]


class MapBuilder:
    """Collects the map elements and paint of one world."""

    def __init__(self, rng: np.random.Generator, centre_colour):
        self.rng = rng
        self.centre_colour = centre_colour
        self.road_segments: list[tuple[Polygon, bool]] = []
        self.lanes: list[dict] = []
        self.ped_crossings: list[tuple[Polygon, int]] = []
        self.stop_lines: list[tuple[Polygon, int]] = []
        self.road_dividers: list[tuple[LineString, int]] = []
        self.lane_dividers: list[tuple[LineString, str]] = []
        self.paint: list[Paint] = []

    def line_paint(self, road: Road, d: float, s0, s1, width: float, colour, dash, kind: str):
        """Paint along offset d: solid when dash is None else (dash_m, gap_m)."""
        if s1 - s0 < 0.3:
            return
        if dash is None:
            spans = [(s0, s1)]
        else:
            dash_m, gap_m = dash
            phase = self.rng.uniform(0.0, dash_m + gap_m)
            starts = np.arange(s0 - phase, s1, dash_m + gap_m)
            spans = [(max(a, s0), min(a + dash_m, s1)) for a in starts]
            spans = [(a, b) for a, b in spans if b - a > 0.3]
        for a, b in spans:
            strip = road.strip(d - width / 2, d + width / 2, a, b)
            self.paint.append(Paint(strip, colour, "Lane Marking - General", kind, width))

    def add_road(self, road: Road, crossings: list[dict], style: dict):
        """Segments, lanes, dividers, crossings and their paint for one road."""
        w = road.lane_width_m
        for a, b in road.open_intervals():
            if b - a < 1.0:
                continue
            seg_idx = len(self.road_segments)
            self.road_segments.append((road.carriageway(a, b), False))
            here = [c for c in crossings if a - 1e-6 <= c["s0"] and c["s1"] <= b + 1e-6]
            # Divider-free zones: from the outer stop line across the crosswalk.
            gaps = sorted((c["zone"][0], c["zone"][1]) for c in here)
            spans, start = [], a
            for g0, g1 in gaps:
                if g0 > start:
                    spans.append((start, g0))
                start = max(start, g1)
            if start < b:
                spans.append((start, b))

            for k in range(road.lanes_right):
                self._lane(road, -(k + 1) * w, -k * w, a, b, forward=True)
            for k in range(road.lanes_left):
                self._lane(road, k * w, (k + 1) * w, a, b, forward=False)

            for s0, s1 in spans:
                if s1 - s0 < 1.0:
                    continue
                if road.lanes_left > 0 and road.lanes_right > 0:
                    for piece in _chunks(road.polyline(0.0, s0, s1)):
                        self.road_dividers.append((LineString(piece), seg_idx))
                    self._centre_paint(road, s0, s1, style)
                offsets = [-(k + 1) * w for k in range(road.lanes_right - 1)]
                offsets += [(k + 1) * w for k in range(road.lanes_left - 1)]
                for d in offsets:
                    solid = style["lane_solid"]
                    seg_type = "SINGLE_SOLID_WHITE" if solid else "DOUBLE_DASHED_WHITE"
                    for piece in _chunks(road.polyline(d, s0, s1)):
                        self.lane_dividers.append((LineString(piece), seg_type))
                    # Dashed dividers turn solid on the last metres before a stop line.
                    approach = style["approach_solid_m"]
                    near = [(g0 - approach, g0) for g0, _ in gaps] + [
                        (g1, g1 + approach) for _, g1 in gaps
                    ]
                    cuts = sorted(
                        (max(n0, s0), min(n1, s1)) for n0, n1 in near if n1 > s0 and n0 < s1
                    )
                    lane_w, dash = style["lane_w"], None if solid else style["dash"]
                    t = s0
                    for c0, c1 in cuts:
                        if c0 > t:
                            self.line_paint(road, d, t, c0, lane_w, WHITE, dash, "lane_divider")
                        self.line_paint(road, d, c0, c1, lane_w, WHITE, None, "lane_divider")
                        t = max(t, c1)
                    if t < s1:
                        self.line_paint(road, d, t, s1, lane_w, WHITE, dash, "lane_divider")

            for c in here:
                self._crossing(road, c, seg_idx, style)

    def _lane(self, road: Road, d0: float, d1: float, s0: float, s1: float, forward: bool):
        centre = road.polyline((d0 + d1) / 2, s0, s1)
        if not forward:
            centre = centre[::-1]
        edges = [road.at(s0, np.array([d0, d1])), road.at(s1, np.array([d0, d1]))]
        if not forward:
            edges = edges[::-1]
        self.lanes.append({"polygon": road.strip(d0, d1, s0, s1), "centre": centre, "edges": edges})

    def _centre_paint(self, road: Road, s0: float, s1: float, style: dict):
        colour, kind, lw = self.centre_colour, style["centre"], style["centre_w"]
        if kind == "double_solid":
            for d in (-style["centre_gap"] / 2 - lw / 2, style["centre_gap"] / 2 + lw / 2):
                self.line_paint(road, d, s0, s1, lw, colour, None, "road_divider")
        elif kind == "solid":
            self.line_paint(road, 0.0, s0, s1, lw, colour, None, "road_divider")
        else:
            self.line_paint(road, 0.0, s0, s1, lw, colour, style["dash"], "road_divider")

    def _crossing(self, road: Road, c: dict, seg_idx: int, style: dict):
        r, left = road.right_edge_d, road.left_edge_d
        ped_idx = len(self.ped_crossings)
        self.ped_crossings.append((road.carriageway(c["s0"], c["s1"]), seg_idx))
        if style["crossing"] == "zebra":
            bar, gap = style["zebra_bar"], style["zebra_gap"]
            d = r + 0.3
            while d + bar <= left - 0.3 + 1e-6:
                strip = road.strip(d, d + bar, c["s0"], c["s1"])
                self.paint.append(
                    Paint(strip, WHITE, "Lane Marking - Crosswalk", "ped_crossing", bar)
                )
                d += bar + gap
        else:  # two transverse lines along the crossing's edges
            for a, b in ((c["s0"], c["s0"] + 0.3), (c["s1"] - 0.3, c["s1"])):
                strip = road.strip(r, left, a, b)
                self.paint.append(
                    Paint(strip, WHITE, "Lane Marking - Crosswalk", "ped_crossing", b - a)
                )
        for side, (a, b) in c["stops"]:
            d0, d1 = (r, 0.0) if side == "right" else (0.0, left)
            if d1 - d0 < 0.5:
                continue
            poly = road.strip(d0, d1, a, b)
            self.stop_lines.append((poly, ped_idx))
            self.paint.append(Paint(poly, WHITE, "Lane Marking - General", "stop_line", b - a))


def crossing_at_junction(road: Road, cut: tuple[float, float], which: str, depth: float):
    """A crosswalk just outside a junction cut, with a stop line for inbound traffic."""
    stop_gap, stop_w = 1.5, 0.45
    if which == "before":  # the arm at s < cut: inbound traffic drives +s (right lanes)
        s1 = cut[0] - 0.5
        s0 = s1 - depth
        stop = (s0 - stop_gap - stop_w, s0 - stop_gap)
        return {"s0": s0, "s1": s1, "stops": [("right", stop)], "zone": (stop[0], cut[0])}
    s0 = cut[1] + 0.5
    s1 = s0 + depth
    stop = (s1 + stop_gap, s1 + stop_gap + stop_w)
    return {"s0": s0, "s1": s1, "stops": [("left", stop)], "zone": (cut[1], stop[1])}


def midblock_crossing(s_mid: float, depth: float):
    stop_gap, stop_w = 2.0, 0.45
    s0, s1 = s_mid - depth / 2, s_mid + depth / 2
    before = (s0 - stop_gap - stop_w, s0 - stop_gap)
    after = (s1 + stop_gap, s1 + stop_gap + stop_w)
    return {
        "s0": s0,
        "s1": s1,
        "stops": [("right", before), ("left", after)],
        "zone": (before[0], after[1]),
    }

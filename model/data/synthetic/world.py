"""Procedural road worlds: shapely geometry in a scene-local metric frame.

A world is one or two roads (a main road the ego drives along, optionally a cross road meeting
it in a four-way or T junction). Each road is a centreline plus a cross-section (lanes per
direction, lane width, centre-line style, sidewalks). Everything else is derived from that with
shapely: the drivable area (with rounded junction corners), road segments, lanes, lane and road
dividers, zebra crossings with stop lines, curbs and walkways. The same geometry becomes the
nuScenes vector map (``tables.py``) and the ground texture the cameras see (``render.py``), so
images and map agree by construction.

Traffic drives on the right in the local frame; a left-hand-traffic location mirrors the whole
world when it is placed in the global frame (``World.global_from_local``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from shapely import ops
from shapely.geometry import LineString, MultiPoint, Polygon
from shapely.geometry.base import BaseGeometry

STEP_M = 0.5  # centreline sampling
KEYFRAME_DT_S = 0.5  # 2 Hz keyframes
MARGIN_M = 70.0  # road beyond either end of the ego trajectory

WHITE = (0.92, 0.92, 0.90)
YELLOW = (0.95, 0.78, 0.20)


@dataclass
class Road:
    """A centreline sampled every ``STEP_M`` with its cross-section.

    Lateral offset ``d`` is positive to the left of the centreline direction. Lanes at ``d < 0``
    drive along the centreline (right-hand traffic), lanes at ``d > 0`` against it.
    """

    name: str
    xy: np.ndarray  # (N, 2)
    heading: np.ndarray  # (N,) unwrapped radians
    lanes_right: int
    lanes_left: int
    lane_width_m: float
    sidewalk_right_m: float
    sidewalk_left_m: float
    cuts: list[tuple[float, float]] = field(default_factory=list)  # junction intervals

    @property
    def s(self) -> np.ndarray:
        return np.arange(len(self.xy)) * STEP_M

    @property
    def length_m(self) -> float:
        return (len(self.xy) - 1) * STEP_M

    @property
    def right_edge_d(self) -> float:
        return -self.lanes_right * self.lane_width_m

    @property
    def left_edge_d(self) -> float:
        return self.lanes_left * self.lane_width_m

    def at(self, s, d=0.0) -> np.ndarray:
        """(..., 2) points at arc length ``s`` and lateral offset ``d`` (broadcast)."""
        s = np.asarray(s, dtype=np.float64)
        x = np.interp(s, self.s, self.xy[:, 0])
        y = np.interp(s, self.s, self.xy[:, 1])
        th = self.heading_at(s)
        d = np.asarray(d, dtype=np.float64)
        return np.stack([x - d * np.sin(th), y + d * np.cos(th)], axis=-1)

    def heading_at(self, s) -> np.ndarray:
        return np.interp(np.asarray(s, dtype=np.float64), self.s, self.heading)

    def polyline(self, d: float, s0: float, s1: float) -> np.ndarray:
        s0, s1 = max(s0, 0.0), min(s1, self.length_m)
        n = max(int(np.ceil((s1 - s0) / STEP_M)), 1)
        return self.at(np.linspace(s0, s1, n + 1), d)

    def strip(self, d0: float, d1: float, s0: float, s1: float) -> Polygon:
        """The area between lateral offsets d0 < d1 over arc lengths [s0, s1]."""
        a = self.polyline(d0, s0, s1)
        b = self.polyline(d1, s0, s1)[::-1]
        return Polygon(np.concatenate([a, b]))

    def carriageway(self, s0: float, s1: float) -> Polygon:
        return self.strip(self.right_edge_d, self.left_edge_d, s0, s1)

    def open_intervals(self) -> list[tuple[float, float]]:
        """[0, length] without the junction cuts."""
        out, start = [], 0.0
        for c0, c1 in sorted(self.cuts):
            if c0 > start:
                out.append((start, c0))
            start = max(start, c1)
        if start < self.length_m:
            out.append((start, self.length_m))
        return out


def centreline(start_xy, start_heading: float, pieces: list[tuple[float, float]]) -> tuple:
    """Integrate (length_m, curvature_per_m) pieces into a polyline sampled every STEP_M."""
    curv = np.concatenate([np.full(int(round(length / STEP_M)), k) for length, k in pieces])
    heading = start_heading + np.concatenate([[0.0], np.cumsum(curv * STEP_M)])
    mid = (heading[:-1] + heading[1:]) / 2.0
    steps = np.stack([np.cos(mid), np.sin(mid)], axis=1) * STEP_M
    xy = np.asarray(start_xy, dtype=np.float64) + np.concatenate(
        [[[0.0, 0.0]], np.cumsum(steps, 0)]
    )
    return xy, heading


@dataclass
class Paint:
    """A painted marking: polygon, paint colour (RGB in [0, 1]), Vistas class name, what it
    marks (road_divider, lane_divider, stop_line or ped_crossing) and its width across (m)."""

    polygon: Polygon
    colour: tuple[float, float, float]
    vistas: str
    kind: str
    width_m: float


@dataclass
class Vehicle:
    """A box moving along a lane (or parked): local x, y, yaw per keyframe."""

    poses: np.ndarray  # (T, 3)
    size_wlh: tuple[float, float, float]
    colour: tuple[float, float, float]
    moving: bool


@dataclass
class World:
    kind: str
    roads: list[Road]
    drivable: list[Polygon]
    road_segments: list[tuple[Polygon, bool]]  # (polygon, is_intersection)
    lanes: list[dict]  # polygon, centre (along travel), edges (start and end cross-sections)
    ped_crossings: list[tuple[Polygon, int]]  # (polygon, road segment index)
    stop_lines: list[tuple[Polygon, int]]  # (polygon, ped crossing index)
    walkways: list[Polygon]
    curbs: BaseGeometry
    curb_width_m: float
    road_dividers: list[tuple[LineString, int]]  # (line, road segment index)
    lane_dividers: list[tuple[LineString, str]]  # (line, nuScenes segment type)
    paint: list[Paint]
    ego_poses: np.ndarray  # (T, 3) local x, y, yaw
    vehicles: list[Vehicle]
    global_from_local: np.ndarray  # (3, 3) 2-D affine, a reflection for left-hand traffic
    bounds: tuple[float, float, float, float]  # local xmin, ymin, xmax, ymax of all geometry


def local_from_ego(world: World, frame: int) -> np.ndarray:
    """4x4 ego -> scene-local frame at a keyframe.

    The ego frame is a proper (right-handed) frame in the global map; where the world is
    mirrored into the global frame (left-hand traffic), the local frame sees it mirrored.
    """
    x, y, yaw = world.ego_poses[frame]
    mirror = np.linalg.det(world.global_from_local[:2, :2]) < 0
    c, s = np.cos(yaw), np.sin(yaw)
    out = np.eye(4)
    out[:2, :2] = np.array([[c, -s], [s, c]]) @ np.diag([1.0, -1.0 if mirror else 1.0])
    out[:2, 3] = (x, y)
    return out


def global_yaw(world: World, local_yaw: float) -> float:
    head = world.global_from_local[:2, :2] @ np.array([np.cos(local_yaw), np.sin(local_yaw)])
    return float(np.arctan2(head[1], head[0]))


def _parts(geom: BaseGeometry) -> list[Polygon]:
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    return [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon) and g.area > 0.05]


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


class _Builder:
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


def _crossing_at_junction(road: Road, cut: tuple[float, float], which: str, depth: float):
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


def _midblock_crossing(s_mid: float, depth: float):
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


def _cross_section(rng: np.random.Generator) -> dict:
    lanes = int(rng.choice([1, 2, 3], p=[0.25, 0.45, 0.3]))
    lanes_other = int(np.clip(lanes + rng.integers(-1, 2), 1, 3))
    return {
        "lanes_right": lanes,
        "lanes_left": lanes_other,
        "lane_width_m": float(rng.uniform(2.9, 3.8)),
        "sidewalk_right_m": float(0.0 if rng.random() < 0.12 else rng.uniform(1.5, 4.0)),
        "sidewalk_left_m": float(0.0 if rng.random() < 0.12 else rng.uniform(1.5, 4.0)),
    }


def _style(rng: np.random.Generator, lanes: int) -> dict:
    dash = float(rng.uniform(2.0, 4.0))
    return {
        "centre": str(
            rng.choice(["double_solid", "solid", "dashed"], p=[0.55, 0.2, 0.25])
            if lanes > 1
            else rng.choice(["double_solid", "dashed"], p=[0.4, 0.6])
        ),
        "centre_w": float(rng.uniform(0.10, 0.16)),
        "centre_gap": float(rng.uniform(0.10, 0.25)),
        "lane_w": float(rng.uniform(0.10, 0.18)),
        "lane_solid": bool(rng.random() < 0.12),
        "dash": (dash, float(dash * rng.uniform(1.2, 3.0))),
        "approach_solid_m": float(rng.choice([0.0, 10.0, 20.0])),
        "crossing": str(rng.choice(["zebra", "zebra", "zebra", "lines"])),
        "zebra_bar": float(rng.uniform(0.4, 0.65)),
        "zebra_gap": float(rng.uniform(0.45, 0.8)),
        "crossing_depth": float(rng.uniform(3.0, 5.0)),
    }


def make_world(
    rng: np.random.Generator,
    kind: str,
    samples: int,
    centre_colour,
    global_from_local: np.ndarray,
) -> World:
    """One procedural world; ``kind`` is straight, curve, cross or tee."""
    speed = float(rng.uniform(4.0, 11.0))
    t_end = KEYFRAME_DT_S * max(samples - 1, 1)
    accel = float(np.clip(rng.normal(0.0, 0.3), (2.0 - speed) / t_end, 0.8))
    t_s = np.arange(samples) * KEYFRAME_DT_S
    travelled = speed * t_s + 0.5 * accel * t_s**2
    traj_len = max(float(travelled[-1]), 1.0)
    total = traj_len + 2 * MARGIN_M
    xs = _cross_section(rng)
    style = _style(rng, xs["lanes_right"])
    builder = _Builder(rng, centre_colour)

    # Main road pieces (length, curvature); a junction needs 40 m of straight road either side.
    s_junction = None
    if kind == "curve":
        radius = float(rng.uniform(30.0, 150.0)) * rng.choice([-1, 1])
        turn = float(rng.uniform(0.4, 1.6))
        arc = min(abs(radius) * turn, total * 0.6)
        first = float(rng.uniform(0.1, 0.9)) * (total - arc)
        pieces = [(first, 0.0), (arc, 1.0 / radius), (total - first - arc, 0.0)]
    elif kind in ("cross", "tee"):
        s_junction = float(rng.uniform(MARGIN_M - 10.0, MARGIN_M + traj_len + 25.0))
        k = float(rng.uniform(-1, 1)) / 250.0 if rng.random() < 0.5 else 0.0
        a0 = max(s_junction - 40.0, 0.0)
        pieces = [(a0, k), (total - a0, 0.0)]
    else:
        pieces = [(total, 0.0)]
    xy, heading = centreline((-total / 2, 0.0), 0.0, pieces)
    main = Road("main", xy, heading, **xs)
    roads = [main]
    crossings: dict[str, list[dict]] = {"main": []}
    corner_r = float(rng.uniform(3.0, 9.0))

    if s_junction is not None:
        xs_b = _cross_section(rng)
        alpha = np.pi / 2 + float(rng.uniform(-0.35, 0.35))
        p = main.at(s_junction)
        th = float(main.heading_at(s_junction)) + alpha
        half_a = max(-main.right_edge_d, main.left_edge_d)
        half_b = max(xs_b["lanes_right"], xs_b["lanes_left"]) * xs_b["lane_width_m"]
        e_a = half_b / np.sin(alpha) + half_a * abs(1 / np.tan(alpha)) + corner_r
        e_b = half_a / np.sin(alpha) + half_b * abs(1 / np.tan(alpha)) + corner_r
        length_b = float(rng.uniform(60.0, 90.0))
        if kind == "cross":
            start = p - length_b * np.array([np.cos(th), np.sin(th)])
            xy_b, head_b = centreline(start, th, [(2 * length_b, 0.0)])
            cross = Road("cross", xy_b, head_b, **xs_b, cuts=[(length_b - e_b, length_b + e_b)])
        else:
            sign = rng.choice([-1.0, 1.0])  # the side of the main road the cross road leaves
            th = th if sign > 0 else th + np.pi
            xy_b, head_b = centreline(p, th, [(length_b, 0.0)])
            cross = Road("cross", xy_b, head_b, **xs_b, cuts=[(0.0, e_b)])
        main.cuts = [(s_junction - e_a, s_junction + e_a)]
        roads.append(cross)
        crossings["cross"] = []
        depth = style["crossing_depth"]
        for road in roads:
            for cut in road.cuts:
                if cut[0] > 1.0:
                    crossings[road.name].append(_crossing_at_junction(road, cut, "before", depth))
                if cut[1] < road.length_m - 1.0:
                    crossings[road.name].append(_crossing_at_junction(road, cut, "after", depth))
    elif rng.random() < 0.75:
        # A mid-block zebra on a straight stretch the ego sees.
        for _ in range(20):
            s_mid = float(rng.uniform(MARGIN_M - 5.0, MARGIN_M + traj_len + 30.0))
            if abs(main.heading_at(s_mid + 8) - main.heading_at(s_mid - 8)) < 0.02:
                crossings["main"].append(_midblock_crossing(s_mid, style["crossing_depth"]))
                break

    for road in roads:
        builder.add_road(road, crossings[road.name], style)

    # Drivable area: union of carriageways with rounded junction corners.
    carriage = ops.unary_union([r.carriageway(0.0, r.length_m) for r in roads])
    drivable = carriage.buffer(corner_r, join_style="round").buffer(-corner_r, join_style="round")
    drivable = drivable.simplify(0.01)
    if s_junction is not None:
        ends = []
        for road in roads:
            for c0, c1 in road.cuts:
                for s in (c0, c1):
                    if 0.0 < s < road.length_m:
                        ends.append(road.at(s, road.right_edge_d))
                        ends.append(road.at(s, road.left_edge_d))
            if road.name == "cross" and kind == "tee":
                ends.append(road.at(0.0, road.right_edge_d))
                ends.append(road.at(0.0, road.left_edge_d))
        hull = MultiPoint(np.array(ends)).convex_hull
        junction = drivable.intersection(hull)
        for part in _parts(junction):
            builder.road_segments.append((part, True))

    side = []
    for road in roads:
        if road.sidewalk_right_m > 0:
            d = road.right_edge_d
            side.append(road.strip(d - road.sidewalk_right_m, d + 0.01, 0.0, road.length_m))
        if road.sidewalk_left_m > 0:
            d = road.left_edge_d
            side.append(road.strip(d - 0.01, d + road.sidewalk_left_m, 0.0, road.length_m))
    curb_w = float(rng.uniform(0.15, 0.3))
    walk_region = ops.unary_union(side) if side else Polygon()
    walkways = _parts(walk_region.difference(drivable).simplify(0.01))
    curbs = drivable.buffer(curb_w, join_style="mitre").difference(drivable)
    # Curbs run along the road sides, not across the open road ends at the world's edge.
    ends_cut = ops.unary_union(
        [
            r.strip(r.right_edge_d - 5, r.left_edge_d + 5, a, b)
            for r in roads
            for a, b in ((0.0, 0.6), (r.length_m - 0.6, r.length_m))
            if not (r.name == "cross" and kind == "tee" and a == 0.0)
        ]
    )
    curbs = curbs.difference(ends_cut)

    ego_lane = int(rng.integers(0, main.lanes_right))
    ego_d = -(ego_lane + 0.5) * main.lane_width_m + float(rng.uniform(-0.25, 0.25))
    s_ego = MARGIN_M + travelled
    ego_xy = main.at(s_ego, ego_d)
    ego_poses = np.concatenate([ego_xy, main.heading_at(s_ego)[:, None]], axis=1)

    vehicles = _traffic(rng, roads, samples, s_ego, ego_lane, speed, crossings)

    all_geom = ops.unary_union([drivable, walk_region])
    return World(
        kind=kind,
        roads=roads,
        drivable=_parts(drivable),
        road_segments=builder.road_segments,
        lanes=builder.lanes,
        ped_crossings=builder.ped_crossings,
        stop_lines=builder.stop_lines,
        walkways=walkways,
        curbs=curbs,
        curb_width_m=curb_w,
        road_dividers=builder.road_dividers,
        lane_dividers=builder.lane_dividers,
        paint=builder.paint,
        ego_poses=ego_poses,
        vehicles=vehicles,
        global_from_local=global_from_local,
        bounds=tuple(float(v) for v in all_geom.bounds),
    )


def _traffic(
    rng, roads: list[Road], samples: int, s_ego, ego_lane: int, ego_speed: float, crossings
) -> list[Vehicle]:
    """Parked cars along the curbs and cars driving in the lanes (none in the ego's way)."""
    t = np.arange(samples) * KEYFRAME_DT_S
    out: list[Vehicle] = []

    def blocked(road: Road, s: float) -> bool:
        if any(c0 - 6 < s < c1 + 6 for c0, c1 in road.cuts):
            return True
        return any(c["zone"][0] - 4 < s < c["zone"][1] + 4 for c in crossings[road.name])

    def add(road: Road, s_track, d: float, forward: bool, moving: bool):
        w = float(rng.uniform(1.7, 2.0))
        size = (w, float(rng.uniform(3.9, 5.0)), float(rng.uniform(1.4, 1.9)))
        xy = road.at(s_track, d)
        yaw = road.heading_at(s_track) + (0.0 if forward else np.pi)
        grey = float(rng.uniform(0.15, 0.95))
        colour = (
            tuple(float(v) for v in rng.uniform(0.15, 0.9, 3))
            if rng.random() < 0.4
            else (grey, grey, grey * float(rng.uniform(0.95, 1.05)))
        )
        out.append(Vehicle(np.concatenate([xy, yaw[:, None]], axis=1), size, colour, moving))

    for road in roads:
        lo, hi = 15.0, road.length_m - 15.0
        parked_sides = set()
        # Parked cars in the outermost lanes, not on the ego's lane.
        for side in ("right", "left"):
            n_lanes = road.lanes_right if side == "right" else road.lanes_left
            if road.name == "main" and side == "right" and ego_lane == n_lanes - 1:
                continue
            if n_lanes < 2 and road.name == "main":
                continue
            if rng.random() < 0.5:
                continue
            edge = road.right_edge_d if side == "right" else road.left_edge_d
            d = edge + (1.1 if side == "right" else -1.1)
            parked_sides.add(side)
            for s in np.sort(rng.uniform(lo, hi, int(rng.integers(1, 5)))):
                if not blocked(road, s):
                    add(road, np.full(samples, s), d, side == "right", False)
        # Moving cars on the other lanes.
        for _ in range(int(rng.integers(1, 4))):
            forward = bool(rng.random() < 0.35)
            n_lanes = road.lanes_right if forward else road.lanes_left
            lane = int(rng.integers(0, n_lanes))
            if road.name == "main" and forward and lane == ego_lane:
                continue
            if lane == n_lanes - 1 and ("right" if forward else "left") in parked_sides:
                continue
            d = -(lane + 0.5) * road.lane_width_m if forward else (lane + 0.5) * road.lane_width_m
            v = float(rng.uniform(3.0, 13.0))
            s0 = float(rng.uniform(lo, hi))
            s_track = s0 + (v if forward else -v) * t
            if s_track.min() < 2.0 or s_track.max() > road.length_m - 2.0:
                continue
            add(road, s_track, d, forward, True)
    # A car ahead of the ego in its lane, keeping its distance.
    if rng.random() < 0.5:
        main = roads[0]
        gap = float(rng.uniform(12.0, 30.0))
        d = -(ego_lane + 0.5) * main.lane_width_m
        add(main, s_ego + gap, d, True, True)
    return out

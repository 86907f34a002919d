"""Procedural road worlds: shapely geometry in a scene-local metric frame.

A world is one or two roads (a main road the ego drives along, optionally a cross road meeting
it in a four-way or T junction). Each road is a centreline plus a cross-section (lanes per
direction, lane width, centre-line style, sidewalks). Everything else is derived from that with
shapely: the drivable area (with rounded junction corners), road segments, lanes, lane and road
dividers, zebra crossings with stop lines, curbs and walkways. The same geometry becomes the
nuScenes vector map (``maps.py``) and the ground texture the cameras see (``render.py``), so
images and map agree by construction. The pieces: ``road.py`` (a road), ``markings.py`` (the map
elements and paint along it), ``traffic.py`` (the other cars); this module lays them out.

Traffic drives on the right in the local frame; a left-hand-traffic location mirrors the whole
world when it is placed in the global frame (``World.global_from_local``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from shapely import ops
from shapely.geometry import LineString, MultiPoint, Polygon
from shapely.geometry.base import BaseGeometry

from model.data.synthetic.markings import (
    MapBuilder,
    Paint,
    crossing_at_junction,
    midblock_crossing,
)
from model.data.synthetic.road import Road, centreline
from model.data.synthetic.traffic import KEYFRAME_DT_S, Vehicle, make_traffic

MARGIN_M = 70.0  # road beyond either end of the ego trajectory


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
    builder = MapBuilder(rng, centre_colour)

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
                    crossings[road.name].append(crossing_at_junction(road, cut, "before", depth))
                if cut[1] < road.length_m - 1.0:
                    crossings[road.name].append(crossing_at_junction(road, cut, "after", depth))
    elif rng.random() < 0.75:
        # A mid-block zebra on a straight stretch the ego sees.
        for _ in range(20):
            s_mid = float(rng.uniform(MARGIN_M - 5.0, MARGIN_M + traj_len + 30.0))
            if abs(main.heading_at(s_mid + 8) - main.heading_at(s_mid - 8)) < 0.02:
                crossings["main"].append(midblock_crossing(s_mid, style["crossing_depth"]))
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

    vehicles = make_traffic(rng, roads, samples, s_ego, ego_lane, speed, crossings)

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



"""Traffic: parked cars along the curbs and cars driving in the lanes, none in the ego's way."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.data.synthetic.road import Road

KEYFRAME_DT_S = 0.5  # 2 Hz keyframes


@dataclass
class Vehicle:
    """A box moving along a lane (or parked): local x, y, yaw per keyframe."""

    poses: np.ndarray  # (T, 3)
    size_wlh: tuple[float, float, float]
    colour: tuple[float, float, float]
    moving: bool


def make_traffic(
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

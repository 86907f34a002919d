"""A road: a centreline sampled every ``STEP_M`` with its cross-section (lanes per direction,
lane width, sidewalks), and the strips and polylines at lateral offsets that the map elements,
the paint and the traffic of a world are cut from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from shapely.geometry import Polygon

STEP_M = 0.5  # centreline sampling


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

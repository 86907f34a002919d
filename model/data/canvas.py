"""The BEV canvas and drawing on it: frames, filled polygons and exact distance bands.

Rasterisation happens on a "canvas" laid out like get_map_mask's: columns along ego +x,
rows along ego +y, integer coordinates on pixel centres. cv2's polygon fill is not symmetric
under flips, so filling in the devkit's layout and then turning the canvas into ours
(``bev_from_canvas``) is what makes both agree pixel for pixel.

Filled rasterisation (``fill_polygons``: hdmapnet_filled, fine) follows the devkit's vertex
rounding and ``cv2.fillPoly``; ``bands`` (hdmapnet) marks the cells whose centre lies within a
distance of a geometry, exactly. ``model.data.rasterise`` draws the map's classes with them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import shapely

from model.geometry import BevGrid


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


def global_from_canvas_affine(canvas_from_global: list[float]) -> list[float]:
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


"""BEV labels. hdmapnet: HDMapNet's rules, checked cell by cell against the same rules computed
independently (shapely distances in the global frame from the geometry the test wrote, read back
by the devkit). hdmapnet_filled and fine: equal to the devkit's own rasterisation
(NuScenesMap.get_map_mask) after the documented orientation transform, exact for polygon
classes, within the line width for lines."""

from __future__ import annotations

import json
import math
import re

import cv2
import numpy as np
import pytest
import shapely
from nuscenes.map_expansion.map_api import NuScenesMap, NuScenesMapExplorer
from shapely import affinity
from shapely.geometry import LineString, Polygon, box

import model.data.labels as labels
from model.data.canvas import ego_yaw
from model.data.labels import (
    FINE_CLASSES,
    HDMAPNET_CLASSES,
    PAINT_CLASSES,
    PROTOCOLS,
    LabelConfig,
    class_names,
    is_multilabel,
    pack_label,
    paint_path,
    unpack_label,
)
from model.data.rasterise import rasterise_bev_label
from model.geometry import BevGrid, transform_from_pose

GRID = BevGrid(-12.0, 12.0, -8.0, 8.0, 0.2)  # 120 x 80, not square, small


# --- an independent rasteriser: the devkit ----------------------------------------------------


def devkit_mask(nusc_map: NuScenesMap, global_from_ego: np.ndarray, grid: BevGrid, layers):
    """``get_map_mask`` for ``layers`` (OR-ed), brought into our BEV orientation.

    The documented transform: get_map_mask's patch is centred on the grid centre shifted by half
    a cell towards +x, +y (the devkit puts pixel centres on integer canvas coordinates measured
    from the patch edge), rotated by the ego yaw; its canvas has rows along ego +y and columns
    along ego +x, so ours = canvas.T flipped in both axes (row 0 = x_max, col 0 = y_max).
    """
    res = grid.resolution_m
    centre_ego = np.array(
        [(grid.x_min_m + grid.x_max_m + res) / 2, (grid.y_min_m + grid.y_max_m + res) / 2, 0, 1]
    )
    yaw = ego_yaw(global_from_ego)
    c, s = math.cos(yaw), math.sin(yaw)
    gx = global_from_ego[0, 3] + c * centre_ego[0] - s * centre_ego[1]
    gy = global_from_ego[1, 3] + s * centre_ego[0] + c * centre_ego[1]
    patch_box = (gx, gy, grid.y_max_m - grid.y_min_m, grid.x_max_m - grid.x_min_m)
    canvas = nusc_map.get_map_mask(
        patch_box, math.degrees(yaw), list(layers), canvas_size=(grid.width, grid.height)
    )
    return canvas.max(axis=0).T[::-1, ::-1]


def fix_devkit_lines(monkeypatch) -> None:
    """The devkit's mask_for_lines iterates a MultiLineString directly, which shapely 2 forbids
    (nuscenes-devkit #870); for the reference rasterisation only, iterate its parts."""
    original = NuScenesMapExplorer.mask_for_lines

    def mask_for_lines(lines, mask):
        for part in getattr(lines, "geoms", [lines]):
            mask = original(part, mask)
        return mask

    monkeypatch.setattr(NuScenesMapExplorer, "mask_for_lines", staticmethod(mask_for_lines))


@pytest.fixture
def devkit_lines_fixed(monkeypatch):
    fix_devkit_lines(monkeypatch)


def distance_to(mask: np.ndarray) -> np.ndarray:
    """Per-pixel distance (pixels) to the nearest set pixel of ``mask``."""
    if not mask.any():
        return np.full(mask.shape, np.inf)
    return cv2.distanceTransform((mask == 0).astype(np.uint8), cv2.DIST_L2, 5)


def devkit_line_mask(nusc_map, global_from_ego, grid: BevGrid, layers, margin: int = 8):
    """``devkit_mask`` on the grid grown by ``margin`` cells per side: our lines are buffered
    before clipping, so a line just outside the grid reaches in; the devkit clips first."""
    m = margin * grid.resolution_m
    grown = BevGrid(
        grid.x_min_m - m, grid.x_max_m + m, grid.y_min_m - m, grid.y_max_m + m, grid.resolution_m
    )
    return devkit_mask(nusc_map, global_from_ego, grown, layers)


def assert_lines_agree(ours, reference, width_m: float, res: float, margin: int = 0):
    """Every pixel of either mask lies within the line width of the other.

    ``reference`` may cover ``margin`` more cells on each side than ``ours``.
    """
    tolerance_px = width_m / res / 2 + 2.0  # half the width, plus the devkit's 2 px line
    padded = np.pad(np.asarray(ours, np.uint8), margin)
    inner = np.zeros(padded.shape, bool)
    inner[margin : padded.shape[0] - margin, margin : padded.shape[1] - margin] = True
    assert distance_to(padded)[(reference > 0) & inner].max(initial=0) <= tolerance_px
    assert distance_to(reference)[padded > 0].max(initial=0) <= tolerance_px


def contour_of(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` next to a pixel outside it (the canvas edge is not a contour)."""
    eroded = cv2.erode(mask, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    return mask & (1 - eroded)


# --- a hand-made vector map ---------------------------------------------------------------------


class MapBuilder:
    """Writes a minimal NuScenesMap expansion JSON the devkit loads."""

    LAYERS = (
        "polygon line node drivable_area road_segment road_block lane ped_crossing walkway "
        "stop_line carpark_area road_divider lane_divider traffic_light lane_connector"
    ).split()

    def __init__(self):
        self.data = {name: [] for name in self.LAYERS}
        self.data.update(arcline_path_3={}, connectivity={}, canvas_edge=[3000.0, 3000.0])
        self.data["version"] = "1.3"
        self.count = 0

    def _token(self, kind):
        self.count += 1
        return f"{kind}-{self.count}"

    def _nodes(self, coords):
        tokens = []
        for x, y in coords:
            token = self._token("node")
            self.data["node"].append({"token": token, "x": float(x), "y": float(y)})
            tokens.append(token)
        return tokens

    def polygon(self, layer, exterior, holes=()):
        ptoken = self._token("polygon")
        self.data["polygon"].append(
            {
                "token": ptoken,
                "exterior_node_tokens": self._nodes(exterior),
                "holes": [{"node_tokens": self._nodes(h)} for h in holes],
            }
        )
        record = {"token": self._token(layer)}
        if layer == "drivable_area":
            record["polygon_tokens"] = [ptoken]
        else:
            record["polygon_token"] = ptoken
        if layer == "lane":
            record.update(left_lane_divider_segments=[], right_lane_divider_segments=[])
        if layer == "stop_line":
            record.update(stop_line_type="STOP_SIGN", ped_crossing_tokens=[])
        self.data[layer].append(record)

    def line(self, layer, coords):
        ltoken = self._token("line")
        self.data["line"].append({"token": ltoken, "node_tokens": self._nodes(coords)})
        self.data[layer].append({"token": self._token(layer), "line_token": ltoken})

    def write(self, root, location="singapore-onenorth") -> NuScenesMap:
        path = root / "maps" / "expansion" / f"{location}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data))
        return NuScenesMap(dataroot=str(root), map_name=location)


def box_coords(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


@pytest.fixture(scope="module")
def toy_map(tmp_path_factory) -> NuScenesMap:
    """A straight road along global x at y in [95, 105] with a bend, crossings and dividers."""
    m = MapBuilder()
    road = box_coords(50, 95, 150, 105)
    m.polygon("road_segment", road)
    m.polygon("lane", [(90, 105), (110, 105), (112, 125), (95.3, 125)])  # a side street
    m.polygon("drivable_area", road, holes=[box_coords(120, 99, 124, 101)])
    m.polygon("ped_crossing", [(98.1, 95), (101.7, 95), (101.4, 105), (98.3, 105)])
    m.polygon("ped_crossing", box_coords(121, 95.2, 123.6, 104.8))
    m.polygon("stop_line", box_coords(96.6, 95.3, 97.4, 99.8))
    m.line("road_divider", [(50, 100.1), (97, 100.1)])
    m.line("road_divider", [(103, 100.1), (150, 100.1)])
    # A lane divider that leaves the patch and comes back: its clip is a MultiLineString.
    m.line(
        "lane_divider", [(60, 97.3), (100, 97.3), (100, 80), (106, 80), (106, 97.6), (140, 97.6)]
    )
    return m.write(tmp_path_factory.mktemp("toy"))


# Poses are generic: a vertex exactly half-way between two pixel centres is a rounding tie that
# float noise breaks differently in the two rasterisers (a metre-lattice pose at yaw 0 makes
# dozens of them), so no pose here sits on the map's lattice.
POSES = [
    (100.013, 99.987, 0.0),
    (101.3, 99.2, 17.0),
    (99.7, 101.9, -123.4),
    (104.05, 100.35, 90.0),
    (97.2, 98.8, 181.7),
]


def pose(x, y, yaw_deg) -> np.ndarray:
    half = math.radians(yaw_deg) / 2
    return transform_from_pose([x, y, 0.0], [math.cos(half), 0.0, 0.0, math.sin(half)])


# --- HDMapNet's rules, computed independently ---------------------------------------------------

WIDTH_M, CLEAR_M = 0.75, 0.3  # HDMapNet: 5 px lines at 0.15 m, a 4 px thicker clearing mask
DIVIDER, PED, BOUNDARY = (
    HDMAPNET_CLASSES.index(n) for n in ("divider", "ped_crossing", "boundary")
)


def ego_from_global_2d(global_from_ego: np.ndarray) -> list[float]:
    """shapely affine of the label's frame: the ego pose's yaw only (the map is 2-D)."""
    yaw = ego_yaw(global_from_ego)
    c, s = math.cos(yaw), math.sin(yaw)
    tx, ty = global_from_ego[0, 3], global_from_ego[1, 3]
    return [c, s, -s, c, -c * tx - s * ty, s * tx - c * ty]


def distances(geoms, global_from_ego, grid: BevGrid, inset_m: float = 0.0) -> np.ndarray:
    """(H, W) metres from each cell centre to the geometries clipped to the grid (less inset)."""
    xy = grid.ego_xy_centres()
    points = shapely.points(xy[..., 0], xy[..., 1])
    rect = box(
        grid.x_min_m + inset_m,
        grid.y_min_m + inset_m,
        grid.x_max_m - inset_m,
        grid.y_max_m - inset_m,
    )
    out = np.full(grid.shape, np.inf)
    for geom in geoms:
        local = affinity.affine_transform(geom, ego_from_global_2d(global_from_ego)) & rect
        if not local.is_empty:
            out = np.minimum(out, shapely.distance(points, local))
    return out


def rules_label(shapes: dict, global_from_ego, grid: BevGrid) -> np.ndarray:
    """HDMapNet's composition from {class: [(global geometry, band radius m, inset m)]}: a cell
    is in a class's band iff its centre is within the radius; boundary, then ped_crossing, then
    divider, each clearing the lower classes within its radius + CLEAR_M."""
    label = np.zeros(grid.shape, np.uint8)
    cleared = np.zeros(grid.shape, bool)
    for cls in (BOUNDARY, PED, DIVIDER):
        near = np.zeros(grid.shape, bool)
        clear = np.zeros(grid.shape, bool)
        for geom, radius_m, inset_m in shapes.get(HDMAPNET_CLASSES[cls], []):
            d = distances([geom], global_from_ego, grid, inset_m)
            near |= d <= radius_m
            clear |= d <= radius_m + CLEAR_M
        label[near & ~cleared] = cls
        cleared |= clear
    return label


# A 12 m road along global x with a side street (one boundary ring with a notch), a crossing
# with two long and two short edges, a lane divider along the road through the crossing and a
# road divider leaving the road across both curbs.
ROAD = box_coords(60, 94, 140, 106)
SIDE_STREET = [(104, 106), (112, 106), (113, 125), (103, 125)]
CROSSING = [(98.2, 94.3), (101.9, 94.1), (101.6, 105.8), (98.5, 105.6)]
LONG_EDGES = [CROSSING[1:3], [CROSSING[3], CROSSING[0]]]
SHORT_EDGES = [CROSSING[0:2], CROSSING[2:4]]
LANE_DIVIDER = [(55.0, 100.3), (145.0, 100.7)]
ROAD_DIVIDER = [(93.0, 88.0), (107.0, 112.0)]
RULE_POSES = [
    (100.013, 99.987, 7.3),
    (101.3, 99.2, 17.0),
    (99.7, 101.9, -123.4),
    (102.05, 100.35, 90.0),
]


def rules_shapes() -> dict:
    ring = shapely.union_all([Polygon(ROAD), Polygon(SIDE_STREET)]).boundary
    half = WIDTH_M / 2
    return {
        "divider": [(LineString(LANE_DIVIDER), half, 0.0), (LineString(ROAD_DIVIDER), half, 0.0)],
        "ped_crossing": [(LineString(e), half, 0.0) for e in LONG_EDGES],
        "boundary": [(ring, half, 0.2)],
    }


@pytest.fixture(scope="module")
def rules_map(tmp_path_factory) -> NuScenesMap:
    m = MapBuilder()
    m.polygon("road_segment", ROAD)
    m.polygon("lane", SIDE_STREET)
    m.polygon("drivable_area", ROAD)
    m.polygon("ped_crossing", CROSSING)
    m.line("lane_divider", LANE_DIVIDER)
    m.line("road_divider", ROAD_DIVIDER)
    return m.write(tmp_path_factory.mktemp("rules"))


@pytest.mark.parametrize("res", [0.15, 0.5])
@pytest.mark.parametrize("xy_yaw", RULE_POSES)
def test_hdmapnet_label_equals_its_rules_computed_independently(rules_map, xy_yaw, res):
    grid = BevGrid(-12.0, 12.0, -7.5, 7.5, res)
    global_from_ego = pose(*xy_yaw)
    label = rasterise_bev_label(rules_map, global_from_ego, LabelConfig(grid=grid))
    expected = rules_label(rules_shapes(), global_from_ego, grid)
    assert {DIVIDER, PED, BOUNDARY} <= set(np.unique(expected))
    np.testing.assert_array_equal(label, expected)


def test_hdmapnet_crossing_is_drawn_as_its_two_longest_edges(tmp_path):
    m = MapBuilder()
    m.polygon("ped_crossing", CROSSING)
    global_from_ego = pose(*RULE_POSES[1])
    label = rasterise_bev_label(m.write(tmp_path), global_from_ego, LabelConfig(grid=GRID))
    to_long = distances([LineString(e) for e in LONG_EDGES], global_from_ego, GRID)
    to_short = distances([LineString(e) for e in SHORT_EDGES], global_from_ego, GRID)
    inside = distances([Polygon(CROSSING)], global_from_ego, GRID) == 0
    np.testing.assert_array_equal(label == PED, to_long <= WIDTH_M / 2)
    # The short edges and the inside are not drawn.
    short_only = (to_short <= WIDTH_M / 2) & (to_long > WIDTH_M / 2)
    assert short_only.sum() > 10 and (label[short_only] == 0).all()
    assert (label[inside & (to_long > WIDTH_M / 2)] == 0).all()


def test_hdmapnet_divider_is_a_band_of_the_line_width(tmp_path):
    m = MapBuilder()
    m.line("lane_divider", LANE_DIVIDER)
    global_from_ego = pose(*RULE_POSES[2])
    label = rasterise_bev_label(m.write(tmp_path), global_from_ego, LabelConfig(grid=GRID))
    assert set(np.unique(label)) == {0, DIVIDER}
    to_line = distances([LineString(LANE_DIVIDER)], global_from_ego, GRID)
    np.testing.assert_array_equal(label == DIVIDER, to_line <= WIDTH_M / 2)


@pytest.mark.parametrize("res", [0.15, 0.5])
@pytest.mark.parametrize("yaw", [9.0, 31.0, 58.0, 133.0])
def test_divider_band_area_is_length_times_width(tmp_path, res, yaw):
    grid = BevGrid(-30.0, 30.0, -15.0, 15.0, res)
    m = MapBuilder()
    line = [(40.0, 95.0), (160.0, 104.0)]
    m.line("lane_divider", line)
    global_from_ego = pose(100.03, 101.1, yaw)
    label = rasterise_bev_label(m.write(tmp_path), global_from_ego, LabelConfig(grid=grid))
    rect = box(grid.x_min_m, grid.y_min_m, grid.x_max_m, grid.y_max_m)
    inside = affinity.affine_transform(LineString(line), ego_from_global_2d(global_from_ego)) & rect
    area_m2 = (label == DIVIDER).sum() * res**2
    assert inside.length > 25.0
    assert area_m2 / (inside.length * WIDTH_M) == pytest.approx(1.0, abs=0.05)


def test_hdmapnet_priority_boundary_over_crossing_over_divider(rules_map):
    global_from_ego = pose(*RULE_POSES[0])
    label = rasterise_bev_label(rules_map, global_from_ego, LabelConfig(grid=GRID))
    shapes = rules_shapes()
    d = {
        name: distances([g for g, _, _ in shapes[name]], global_from_ego, GRID, shapes[name][0][2])
        for name in shapes
    }
    band = {name: d[name] <= WIDTH_M / 2 for name in d}
    clear = {name: d[name] <= WIDTH_M / 2 + CLEAR_M for name in d}
    # Where boundary meets either, boundary; where crossing and divider meet, crossing.
    assert (band["boundary"] & band["divider"]).any()
    assert (band["boundary"] & band["ped_crossing"]).any()
    assert (label[band["boundary"]] == BOUNDARY).all()
    crossing_over_divider = band["ped_crossing"] & band["divider"] & ~clear["boundary"]
    assert crossing_over_divider.any() and (label[crossing_over_divider] == PED).all()
    # The clearing mask is thicker than the band: a divider stops short of a higher class.
    margin = band["divider"] & ~band["ped_crossing"] & clear["ped_crossing"] & ~clear["boundary"]
    assert margin.any() and (label[margin] == 0).all()
    assert (label[band["divider"] & ~clear["ped_crossing"] & ~clear["boundary"]] == DIVIDER).all()


def test_hdmapnet_multilinestring_divider_is_drawn_whole(tmp_path):
    # The lane divider's detour leaves the grid: its clip is a MultiLineString, the case the
    # devkit's mask_for_lines crashes on (nuscenes-devkit #870). Every part is drawn.
    detour = [(60, 97.3), (100, 97.3), (100, 80), (106, 80), (106, 97.6), (140, 97.6)]
    m = MapBuilder()
    m.line("lane_divider", detour)
    global_from_ego = pose(103.0, 97.0, 0.0)
    label = rasterise_bev_label(m.write(tmp_path), global_from_ego, LabelConfig(grid=GRID))
    rect = box(GRID.x_min_m, GRID.y_min_m, GRID.x_max_m, GRID.y_max_m)
    ego = affinity.affine_transform(LineString(detour), ego_from_global_2d(global_from_ego))
    assert len((ego & rect).geoms) == 2
    expected = distances([LineString(detour)], global_from_ego, GRID) <= WIDTH_M / 2
    np.testing.assert_array_equal(label == DIVIDER, expected)


# --- the filled protocols against the devkit's get_map_mask -------------------------------------


def test_class_names_of_every_protocol():
    assert class_names("hdmapnet") == ["background", "divider", "ped_crossing", "boundary"]
    assert class_names("hdmapnet_filled") == class_names("hdmapnet")
    assert class_names("fine") == list(FINE_CLASSES)
    assert [is_multilabel(p) for p in PROTOCOLS] == [False, False, True]
    with pytest.raises(ValueError, match="protocol"):
        class_names("coco")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_label_shapes_and_dtypes(toy_map, protocol):
    label = rasterise_bev_label(toy_map, pose(*POSES[1]), LabelConfig(protocol, GRID))
    assert label.dtype == np.uint8
    if is_multilabel(protocol):
        assert label.shape == (len(FINE_CLASSES), *GRID.shape)
        assert set(np.unique(label)) <= {0, 1}
    else:
        assert label.shape == GRID.shape
        assert set(np.unique(label)) == set(range(len(HDMAPNET_CLASSES)))


@pytest.mark.parametrize("xy_yaw", POSES)
def test_fine_polygon_classes_equal_devkit_get_map_mask(toy_map, xy_yaw):
    global_from_ego = pose(*xy_yaw)
    label = rasterise_bev_label(toy_map, global_from_ego, LabelConfig("fine", GRID))
    for layer in ("ped_crossing", "stop_line", "drivable_area"):
        reference = devkit_mask(toy_map, global_from_ego, GRID, [layer])
        np.testing.assert_array_equal(label[FINE_CLASSES.index(layer)], reference, err_msg=layer)


@pytest.mark.parametrize("xy_yaw", POSES)
def test_filled_ped_crossing_equals_devkit_where_no_line_covers_it(toy_map, xy_yaw):
    global_from_ego = pose(*xy_yaw)
    label = rasterise_bev_label(toy_map, global_from_ego, LabelConfig("hdmapnet_filled", GRID))
    reference = devkit_mask(toy_map, global_from_ego, GRID, ["ped_crossing"])
    area = np.isin(label, [0, PED])  # divider and boundary are painted over crossings
    np.testing.assert_array_equal((label == PED)[area], reference[area].astype(bool))


@pytest.mark.parametrize("protocol", ["hdmapnet", "hdmapnet_filled"])
@pytest.mark.parametrize("xy_yaw", POSES)
def test_dividers_agree_with_devkit_within_line_width(
    toy_map, xy_yaw, protocol, devkit_lines_fixed
):
    global_from_ego = pose(*xy_yaw)
    cfg = LabelConfig(protocol, GRID, line_width_m=0.6)
    label = rasterise_bev_label(toy_map, global_from_ego, cfg)
    reference = devkit_line_mask(toy_map, global_from_ego, GRID, ["road_divider", "lane_divider"])
    if protocol == "hdmapnet_filled":  # dividers are painted last, never erased
        assert_lines_agree(label == DIVIDER, reference, 0.6, GRID.resolution_m, margin=8)
    else:  # crossings and boundaries clear dividers near them: count them as dividers here
        others = np.pad(label > 1, 8)
        assert_lines_agree(label > 0, reference | others, 0.6, GRID.resolution_m, margin=8)


@pytest.mark.parametrize("protocol", ["hdmapnet", "hdmapnet_filled"])
@pytest.mark.parametrize("xy_yaw", POSES)
def test_boundary_is_the_contour_of_road_and_lane_within_line_width(toy_map, xy_yaw, protocol):
    global_from_ego = pose(*xy_yaw)
    cfg = LabelConfig(protocol, GRID, line_width_m=0.8)
    label = rasterise_bev_label(toy_map, global_from_ego, cfg)
    union = devkit_mask(toy_map, global_from_ego, GRID, ["road_segment", "lane"])
    reference = contour_of(np.ascontiguousarray(union))
    # Other classes meet boundaries (filled: painted over them), so they count as boundary here.
    ours = label > 0
    assert_lines_agree(ours, reference | (label != BOUNDARY) & ours, 0.8, GRID.resolution_m)
    assert (label == BOUNDARY).any()


def test_multilinestring_divider_is_rasterised_not_crashing(toy_map, monkeypatch):
    # At this pose the lane divider's detour leaves the grid: its clip has several parts,
    # the case where the devkit's own mask_for_lines raises (nuscenes-devkit #870).
    global_from_ego = pose(103.0, 97.0, 0.0)
    with pytest.raises(TypeError):
        devkit_mask(toy_map, global_from_ego, GRID, ["lane_divider"])
    label = rasterise_bev_label(toy_map, global_from_ego, LabelConfig("fine", GRID))
    lane_divider = label[FINE_CLASSES.index("lane_divider")]
    # Both parts are drawn: behind the detour (ego x < -3 m) and ahead of it (ego x > 3 m).
    rows, _ = np.nonzero(lane_divider)
    assert (rows > GRID.height // 2 + 10).any() and (rows < GRID.height // 2 - 10).any()
    fix_devkit_lines(monkeypatch)
    reference = devkit_line_mask(toy_map, global_from_ego, GRID, ["lane_divider"])
    assert_lines_agree(lane_divider, reference, 0.75, GRID.resolution_m, margin=8)


def test_label_rotates_with_the_ego(toy_map):
    # Facing +x, the road (along global x) runs up the image; facing +y it runs across.
    along = rasterise_bev_label(toy_map, pose(75, 100, 0), LabelConfig("fine", GRID))
    across = rasterise_bev_label(toy_map, pose(75, 100, 90), LabelConfig("fine", GRID))
    road_div = FINE_CLASSES.index("road_divider")
    assert along[road_div].any(axis=1).all() and not along[road_div].any(axis=0).all()
    assert across[road_div].any(axis=0).all()


def test_filled_paint_order_divider_over_boundary_over_crossing(toy_map):
    # A crossing spans the road, so its ends meet the boundary and the divider crosses it.
    label = rasterise_bev_label(
        toy_map, pose(100.0, 100.0, 0.0), LabelConfig("hdmapnet_filled", GRID)
    )
    fine = rasterise_bev_label(toy_map, pose(100.0, 100.0, 0.0), LabelConfig("fine", GRID))
    crossing = fine[FINE_CLASSES.index("ped_crossing")] > 0
    assert (label[crossing] == PED).any() and (label[crossing] == BOUNDARY).any()
    assert (label[crossing] == DIVIDER).any()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pack_unpack_round_trip(toy_map, protocol):
    cfg = LabelConfig(protocol, GRID)
    label = rasterise_bev_label(toy_map, pose(*POSES[2]), cfg)
    packed = pack_label(label, cfg)
    assert packed.shape == GRID.shape and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_label(packed, cfg), label)


# --- the paint source ---------------------------------------------------------------------------


def paint_shapes(dataroot, location: str, global_from_ego, grid: BevGrid) -> dict:
    """{class: [(mark polygon, radius, 0)]} read straight from the paint file: each mark widened
    to the line width (radius (width - mark width) / 2, at least 0)."""
    doc = json.loads(paint_path(dataroot, location).read_text())
    yaw = ego_yaw(global_from_ego)
    c, s = math.cos(yaw), math.sin(yaw)
    global_from_ego_2d = [c, -s, s, c, global_from_ego[0, 3], global_from_ego[1, 3]]
    rect = affinity.affine_transform(
        box(grid.x_min_m, grid.y_min_m, grid.x_max_m, grid.y_max_m), global_from_ego_2d
    )
    out: dict = {}
    for mark in doc["marks"]:
        geom = shapely.from_wkt(mark["wkt"])
        if mark["vistas"] in PAINT_CLASSES and geom.distance(rect) <= WIDTH_M:
            radius = max(0.0, (WIDTH_M - mark["width_m"]) / 2)
            out.setdefault(PAINT_CLASSES[mark["vistas"]], []).append((geom, radius, 0.0))
    return out


def test_paint_labels_are_the_painted_marks_widened_to_the_line(synthetic_root):
    from model.data.keyframes import index_split

    grid = BevGrid(-30.0, 30.0, -15.0, 15.0, 0.5)
    records = index_split(synthetic_root, "v1.0-mini", "train")
    seen = set()
    for rec in records[::9]:
        nusc_map = NuScenesMap(dataroot=str(synthetic_root), map_name=rec.location)
        paint = rasterise_bev_label(
            nusc_map, rec.global_from_ego, LabelConfig(grid=grid, source="paint")
        )
        shapes = paint_shapes(synthetic_root, rec.location, rec.global_from_ego, grid)
        np.testing.assert_array_equal(paint, rules_label(shapes, rec.global_from_ego, grid))
        seen |= set(np.unique(paint))
        mapped = rasterise_bev_label(nusc_map, rec.global_from_ego, LabelConfig(grid=grid))
        assert (paint != mapped).mean() > 0.005  # dash gaps, zebra gaps, curbs off the road edge
    assert seen == {0, DIVIDER, PED, BOUNDARY}


def test_paint_source_without_painted_marks_raises_naming_source(toy_map):
    with pytest.raises(ValueError, match=r"^source: .*only source 'map'"):
        rasterise_bev_label(toy_map, pose(*POSES[0]), LabelConfig(grid=GRID, source="paint"))


def test_paint_classes_follow_the_pseudo_labels_vistas_mapping():
    from model.data.pseudo_classes import VISTAS_TO_PROTOCOL

    for vistas, name in PAINT_CLASSES.items():
        assert VISTAS_TO_PROTOCOL["hdmapnet"][vistas] == name


# --- the config: validation and cache key --------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"protocol": "nope"}, "protocol"),
        ({"source": "lidar"}, "source"),
        ({"source": "paint", "protocol": "fine"}, "source"),
        ({"line_width_m": 0.0}, "line_width_m"),
        ({"line_width_m": float("nan")}, "line_width_m"),
        ({"line_width_m": float("inf")}, "line_width_m"),
        ({"line_width_m": "wide"}, "line_width_m"),
        ({"clear_margin_m": -0.1}, "clear_margin_m"),
        ({"grid": BevGrid(-30.0, 30.0, -15.0, 15.0, 0.0)}, "grid.resolution_m"),
        ({"grid": BevGrid(-30.0, 30.0, -15.0, 15.0, float("nan"))}, "grid.resolution_m"),
        ({"grid": BevGrid(-1.0, 1.0, -1.0, 1.0, 5.0)}, "grid.resolution_m"),
        ({"grid": BevGrid(1.0, -1.0, -1.0, 1.0, 0.5)}, "grid.x_max_m"),
        ({"grid": BevGrid(-12.0, 12.0, -8.0, 8.0, 0.15)}, "grid.resolution_m"),
        ({"grid": {"x_min_m": -1.0, "bogus": 2.0}}, "grid"),
    ],
    ids=str,
)
def test_label_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}: "):
        LabelConfig(**kwargs)


def test_label_config_error_says_what_was_wrong():
    with pytest.raises(ValueError) as info:
        LabelConfig(line_width_m=-1)
    assert str(info.value) == "line_width_m: must be > 0, got -1"


@pytest.mark.parametrize(
    "change",
    [
        {"protocol": "hdmapnet_filled"},
        {"protocol": "fine"},
        {"grid": BevGrid(resolution_m=0.5)},
        {"line_width_m": 0.5},
        {"clear_margin_m": 0.0},
        {"source": "paint"},
    ],
    ids=str,
)
def test_cache_key_changes_with_every_field(change):
    assert LabelConfig(**change).cache_key() == LabelConfig(**change).cache_key()
    assert LabelConfig(**change).cache_key() != LabelConfig().cache_key()


@pytest.mark.parametrize(
    "table, key, value",
    [
        ("HDMAPNET_RULES", "priority", ("divider", "ped_crossing", "boundary")),
        ("HDMAPNET_RULES", "ped_crossing_edges", 4),
        ("HDMAPNET_RULES", "boundary_inset_m", 0.0),
        ("HDMAPNET_FILLED_RULES", "paint_order", ("boundary", "ped_crossing", "divider")),
        ("PAINT_CLASSES", "Curb", "background"),
    ],
    ids=str,
)
def test_cache_key_changes_with_a_rule(monkeypatch, table, key, value):
    configs = [LabelConfig(), LabelConfig("hdmapnet_filled"), LabelConfig(source="paint")]
    before = [c.cache_key() for c in configs]
    monkeypatch.setitem(getattr(labels, table), key, value)
    after = [c.cache_key() for c in configs]
    assert sum(a != b for a, b in zip(before, after, strict=True)) >= 1
    monkeypatch.setattr(labels, "LABEL_ALGORITHM_VERSION", labels.LABEL_ALGORITHM_VERSION + 1)
    assert all(c.cache_key() != b for c, b in zip(configs, after, strict=True))


# --- the acceptance check on a dataset sample ---------------------------------------------------


def test_synthetic_sample_labels_equal_devkit_rasterisation(synthetic_root, devkit_lines_fixed):
    from model.data.keyframes import index_split

    grid = BevGrid(-30.0, 30.0, -15.0, 15.0, 0.3)
    records = index_split(synthetic_root, "v1.0-mini", "train")
    checked_lines = 0
    seen_polygons = set()
    for rec in records[::3]:
        nusc_map = NuScenesMap(dataroot=str(synthetic_root), map_name=rec.location)
        fine = rasterise_bev_label(nusc_map, rec.global_from_ego, LabelConfig("fine", grid))
        for layer in ("ped_crossing", "stop_line", "drivable_area"):
            reference = devkit_mask(nusc_map, rec.global_from_ego, grid, [layer])
            np.testing.assert_array_equal(fine[FINE_CLASSES.index(layer)], reference, layer)
            if reference.any():
                seen_polygons.add(layer)
        for layer in ("lane_divider", "road_divider"):
            reference = devkit_line_mask(nusc_map, rec.global_from_ego, grid, [layer])
            assert_lines_agree(fine[FINE_CLASSES.index(layer)], reference, 0.75, 0.3, margin=8)
            checked_lines += int(reference.any())
    assert checked_lines > 0
    assert {"ped_crossing", "drivable_area"} <= seen_polygons

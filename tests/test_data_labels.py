"""BEV labels: equal to the devkit's own rasterisation (NuScenesMap.get_map_mask) after the
documented orientation transform, exact for polygon classes, within the line width for lines."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from nuscenes.map_expansion.map_api import NuScenesMap, NuScenesMapExplorer

from model.data.labels import (
    FINE_CLASSES,
    HDMAPNET_CLASSES,
    LabelConfig,
    class_names,
    ego_yaw,
    pack_label,
    rasterise_bev_label,
    unpack_label,
)
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


# --- tests ---------------------------------------------------------------------------------


def test_class_names_of_both_protocols():
    assert class_names("hdmapnet") == ["background", "divider", "ped_crossing", "boundary"]
    assert class_names("fine") == list(FINE_CLASSES)
    with pytest.raises(ValueError, match="protocol"):
        class_names("coco")


def test_label_shapes_and_dtypes(toy_map):
    hd = rasterise_bev_label(toy_map, pose(*POSES[1]), LabelConfig(grid=GRID))
    fine = rasterise_bev_label(toy_map, pose(*POSES[1]), LabelConfig("fine", GRID))
    assert hd.shape == GRID.shape and hd.dtype == np.uint8
    assert set(np.unique(hd)) <= set(range(len(HDMAPNET_CLASSES)))
    assert fine.shape == (len(FINE_CLASSES), *GRID.shape) and fine.dtype == np.uint8
    assert set(np.unique(fine)) <= {0, 1}


@pytest.mark.parametrize("xy_yaw", POSES)
def test_fine_polygon_classes_equal_devkit_get_map_mask(toy_map, xy_yaw):
    global_from_ego = pose(*xy_yaw)
    label = rasterise_bev_label(toy_map, global_from_ego, LabelConfig("fine", GRID))
    for layer in ("ped_crossing", "stop_line", "drivable_area"):
        reference = devkit_mask(toy_map, global_from_ego, GRID, [layer])
        np.testing.assert_array_equal(label[FINE_CLASSES.index(layer)], reference, err_msg=layer)


@pytest.mark.parametrize("xy_yaw", POSES)
def test_hdmapnet_ped_crossing_equals_devkit_where_no_line_covers_it(toy_map, xy_yaw):
    global_from_ego = pose(*xy_yaw)
    label = rasterise_bev_label(toy_map, global_from_ego, LabelConfig(grid=GRID))
    reference = devkit_mask(toy_map, global_from_ego, GRID, ["ped_crossing"])
    area = np.isin(label, [0, 2])  # divider and boundary are painted over crossings
    np.testing.assert_array_equal((label == 2)[area], reference[area].astype(bool))


@pytest.mark.parametrize("xy_yaw", POSES)
def test_dividers_agree_with_devkit_within_line_width(toy_map, xy_yaw, devkit_lines_fixed):
    global_from_ego = pose(*xy_yaw)
    cfg = LabelConfig(grid=GRID, divider_width_m=0.6)
    label = rasterise_bev_label(toy_map, global_from_ego, cfg)
    layers = ["road_divider", "lane_divider"]
    reference = devkit_line_mask(toy_map, global_from_ego, GRID, layers)
    assert_lines_agree(label == 1, reference, cfg.divider_width_m, GRID.resolution_m, margin=8)


@pytest.mark.parametrize("xy_yaw", POSES)
def test_boundary_is_the_contour_of_road_and_lane_within_line_width(toy_map, xy_yaw):
    global_from_ego = pose(*xy_yaw)
    cfg = LabelConfig(grid=GRID, boundary_width_m=0.8)
    label = rasterise_bev_label(toy_map, global_from_ego, cfg)
    union = devkit_mask(toy_map, global_from_ego, GRID, ["road_segment", "lane"])
    reference = contour_of(np.ascontiguousarray(union))
    # Dividers are painted over boundaries, so both count as boundary here.
    assert_lines_agree(np.isin(label, [1, 3]), reference | (label == 1), 0.8, GRID.resolution_m)
    assert (label == 3).any()


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


def test_hdmapnet_paint_order_divider_over_boundary_over_crossing(toy_map):
    # A crossing spans the road, so its ends meet the boundary and the divider crosses it.
    label = rasterise_bev_label(toy_map, pose(100.0, 100.0, 0.0), LabelConfig(grid=GRID))
    fine = rasterise_bev_label(toy_map, pose(100.0, 100.0, 0.0), LabelConfig("fine", GRID))
    crossing = fine[FINE_CLASSES.index("ped_crossing")] > 0
    assert (label[crossing] == 2).any() and (label[crossing] == 3).any()


@pytest.mark.parametrize("protocol", ["hdmapnet", "fine"])
def test_pack_unpack_round_trip(toy_map, protocol):
    cfg = LabelConfig(protocol, GRID)
    label = rasterise_bev_label(toy_map, pose(*POSES[2]), cfg)
    packed = pack_label(label, cfg)
    assert packed.shape == GRID.shape and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_label(packed, cfg), label)


def test_label_config_rejects_bad_values():
    with pytest.raises(ValueError):
        LabelConfig(protocol="nope")
    with pytest.raises(ValueError):
        LabelConfig(divider_width_m=0.0)
    assert LabelConfig().cache_key() != LabelConfig(divider_width_m=0.5).cache_key()


# --- the acceptance check on a dataset sample ---------------------------------------------------


def test_synthetic_sample_labels_equal_devkit_rasterisation(synthetic_root, devkit_lines_fixed):
    from model.data.dataset import index_split

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

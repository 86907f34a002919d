"""The synthetic dataroot: devkit compatibility, geometry, determinism and the CLI.

The geometry tests use only the devkit and pyquaternion (never the generator's own code): map
points are moved global -> ego -> camera with the dataroot's records and projected with the
devkit's ``view_points``, then compared with the rendered images and semantic ground truth.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import shapely
from nuscenes.map_expansion.map_api import NuScenesMap
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.geometry_utils import view_points
from PIL import Image
from pyquaternion import Quaternion
from shapely.geometry import MultiPolygon
from shapely.ops import unary_union

from model.data.vistas import VISTAS_ID
from model.geometry import CAMERAS

TABLES = (
    "attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
    "sample_annotation", "sample_data", "scene", "sensor", "visibility",
)  # fmt: skip
MARKING = VISTAS_ID["Lane Marking - General"]
CROSSWALK = VISTAS_ID["Lane Marking - Crosswalk"]
GROUND_OF_ROADS = {VISTAS_ID[c] for c in ("Road", "Curb", "Sidewalk")} | {MARKING, CROSSWALK}
REPO = Path(__file__).resolve().parents[1]


@cache
def _nusc(root: Path) -> NuScenes:
    return NuScenes(version="v1.0-mini", dataroot=str(root), verbose=False)


@cache
def _map(root: Path, location: str) -> NuScenesMap:
    return NuScenesMap(dataroot=str(root), map_name=location)


def _location(nusc: NuScenes, scene: dict) -> str:
    return nusc.get("log", scene["log_token"])["location"]


def _project(nusc: NuScenes, sd_token: str, points_global: np.ndarray):
    """(N, 3) global points -> (N, 2) pixel coordinates and (N,) camera-frame depth."""
    sd = nusc.get("sample_data", sd_token)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    p = points_global.T - np.array(pose["translation"])[:, None]
    p = Quaternion(pose["rotation"]).inverse.rotation_matrix @ p
    p = p - np.array(cs["translation"])[:, None]
    p = Quaternion(cs["rotation"]).inverse.rotation_matrix @ p
    depth = p[2].copy()
    uv = view_points(p, np.array(cs["camera_intrinsic"]), normalize=True)[:2].T
    return uv, depth, p


def _images(root: Path, nusc: NuScenes, sd_token: str):
    sd = nusc.get("sample_data", sd_token)
    path = Path(nusc.get_sample_data_path(sd_token))
    image = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    semantic = np.asarray(Image.open(root / "semantic" / sd["channel"] / f"{path.stem}.png"))
    return image, semantic


def _pixels_near(nusc, sd_token, pts, image_hw, max_dist_m=12.0):
    """Integer pixels of all points, and which are seen 3..max_dist_m ahead inside the image."""
    uv, depth, p_cam = _project(nusc, sd_token, pts)
    h, w = image_hw
    dist = np.hypot(p_cam[0], p_cam[2])
    px = np.round(uv).astype(int)
    ok = (depth > 1.0) & (dist > 3.0) & (dist < max_dist_m)
    ok &= (px[:, 0] >= 1) & (px[:, 0] < w - 1) & (px[:, 1] >= 1) & (px[:, 1] < h - 1)
    return px, ok


def _densify(lines, step_m=0.2) -> np.ndarray:
    out = []
    for line in lines:
        d = np.arange(0.0, line.length, step_m)
        out.append(np.array([line.interpolate(x).coords[0] for x in d]).reshape(-1, 2))
    return np.concatenate(out) if out else np.zeros((0, 2))


def _grid_in(polygons, step_m=0.1, inset_m=0.05) -> np.ndarray:
    out = []
    for poly in polygons:
        poly = poly.buffer(-inset_m)
        if poly.is_empty:
            continue
        x0, y0, x1, y1 = poly.bounds
        xs, ys = np.meshgrid(np.arange(x0, x1, step_m), np.arange(y0, y1, step_m))
        pts = np.stack([xs.ravel(), ys.ravel()], 1)
        out.append(pts[shapely.contains_xy(poly, pts[:, 0], pts[:, 1])])
    return np.concatenate(out) if out else np.zeros((0, 2))


def _with_z(xy: np.ndarray) -> np.ndarray:
    return np.concatenate([xy, np.zeros((len(xy), 1))], 1)


def _keyframe_cameras(nusc: NuScenes):
    """(scene, sample_data token) for every camera of every other keyframe."""
    for scene in nusc.scene:
        token = scene["first_sample_token"]
        k = 0
        while token:
            sample = nusc.get("sample", token)
            if k % 2 == 0:
                for cam in CAMERAS:
                    yield scene, sample["data"][cam]
            token, k = sample["next"], k + 1


# ----------------------------------------------------------------------------- devkit loading


def test_devkit_loads_every_table(synthetic_root):
    nusc = _nusc(synthetic_root)
    for name in TABLES:
        assert len(getattr(nusc, name)) > 0, name
    assert len(nusc.scene) == 6
    assert all(s["nbr_samples"] == 6 for s in nusc.scene)
    assert {c["name"] for c in nusc.category} >= {"vehicle.car"}
    for sample in nusc.sample:
        assert set(sample["data"]) == set(CAMERAS) | {"LIDAR_TOP"}


def test_get_sample_data_gives_files_boxes_and_intrinsics(synthetic_root):
    nusc = _nusc(synthetic_root)
    sample = nusc.sample[len(nusc.sample) // 2]
    n_boxes = 0
    for channel, token in sample["data"].items():
        path, boxes, intrinsic = nusc.get_sample_data(token)
        assert Path(path).is_file()
        n_boxes += len(boxes)
        if channel == "LIDAR_TOP":
            assert intrinsic is None
            points = np.fromfile(path, dtype=np.float32)
            assert points.size > 0 and points.size % 5 == 0
        else:
            assert intrinsic.shape == (3, 3)
            with Image.open(path) as im:
                assert im.size == (160, 90)
    assert n_boxes > 0
    ann = nusc.get("sample_annotation", sample["anns"][0])
    assert ann["category_name"] == "vehicle.car"
    assert np.isfinite(nusc.box_velocity(ann["token"])[:2]).all()


def test_splits_and_generator_record(synthetic_root):
    nusc = _nusc(synthetic_root)
    splits = json.loads((synthetic_root / "splits.json").read_text())
    assert sorted(splits["train"] + splits["val"]) == sorted(s["name"] for s in nusc.scene)
    assert len(splits["train"]) == 4 and len(splits["val"]) == 2
    meta = json.loads((synthetic_root / "synthetic.json").read_text())
    assert meta["generator_version"]
    assert meta["args"] == {"scenes": 6, "samples_per_scene": 6, "image_size": [90, 160], "seed": 0}


def test_ego_poses_are_smooth_at_2hz(synthetic_root):
    nusc = _nusc(synthetic_root)
    for scene in nusc.scene:
        token, xy, ts = scene["first_sample_token"], [], []
        while token:
            sample = nusc.get("sample", token)
            sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
            xy.append(nusc.get("ego_pose", sd["ego_pose_token"])["translation"][:2])
            ts.append(sample["timestamp"])
            token = sample["next"]
        assert np.allclose(np.diff(ts), 500_000)
        speed = np.linalg.norm(np.diff(xy, axis=0), axis=1) / 0.5
        assert speed.min() > 1.0 and speed.max() < 20.0
        assert np.abs(np.diff(speed)).max() < 1.5  # under 3 m/s^2


def test_map_mask_over_every_layer(synthetic_root):
    nusc = _nusc(synthetic_root)
    totals: dict[str, int] = {}
    for scene in nusc.scene:
        nmap = _map(synthetic_root, _location(nusc, scene))
        sample = nusc.get("sample", scene["first_sample_token"])
        pose = nusc.get(
            "ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"]
        )
        yaw = Quaternion(pose["rotation"]).yaw_pitch_roll[0]
        layers = nmap.non_geometric_layers
        box = (pose["translation"][0], pose["translation"][1], 100.0, 100.0)
        mask = nmap.get_map_mask(box, np.degrees(yaw), layers, canvas_size=(200, 200))
        assert mask.shape == (len(layers) - 1, 200, 200)  # traffic_light has no mask
        for name, m in zip([n for n in layers if n != "traffic_light"], mask, strict=True):
            totals[name] = totals.get(name, 0) + int(m.sum())
        assert mask[layers.index("drivable_area")].any()
    for name in (
        "drivable_area",
        "road_segment",
        "lane",
        "ped_crossing",
        "walkway",
        "stop_line",
        "road_divider",
        "lane_divider",
    ):
        assert totals[name] > 0, name


def test_map_json_has_every_devkit_key(synthetic_root):
    for path in sorted((synthetic_root / "maps" / "expansion").glob("*.json")):
        data = json.loads(path.read_text())
        nmap = _map(synthetic_root, path.stem)
        for layer in nmap.layer_names + [
            "arcline_path_3",
            "connectivity",
            "canvas_edge",
            "version",
        ]:
            assert layer in data, layer
        lane = nmap.lane[0]["token"]
        assert len(nmap.discretize_lanes([lane], 0.5)[lane]) > 2
    for record in _nusc(synthetic_root).map:
        assert (synthetic_root / record["filename"]).is_file()


# ------------------------------------------------------------------------------- geometry


@cache
def _marking_points(root: Path, location: str) -> dict[str, np.ndarray]:
    """Global points on the location's markings, from the map JSON through the devkit."""
    nmap = _map(root, location)
    dividers = [nmap.extract_line(r["line_token"]) for r in nmap.lane_divider + nmap.road_divider]
    line_xy = _densify(dividers)
    # Points 0.9 m to the side of each divider point: plain lane surface.
    tangent = np.gradient(line_xy, axis=0)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
    return {
        "divider": line_xy,
        "beside": line_xy + 0.9 * normal,
        "stop": _grid_in([nmap.extract_polygon(r["polygon_token"]) for r in nmap.stop_line]),
        "crossing": _grid_in([nmap.extract_polygon(r["polygon_token"]) for r in nmap.ped_crossing]),
    }


def _near_ego(nusc, sd_token, xy: np.ndarray, radius_m: float = 15.0) -> np.ndarray:
    pose = nusc.get("ego_pose", nusc.get("sample_data", sd_token)["ego_pose_token"])
    return np.linalg.norm(xy - np.array(pose["translation"][:2]), axis=1) < radius_m


def test_map_markings_project_onto_painted_pixels(synthetic_root):
    nusc = _nusc(synthetic_root)
    on_div, off_div, on_stop, on_cross = [], [], [], []
    lum_on, lum_off = [], []
    for scene, sd_token in _keyframe_cameras(nusc):
        pts = _marking_points(synthetic_root, _location(nusc, scene))
        image, semantic = _images(synthetic_root, nusc, sd_token)
        hw = semantic.shape

        near = _near_ego(nusc, sd_token, pts["divider"])
        px, ok = _pixels_near(nusc, sd_token, _with_z(pts["divider"][near]), hw)
        px_side, ok_side = _pixels_near(nusc, sd_token, _with_z(pts["beside"][near]), hw)
        both = ok & ok_side
        px, px_side = px[both], px_side[both]
        sem_on = semantic[px[:, 1], px[:, 0]]
        on_div.append(sem_on == MARKING)
        off_div.append(semantic[px_side[:, 1], px_side[:, 0]] == MARKING)
        painted = sem_on == MARKING
        lum_on.append(image[px[painted, 1], px[painted, 0]])
        lum_off.append(image[px_side[painted, 1], px_side[painted, 0]])
        # Stop lines are 0.45 m deep: keep to where a pixel covers well under that.
        for key, acc, cls, max_d in (
            ("stop", on_stop, MARKING, 7.0),
            ("crossing", on_cross, CROSSWALK, 12.0),
        ):
            xy = pts[key][_near_ego(nusc, sd_token, pts[key])]
            p, ok = _pixels_near(nusc, sd_token, _with_z(xy), hw, max_dist_m=max_d)
            acc.append(semantic[p[ok, 1], p[ok, 0]] == cls)
    on_div, off_div = np.concatenate(on_div), np.concatenate(off_div)
    on_stop, on_cross = np.concatenate(on_stop), np.concatenate(on_cross)
    # Dividers are dashed and worn in places, so only a share of their points is paint, but
    # far more than beside them; stop lines are solid paint; zebra bars cover about half.
    assert len(on_div) > 500 and len(on_stop) > 50 and len(on_cross) > 200
    assert on_div.mean() > 0.25, on_div.mean()
    assert off_div.mean() < 0.05, off_div.mean()
    assert on_stop.mean() > 0.6, on_stop.mean()
    assert on_cross.mean() > 0.3, on_cross.mean()
    # Painted pixels are brighter than the asphalt beside them.
    lum_on, lum_off = np.concatenate(lum_on), np.concatenate(lum_off)
    assert np.median(lum_on - lum_off) > 20, np.median(lum_on - lum_off)


@cache
def _paint_points(root: Path, location: str) -> dict[str, tuple[np.ndarray, int]]:
    """Per kind of painted mark: global points a quarter of the width inside each mark's
    outline, every 0.5 m, and the Vistas id of the kind."""
    marks = json.loads((root / "maps" / "paint" / f"{location}.json").read_text())["marks"]
    out = {}
    for kind in {m["kind"] for m in marks}:
        mine = [m for m in marks if m["kind"] == kind]
        geoms = shapely.from_wkt([m["wkt"] for m in mine])
        inside = shapely.buffer(geoms, [-m["width_m"] / 4 for m in mine])
        points = shapely.get_coordinates(shapely.segmentize(shapely.boundary(inside), 0.5))
        out[kind] = (points, VISTAS_ID[mine[0]["vistas"]])
    return out


def test_painted_marks_file_lies_on_the_painted_pixels(synthetic_root):
    """maps/paint/<location>.json (the BEV labels' paint source): points inside every kind of
    mark project onto pixels of the mark's Vistas class (worn paint aside)."""
    from model.data.synthetic.maps import PAINT_KINDS

    nusc = _nusc(synthetic_root)
    hits: dict[str, list[np.ndarray]] = {kind: [] for kind in PAINT_KINDS}
    for scene, sd_token in _keyframe_cameras(nusc):
        _, semantic = _images(synthetic_root, nusc, sd_token)
        for kind, (pts, vistas_id) in _paint_points(synthetic_root, _location(nusc, scene)).items():
            pts = pts[_near_ego(nusc, sd_token, pts)]
            px, ok = _pixels_near(nusc, sd_token, _with_z(pts), semantic.shape, max_dist_m=8.0)
            hits[kind].append(semantic[px[ok, 1], px[ok, 0]] == vistas_id)
    for kind, found in hits.items():
        found = np.concatenate(found)
        assert len(found) > 50 and found.mean() > 0.75, (kind, len(found), found.mean())


def test_points_far_off_the_road_are_not_road(synthetic_root):
    nusc = _nusc(synthetic_root)
    bad, n = 0, 0
    for scene, sd_token in _keyframe_cameras(nusc):
        nmap = _map(synthetic_root, _location(nusc, scene))
        paved = unary_union(
            [nmap.extract_polygon(t) for r in nmap.drivable_area for t in r["polygon_tokens"]]
            + [nmap.extract_polygon(r["polygon_token"]) for r in nmap.walkway]
        )
        sd = nusc.get("sample_data", sd_token)
        pose = nusc.get("ego_pose", sd["ego_pose_token"])
        x, y = pose["translation"][:2]
        xs, ys = np.meshgrid(np.arange(x - 30, x + 30, 1.0), np.arange(y - 30, y + 30, 1.0))
        pts = np.stack([xs.ravel(), ys.ravel()], 1)
        far = shapely.distance(MultiPolygon(getattr(paved, "geoms", [paved])), shapely.points(pts))
        pts = pts[far > 15.0]
        _, semantic = _images(synthetic_root, nusc, sd_token)
        px, ok = _pixels_near(nusc, sd_token, _with_z(pts), semantic.shape, max_dist_m=30.0)
        labels = semantic[px[ok, 1], px[ok, 0]]
        bad += int(np.isin(labels, list(GROUND_OF_ROADS)).sum())
        n += len(labels)
    assert n > 500
    assert bad == 0


def test_vehicle_boxes_cover_car_pixels(synthetic_root):
    nusc = _nusc(synthetic_root)
    hits, n = 0, 0
    for _, sd_token in _keyframe_cameras(nusc):
        _, boxes, k = nusc.get_sample_data(sd_token)
        _, semantic = _images(synthetic_root, nusc, sd_token)
        h, w = semantic.shape
        for box in boxes:
            centre = box.center
            if centre[2] < 3.0 or np.linalg.norm(centre) > 25.0:
                continue
            u, v = view_points(centre[:, None], k, normalize=True)[:2, 0]
            if 0 <= u < w and 0 <= v < h:
                n += 1
                hits += int(semantic[int(v), int(u)] == VISTAS_ID["Car"])
    assert n > 5
    assert hits / n > 0.7  # a nearer car may hide the centre


# ------------------------------------------------------------------------- determinism, CLI


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_arguments_give_identical_files(tmp_path):
    from model.data.synthetic import generate_dataset

    kwargs = dict(scenes=2, samples_per_scene=2, image_size=(32, 48), seed=7, progress=False)
    a = _tree_bytes(generate_dataset(tmp_path / "a", **kwargs))
    b = _tree_bytes(generate_dataset(tmp_path / "b", **kwargs))
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    c = _tree_bytes(generate_dataset(tmp_path / "c", **{**kwargs, "seed": 8}))
    assert c["v1.0-mini/sample.json"] != a["v1.0-mini/sample.json"]


@pytest.mark.parametrize(
    "kwargs",
    [{"scenes": 0}, {"samples_per_scene": -2}, {"image_size": (90,)}, {"image_size": (8, 8)}],
    ids=str,
)
def test_generate_dataset_rejects_bad_arguments_before_writing(tmp_path, kwargs):
    from model.data.synthetic import generate_dataset

    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "out", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "model.data.synthetic", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--scenes", "-1"],
        ["--scenes", "0"],
        ["--samples-per-scene", "0"],
        ["--samples-per-scene", "two"],
        ["--image-size", "90by160"],
        ["--image-size", "0x160"],
        ["--seed", "-3"],
    ],
    ids=lambda a: " ".join(a),
)
def test_cli_rejects_bad_arguments(tmp_path, args):
    out = tmp_path / "out"
    result = _cli("--out", str(out), *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.strip()
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_unwritable_out(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "out", Path("/proc/synthetic_out")):
        result = _cli("--out", str(out), "--scenes", "1", "--samples-per-scene", "1")
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_cli_refuses_non_empty_out_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _cli("--out", str(out), "--scenes", "1", "--samples-per-scene", "1")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_overwrite_replaces_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    args = ["--out", str(out), "--scenes", "2", "--samples-per-scene", "1", "--image-size", "32x48"]
    result = _cli(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stdout
    assert not (out / "keep.txt").exists()
    assert (out / "v1.0-mini" / "sample.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers

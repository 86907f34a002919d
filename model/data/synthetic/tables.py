"""nuScenes tables, vector-map JSON and raster basemaps for generated worlds.

Field sets follow the nuScenes v1.0 schema (and map expansion v1.3) so that the unmodified
devkit and the usual converters (mmdet3d ``create_data``, BEVFormer, HDMapNet/MapTR map
extraction) read them. Tokens are 32 hex digits derived from the seed and the record's name, so
the same arguments give the same files.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from pyquaternion import Quaternion
from shapely import affinity
from shapely.geometry import LineString, Polygon
from shapely.geometry.base import BaseGeometry

from model.data.synthetic.rig import Camera, ego_from_lidar
from model.data.synthetic.world import World

# The devkit accepts only these map names; left-hand traffic where the real city drives left.
LOCATIONS = ("boston-seaport", "singapore-onenorth")
LEFT_HAND_TRAFFIC = {"singapore-onenorth": True, "boston-seaport": False}
MAP_DIMS_M = {
    "singapore-onenorth": (1585.6, 2025.0),
    "singapore-hollandvillage": (2808.3, 2922.9),
    "singapore-queenstown": (3228.6, 3687.1),
    "boston-seaport": (2979.5, 2118.1),
}
BASEMAP_RES_M = 0.1  # the devkit's default map_resolution
SIMPLIFY_M = 0.005
BASEMAP_MAX_PIXELS = 120_000_000

CATEGORIES = (
    ("human.pedestrian.adult", "Adult subcategory."),
    ("human.pedestrian.child", "Child subcategory."),
    ("human.pedestrian.wheelchair", "Wheelchairs."),
    ("human.pedestrian.stroller", "Strollers."),
    ("human.pedestrian.personal_mobility", "Small electric or self-propelled vehicles."),
    ("human.pedestrian.police_officer", "Police officer."),
    ("human.pedestrian.construction_worker", "Construction worker."),
    ("animal", "All animals."),
    ("vehicle.car", "Vehicle designed primarily for personal use."),
    ("vehicle.motorcycle", "Gasoline or electric powered 2-wheeled vehicle."),
    ("vehicle.bicycle", "Human or electric powered 2-wheeled vehicle."),
    ("vehicle.bus.bendy", "Bendy bus subcategory."),
    ("vehicle.bus.rigid", "Rigid bus subcategory."),
    ("vehicle.truck", "Vehicles primarily designed to haul cargo."),
    ("vehicle.construction", "Vehicles primarily designed for construction."),
    ("vehicle.emergency.ambulance", "All types of ambulances."),
    ("vehicle.emergency.police", "All types of police vehicles."),
    ("vehicle.trailer", "Any vehicle trailer."),
    ("movable_object.barrier", "Temporary road barrier."),
    ("movable_object.trafficcone", "All types of traffic cone."),
    ("movable_object.pushable_pullable", "Objects that a pedestrian may push or pull."),
    ("movable_object.debris", "Movable object that is left on the driveable surface."),
    ("static_object.bicycle_rack", "Area or device intended to park or secure the bicycles."),
)
ATTRIBUTES = (
    ("vehicle.moving", "Vehicle is moving."),
    ("vehicle.stopped", "Vehicle, with a driver/rider in/on it, is currently stationary."),
    ("vehicle.parked", "Vehicle is stationary (usually for longer duration) with no driver."),
    ("cycle.with_rider", "There is a rider on the bicycle or motorcycle."),
    ("cycle.without_rider", "There is NO rider on the bicycle or motorcycle."),
    ("pedestrian.sitting_lying_down", "The human is sitting or lying down."),
    ("pedestrian.standing", "The human is standing."),
    ("pedestrian.moving", "The human is moving."),
)
VISIBILITIES = (
    ("1", "v0-40", "visibility of whole object is between 0 and 40%"),
    ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
    ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
    ("4", "v80-100", "visibility of whole object is between 80 and 100%"),
)


class Tokens:
    """Deterministic 32-hex-digit tokens from the seed and a record's name."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, *parts) -> str:
        key = "/".join(str(p) for p in (self.seed, *parts))
        return hashlib.md5(key.encode()).hexdigest()


def yaw_quaternion(yaw: float) -> list[float]:
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def _affine(a: np.ndarray) -> list[float]:
    """shapely.affinity matrix [a, b, d, e, xoff, yoff] of a 3x3 2-D affine."""
    return [a[0, 0], a[0, 1], a[1, 0], a[1, 1], a[0, 2], a[1, 2]]


def to_global(world: World, geom: BaseGeometry) -> BaseGeometry:
    return affinity.affine_transform(geom, _affine(world.global_from_local))


def global_poses(world: World, poses: np.ndarray) -> np.ndarray:
    """(T, 3) local x, y, yaw -> global x, y, yaw (a reflection flips the yaw)."""
    a = world.global_from_local
    xy = poses[:, :2] @ a[:2, :2].T + a[:2, 2]
    head = np.stack([np.cos(poses[:, 2]), np.sin(poses[:, 2])], 1) @ a[:2, :2].T
    return np.concatenate([xy, np.arctan2(head[:, 1], head[:, 0])[:, None]], 1)


@dataclass
class SceneInfo:
    """What a rendered scene hands to the table writer."""

    index: int
    name: str
    location: str
    logfile: str
    timestamps: list[int]
    files: dict[str, list[str]]  # channel -> relative file names per keyframe
    lidar_counts: list[list[int]]  # per keyframe, per vehicle


def _r(x: float) -> float:
    return round(float(x), 6)


def build_tables(
    scenes: list[SceneInfo], worlds: list[World], rig: list[Camera], tok: Tokens
) -> dict[str, list[dict]]:
    """All 13 nuScenes tables for the rendered scenes."""
    t: dict[str, list[dict]] = {
        name: []
        for name in (
            "attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map",
            "sample", "sample_annotation", "sample_data", "scene", "sensor", "visibility",
        )
    }  # fmt: skip
    for name, desc in CATEGORIES:
        t["category"].append({"token": tok("category", name), "name": name, "description": desc})
    for name, desc in ATTRIBUTES:
        t["attribute"].append({"token": tok("attribute", name), "name": name, "description": desc})
    for token, level, desc in VISIBILITIES:
        t["visibility"].append({"token": token, "level": level, "description": desc})
    channels = [cam.name for cam in rig] + ["LIDAR_TOP"]
    for ch in channels:
        modality = "lidar" if ch == "LIDAR_TOP" else "camera"
        t["sensor"].append({"token": tok("sensor", ch), "channel": ch, "modality": modality})
    car = tok("category", "vehicle.car")
    lidar_pose = ego_from_lidar()

    for info, world in zip(scenes, worlds, strict=True):
        log = tok("log", info.index)
        t["log"].append(
            {
                "token": log,
                "logfile": info.logfile,
                "vehicle": "n000",
                "date_captured": "2018-08-01",
                "location": info.location,
            }
        )
        calib = {}
        for cam in rig:
            calib[cam.name] = tok("calibrated_sensor", info.index, cam.name)
            t["calibrated_sensor"].append(
                {
                    "token": calib[cam.name],
                    "sensor_token": tok("sensor", cam.name),
                    "translation": [_r(v) for v in cam.ego_from_cam[:3, 3]],
                    "rotation": [_r(v) for v in cam.rotation_wxyz],
                    "camera_intrinsic": [[_r(v) for v in row] for row in cam.img_from_cam],
                }
            )
        calib["LIDAR_TOP"] = tok("calibrated_sensor", info.index, "LIDAR_TOP")
        t["calibrated_sensor"].append(
            {
                "token": calib["LIDAR_TOP"],
                "sensor_token": tok("sensor", "LIDAR_TOP"),
                "translation": [_r(v) for v in lidar_pose[:3, 3]],
                "rotation": [_r(v) for v in Quaternion(matrix=lidar_pose[:3, :3]).elements],
                "camera_intrinsic": [],
            }
        )

        n = len(info.timestamps)
        samples = [tok("sample", info.index, k) for k in range(n)]
        scene = tok("scene", info.index)
        t["scene"].append(
            {
                "token": scene,
                "log_token": log,
                "nbr_samples": n,
                "first_sample_token": samples[0],
                "last_sample_token": samples[-1],
                "name": info.name,
                "description": f"synthetic {world.kind} world, {info.location}",
            }
        )
        ego = global_poses(world, world.ego_poses)
        for k in range(n):
            t["sample"].append(
                {
                    "token": samples[k],
                    "timestamp": info.timestamps[k],
                    "prev": samples[k - 1] if k > 0 else "",
                    "next": samples[k + 1] if k + 1 < n else "",
                    "scene_token": scene,
                }
            )
        for ch in channels:
            sd = [tok("sample_data", info.index, ch, k) for k in range(n)]
            for k in range(n):
                pose = tok("ego_pose", info.index, ch, k)
                t["ego_pose"].append(
                    {
                        "token": pose,
                        "timestamp": info.timestamps[k],
                        "rotation": [_r(v) for v in yaw_quaternion(ego[k, 2])],
                        "translation": [_r(ego[k, 0]), _r(ego[k, 1]), 0.0],
                    }
                )
                is_cam = ch != "LIDAR_TOP"
                t["sample_data"].append(
                    {
                        "token": sd[k],
                        "sample_token": samples[k],
                        "ego_pose_token": pose,
                        "calibrated_sensor_token": calib[ch],
                        "timestamp": info.timestamps[k],
                        "fileformat": "jpg" if is_cam else "pcd",
                        "is_key_frame": True,
                        "height": rig[0].image_hw[0] if is_cam else 0,
                        "width": rig[0].image_hw[1] if is_cam else 0,
                        "filename": info.files[ch][k],
                        "prev": sd[k - 1] if k > 0 else "",
                        "next": sd[k + 1] if k + 1 < n else "",
                    }
                )

        for vi, veh in enumerate(world.vehicles):
            inst = tok("instance", info.index, vi)
            anns = [tok("sample_annotation", info.index, vi, k) for k in range(n)]
            t["instance"].append(
                {
                    "token": inst,
                    "category_token": car,
                    "nbr_annotations": n,
                    "first_annotation_token": anns[0],
                    "last_annotation_token": anns[-1],
                }
            )
            attr = tok("attribute", "vehicle.moving" if veh.moving else "vehicle.parked")
            poses = global_poses(world, veh.poses)
            w, length, h = veh.size_wlh
            for k in range(n):
                pts = info.lidar_counts[k][vi]
                t["sample_annotation"].append(
                    {
                        "token": anns[k],
                        "sample_token": samples[k],
                        "instance_token": inst,
                        "visibility_token": "4" if pts > 0 else "1",
                        "attribute_tokens": [attr],
                        "translation": [_r(poses[k, 0]), _r(poses[k, 1]), _r(h / 2)],
                        "size": [_r(w), _r(length), _r(h)],
                        "rotation": [_r(v) for v in yaw_quaternion(poses[k, 2])],
                        "prev": anns[k - 1] if k > 0 else "",
                        "next": anns[k + 1] if k + 1 < n else "",
                        "num_lidar_pts": pts,
                        "num_radar_pts": 0,
                    }
                )

    for loc in sorted({s.location for s in scenes}):
        t["map"].append(
            {
                "token": tok("map", loc),
                "log_tokens": [tok("log", s.index) for s in scenes if s.location == loc],
                "category": "semantic_prior",
                "filename": f"maps/{tok('map', loc)}.png",
            }
        )
    return t


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
        seg_tokens = []
        for i, (poly, is_x) in enumerate(world.road_segments):
            token = self.tok("road_segment", self.loc, k, i)
            seg_tokens.append(token)
            self.rec["road_segment"].append(
                {
                    "token": token,
                    "polygon_token": self.polygon(g(poly), f"{k}/segment{i}"),
                    "is_intersection": bool(is_x),
                    "drivable_area_token": da,
                }
            )
        for i, lane in enumerate(world.lanes):
            token = self.tok("lane", self.loc, k, i)
            centre = np.asarray(g(LineString(lane["centre"])).coords)
            poly = g(lane["polygon"])
            ends = [
                self.line(g(LineString(edge)), f"{k}/lane{i}/edge{j}")[0]
                for j, edge in enumerate(lane["edges"])
            ]
            self.rec["lane"].append(
                {
                    "token": token,
                    "polygon_token": self.polygon(poly, f"{k}/lane{i}"),
                    "lane_type": "CAR",
                    "from_edge_line_token": ends[0],
                    "to_edge_line_token": ends[1],
                    "left_lane_divider_segments": [],
                    "right_lane_divider_segments": [],
                }
            )
            self.arclines[token] = arcline_path(centre)
            self.connectivity[token] = {"incoming": [], "outgoing": []}
        ped_tokens = []
        for i, (poly, seg) in enumerate(world.ped_crossings):
            token = self.tok("ped_crossing", self.loc, k, i)
            ped_tokens.append(token)
            self.rec["ped_crossing"].append(
                {
                    "token": token,
                    "polygon_token": self.polygon(g(poly), f"{k}/ped{i}"),
                    "road_segment_token": seg_tokens[seg],
                }
            )
        for i, poly in enumerate(world.walkways):
            self.rec["walkway"].append(
                {
                    "token": self.tok("walkway", self.loc, k, i),
                    "polygon_token": self.polygon(g(poly), f"{k}/walkway{i}"),
                }
            )
        for i, (poly, ped) in enumerate(world.stop_lines):
            self.rec["stop_line"].append(
                {
                    "token": self.tok("stop_line", self.loc, k, i),
                    "polygon_token": self.polygon(g(poly), f"{k}/stop{i}"),
                    "stop_line_type": "PED_CROSSING",
                    "ped_crossing_tokens": [ped_tokens[ped]],
                    "traffic_light_tokens": [],
                    "road_block_token": "",
                }
            )
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
            marks.append({"kind": kind, "vistas": vistas, "width_m": _r(width), "wkt": wkt})
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

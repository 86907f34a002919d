"""The 13 nuScenes tables for generated worlds (their map files: ``maps.py``).

Field sets follow the nuScenes v1.0 schema so that the unmodified devkit and the usual
converters (mmdet3d ``create_data``, BEVFormer) read them. Tokens are 32 hex digits derived from
the seed and the record's name, so the same arguments give the same files.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from pyquaternion import Quaternion

from model.data.synthetic.rig import Camera, ego_from_lidar
from model.data.synthetic.world import World

# The devkit accepts only these map names; left-hand traffic where the real city drives left.
LOCATIONS = ("boston-seaport", "singapore-onenorth")
LEFT_HAND_TRAFFIC = {"singapore-onenorth": True, "boston-seaport": False}

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


def rounded(x: float) -> float:
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
                    "translation": [rounded(v) for v in cam.ego_from_cam[:3, 3]],
                    "rotation": [rounded(v) for v in cam.rotation_wxyz],
                    "camera_intrinsic": [[rounded(v) for v in row] for row in cam.img_from_cam],
                }
            )
        calib["LIDAR_TOP"] = tok("calibrated_sensor", info.index, "LIDAR_TOP")
        t["calibrated_sensor"].append(
            {
                "token": calib["LIDAR_TOP"],
                "sensor_token": tok("sensor", "LIDAR_TOP"),
                "translation": [rounded(v) for v in lidar_pose[:3, 3]],
                "rotation": [rounded(v) for v in Quaternion(matrix=lidar_pose[:3, :3]).elements],
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
                        "rotation": [rounded(v) for v in yaw_quaternion(ego[k, 2])],
                        "translation": [rounded(ego[k, 0]), rounded(ego[k, 1]), 0.0],
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
                        "translation": [rounded(poses[k, 0]), rounded(poses[k, 1]), rounded(h / 2)],
                        "size": [rounded(w), rounded(length), rounded(h)],
                        "rotation": [rounded(v) for v in yaw_quaternion(poses[k, 2])],
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



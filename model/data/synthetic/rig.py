"""The sensor rig: six cameras and a roof lidar placed like the nuScenes data-collection car.

Positions, yaws and focal lengths are those of the real nuScenes rig (``calibrated_sensor`` of
the public v1.0 logs, rounded); the cameras are mounted level (the real ones pitch and roll by
under one degree). Intrinsics are given for the real 1600x900 images and scaled to the
generated image size with ``model.geometry.scale_intrinsics``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pyquaternion import Quaternion

from model.geometry import CAMERAS, scale_intrinsics

REAL_IMAGE_HW = (900, 1600)


@dataclass(frozen=True)
class CameraMount:
    translation_m: tuple[float, float, float]  # in the ego frame
    yaw_deg: float  # optical axis, counter-clockwise from ego +x
    focal_px: float  # at 1600x900
    principal_px: tuple[float, float]  # (cx, cy) at 1600x900


# fmt: off
CAMERA_MOUNTS: dict[str, CameraMount] = {
    "CAM_FRONT_LEFT":  CameraMount((1.524, 0.495, 1.509), 55.2, 1272.6, (826.6, 479.8)),
    "CAM_FRONT":       CameraMount((1.701, 0.016, 1.511), 0.3, 1266.4, (816.3, 491.5)),
    "CAM_FRONT_RIGHT": CameraMount((1.551, -0.493, 1.496), -56.4, 1260.8, (808.0, 495.3)),
    "CAM_BACK_LEFT":   CameraMount((1.036, 0.485, 1.591), 108.6, 1256.7, (792.1, 492.8)),
    "CAM_BACK":        CameraMount((0.028, 0.003, 1.579), 179.9, 809.2, (829.2, 481.8)),
    "CAM_BACK_RIGHT":  CameraMount((1.015, -0.481, 1.562), -110.8, 1259.5, (807.3, 501.2)),
}
# fmt: on
assert tuple(CAMERA_MOUNTS) == CAMERAS

LIDAR_TRANSLATION_M = (0.944, 0.0, 1.840)
LIDAR_YAW_DEG = -90.0  # the nuScenes lidar's x axis points to the right of the car


@dataclass(frozen=True)
class Camera:
    name: str
    ego_from_cam: np.ndarray  # (4, 4)
    img_from_cam: np.ndarray  # (3, 3) for the generated image size
    image_hw: tuple[int, int]

    @property
    def rotation_wxyz(self) -> list[float]:
        return list(Quaternion(matrix=self.ego_from_cam[:3, :3]).elements)


def ego_from_cam_level(translation_m, yaw_deg: float) -> np.ndarray:
    """A level camera (x right, y down, z forward) looking along ``yaw_deg`` in the ego frame."""
    yaw = np.radians(yaw_deg)
    forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    out = np.eye(4)
    out[:3, :3] = np.stack([right, down, forward], axis=1)
    out[:3, 3] = translation_m
    return out


def camera_rig(image_hw: tuple[int, int]) -> list[Camera]:
    """The six cameras in ``CAMERAS`` order for images of ``image_hw`` = (height, width)."""
    h, w = image_hw
    sx, sy = w / REAL_IMAGE_HW[1], h / REAL_IMAGE_HW[0]
    rig = []
    for name, mount in CAMERA_MOUNTS.items():
        k = np.array(
            [
                [mount.focal_px, 0.0, mount.principal_px[0]],
                [0.0, mount.focal_px, mount.principal_px[1]],
                [0.0, 0.0, 1.0],
            ]
        )
        rig.append(
            Camera(
                name=name,
                ego_from_cam=ego_from_cam_level(mount.translation_m, mount.yaw_deg),
                img_from_cam=scale_intrinsics(k, sx, sy),
                image_hw=(h, w),
            )
        )
    return rig


def ego_from_lidar() -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Quaternion(axis=[0, 0, 1], degrees=LIDAR_YAW_DEG).rotation_matrix
    out[:3, 3] = LIDAR_TRANSLATION_M
    return out

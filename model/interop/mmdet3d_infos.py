"""mmdet3d nuScenes info files (``*_infos_*.pkl``) -> the keyframe index our dataset uses.

Two formats are read, both as written by the converters from a nuScenes dataroot:

- ``legacy``: ``{"infos": [...], "metadata": {"version": ...}}``, written by mmdet3d < 1.1's
  ``tools/create_data.py`` and BEVFormer's ``nuscenes_converter`` (``*_infos_temporal_*.pkl``).
  Per sample: ``token``, ``prev``, ``next``, ``scene_token`` (BEVFormer), ``timestamp`` (us),
  ``lidar2ego_*`` and ``ego2global_*`` (translation + wxyz quaternion), and ``cams[CAM_*]`` with
  ``data_path``, ``cam_intrinsic``, ``sensor2ego_*``, ``sensor2lidar_rotation`` /
  ``sensor2lidar_translation`` (camera -> keyframe lidar, motion-compensated).
- ``v2``: ``{"metainfo": {...}, "data_list": [...]}``, written by mmdet3d >= 1.1 (its
  ``create_data.py`` converts the legacy infos with ``update_infos_to_v2``). Per sample: ``token``,
  ``ego2global`` (4x4), ``lidar_points.lidar2ego`` (4x4), ``images[CAM_*]`` with ``img_path``
  (a file name under ``samples/CAM_*``), ``cam2img`` and ``lidar2cam`` (4x4, motion-compensated).

Either way the camera extrinsics come out as ``ego_from_cam`` into the keyframe's ego frame
(the LIDAR_TOP ego pose), through the lidar: ``ego_from_lidar @ lidar_from_cam``, the same
motion-compensated transform ``model.data.dataset`` computes from the tables.

The pickles are read with a restricted unpickler (numpy arrays and plain containers only).
Scene names, map locations and image sizes are not in the info files: ``records_from_infos``
reads them through nuscenes-devkit, like every other read of a dataroot.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.geometry import CAMERAS, invert_transform, transform_from_pose

log = logging.getLogger(__name__)

_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    # mmengine dumps with pickle protocol 2, which spells numpy's byte buffers as
    # _codecs.encode(latin-1 str): harmless, and needed for every array.
    ("_codecs", "encode"),
}
_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric", "numpy.dtypes")  # fmt: skip


class _InfoUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and builtin containers; refuses everything else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS or (
            module in _NUMPY_MODULES
            and name in ("_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer")
            or module == "numpy.dtypes"
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"info file refers to {module}.{name}, which is not allowed")


@dataclass
class InfoSample:
    """One keyframe as an info file describes it; arrays in ``CAMERAS`` order."""

    token: str
    timestamp_us: int
    scene_token: str | None  # legacy BEVFormer infos only
    prev: str | None  # previous keyframe token as written in the file ('' -> None)
    image_paths: list[Path]  # resolved against the dataroot
    intrinsics: np.ndarray  # (6, 3, 3) img_from_cam of the original images
    ego_from_cam: np.ndarray  # (6, 4, 4) into the keyframe's ego frame
    global_from_ego: np.ndarray  # (4, 4) keyframe ego pose
    ego_from_lidar: np.ndarray  # (4, 4)


@dataclass
class InfoFile:
    path: Path
    format: str  # "legacy" | "v2"
    version: str | None  # nuScenes version the converter read, when the file says
    samples: list[InfoSample]

    @property
    def tokens(self) -> list[str]:
        return [s.token for s in self.samples]


def load_pickle(path: Path | str) -> object:
    data = Path(path).read_bytes()
    return _InfoUnpickler(io.BytesIO(data)).load()


def _resolve(dataroot: Path, written: str, camera: str) -> Path:
    """An image path as a converter wrote it -> the file under ``dataroot``.

    Legacy files hold whatever path the converter was given (``./data/nuscenes/samples/...``,
    absolute, ...): the part from ``samples/`` or ``sweeps/`` on is kept. v2 files hold the
    bare file name, which lives in ``samples/<camera>/``.
    """
    parts = Path(written).parts
    for anchor in ("samples", "sweeps"):
        if anchor in parts:
            return dataroot.joinpath(*parts[len(parts) - 1 - parts[::-1].index(anchor) :])
    return dataroot / "samples" / camera / Path(written).name


def _matrix(values, shape: tuple[int, int]) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64)
    if out.shape != shape:
        raise ValueError(f"expected a {shape} matrix, got shape {out.shape}")
    return out


def _legacy_sample(info: dict, dataroot: Path) -> InfoSample:
    ego_from_lidar = transform_from_pose(info["lidar2ego_translation"], info["lidar2ego_rotation"])
    global_from_ego = transform_from_pose(
        info["ego2global_translation"], info["ego2global_rotation"]
    )
    paths, intrinsics, extrinsics = [], [], []
    for cam in CAMERAS:
        if cam not in info["cams"]:
            raise ValueError(f"info of sample {info['token']} has no {cam}")
        cam_info = info["cams"][cam]
        lidar_from_cam = np.eye(4)
        lidar_from_cam[:3, :3] = _matrix(cam_info["sensor2lidar_rotation"], (3, 3))
        lidar_from_cam[:3, 3] = np.asarray(cam_info["sensor2lidar_translation"]).reshape(3)
        extrinsics.append(ego_from_lidar @ lidar_from_cam)
        intrinsics.append(_matrix(cam_info["cam_intrinsic"], (3, 3)))
        paths.append(_resolve(dataroot, str(cam_info["data_path"]), cam))
    return InfoSample(
        token=info["token"],
        timestamp_us=int(info["timestamp"]),
        scene_token=info.get("scene_token"),
        prev=info.get("prev") or None,
        image_paths=paths,
        intrinsics=np.stack(intrinsics),
        ego_from_cam=np.stack(extrinsics),
        global_from_ego=global_from_ego,
        ego_from_lidar=ego_from_lidar,
    )


def _v2_sample(info: dict, dataroot: Path) -> InfoSample:
    ego_from_lidar = _matrix(info["lidar_points"]["lidar2ego"], (4, 4))
    paths, intrinsics, extrinsics = [], [], []
    for cam in CAMERAS:
        cam_info = info["images"].get(cam)
        if not cam_info or not cam_info.get("img_path"):
            raise ValueError(f"info of sample {info['token']} has no {cam} image")
        cam2img = np.asarray(cam_info["cam2img"], dtype=np.float64)[:3, :3]
        extrinsics.append(ego_from_lidar @ invert_transform(_matrix(cam_info["lidar2cam"], (4, 4))))
        intrinsics.append(cam2img)
        paths.append(_resolve(dataroot, str(cam_info["img_path"]), cam))
    timestamp = float(info["timestamp"])
    return InfoSample(
        token=info["token"],
        # v2 stores seconds; round to the microseconds the tables use.
        timestamp_us=int(round(timestamp * 1e6)) if timestamp < 1e12 else int(timestamp),
        scene_token=info.get("scene_token"),
        prev=info.get("prev") or None,
        image_paths=paths,
        intrinsics=np.stack(intrinsics),
        ego_from_cam=np.stack(extrinsics),
        global_from_ego=_matrix(info["ego2global"], (4, 4)),
        ego_from_lidar=ego_from_lidar,
    )


def read_info_file(path: Path | str, dataroot: Path | str) -> InfoFile:
    """Read a legacy or v2 mmdet3d nuScenes info file; image paths resolved under ``dataroot``."""
    path, dataroot = Path(path), Path(dataroot)
    content = load_pickle(path)
    if isinstance(content, dict) and "data_list" in content:
        meta = content.get("metainfo") or {}
        samples = [_v2_sample(info, dataroot) for info in content["data_list"]]
        return InfoFile(path, "v2", meta.get("version"), samples)
    if isinstance(content, dict) and "infos" in content:
        meta = content.get("metadata") or {}
        samples = [_legacy_sample(info, dataroot) for info in content["infos"]]
        return InfoFile(path, "legacy", meta.get("version"), samples)
    if isinstance(content, list):  # very old files: the bare infos list
        return InfoFile(path, "legacy", None, [_legacy_sample(i, dataroot) for i in content])
    raise ValueError(f"{path} is not an mmdet3d nuScenes info file (no 'infos' or 'data_list')")


# --- to our dataset's records -------------------------------------------------------------


def records_from_infos(info: InfoFile, dataroot: Path | str, version: str) -> list:
    """``model.data.dataset.SampleRecord`` s for the info file's keyframes.

    Geometry (extrinsics, intrinsics, ego pose, image paths) comes from the info file; scene
    name, map location and image size from the tables (the info files do not hold them).
    Records are grouped by scene in order of first appearance and sorted by time within a scene,
    as ``index_split`` orders them; ``prev_index`` links a keyframe to its predecessor when that
    one is in the file too.
    """
    from model.data.keyframes import SampleRecord, check_dataroot, load_nuscenes

    root = check_dataroot(dataroot, version)
    nusc = load_nuscenes(str(root), version)
    by_scene: dict[str, list[tuple[InfoSample, dict]]] = {}
    for sample in info.samples:
        table_sample = nusc.get("sample", sample.token)  # KeyError: not this dataroot's sample
        by_scene.setdefault(table_sample["scene_token"], []).append((sample, table_sample))
    records: list = []
    index_of: dict[str, int] = {}
    for scene_token, members in by_scene.items():
        scene = nusc.get("scene", scene_token)
        location = nusc.get("log", scene["log_token"])["location"]
        for sample, table_sample in sorted(members, key=lambda m: m[0].timestamp_us):
            sizes = []
            for cam in CAMERAS:
                sd = nusc.get("sample_data", table_sample["data"][cam])
                sizes.append((int(sd["height"]), int(sd["width"])))
            index_of[sample.token] = len(records)
            records.append(
                SampleRecord(
                    sample_token=sample.token,
                    scene_name=scene["name"],
                    location=location,
                    image_paths=list(sample.image_paths),
                    image_sizes=sizes,
                    intrinsics=sample.intrinsics.copy(),
                    ego_from_cam=sample.ego_from_cam.copy(),
                    global_from_ego=sample.global_from_ego.copy(),
                    prev_index=index_of.get(table_sample["prev"], -1),
                )
            )
    return records


def scenes_of(info: InfoFile, dataroot: Path | str, version: str) -> list[str]:
    """Scene names of the info file's keyframes, in order of first appearance."""
    return list(dict.fromkeys(r.scene_name for r in records_from_infos(info, dataroot, version)))


def dataset_from_infos(
    info_path: Path | str,
    dataroot: Path | str,
    version: str,
    image_size: tuple[int, int],
    split: str | None = None,
    atol: float = 1e-4,
    **dataset_kwargs,
):
    """A ``NuScenesBevDataset`` over exactly the keyframes of an mmdet3d info file.

    The dataset is built for the file's scenes (within ``split``, or the dataroot's split that
    holds them all) and then checked against the file: the same keyframes, and extrinsics,
    intrinsics and ego poses that agree to ``atol`` (an info file made from another copy of the
    data, or a converter with other conventions, fails here instead of training on wrong
    geometry). Info files that hold only part of a scene's keyframes are refused.
    """
    from model.data.dataset import NuScenesBevDataset
    from model.data.keyframes import split_names, split_scenes

    info = read_info_file(info_path, dataroot)
    records = records_from_infos(info, dataroot, version)
    scenes = list(dict.fromkeys(r.scene_name for r in records))
    if split is None:
        holding = [s for s in split_names(dataroot, version)
                   if set(scenes) <= set(split_scenes(dataroot, version, s))]  # fmt: skip
        if not holding:
            raise ValueError(f"no split of {dataroot} holds all scenes of {info_path}: {scenes}")
        split = holding[0]
    dataset = NuScenesBevDataset(
        dataroot, version, split, image_size, scenes=scenes, **dataset_kwargs
    )
    check_records_agree(records, dataset.records, atol=atol, what=str(info_path))
    return dataset


def check_records_agree(
    from_infos: Sequence,
    from_tables: Sequence,
    atol: float = 1e-4,
    rtol: float = 1e-6,
    what: str = "info file",
) -> None:
    """Raise ``ValueError`` unless both record lists describe the same keyframes alike.

    ``rtol`` covers the float32 matrices of v2 files: global translations of a few km are
    stored to about 1e-4 m, far below anything that matters and far above ``atol`` alone.
    """
    tables = {r.sample_token: r for r in from_tables}
    infos = {r.sample_token: r for r in from_infos}
    if set(tables) != set(infos):
        only_tables = sorted(set(tables) - set(infos))
        only_infos = sorted(set(infos) - set(tables))
        raise ValueError(
            f"{what} and the dataroot's scenes hold different keyframes: {len(only_tables)} only "
            f"in the tables ({only_tables[:3]}), {len(only_infos)} only in the file "
            f"({only_infos[:3]}); partial scenes need a records hook in NuScenesBevDataset"
        )
    for token, rec in infos.items():
        ref = tables[token]
        for name in ("ego_from_cam", "intrinsics", "global_from_ego"):
            a, b = getattr(rec, name), getattr(ref, name)
            if not np.allclose(a, b, atol=atol, rtol=rtol):
                err = float(np.abs(np.asarray(a) - np.asarray(b)).max())
                raise ValueError(
                    f"{what}: {name} of sample {token} differs from the tables by {err:.3g}"
                )
        if [Path(p).resolve() for p in rec.image_paths] != [
            Path(p).resolve() for p in ref.image_paths
        ]:
            raise ValueError(f"{what}: image paths of sample {token} differ from the tables")

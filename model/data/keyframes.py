"""The keyframes of a nuScenes-format dataroot: its checks, splits and fingerprint, and one
small record per keyframe (paths and matrices) read from the tables through nuscenes-devkit.

The records of a split are kept in the cache beside the labels (``index_split``), so later
processes (every trial) never import the devkit (``model.data.prepare`` precomputes them).

Camera extrinsics are motion-compensated: each camera's ``ego_from_cam`` maps into the
keyframe's ego frame (the LIDAR_TOP sample's ego pose), through the ego pose at the camera's own
timestamp, as BEVFormer's ``lidar2img`` does.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model.data.errors import DatarootNotFoundError, MapNotFoundError
from model.data.label_cache import atomic_write_bytes
from model.geometry import CAMERAS, invert_transform, transform_from_pose

log = logging.getLogger(__name__)

_KEY_SENSOR = "LIDAR_TOP"

# Official devkit split names per version for the generic names "train" / "val" / "test".
_DEVKIT_SPLITS = {
    "v1.0-mini": {"train": "mini_train", "val": "mini_val"},
    "v1.0-trainval": {"train": "train", "val": "val"},
    "v1.0-test": {"test": "test"},
}


# --- dataroot checks, splits, fingerprint ---------------------------------------------------


def check_dataroot(dataroot: Path | str, version: str) -> Path:
    """The dataroot as a Path; a clear error naming the path when it or the version is absent."""
    root = Path(dataroot).expanduser()
    if not root.is_dir():
        raise DatarootNotFoundError(f"nuScenes dataroot {root} does not exist")
    tables = root / version
    if not tables.is_dir():
        found = sorted(p.name for p in root.glob("v1.0-*") if p.is_dir())
        raise DatarootNotFoundError(
            f"version folder {tables} does not exist (versions in {root}: {found or 'none'})"
        )
    return root


def split_names(dataroot: Path | str, version: str) -> list[str]:
    """The splits a dataroot offers: its splits.json keys, else the devkit's for the version."""
    root = check_dataroot(dataroot, version)
    if (root / "splits.json").is_file():
        return sorted(json.loads((root / "splits.json").read_text()))
    return sorted(_DEVKIT_SPLITS.get(version, {"train": "train", "val": "val"}))


def split_scenes(dataroot: Path | str, version: str, split: str) -> list[str]:
    """Scene names of a split: ``DIR/splits.json`` when present, else the devkit's official ones.

    ``train`` / ``val`` name ``mini_train`` / ``mini_val`` for v1.0-mini; any devkit split name
    (``mini_train``, ``train_detect``, ...) is accepted as is.
    """
    root = check_dataroot(dataroot, version)
    split_file = root / "splits.json"
    if split_file.is_file():
        splits = json.loads(split_file.read_text())
        if split not in splits:
            raise ValueError(f"split {split!r} is not in {split_file} (has {sorted(splits)})")
        return list(splits[split])
    from nuscenes.utils.splits import create_splits_scenes

    official = create_splits_scenes(verbose=False)
    name = _DEVKIT_SPLITS.get(version, {}).get(split, split)
    if name not in official:
        raise ValueError(f"unknown split {split!r} for {version} (devkit has {sorted(official)})")
    return list(official[name])


@functools.lru_cache(maxsize=8)
def _fingerprint(root: str, version: str, stats: tuple) -> str:
    digest = hashlib.sha256(version.encode())
    for rel, _size, _mtime in stats:
        digest.update(rel.encode())
        with open(Path(root) / rel, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataroot: Path | str, version: str) -> str:
    """Content hash of the tables, vector maps and paint (what labels are made from)."""
    root = check_dataroot(dataroot, version)
    files = sorted((root / version).glob("*.json")) + sorted(root.glob("maps/expansion/*.json"))
    files += sorted(root.glob("maps/paint/*.json"))  # what bev_label_source "paint" is made from
    stats = tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(str(root), version, stats)


@functools.lru_cache(maxsize=1)
def load_nuscenes(dataroot: str, version: str):
    """The devkit's NuScenes for a dataroot (kept for the next call: train then val)."""
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version=version, dataroot=dataroot, verbose=False)


# --- per-keyframe records ------------------------------------------------------------------


@dataclass
class SampleRecord:
    """Everything a sample needs from the tables, in plain arrays."""

    sample_token: str
    scene_name: str
    location: str
    image_paths: list[Path]  # in CAMERAS order
    image_sizes: list[tuple[int, int]]  # original (height, width)
    intrinsics: np.ndarray  # (6, 3, 3) for the original images
    ego_from_cam: np.ndarray  # (6, 4, 4)
    global_from_ego: np.ndarray  # (4, 4)
    prev_index: int  # index of the previous keyframe in the same dataset, -1 if none


def _pose(nusc, sample_data: dict) -> np.ndarray:
    pose = nusc.get("ego_pose", sample_data["ego_pose_token"])
    return transform_from_pose(pose["translation"], pose["rotation"])


def _index_scene(nusc, root: Path, scene: dict, location: str) -> list[SampleRecord]:
    records: list[SampleRecord] = []
    token = scene["first_sample_token"]
    while token:
        sample = nusc.get("sample", token)
        key_sensor = _KEY_SENSOR if _KEY_SENSOR in sample["data"] else "CAM_FRONT"
        global_from_ego = _pose(nusc, nusc.get("sample_data", sample["data"][key_sensor]))
        ego_from_global = invert_transform(global_from_ego)
        paths, sizes, intrinsics, extrinsics = [], [], [], []
        for cam in CAMERAS:
            if cam not in sample["data"]:
                raise ValueError(f"sample {token} of scene {scene['name']} has no {cam} image")
            sd = nusc.get("sample_data", sample["data"][cam])
            calib = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            cam_ego_from_cam = transform_from_pose(calib["translation"], calib["rotation"])
            extrinsics.append(ego_from_global @ _pose(nusc, sd) @ cam_ego_from_cam)
            intrinsics.append(np.asarray(calib["camera_intrinsic"], dtype=np.float64))
            paths.append(root / sd["filename"])
            sizes.append((int(sd["height"]), int(sd["width"])))
        records.append(
            SampleRecord(
                sample_token=token,
                scene_name=scene["name"],
                location=location,
                image_paths=paths,
                image_sizes=sizes,
                intrinsics=np.stack(intrinsics),
                ego_from_cam=np.stack(extrinsics),
                global_from_ego=global_from_ego,
                prev_index=len(records) - 1 if sample["prev"] else -1,
            )
        )
        token = sample["next"]
    return records


def index_split(
    dataroot: Path | str,
    version: str,
    split: str,
    scenes: Sequence[str] | None = None,
    cache_dir: Path | str | None = None,
) -> list[SampleRecord]:
    """Records of every keyframe of a split (or of ``scenes`` within it), scene by scene.

    With a ``cache_dir`` the split's records are kept in ``CACHE/keyframes/`` (keyed by the
    dataset fingerprint and the split's scenes), so a later process reads one small file instead
    of importing the devkit and loading its tables (seconds for the synthetic set; commonly
    reported at about half a minute and several GB for v1.0-trainval), as mmdetection3d's info
    files do.
    """
    root = check_dataroot(dataroot, version)
    split_names_ = split_scenes(root, version, split)
    if scenes is not None:
        unknown = sorted(set(scenes) - set(split_names_))
        if unknown:
            raise ValueError(f"scenes {unknown} are not in split {split!r}")
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([version, split_names_]).encode()).hexdigest()[:12]
        name = f"{dataset_fingerprint(root, version)}-{split}-{key}.npz"
        path = Path(cache_dir) / "keyframes" / name
    # The fingerprint covers the tables and the map files: a changed or missing map is a miss.
    records = _read_index(path, root) if path is not None else None
    if records is None:
        records = _index_scenes(root, version, split, split_names_)
        if path is not None and records:
            atomic_write_bytes(path, _index_bytes(records, root))
    if scenes is None:
        return records
    return _restrict(records, set(scenes))


def _index_scenes(root: Path, version: str, split: str, wanted: list[str]) -> list[SampleRecord]:
    """The records of ``wanted`` scenes, read from the tables through the devkit."""
    nusc = load_nuscenes(str(root), version)
    by_name = {s["name"]: s for s in nusc.scene}
    absent = [s for s in wanted if s not in by_name]
    if absent:
        raise ValueError(
            f"{len(absent)} scenes of split {split!r} are not in {root / version}: {absent[:5]}"
        )
    records: list[SampleRecord] = []
    for name in wanted:
        scene = by_name[name]
        location = nusc.get("log", scene["log_token"])["location"]
        _check_map(root, name, location)
        offset = len(records)
        for rec in _index_scene(nusc, root, scene, location):
            if rec.prev_index >= 0:
                rec.prev_index += offset
            records.append(rec)
    return records


def _restrict(records: list[SampleRecord], scenes: set[str]) -> list[SampleRecord]:
    """The records of ``scenes``, in split order, with ``prev_index`` renumbered."""
    kept = [i for i, r in enumerate(records) if r.scene_name in scenes]
    new_index = {old: new for new, old in enumerate(kept)}
    return [replace(records[i], prev_index=new_index.get(records[i].prev_index, -1)) for i in kept]


_INDEX_FORMAT = 1
_INDEX_ARRAYS = ("intrinsics", "ego_from_cam", "global_from_ego")


def _index_bytes(records: list[SampleRecord], root: Path) -> bytes:
    arrays = {
        "format": np.array(_INDEX_FORMAT),
        "sample_token": np.array([r.sample_token for r in records]),
        "scene_name": np.array([r.scene_name for r in records]),
        "location": np.array([r.location for r in records]),
        "filename": np.array([[str(p.relative_to(root)) for p in r.image_paths] for r in records]),
        "image_sizes": np.array([r.image_sizes for r in records], dtype=np.int64),
        "prev_index": np.array([r.prev_index for r in records], dtype=np.int64),
        **{name: np.stack([getattr(r, name) for r in records]) for name in _INDEX_ARRAYS},
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _read_index(path: Path, root: Path) -> list[SampleRecord] | None:
    """The records a cached index holds; None when there is none (or it cannot be read: it is
    then rebuilt and replaced)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as index:
            arrays = {name: index[name] for name in index.files}
        if int(arrays["format"]) != _INDEX_FORMAT:
            return None
        return [
            SampleRecord(
                sample_token=str(arrays["sample_token"][i]),
                scene_name=str(arrays["scene_name"][i]),
                location=str(arrays["location"][i]),
                image_paths=[root / str(f) for f in arrays["filename"][i]],
                image_sizes=[(int(h), int(w)) for h, w in arrays["image_sizes"][i]],
                intrinsics=arrays["intrinsics"][i],
                ego_from_cam=arrays["ego_from_cam"][i],
                global_from_ego=arrays["global_from_ego"][i],
                prev_index=int(arrays["prev_index"][i]),
            )
            for i in range(len(arrays["sample_token"]))
        ]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("keyframe index %s is unreadable (%s); rebuilding it", path, exc)
        return None


def _check_map(root: Path, scene_name: str, location: str) -> None:
    from nuscenes.map_expansion.map_api import locations

    path = root / "maps" / "expansion" / f"{location}.json"
    if location not in locations or not path.is_file():
        raise MapNotFoundError(
            f"scene {scene_name} is in map location {location!r} but {path} does not exist "
            f"(the devkit knows {locations}); BEV labels need the map expansion"
        )


def camera_images(dataroot: Path, version: str) -> list[Path]:
    """Every keyframe camera image of the version, in sample order then CAMERAS order."""
    nusc = load_nuscenes(str(dataroot), version)
    paths = []
    for sample in nusc.sample:
        for cam in CAMERAS:
            if cam in sample["data"]:
                paths.append(
                    Path(dataroot) / nusc.get("sample_data", sample["data"][cam])["filename"]
                )
    return paths

"""The controls of the pseudo-label axis, written as pseudo-label sets like a labeller's.

- ``oracle``, the positive control: the BEV labels of a label config reprojected into every
  camera with the reprojection loss's own geometry. Each pixel's ray
  (``model.network.reprojection.reprojection_grids`` at stride 1 on the original image, pixel
  centres at integer coordinates) meets the ground in one BEV cell (``model.data.alignment_stats.
  ray_cells``: the cell holding the point where the loss samples the BEV), and the pixel gets
  that cell's class in perspective classes (``perspective_classes``). Pixels whose ray does not
  meet the ground in front of the camera, or meets it outside the grid, are IGNORE. It needs
  only the BEV labels and the calibration, so real nuScenes has it too.
- ``shuffled``, the negative control: a labeller's set with each keyframe given the labels of
  another keyframe of its split, camera by camera (``shuffle_partners``): the label statistics
  over the split stay exactly (the images of a dataroot share one size), the geometry is gone.

Files: ``DIR/pseudo_labels/<set>/<protocol>/CAM_*/<stem>.png`` (``model.data.pseudo_sources``)
for every keyframe camera image of every split of the dataroot (``split_names``), each written
atomically; ``source.json`` beside them says how they were made (shuffled: every keyframe's
partner) and, last, that they are complete. ``ensure_label_set`` writes a set on first use,
under a file lock (concurrent trials share a dataroot), and resumes a killed writer.

The dataset resizes label images to the model's image size (nearest), as it does a
labeller's: the reprojection loss then reads, at each of its pixels, the oracle label of the
nearest original pixel.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from filelock import FileLock
from tqdm import tqdm

from model.data.alignment_stats import ray_cells
from model.data.errors import MissingPseudoLabelsError
from model.data.images import read_image
from model.data.keyframes import SampleRecord, dataset_fingerprint, index_split, split_names
from model.data.label_cache import (
    LabelCache,
    LabelJob,
    atomic_write_bytes,
    default_cache_dir,
    write_png,
)
from model.data.labels import PSEUDO_LABEL_PROTOCOL, LabelConfig, is_multilabel
from model.data.pseudo_classes import pseudo_channel_groups
from model.data.pseudo_sources import (
    MARKER,
    is_complete,
    label_set,
    labeler_set,
    oracle_set,
    pseudo_label_command,
    pseudo_label_path,
    shuffled_set,
)
from model.data.simulated_labeler import ensure_synthetic
from model.geometry import BevGrid
from model.names import IGNORE
from model.network.reprojection import reprojection_grids

log = logging.getLogger(__name__)

# The shuffled control's permutation is fixed: drawn from this seed and the split's name, the
# same for every trial and training seed (the seeds vary the model, not the control).
SHUFFLE_SEED = 0


# --- oracle ----------------------------------------------------------------------------------


def perspective_classes(bev_label: np.ndarray, protocol: str) -> np.ndarray:
    """(H, W) uint8: each BEV cell's perspective class (``PSEUDO_TO_BEV``), from a label of BEV
    ``protocol`` (``(H, W)`` class ids, or ``(C, H, W)`` multi-hot). A multi-label cell takes
    its last perspective class: a marking over the drivable area is the marking."""
    groups = pseudo_channel_groups(protocol)
    if not is_multilabel(protocol):
        table = np.full(256, IGNORE, np.uint8)
        for k, group in enumerate(groups):
            table[group] = k
        return table[bev_label]
    out = np.zeros(bev_label.shape[1:], np.uint8)  # no channel set: background
    for k, group in enumerate(groups):
        if group:
            out[bev_label[group].any(0)] = k
    return out


def oracle_label(
    cell_classes: np.ndarray,
    intrinsics: np.ndarray,
    ego_from_cam: np.ndarray,
    image_hw: tuple[int, int],
    grid: BevGrid,
) -> np.ndarray:
    """(H, W) uint8 label of one camera image: the class of the BEV cell each pixel's ray
    lands in (``cell_classes``, (grid H, grid W)), IGNORE where it lands in none."""
    grids = reprojection_grids(
        torch.as_tensor(intrinsics)[None, None],
        torch.as_tensor(ego_from_cam)[None, None],
        image_hw,
        grid,
        stride=1,
        cache=False,
    )
    cells = ray_cells(grids, grid)[0, 0].numpy()  # each pixel's flat cell, -1: none
    classes = cell_classes.reshape(-1)[np.maximum(cells, 0)]
    return np.where(cells >= 0, classes, IGNORE).astype(np.uint8)


def write_oracle(
    root: Path, version: str, label_cfg: LabelConfig, cache_dir: Path, progress: bool = False
) -> int:
    """The oracle set of ``label_cfg`` (BEV labels built where the label cache lacks them);
    returns the number of label images written."""
    name = oracle_set(label_cfg.cache_key())
    protocol = PSEUDO_LABEL_PROTOCOL[label_cfg.protocol]
    splits = _splits(root, version, cache_dir)
    records = list({r.sample_token: r for rs in splits.values() for r in rs}.values())
    fingerprint = dataset_fingerprint(root, version)
    cache = LabelCache(cache_dir, fingerprint, label_cfg)
    jobs = [LabelJob(r.sample_token, r.location, r.global_from_ego) for r in records]
    cache.ensure(jobs, root, progress=progress)
    settings = {
        "source": "oracle",
        "protocol": protocol,
        "label_config": label_cfg.to_dict(),
        "label_key": label_cfg.cache_key(),
        "fingerprint": fingerprint,
        "splits": sorted(splits),
    }
    written = 0
    for rec in tqdm(records, desc="oracle pseudo-labels", unit="sample", disable=not progress):
        cells = None
        for path, hw, k, e in zip(
            rec.image_paths, rec.image_sizes, rec.intrinsics, rec.ego_from_cam, strict=True
        ):
            out = pseudo_label_path(root, name, protocol, path)
            if out.is_file():  # a killed writer's work
                continue
            if cells is None:
                cells = perspective_classes(cache.load(rec.sample_token), label_cfg.protocol)
            write_png(out, oracle_label(cells, k, e, hw, label_cfg.grid))
            written += 1
    _mark_complete(root / "pseudo_labels" / name / protocol, settings, 6 * len(records))
    return written


# --- shuffled --------------------------------------------------------------------------------


def shuffle_partners(scenes: Sequence[str], split: str, seed: int = SHUFFLE_SEED) -> list[int]:
    """``partner[i]``: the keyframe whose labels keyframe ``i`` of a split gets (``scenes[i]``
    its scene). A permutation that leaves no keyframe its own and, where no scene holds more
    than half the split's keyframes, gives none a keyframe of its own scene (a neighbour half
    a second away would keep most of the geometry).

    The rule: scenes in a random order, each scene's keyframes in a random order, laid out in
    one row; every keyframe takes the one ``m`` places further on, cyclically, ``m`` the
    largest scene's size (1 where that scene holds more than half). Random from ``seed`` and
    ``split``: fixed for a dataroot.
    """
    n = len(scenes)
    if n < 2:
        raise ValueError(f"split {split!r}: cannot shuffle the labels of {n} keyframe(s)")
    digest = hashlib.sha256(split.encode()).digest()
    rng = np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])
    by_scene: dict[str, list[int]] = {}
    for i, scene in enumerate(scenes):
        by_scene.setdefault(scene, []).append(i)
    blocks = [list(by_scene.values())[s] for s in rng.permutation(len(by_scene))]
    row = [int(i) for block in blocks for i in rng.permutation(block)]
    largest = max(len(block) for block in blocks)
    shift = largest if 2 * largest <= n else 1
    partner = [0] * n
    for place, i in enumerate(row):
        partner[i] = row[(place + shift) % n]
    return partner


def write_shuffled(
    root: Path, version: str, base: str, protocol: str, cache_dir: Path, progress: bool = False
) -> int:
    """The shuffled set of the labeller set ``base`` (whose files must all exist); returns the
    number of label images it holds."""
    name = shuffled_set(base)
    splits = _splits(root, version, cache_dir)
    wanted = [
        pseudo_label_path(root, base, protocol, p)
        for records in splits.values()
        for r in records
        for p in r.image_paths
    ]
    missing = [p for p in wanted if not p.is_file()]
    if missing:
        command = pseudo_label_command(root, version, base, protocol)
        raise MissingPseudoLabelsError(missing, len(wanted), command)
    partners: dict[str, str] = {}
    with tqdm(total=len(wanted) // 6, desc="shuffled pseudo-labels", disable=not progress) as bar:
        for split, records in splits.items():
            partner = shuffle_partners([r.scene_name for r in records], split)
            for rec, j in zip(records, partner, strict=True):
                if rec.sample_token not in partners:  # splits are disjoint; if not, first wins
                    partners[rec.sample_token] = records[j].sample_token
                    _copy_labels(root, base, name, protocol, records[j], rec)
                bar.update()
    settings = {
        "source": "shuffled",
        "base": base,
        "protocol": protocol,
        "seed": SHUFFLE_SEED,
        "splits": sorted(splits),
        "partners": partners,  # keyframe -> the keyframe whose labels it has
    }
    _mark_complete(root / "pseudo_labels" / name / protocol, settings, 6 * len(partners))
    return 6 * len(partners)


def _copy_labels(
    root: Path, base: str, name: str, protocol: str, src: SampleRecord, dst: SampleRecord
) -> None:
    """Camera by camera, ``src``'s labels of set ``base`` as ``dst``'s of set ``name``."""
    pairs = zip(dst.image_paths, dst.image_sizes, strict=True)
    for cam, (path, (height, width)) in enumerate(pairs):
        out = pseudo_label_path(root, name, protocol, path)
        if out.is_file():
            continue
        source = pseudo_label_path(root, base, protocol, src.image_paths[cam])
        if src.image_sizes[cam] == (height, width):
            atomic_write_bytes(out, source.read_bytes())
        else:
            label = read_image(source, cv2.IMREAD_UNCHANGED)
            write_png(out, cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST))


# --- on first use ----------------------------------------------------------------------------


def _splits(root: Path, version: str, cache_dir: Path) -> dict[str, list[SampleRecord]]:
    """The keyframes of every split of the dataroot: what a set covers."""
    names = split_names(root, version)
    return {split: index_split(root, version, split, cache_dir=cache_dir) for split in names}


def _mark_complete(folder: Path, settings: dict, images: int) -> None:
    summary = {**settings, "images": images, "complete": True}
    atomic_write_bytes(folder / MARKER, json.dumps(summary, indent=2).encode())


def ensure_label_set(
    dataroot: Path | str,
    version: str,
    source: str,
    labeler: str,
    noise_level: str,
    label_cfg: LabelConfig,
    cache_dir: Path | str | None = None,
    progress: bool = False,
) -> str:
    """The name of the pseudo-label set these settings read (``pseudo_sources.label_set``), with
    its files written if they are made on first use: the simulated labeller's (a synthetic
    dataroot), the oracle and the shuffled sets. Mask2Former's must exist already."""
    root = Path(dataroot)
    protocol = PSEUDO_LABEL_PROTOCOL[label_cfg.protocol]
    name = label_set(source, labeler, noise_level, label_cfg.cache_key())
    if source != "oracle" and labeler == "synthetic":
        ensure_synthetic(root, version, label_cfg.protocol, noise_level)
    if source == "labeler":
        return name
    folder = root / "pseudo_labels" / name / protocol
    if is_complete(folder / MARKER):
        return name
    folder.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    with FileLock(str(folder / ".generate.lock")):
        if not is_complete(folder / MARKER):
            log.info("writing %s pseudo-labels into %s", source, folder)
            if source == "oracle":
                write_oracle(root, version, label_cfg, cache, progress)
            else:
                base = labeler_set(labeler, noise_level)
                write_shuffled(root, version, base, protocol, cache, progress)
    return name

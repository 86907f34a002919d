"""The ``synthetic`` labeller: a *simulation* of a pseudo-labeller for the synthetic dataroot.

The stored perspective ground truth, mapped through the Vistas table
(``model.data.pseudo_classes``), then corrupted the way real pseudo-labels go wrong
(``Corruption``). The corruption settings and the resulting error rates are written to
``noise.json`` beside the labels so runs can log them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from model.data.images import read_image
from model.data.keyframes import camera_images, check_dataroot
from model.data.label_cache import atomic_write_bytes, write_png
from model.data.labels import PSEUDO_LABEL_PROTOCOL
from model.data.pseudo_classes import PSEUDO_CLASSES, VISTAS_LOOKUP
from model.data.pseudo_sources import (
    NOISE_LEVELS,
    LabelerReport,
    is_complete,
    labeler_set,
    pseudo_label_path,
)
from model.names import IGNORE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corruption:
    """How the simulated labeller damages clean labels (all probabilities per image event).

    Defaults (``medium``) aim at what a Vistas-trained Mask2Former shows on nuScenes: it misses
    faint dividers, its curbs are a few pixels off, it hallucinates some markings, it confuses
    marking types, and it gets worse far away (near the top of the road region).
    """

    miss_marking_prob: float = 0.2  # each thin-marking component dropped with this probability
    boundary_shift_px: int = 2  # boundary regions eroded/dilated by up to this many pixels
    false_positive_blobs: float = 1.0  # mean (Poisson) number of false marking blobs per image
    blob_size_frac: float = 0.03  # blob radius as a fraction of the image width (max)
    confusion_prob: float = 0.1  # each marking component relabelled as another marking class
    # Far field (rising quadratically from 0 at the bottom of the road region to the top):
    far_noise: float = 0.3  # strength: thin-marking dropout probability at the top
    far_shift_px: float = 8.0  # label displacement (wobbly edges) at the top, at strength 1
    far_noise_block_px: int = 8  # cell size of the displacement field and of the dropout

    @classmethod
    def preset(cls, level: str) -> Corruption:
        scale = dict(zip(NOISE_LEVELS, (0.0, 0.5, 1.0, 2.0), strict=True))
        if level not in scale:
            raise ValueError(f"noise level must be one of {sorted(scale)}, got {level!r}")
        s = scale[level]
        base = cls()
        return cls(
            miss_marking_prob=min(1.0, base.miss_marking_prob * s),
            boundary_shift_px=int(round(base.boundary_shift_px * s)),
            false_positive_blobs=base.false_positive_blobs * s,
            blob_size_frac=base.blob_size_frac,
            confusion_prob=min(1.0, base.confusion_prob * s),
            far_noise=min(1.0, base.far_noise * s),
            far_shift_px=base.far_shift_px,
            far_noise_block_px=base.far_noise_block_px,
        )


def _image_rng(seed: int, path: Path) -> np.random.Generator:
    # Per image, so a resumed run gives the same labels as an uninterrupted one.
    digest = hashlib.sha256(f"{seed}:{path.parent.name}/{path.name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def corrupt_label(
    clean: np.ndarray, protocol: str, corruption: Corruption, rng: np.random.Generator
) -> np.ndarray:
    """A simulated pseudo-label from a clean perspective label (both uint8, 255 = ignore)."""
    classes = PSEUDO_CLASSES[protocol]
    if protocol == "hdmapnet":
        surface, markings, edge = 0, [1, 2], 3  # what lies under markings; marking ids; curbs
        thin = [1]
    else:
        surface, markings, edge = (
            classes.index("drivable_area"),
            [2, 3],
            classes.index("drivable_area"),
        )
        thin = [2]
    label = clean.copy()
    ground = label != IGNORE
    height, width = label.shape

    # Thin markings missed, marking types confused: per connected component.
    for cls in markings:
        count, components = cv2.connectedComponents((clean == cls).astype(np.uint8), connectivity=8)
        for comp in range(1, count):
            where = components == comp
            if cls in thin and rng.random() < corruption.miss_marking_prob:
                label[where] = surface
            elif rng.random() < corruption.confusion_prob:
                label[where] = rng.choice([m for m in markings if m != cls])

    # Boundaries (hdmapnet: curbs; fine: the drivable-area edge) eroded or dilated.
    if corruption.boundary_shift_px > 0:
        shift = int(rng.integers(-corruption.boundary_shift_px, corruption.boundary_shift_px + 1))
        if shift:
            region = (label == edge).astype(np.uint8)
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * abs(shift) + 1,) * 2)
            if shift > 0:
                grown = cv2.dilate(region, kernel).astype(bool) & ground
                label[grown & ~np.isin(label, markings)] = edge
            else:
                lost = region.astype(bool) & ~cv2.erode(region, kernel).astype(bool)
                label[lost] = 0 if protocol == "hdmapnet" else classes.index("background")

    # False-positive marking blobs on the ground.
    rows, cols = np.nonzero(ground)
    for _ in range(rng.poisson(corruption.false_positive_blobs) if len(rows) else 0):
        i = rng.integers(len(rows))
        radius = max(1.0, rng.uniform(0.3, 1.0) * corruption.blob_size_frac * width)
        axes = (int(radius), max(1, int(radius * rng.uniform(0.2, 0.6))))
        blob = np.zeros_like(label)
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(blob, (int(cols[i]), int(rows[i])), axes, angle, 0, 360, 1, -1)
        label[(blob > 0) & ground] = rng.choice(markings)

    # Far field: edges wobble (a smooth random displacement of the labels) and thin markings
    # fade out block by block, both growing towards the top of the road region.
    if corruption.far_noise > 0 and len(rows):
        top, bottom = rows.min(), rows.max()
        far = np.clip((bottom - np.arange(height)) / max(bottom - top, 1), 0.0, 1.0) ** 2
        block = max(1, corruption.far_noise_block_px)
        bh, bw = -(-height // block) + 1, -(-width // block) + 1
        field = rng.normal(size=(2, bh, bw)).astype(np.float32)
        amplitude = (corruption.far_noise * corruption.far_shift_px * far)[:, None]
        xs, ys = np.meshgrid(
            np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
        )
        dx, dy = (cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in field)
        moved = cv2.remap(
            label,
            xs + (dx * amplitude).astype(np.float32),
            ys + (dy * amplitude).astype(np.float32),
            cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_REPLICATE,
        )
        from_outside = moved == IGNORE  # never pull unlabelled pixels onto the ground
        moved[from_outside] = label[from_outside]
        block_far = far[np.minimum((np.arange(bh) + 0.5) * block, height - 1).astype(int)]
        fade = rng.random((bh, bw)) < corruption.far_noise * block_far[:, None]
        fade = np.kron(fade, np.ones((block, block), bool))[:height, :width]
        moved[fade & np.isin(moved, thin)] = surface
        label = moved
    label[~ground] = IGNORE
    return label


def semantic_path(dataroot: Path, image_path: Path) -> Path:
    """The synthetic dataroot's perspective ground truth for a camera image."""
    return Path(dataroot) / "semantic" / image_path.parent.name / f"{image_path.stem}.png"


def _noise_stats(pairs: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int) -> dict:
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for clean, noisy in pairs:
        valid = (clean != IGNORE) & (noisy != IGNORE)
        confusion += np.bincount(
            clean[valid].astype(np.int64) * num_classes + noisy[valid],
            minlength=num_classes**2,
        ).reshape(num_classes, num_classes)
    total = confusion.sum()
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {
        "pixel_error_rate": float(1.0 - tp.sum() / total) if total else 0.0,
        "iou_vs_clean": iou,
        "confusion": confusion,
    }


def run_synthetic(
    dataroot: Path | str,
    version: str,
    protocol: str = "hdmapnet",
    corruption: Corruption | None = None,
    noise_level: str = "medium",
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> LabelerReport:
    """Simulated pseudo-labels from ``DIR/semantic``; writes ``noise.json`` beside them."""
    root = check_dataroot(dataroot, version)
    corruption = corruption or Corruption.preset(noise_level)
    settings = {
        "labeler": "synthetic",
        "simulation": True,
        "protocol": protocol,
        "classes": list(PSEUDO_CLASSES[protocol]),
        "noise_level": noise_level if corruption == Corruption.preset(noise_level) else "custom",
        "seed": seed,
        "corruption": dataclasses.asdict(corruption),
    }
    name = labeler_set("synthetic", settings["noise_level"])  # noise "custom": synthetic-custom
    out_dir = root / "pseudo_labels" / name / protocol
    noise_file = out_dir / "noise.json"
    if noise_file.is_file() and not overwrite:
        previous = json.loads(noise_file.read_text())
        if {k: previous.get(k) for k in settings} != settings:
            raise ValueError(
                f"{out_dir} holds synthetic pseudo-labels made with other settings "
                f"({previous.get('noise_level')}, seed {previous.get('seed')}); "
                "pass --overwrite to replace them"
            )
    images = camera_images(root, version)
    missing_gt = [p for p in images if not semantic_path(root, p).is_file()]
    if missing_gt:
        raise FileNotFoundError(
            f"{len(missing_gt)} of {len(images)} images have no perspective ground truth "
            f"(e.g. {semantic_path(root, missing_gt[0])}): the synthetic labeller needs a "
            "dataroot made by python -m model.data.synthetic"
        )
    lookup = VISTAS_LOOKUP[protocol]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(noise_file, json.dumps({**settings, "complete": False}, indent=2).encode())

    written = skipped = 0
    pairs = []
    start = time.perf_counter()
    for path in tqdm(images, desc="synthetic pseudo-labels", unit="img", disable=not progress):
        clean = lookup[read_image(semantic_path(root, path), cv2.IMREAD_UNCHANGED)]
        out = pseudo_label_path(root, name, protocol, path)
        if out.is_file() and not overwrite:
            noisy = read_image(out, cv2.IMREAD_UNCHANGED)
            skipped += 1
        else:
            noisy = corrupt_label(clean, protocol, corruption, _image_rng(seed, path))
            write_png(out, noisy)
            written += 1
        pairs.append((clean, noisy))
    seconds = time.perf_counter() - start
    stats = _noise_stats(pairs, len(PSEUDO_CLASSES[protocol]))
    summary = {
        **settings,
        "complete": True,
        "images": len(images),
        "pixel_error_rate": stats["pixel_error_rate"],
        "iou_vs_clean": {
            name: (None if np.isnan(v) else float(v))
            for name, v in zip(PSEUDO_CLASSES[protocol], stats["iou_vs_clean"], strict=True)
        },
        "confusion_clean_rows_noisy_cols": stats["confusion"].tolist(),
    }
    atomic_write_bytes(noise_file, json.dumps(summary, indent=2).encode())
    log.info("synthetic pseudo-labels: pixel error rate %.3f", summary["pixel_error_rate"])
    return LabelerReport(written, skipped, seconds)


def read_noise_report(
    dataroot: Path | str, protocol: str = "hdmapnet", noise_level: str = "medium"
) -> dict:
    """The ``noise.json`` of the synthetic labeller (settings and measured error rates)."""
    folder = Path(dataroot) / "pseudo_labels" / labeler_set("synthetic", noise_level) / protocol
    return json.loads((folder / "noise.json").read_text())


def ensure_synthetic(
    dataroot: Path | str, version: str, protocol: str, noise_level: str = "medium"
) -> None:
    """Simulated pseudo-labels of a synthetic dataroot at ``noise_level``, written on first use
    (seconds) under a file lock: concurrent trials and the sweep driver share a dataroot. A
    no-op for a dataroot that is not synthetic or already has them."""
    from filelock import FileLock

    protocol = PSEUDO_LABEL_PROTOCOL[protocol]  # the perspective classes of the BEV protocol
    root = Path(dataroot)
    noise = root / "pseudo_labels" / labeler_set("synthetic", noise_level) / protocol / "noise.json"
    if not (root / "synthetic.json").is_file() or is_complete(noise):
        return
    noise.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(noise.parent / ".generate.lock")):
        if not is_complete(noise):
            log.info("writing simulated pseudo-labels into %s", noise.parent)
            run_synthetic(root, version, protocol, noise_level=noise_level, progress=False)

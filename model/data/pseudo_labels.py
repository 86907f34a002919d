"""Per-camera semantic pseudo-labels in a protocol's perspective classes.

Two labellers write the same files, ``DIR/pseudo_labels/<set>/<protocol>/CAM_*/<stem>.png``
(uint8 class ids, 255 = ignore; the set names the labeller and its noise level, see
``model.data.pseudo_sources``), one per keyframe camera image:

- ``mask2former``: Hugging Face transformers' ``Mask2FormerForUniversalSegmentation`` with a
  Mapillary Vistas semantic checkpoint from a local directory, batched, on the GPU in bf16 when
  there is one. Vistas classes map to ours by *name* (``VISTAS_TO_PROTOCOL``), so any checkpoint
  whose ``id2label`` uses the Vistas names works whatever its class order.
- ``synthetic``: a *simulation* of such a labeller for the synthetic dataroot: the stored
  perspective ground truth, mapped through the same table, then corrupted the way real
  pseudo-labels go wrong (``Corruption``). The corruption settings and the resulting error rates
  are written to ``noise.json`` beside the labels so runs can log them.

Both skip images whose label file exists (resumable) and write each file atomically.

    python -m model.data.pseudo_labels --dataroot DIR --version v1.0-mini --checkpoint M2F_DIR
    python -m model.data.pseudo_labels --dataroot DIR --version v1.0-mini --labeler synthetic
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from model.data.images import read_image
from model.data.keyframes import check_dataroot, load_nuscenes
from model.data.label_cache import atomic_write_bytes, write_png
from model.data.labels import PSEUDO_LABEL_PROTOCOL
from model.data.pseudo_sources import NOISE_LEVELS, is_complete, labeler_set, pseudo_label_path
from model.data.vistas import VISTAS_CLASSES
from model.geometry import CAMERAS
from model.names import IGNORE

log = logging.getLogger(__name__)


# Perspective classes per protocol. hdmapnet: the BEV classes themselves. fine: Vistas v1.2
# cannot tell lane from road dividers or stop lines apart, so its perspective classes are
# coarser; PSEUDO_TO_BEV says which BEV channels each one stands for.
PSEUDO_CLASSES: dict[str, tuple[str, ...]] = {
    "hdmapnet": ("background", "divider", "ped_crossing", "boundary"),
    "fine": ("background", "drivable_area", "lane_marking", "ped_crossing"),
}
PSEUDO_TO_BEV: dict[str, dict[str, tuple[str, ...]]] = {
    "hdmapnet": {name: (name,) for name in PSEUDO_CLASSES["hdmapnet"]},
    "fine": {
        "background": (),
        "drivable_area": ("drivable_area",),
        "lane_marking": ("lane_divider", "road_divider", "stop_line"),
        "ped_crossing": ("ped_crossing",),
    },
}


def pseudo_channel_groups(protocol: str) -> list[list[int]]:
    """For each perspective class id, the channel indices of BEV ``protocol`` it stands for
    (PSEUDO_TO_BEV of the protocol's pseudo-label classes)."""
    from model.data.labels import class_names

    bev = class_names(protocol)
    pseudo = PSEUDO_LABEL_PROTOCOL[protocol]
    return [[bev.index(name) for name in PSEUDO_TO_BEV[pseudo][c]] for c in PSEUDO_CLASSES[pseudo]]


# Flat, paved ground that carries no marking: the BEV says "background" there. Uneven or
# occluding surfaces (terrain, vegetation, snow) are left out: their pixels are not reliably on
# the ground plane the reprojection assumes.
_PAVED_GROUND = (
    "Road",
    "Service Lane",
    "Bike Lane",
    "Parking",
    "Rail Track",
    "Manhole",
    "Pothole",
    "Catch Basin",
    "Sidewalk",
    "Pedestrian Area",
)
_DRIVABLE = ("Road", "Service Lane", "Bike Lane", "Parking", "Manhole", "Pothole", "Catch Basin")

# Vistas class name -> perspective class name. Every name not listed (vehicles, people, sky,
# buildings, poles, vegetation, ...) is ignored (255).
VISTAS_TO_PROTOCOL: dict[str, dict[str, str]] = {
    "hdmapnet": {
        **{name: "background" for name in _PAVED_GROUND},
        "Lane Marking - General": "divider",
        "Lane Marking - Crosswalk": "ped_crossing",
        "Crosswalk - Plain": "ped_crossing",
        "Curb": "boundary",
        "Curb Cut": "boundary",
    },
    "fine": {
        **{name: "background" for name in _PAVED_GROUND},
        **{name: "drivable_area" for name in _DRIVABLE},
        "Lane Marking - General": "lane_marking",
        "Lane Marking - Crosswalk": "ped_crossing",
        "Crosswalk - Plain": "ped_crossing",
        "Curb": "background",
        "Curb Cut": "background",
    },
}


def _normalise(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def class_lookup(id2label: Mapping[int, str], protocol: str) -> np.ndarray:
    """(256,) uint8 table: a checkpoint's class id -> perspective class id (255 ignore)."""
    if protocol not in PSEUDO_CLASSES:
        raise ValueError(f"unknown protocol {protocol!r}")
    ours = {_normalise(k): v for k, v in VISTAS_TO_PROTOCOL[protocol].items()}
    ids = PSEUDO_CLASSES[protocol]
    table = np.full(256, IGNORE, np.uint8)
    matched = 0
    for index, name in id2label.items():
        target = ours.get(_normalise(str(name)))
        if target is not None:
            table[int(index)] = ids.index(target)
            matched += 1
    if not any(table[int(i)] not in (IGNORE, 0) for i in id2label):
        raise ValueError(
            "the checkpoint's id2label has none of the Vistas marking classes "
            f"({sorted(k for k, v in VISTAS_TO_PROTOCOL[protocol].items() if v != 'background')}); "
            "is it a Mapillary Vistas semantic checkpoint?"
        )
    log.debug("mapped %d of %d checkpoint classes", matched, len(id2label))
    return table


VISTAS_LOOKUP = {p: class_lookup(dict(enumerate(VISTAS_CLASSES)), p) for p in PSEUDO_CLASSES}


# --- which images ----------------------------------------------------------------------------


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


@dataclass
class LabelerReport:
    """What a labelling run did."""

    written: int
    skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


# --- Mask2Former -----------------------------------------------------------------------------


def load_mask2former(checkpoint: Path | str, device: str, dtype=None):
    """Model + image processor from a local directory (``from_pretrained``, no downloads)."""
    import torch
    from transformers import (
        AutoImageProcessor,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
    )

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(
            f"no Mask2Former checkpoint at {checkpoint} (expected config.json and weights, "
            "as written by save_pretrained)"
        )
    model = Mask2FormerForUniversalSegmentation.from_pretrained(str(checkpoint))
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(str(checkpoint))
    except (OSError, ValueError):
        log.warning(
            "%s has no image processor config; using Mask2FormerImageProcessor()", checkpoint
        )
        processor = Mask2FormerImageProcessor()
    return model, processor


def run_mask2former(
    dataroot: Path | str,
    version: str,
    checkpoint: Path | str,
    protocol: str = "hdmapnet",
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
    images: Sequence[Path] | None = None,
) -> LabelerReport:
    """Label every keyframe camera image that has no label file yet."""
    import torch

    root = check_dataroot(dataroot, version)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    images = list(images) if images is not None else camera_images(root, version)
    todo = [p for p in images if not pseudo_label_path(root, "mask2former", protocol, p).is_file()]
    skipped = len(images) - len(todo)
    log.info("%d images to label, %d already done", len(todo), skipped)
    if not todo:
        return LabelerReport(0, skipped, 0.0)
    model, processor = load_mask2former(checkpoint, device, dtype)
    lookup = torch.from_numpy(class_lookup(model.config.id2label, protocol)).to(device)

    def read_rgb(path: Path) -> np.ndarray:
        return read_image(path)[:, :, ::-1].copy()

    start = time.perf_counter()
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    with (
        ThreadPoolExecutor(max_workers=4) as pool,
        tqdm(total=len(todo), desc="Mask2Former", unit="img", disable=not progress) as bar,
    ):
        pending_reads = pool.map(lambda b: [read_rgb(p) for p in b], batches)
        writes = []
        for paths, rgbs in zip(batches, pending_reads, strict=True):
            inputs = processor(images=rgbs, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(device=device, dtype=dtype)
            pixel_mask = inputs.get("pixel_mask")
            with torch.inference_mode():
                outputs = model(
                    pixel_values=pixel_values,
                    pixel_mask=None if pixel_mask is None else pixel_mask.to(device),
                )
                outputs.class_queries_logits = outputs.class_queries_logits.float()
                outputs.masks_queries_logits = _crop_padding(
                    outputs.masks_queries_logits.float(), pixel_mask
                )
                maps = processor.post_process_semantic_segmentation(
                    outputs, target_sizes=[rgb.shape[:2] for rgb in rgbs]
                )
                labels = [lookup[m.long()].cpu().numpy() for m in maps]
            for path, label in zip(paths, labels, strict=True):
                out = pseudo_label_path(root, "mask2former", protocol, path)
                writes.append(pool.submit(write_png, out, label))
            bar.update(len(paths))
        for write in writes:
            write.result()
    seconds = time.perf_counter() - start
    return LabelerReport(len(todo), skipped, seconds)


def _crop_padding(mask_logits, pixel_mask):
    """Drop the processor's bottom/right padding so resizing to the image size aligns."""
    if pixel_mask is None or bool(pixel_mask.all()):
        return mask_logits
    import torch.nn.functional as F

    height, width = pixel_mask.shape[-2:]
    valid_h = int(pixel_mask[0].any(dim=1).sum())
    valid_w = int(pixel_mask[0].any(dim=0).sum())
    full = F.interpolate(mask_logits, size=(height, width), mode="bilinear", align_corners=False)
    return full[..., :valid_h, :valid_w]


# --- simulated labeller ----------------------------------------------------------------------


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


# --- CLI -------------------------------------------------------------------------------------


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


def _parser() -> argparse.ArgumentParser:
    from model.cli import OneLineParser, existing_dir, int_at_least

    parser = OneLineParser(
        prog="python -m model.data.pseudo_labels", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--dataroot", type=existing_dir, required=True, help="nuScenes-format dataroot")
    add("--version", default="v1.0-mini", help="table version folder (default v1.0-mini)")
    add(
        "--labeler",
        choices=("mask2former", "synthetic"),
        default="mask2former",
        help="Mask2Former, or the simulation for synthetic dataroots (default mask2former)",
    )
    add(
        "--protocol",
        choices=tuple(PSEUDO_CLASSES),
        default="hdmapnet",
        help="perspective class protocol (hdmapnet; hdmapnet_filled reads hdmapnet's)",
    )
    add("--checkpoint", type=existing_dir, help="local Mask2Former Vistas checkpoint dir")
    add("--batch-size", type=int_at_least(1), default=8, help="mask2former: images per batch")
    add("--device", default=None, help="mask2former: cpu, cuda or cuda:N (default: cuda if any)")
    add("--noise", choices=NOISE_LEVELS, default="medium", help="synthetic: corruption preset")
    add("--seed", type=int_at_least(0), default=0, help="synthetic: corruption seed")
    add("--overwrite", action="store_true", help="synthetic: replace labels")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def _check_device(parser, device: str) -> None:
    import torch

    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return
    if kind != "cuda" or not (index == "" or index.isdigit()):
        parser.reject("--device", f"expected cpu, cuda or cuda:N, got {device!r}")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index or 0) >= available:
        parser.reject("--device", f"{device} is not available here ({available} CUDA devices)")


def main(argv: Sequence[str] | None = None) -> int:
    from model.cli import one_line
    from model.data.errors import DataError

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        root = check_dataroot(args.dataroot, args.version)
    except DataError as exc:
        parser.reject("--version", one_line(exc))
    if args.labeler == "mask2former":
        if args.checkpoint is None:
            parser.reject("--checkpoint", "a checkpoint DIR is required for --labeler mask2former")
        if not (args.checkpoint / "config.json").is_file():
            parser.reject(
                "--checkpoint",
                f"{args.checkpoint} has no config.json (expected a directory written by "
                "save_pretrained)",
            )
        if args.device is not None:
            _check_device(parser, args.device)
    elif not (root / "synthetic.json").is_file():
        parser.reject(
            "--labeler",
            f"synthetic needs a dataroot made by python -m model.data.synthetic "
            f"({root} has no synthetic.json)",
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.labeler == "mask2former":
            report = run_mask2former(
                root,
                args.version,
                args.checkpoint,
                protocol=args.protocol,
                batch_size=args.batch_size,
                device=args.device,
                progress=not args.quiet,
            )
        else:
            report = run_synthetic(
                root,
                args.version,
                protocol=args.protocol,
                noise_level=args.noise,
                seed=args.seed,
                progress=not args.quiet,
                overwrite=args.overwrite,
            )
    except DataError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(
        f"{args.labeler}: wrote {report.written} labels, skipped {report.skipped} existing, "
        f"{report.images_per_s:.2f} images/s"
    )
    if args.labeler == "synthetic":
        noise = read_noise_report(root, args.protocol, args.noise)
        print(
            f"simulated noise {noise['noise_level']}: "
            f"pixel error rate {noise['pixel_error_rate']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

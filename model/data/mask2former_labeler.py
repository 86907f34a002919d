"""The ``mask2former`` labeller: Hugging Face transformers' ``Mask2FormerForUniversalSegmentation``
with a Mapillary Vistas semantic checkpoint from a local directory, batched, on the GPU in bf16
when there is one. Vistas classes map to ours by name (``model.data.pseudo_classes``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.data.images import read_image
from model.data.keyframes import camera_images, check_dataroot
from model.data.label_cache import write_png
from model.data.pseudo_classes import class_lookup
from model.data.pseudo_sources import LabelerReport, pseudo_label_path

log = logging.getLogger(__name__)


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

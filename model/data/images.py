"""Camera images: decoding (a clear error naming a corrupt file) and the model's input format
(resized, ImageNet-normalised RGB)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from model.data.errors import CorruptImageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def read_image(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """Decode an image file; ``CorruptImageError`` naming the file when it cannot be."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    if path.suffix.lower() in (".jpg", ".jpeg") and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise CorruptImageError(path, "truncated JPEG (no end-of-image marker)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise CorruptImageError(path)
    return image


_PIXEL_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)[:, None, None]
_PIXEL_OFFSET = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)[:, None, None]
_REDUCED_READS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                  (2, cv2.IMREAD_REDUCED_COLOR_2))  # fmt: skip


def load_camera_image(
    path: Path,
    image_size: tuple[int, int],
    original_size: tuple[int, int] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """(3, H, W) float32 RGB, resized to ``image_size`` and ImageNet-normalised.

    With the ``original_size`` known, a JPEG is decoded at 1/2, 1/4 or 1/8 scale when that is
    still at least ``image_size`` (libjpeg scales in the DCT domain, much faster than decoding
    everything and shrinking).
    """
    height, width = image_size
    flags = cv2.IMREAD_COLOR
    if original_size is not None:
        for factor, reduced in _REDUCED_READS:
            if original_size[0] // factor >= height and original_size[1] // factor >= width:
                flags = reduced
                break
    bgr = read_image(path, flags)
    if bgr.shape[:2] != (height, width):
        shrink = bgr.shape[0] > height or bgr.shape[1] > width
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        bgr = cv2.resize(bgr, (width, height), interpolation=interpolation)
    out = np.empty((3, height, width), np.float32) if out is None else out
    for channel, plane in enumerate(reversed(cv2.split(bgr))):  # BGR -> RGB
        out[channel] = plane
    out *= _PIXEL_SCALE
    out += _PIXEL_OFFSET
    return out



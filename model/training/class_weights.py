"""Class weights for the cross-entropy terms, counted from the data a phase trains on.

Square-root balancing, ``w_c = sqrt(f_background / f_c)`` clipped to [1, ``max_weight``]: full
inverse frequency would weigh a 1 %-class 80x and make the background noisy; without any, a
small labelled set collapses to all-background on unseen scenes, and pretraining on ~90 % road
pixels predicts background everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from model.data.labels import is_multilabel
from model.names import IGNORE

log = logging.getLogger(__name__)


def balanced_class_weights(dataset, max_weight: float = 10.0) -> tuple[float, ...]:
    """Weights from the BEV class frequencies of ``dataset``'s labelled samples' labels
    (background gets 1)."""
    n = dataset.label_cfg.num_classes
    counts = np.zeros(n, np.int64)
    for rec in dataset.labelled_records:
        label = dataset.label_cache.load(rec.sample_token)
        counts += np.bincount(label.reshape(-1).astype(np.int64), minlength=n)[:n]
    return _sqrt_balanced(counts, max_weight)


def pseudo_label_class_weights(
    dataset, max_weight: float = 10.0, max_images: int = 1200, seed: int = 0
) -> tuple[float, ...]:
    """The same rule for the reprojection term: class frequencies over the pseudo-label pixels
    of ``dataset`` (ignore excluded), from at most ``max_images`` label images drawn at random
    (the frequencies of a large split settle long before its end)."""
    n = dataset.label_cfg.num_classes
    images = [p for rec in dataset.records for p in rec.image_paths]
    if len(images) > max_images:
        pick = np.random.default_rng(seed).choice(len(images), max_images, replace=False)
        images = [images[i] for i in sorted(pick)]
    counts = np.zeros(n, np.int64)
    for path in images:
        label = dataset.load_pseudo_label(path)
        counts += np.bincount(label[label != IGNORE].astype(np.int64), minlength=n)[:n]
    return _sqrt_balanced(counts, max_weight)


def _sqrt_balanced(counts: np.ndarray, max_weight: float) -> tuple[float, ...]:
    freq = counts.astype(np.float64) / max(counts.sum(), 1)
    weights = np.sqrt(freq[0] / np.maximum(freq, 1e-12))
    weights[0] = 1.0
    return tuple(float(w) for w in np.clip(weights, 1.0, max_weight))


def resolve_class_weights(
    setting, protocol: str, compute: Callable[[], tuple[float, ...]], term: str
) -> tuple[float, ...] | None:
    """A class-weight setting as a phase uses it: a tuple or None as given, "auto" computed
    (None for multi-label protocols, whose BCE terms take no class weights)."""
    if setting != "auto":
        return setting
    weights = None if is_multilabel(protocol) else compute()
    log.info("%s class weights (auto): %s", term, [round(w, 2) for w in weights or []])
    return weights

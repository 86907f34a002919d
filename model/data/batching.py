"""Batches of the datasets' sample dicts: seeded shuffling, seeded workers, pinned memory."""

from __future__ import annotations

import os
import random

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch: tensors gain a leading batch dim, strings become lists."""
    return default_collate(samples)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with seeded shuffling and workers, pinned memory when CUDA is available."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def default_num_workers() -> int:
    """A sensible worker count: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus))

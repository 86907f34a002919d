"""BEV label cache: rasterise every keyframe's label once, in parallel, and keep it on disk.

Layout: ``CACHE/bev_labels/<dataset fingerprint>-<label config key>/<sample_token>.png`` (one
uint8 image per sample, see ``labels.pack_label``) plus ``config.json``. Files are written to a
temporary name and renamed (``os.replace``), so a killed build never leaves a half-written label;
a file lock keeps concurrent builders (several trials on one machine) from duplicating work.

``python -m model.data.prepare`` (model/data/prepare.py) precomputes the labels of every
split so training never waits for them; the dataset builds what is missing on first use.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from filelock import FileLock
from tqdm import tqdm

from model.data.labels import LabelConfig, pack_label, unpack_label
from model.data.rasterise import rasterise_bev_label

log = logging.getLogger(__name__)

# Below this many missing labels a process pool costs more than it saves (a worker pays a few
# seconds of imports and map loading; a label takes tens of milliseconds).
_MIN_LABELS_FOR_POOL = 256


def default_cache_dir() -> Path:
    """``$BEVLABELS_CACHE_DIR`` or ``~/.cache/bevlabels``."""
    env = os.environ.get("BEVLABELS_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "bevlabels"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_png(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    atomic_write_bytes(path, encoded.tobytes())


@dataclass(frozen=True)
class LabelJob:
    """What one label needs: which sample, where, and the ego pose."""

    sample_token: str
    location: str
    global_from_ego: np.ndarray


class LabelCache:
    """The cached labels of one dataset under one label config."""

    def __init__(self, cache_dir: Path, fingerprint: str, cfg: LabelConfig) -> None:
        self.cfg = cfg
        self.root = Path(cache_dir) / "bev_labels" / f"{fingerprint}-{cfg.cache_key()}"
        self.fingerprint = fingerprint

    def path(self, sample_token: str) -> Path:
        return self.root / f"{sample_token}.png"  # _build_one writes the same name

    def missing(self, tokens: Sequence[str]) -> list[str]:
        return [t for t in tokens if not self.path(t).is_file()]

    def load(self, sample_token: str) -> np.ndarray:
        path = self.path(sample_token)
        packed = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if packed is None:
            raise FileNotFoundError(f"BEV label {path} is missing or unreadable")
        return unpack_label(packed, self.cfg)

    def ensure(
        self,
        jobs: Sequence[LabelJob],
        dataroot: Path,
        num_workers: int | None = None,
        progress: bool = True,
    ) -> float:
        """Build the labels of ``jobs`` that are not cached yet; returns seconds spent building."""
        if not self.missing([j.sample_token for j in jobs]):
            return 0.0
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root) + ".lock"):
            todo = [j for j in jobs if not self.path(j.sample_token).is_file()]
            if not todo:  # another process built them while we waited
                return 0.0
            start = time.perf_counter()
            _build(todo, Path(dataroot), self, num_workers, progress)
            atomic_write_bytes(
                self.root / "config.json",
                json.dumps(
                    {"fingerprint": self.fingerprint, "label_config": self.cfg.to_dict()},
                    indent=2,
                ).encode(),
            )
            elapsed = time.perf_counter() - start
            log.info(
                "built %d BEV labels in %.1f s (%.1f labels/s) into %s",
                len(todo),
                elapsed,
                len(todo) / max(elapsed, 1e-9),
                self.root,
            )
            return elapsed


# --- building ------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(dataroot: str, location: str, cfg: dict, cache_root: str) -> None:
    from nuscenes.map_expansion.map_api import NuScenesMap

    cv2.setNumThreads(1)
    _WORKER["map"] = NuScenesMap(dataroot=dataroot, map_name=location)
    _WORKER["cfg"] = LabelConfig(**cfg)
    _WORKER["root"] = Path(cache_root)


def _build_one(job: tuple[str, list]) -> str:
    token, pose = job
    cfg = _WORKER["cfg"]
    label = rasterise_bev_label(_WORKER["map"], np.asarray(pose), cfg)
    write_png(_WORKER["root"] / f"{token}.png", pack_label(label, cfg))
    return token


def _pool_context():
    # Not plain fork: the caller may hold threads (torch, Ray, cv2). A fork server is a clean
    # single-threaded process that imports the rasteriser once and forks workers from there.
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["model.data.label_cache"])
    return ctx


def _build(
    jobs: Sequence[LabelJob],
    dataroot: Path,
    cache: LabelCache,
    num_workers: int | None,
    progress: bool,
) -> None:
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 8)
    by_location: dict[str, list[LabelJob]] = defaultdict(list)
    for job in jobs:
        by_location[job.location].append(job)
    init_args = lambda loc: (  # noqa: E731
        str(dataroot),
        loc,
        cache.cfg.to_dict(),
        str(cache.root),
    )
    with tqdm(total=len(jobs), desc="BEV labels", unit="label", disable=not progress) as bar:
        # One pool per map location: each worker holds only one vector map in memory.
        for location, loc_jobs in sorted(by_location.items()):
            payload = [(j.sample_token, j.global_from_ego.tolist()) for j in loc_jobs]
            if num_workers <= 1 or len(loc_jobs) < _MIN_LABELS_FOR_POOL:
                _init_worker(*init_args(location))
                for item in payload:
                    _build_one(item)
                    bar.update()
                _WORKER.clear()
                continue
            ctx = _pool_context()
            workers = min(num_workers, len(loc_jobs))
            with ctx.Pool(workers, initializer=_init_worker, initargs=init_args(location)) as pool:
                chunk = max(1, min(32, len(payload) // (workers * 4)))
                for _ in pool.imap_unordered(_build_one, payload, chunksize=chunk):
                    bar.update()

"""``generate_dataset``: worlds -> rendered scenes -> nuScenes tables, written atomically."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from model.data.synthetic import maps, render, tables, texture
from model.data.synthetic.markings import WHITE, YELLOW
from model.data.synthetic.rig import camera_rig, ego_from_lidar
from model.data.synthetic.world import World, make_world

log = logging.getLogger(__name__)

# Bump whenever the same arguments would produce different files.
GENERATOR_VERSION = "1.1.0"  # 1.1: maps/paint/<location>.json

KINDS = ("cross", "curve", "tee", "straight")
JPEG_QUALITY = 90
PNG_COMPRESSION = 3
BASE_TIMESTAMP_US = 1_533_110_400_000_000  # 2018-08-01 UTC
MIN_IMAGE_SIDE = 16


@dataclass(frozen=True)
class GeneratorArgs:
    scenes: int
    samples_per_scene: int
    image_size: tuple[int, int]
    seed: int

    def validate(self) -> None:
        for name in ("scenes", "samples_per_scene", "seed"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.scenes < 1:
            raise ValueError(f"scenes must be >= 1, got {self.scenes}")
        if self.samples_per_scene < 1:
            raise ValueError(f"samples_per_scene must be >= 1, got {self.samples_per_scene}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        size = self.image_size
        if (
            len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)
            or min(size) < MIN_IMAGE_SIDE
        ):
            raise ValueError(
                f"image_size must be (height, width) integers >= {MIN_IMAGE_SIDE}, got {size!r}"
            )


def split_of(index: int, scenes: int) -> str:
    """Every third scene is validation (and the last one when that gives none)."""
    if scenes >= 3:
        return "val" if index % 3 == 2 else "train"
    return "val" if index == scenes - 1 else "train"


def texel_m(image_hw: tuple[int, int]) -> float:
    """Ground texture resolution: finer for bigger images (6 cm at 400 px wide)."""
    return float(np.clip(0.06 * 400 / image_hw[1], 0.06, 0.1))


def _place(worlds: list[World], locations: list[str], rng: np.random.Generator) -> None:
    """Rotate each world randomly and put it in its own square of its location's map."""
    for loc in sorted(set(locations)):
        members = [i for i, lo in enumerate(locations) if lo == loc]
        radius = []
        for i in members:
            x0, y0, x1, y1 = worlds[i].bounds
            radius.append(math.hypot(max(-x0, x1), max(-y0, y1)))
        cell = 2 * max(radius) + 20.0
        cols = max(int(math.ceil(math.sqrt(len(members)))), 1)
        for j, i in enumerate(members):
            row, col = divmod(j, cols)
            theta = float(rng.uniform(0, 2 * np.pi))
            mirror = -1.0 if tables.LEFT_HAND_TRAFFIC[loc] else 1.0
            a = np.eye(3)
            c, s = math.cos(theta), math.sin(theta)
            a[:2, :2] = np.array([[c, -s], [s, c]]) @ np.diag([1.0, mirror])
            a[:2, 2] = (50.0 + (col + 0.5) * cell, 50.0 + (row + 0.5) * cell)
            worlds[i].global_from_local = a


def _pool_context():
    # Not plain fork: the caller may hold threads (cv2's pool, torch, Ray), and a child forked
    # while one of them holds a lock hangs in cv2.setNumThreads (seen in the test suite). A
    # fork server is a clean single-threaded process that imports the renderer once.
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["model.data.synthetic.generate"])
    return ctx


def _worker_init() -> None:
    # One thread per worker: the pool already uses every core.
    cv2.setNumThreads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional; the renderer avoids BLAS in its hot paths anyway
        return
    threadpool_limits(1)


@dataclass
class _Job:
    index: int
    name: str
    location: str
    logfile: str
    world: World
    args: GeneratorArgs
    root: str


def _render_scene(job: _Job) -> tables.SceneInfo:
    args = job.args
    rig = camera_rig(args.image_size)
    rng = np.random.default_rng([args.seed, job.index, 1])
    look = texture.Look.draw(rng, wear=float(rng.uniform(0.0, 0.6)))
    tex = texture.GroundTexture(job.world, look, rng, texel_m(args.image_size))
    sky = render.Skyline(rng)
    rays = [render.CameraRays(cam, tex.res_m, look) for cam in rig]
    lidar_pose = ego_from_lidar()
    lidar_from_ego = render.rigid_inverse(lidar_pose)
    root = Path(job.root)
    timestamps = [
        BASE_TIMESTAMP_US + job.index * 3_600_000_000 + k * 500_000
        for k in range(args.samples_per_scene)
    ]
    files: dict[str, list[str]] = {cam.name: [] for cam in rig}
    files["LIDAR_TOP"] = []
    counts = []
    for k, ts in enumerate(timestamps):
        for ci, cam_rays in enumerate(rays):
            frame_rng = np.random.default_rng([args.seed, job.index, 2, k, ci])
            frame = render.render_camera(cam_rays, tex, sky, look, job.world, k, frame_rng)
            ch = cam_rays.cam.name
            stem = f"{job.logfile}__{ch}__{ts}"
            rel = f"samples/{ch}/{stem}.jpg"
            cv2.imwrite(
                str(root / rel), frame.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
            )
            cv2.imwrite(
                str(root / "semantic" / ch / f"{stem}.png"),
                frame.semantic,
                [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION],
            )
            files[ch].append(rel)
        pts, n_in_box = render.lidar_points(job.world, tex, k, lidar_from_ego, lidar_pose)
        rel = f"samples/LIDAR_TOP/{job.logfile}__LIDAR_TOP__{ts}.pcd.bin"
        pts.tofile(root / rel)
        files["LIDAR_TOP"].append(rel)
        counts.append(n_in_box)
    return tables.SceneInfo(
        index=job.index,
        name=job.name,
        location=job.location,
        logfile=job.logfile,
        timestamps=timestamps,
        files=files,
        lidar_counts=counts,
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=indent))


def _workers(jobs: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, jobs))


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Raise (before anything is written) if ``out_dir`` cannot take a new dataroot."""
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise FileExistsError(f"--out {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(
                f"--out {out_dir} exists and is not empty (pass --overwrite to replace it)"
            )
    parent = out_dir.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"--out {out_dir}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out_dir}: {probe} is not writable")


def generate_dataset(
    out_dir: Path,
    *,
    scenes: int = 12,
    samples_per_scene: int = 20,
    image_size: tuple[int, int] = (225, 400),
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a synthetic nuScenes-format dataroot (``v1.0-mini``) to ``out_dir``; returns it.

    The dataroot is built in a temporary directory beside ``out_dir`` and renamed into place,
    so a crash never leaves a partial dataroot. Raises ``ValueError`` for bad arguments and
    ``FileExistsError``/``NotADirectoryError``/``PermissionError`` for an unusable ``out_dir``,
    before writing anything.
    """
    try:
        size = tuple(image_size)
    except TypeError:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}") from None
    args = GeneratorArgs(scenes, samples_per_scene, size, seed)
    args.validate()
    out_dir = Path(out_dir).absolute()
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    rng = np.random.default_rng([seed, 0xC1])
    kind_offset = int(rng.integers(0, len(KINDS)))
    locations = [tables.LOCATIONS[i % len(tables.LOCATIONS)] for i in range(scenes)]
    worlds = []
    for i in range(scenes):
        # Locations alternate; each location cycles through every kind of world.
        kind = KINDS[(i // 2 + 2 * (i % 2) + kind_offset) % len(KINDS)]
        centre = YELLOW if locations[i] == "boston-seaport" else WHITE
        world_rng = np.random.default_rng([seed, i, 0])
        worlds.append(make_world(world_rng, kind, samples_per_scene, centre, np.eye(3)))
    _place(worlds, locations, rng)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private
        rig = camera_rig(args.image_size)
        for cam in rig:
            (tmp / "samples" / cam.name).mkdir(parents=True)
            (tmp / "semantic" / cam.name).mkdir(parents=True)
        (tmp / "samples" / "LIDAR_TOP").mkdir(parents=True)
        (tmp / "maps" / "expansion").mkdir(parents=True)
        (tmp / "maps" / "paint").mkdir(parents=True)
        (tmp / "v1.0-mini").mkdir()

        jobs = [
            _Job(
                index=i,
                name=f"scene-{i:04d}",
                location=locations[i],
                logfile=f"n000-synthetic-s{seed}-{i:04d}",
                world=worlds[i],
                args=args,
                root=str(tmp),
            )
            for i in range(scenes)
        ]
        n_images = scenes * samples_per_scene * len(rig)
        infos: list[tables.SceneInfo] = []
        workers = _workers(len(jobs))
        with tqdm(total=n_images, unit="img", desc="synthetic", disable=not progress) as bar:
            if workers == 1:
                _worker_init()
                results = map(_render_scene, jobs)
                for info in results:
                    infos.append(info)
                    bar.update(samples_per_scene * len(rig))
            else:
                with _pool_context().Pool(workers, initializer=_worker_init) as pool:
                    for info in pool.imap(_render_scene, jobs):
                        infos.append(info)
                        bar.update(samples_per_scene * len(rig))
        render_s = time.perf_counter() - start

        tok = tables.Tokens(seed)
        for name, records in tables.build_tables(infos, worlds, rig, tok).items():
            _write_json(tmp / "v1.0-mini" / f"{name}.json", records)
        basemap_res = {}
        for loc in sorted(set(locations)):
            members = [(i, worlds[i]) for i in range(scenes) if locations[i] == loc]
            _write_json(
                tmp / "maps" / "expansion" / f"{loc}.json", maps.map_json(loc, members, tok)
            )
            _write_json(
                tmp / "maps" / "paint" / f"{loc}.json",
                maps.paint_json(loc, [w for _, w in members]),
            )
            img, res = maps.basemap([w for _, w in members])
            basemap_res[loc] = res
            cv2.imwrite(
                str(tmp / "maps" / f"{tok('map', loc)}.png"),
                img,
                [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION],
            )
        splits = {"train": [], "val": []}
        for info in infos:
            splits[split_of(info.index, scenes)].append(info.name)
        _write_json(tmp / "splits.json", splits, indent=2)
        _write_json(
            tmp / "synthetic.json",
            {
                "generator": "model.data.synthetic",
                "generator_version": GENERATOR_VERSION,
                "args": {
                    "scenes": scenes,
                    "samples_per_scene": samples_per_scene,
                    "image_size": list(args.image_size),
                    "seed": seed,
                },
                "version": "v1.0-mini",
                "locations": sorted(set(locations)),
                "basemap_resolution_m": basemap_res,
                "scenes": [
                    {
                        "name": info.name,
                        "location": info.location,
                        "kind": worlds[info.index].kind,
                        "split": split_of(info.index, scenes),
                    }
                    for info in infos
                ],
            },
            indent=2,
        )
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "dataroot")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    wall = time.perf_counter() - start
    msg = (
        f"synthetic dataroot {out_dir}: {scenes} scenes, {n_images} images in {wall:.1f} s "
        f"({n_images / max(render_s, 1e-9):.1f} images/s rendering, {workers} workers)"
    )
    log.info(msg)
    if progress:
        print(msg)
    return out_dir

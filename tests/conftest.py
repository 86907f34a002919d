"""Shared fixtures: small datasets the tests make themselves."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

# A dataroot small enough to build in seconds and big enough for a train/val split and
# label-fraction subsets (6 scenes: 4 train, 2 val).
SMALL_SYNTHETIC = dict(scenes=6, samples_per_scene=6, image_size=(90, 160), seed=0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A synthetic nuScenes-format dataroot shared by the whole session (read-only for tests)."""
    from model.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("synthetic") / "dataroot"
    generate_dataset(out, progress=False, **SMALL_SYNTHETIC)
    return out


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted at `folder` (``mount -o OPTIONS``) for the block; skips the test where
    this process may not mount (root or CAP_SYS_ADMIN needed)."""
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)

"""Shared fixtures: small datasets the tests make themselves."""

from __future__ import annotations

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

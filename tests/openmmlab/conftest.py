"""The OpenMMLab tier: runs only inside the ``openmmlab`` extra's environment (.ci/openmmlab.sh).

It fails, never skips, when mmcv's ops are missing: a broken build must fail CI. The default
test run does not collect this folder (``--ignore=tests/openmmlab`` in the default addopts).
"""

from __future__ import annotations

from pathlib import Path

import pytest

try:
    import mmcv
    import mmcv.ops  # noqa: F401
    from mmcv.ops import MultiScaleDeformableAttention  # noqa: F401
except Exception as err:  # ImportError, or a build whose _ext cannot load
    raise ImportError(
        "the openmmlab tier needs mmcv 2.1.0 with its compiled ops (`import mmcv.ops` failed: "
        f"{err!r}); build the extra with `bash .ci/openmmlab.sh` (docs/openmmlab.md) and run "
        "the tier with the venv's python"
    ) from err

if mmcv.__version__ != "2.1.0":
    raise ImportError(f"the openmmlab tier pins mmcv 2.1.0, found {mmcv.__version__}")

# Small enough to generate in seconds: 3 scenes (2 train, 1 val) of 3 keyframes.
TINY_SYNTHETIC = dict(scenes=3, samples_per_scene=3, image_size=(48, 80), seed=0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A synthetic nuScenes-format dataroot shared by the tier (read-only for tests)."""
    from model.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("synthetic") / "dataroot"
    generate_dataset(out, progress=False, **TINY_SYNTHETIC)
    return out

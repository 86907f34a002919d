#!/usr/bin/env bash
# OpenMMLab tier: builds the `openmmlab` extra (mmcv 2.1.0 from source with its compiled ops,
# mmdet 3.2.0, mmdet3d 1.4.0) in a separate virtual environment that reuses the system torch, then
# runs tests/openmmlab inside it. Idempotent: an existing venv whose `mmcv.ops` imports is reused.
# A missing or broken mmcv fails the tier (tests/openmmlab/conftest.py), it never skips.
#
#   bash .ci/openmmlab.sh              build if needed, then test
#   bash .ci/openmmlab.sh --build-only build if needed
#
# Environment: OPENMMLAB_VENV (default .venv-openmmlab), PYTHON (the interpreter with torch that
# the venv is made from; default python), MAX_JOBS (default: number of cores),
# OPENMMLAB_WHEEL_DIR (where built mmcv wheels are kept; default ~/.cache/bevlabels/wheels).
# Budget on a clean 2-core machine: about 12 minutes, almost all of it the mmcv build.
set -euo pipefail
cd "$(dirname "$0")/.."

export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
VENV=${OPENMMLAB_VENV:-.venv-openmmlab}
PY="$VENV/bin/python"
start=$(date +%s)
step() { echo "::: openmmlab: $* ($(($(date +%s) - start)) s)"; }

ops_ok() {
    [ -x "$PY" ] && "$PY" - <<'EOF' >/dev/null 2>&1
import mmcv, mmcv.ops, mmdet, mmdet3d  # noqa: F401  (mmdet/mmdet3d check the mmcv version)
from mmcv.ops import MultiScaleDeformableAttention  # noqa: F401
from mmcv.utils import ext_loader
ext_loader.load_ext("_ext", ["ms_deform_attn_forward"])  # the compiled op, not just the fallback
import torch
from mmcv.ops import get_compiling_cuda_version
# A CPU-only build on a CUDA machine has no kernel for the GPU: rebuild.
assert not torch.cuda.is_available() or get_compiling_cuda_version() != "not available"
EOF
}

# mmcv 2.1.0 is sdist-only on PyPI. Its setup.py passes -std=c++17 after torch's own flags, but
# torch >= 2.10 headers need C++20 ("#error C++20 or later compatible compiler is required"), so
# the sdist is unpacked and its -std flag raised to C++20 when the installed torch asks for it.
# The wheel is kept per torch version (and CPU / CUDA ops), so rebuilding the venv does not
# recompile.
install_mmcv() {
    local torch_version torch_include ops wheels src
    torch_version=$("$PY" -c "import sys, torch; print(f'{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}')")
    torch_include=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
    # mmcv compiles its CUDA kernels when torch sees a GPU (or FORCE_CUDA=1): cache them apart.
    ops=$("$PY" -c "import os, torch; print('cuda' if torch.cuda.is_available() or os.environ.get('FORCE_CUDA') == '1' else 'cpu')")
    wheels=${OPENMMLAB_WHEEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bevlabels/wheels}/torch-$torch_version-$ops
    if ! ls "$wheels"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
        step "building mmcv 2.1.0 with its ops against torch $torch_version (the long step)"
        src=$(mktemp -d)
        "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$src" mmcv==2.1.0
        tar -xzf "$src"/mmcv-2.1.0.tar.gz -C "$src"
        if grep -q "C++20" "$torch_include/ATen/ATen.h"; then
            sed -i 's/-std=c++17/-std=c++20/g' "$src/mmcv-2.1.0/setup.py"
        fi
        mkdir -p "$wheels"
        MAX_JOBS=${MAX_JOBS:-$(nproc)} CFLAGS=-g0 CXXFLAGS=-g0 \
            "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$wheels" "$src/mmcv-2.1.0"
        rm -rf "$src"
    fi
    step "installing mmcv 2.1.0 from $wheels"
    # --force-reinstall: replaces a CPU-only build when the venv is reused on a CUDA machine.
    "$PY" -m pip install -q --force-reinstall --no-deps "$wheels"/mmcv-2.1.0-*.whl
}

if ops_ok; then
    step "reusing $VENV (mmcv.ops imports)"
else
    step "creating $VENV"
    # --system-site-packages: reuse the torch already installed (mmcv compiles against it).
    [ -x "$PY" ] || "${PYTHON:-python}" -m venv --system-site-packages "$VENV"
    # No build isolation for mmcv: an isolated build gets setuptools>=82, which has no
    # pkg_resources, and a torch-less environment. So the build tools go in first, pinned.
    "$PY" -m pip install -q "setuptools>=77.0.3,<82" wheel ninja mmengine==0.10.7 "numpy<2"
    install_mmcv
    # numpy<2 again: otherwise pip resolves nuscenes-devkit 1.1.11, whose matplotlib pin has no
    # wheel for this Python and its sdist cannot build offline.
    step "installing mmdet 3.2.0 and mmdet3d 1.4.0"
    "$PY" -m pip install -q mmdet==3.2.0 mmdet3d==1.4.0 "numpy<2"
    ops_ok || { echo "mmcv.ops does not import in $VENV after the build" >&2; exit 1; }
fi

step "installing this project into $VENV (no deps: they come from the system site)"
"$PY" -m pip install -q --no-deps -e .
"$PY" -m pip install -q "pytest>=8.0" "pytest-timeout>=2.2"

if [ "${1:-}" = "--build-only" ]; then
    step "built"
    exit 0
fi

step "tier tests"
rc=0
# -o addopts='': the default addopts deselect slow tests and ignore this very folder.
"$PY" -m pytest tests/openmmlab -p no:cacheprovider -o addopts='' -ra || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "openmmlab tier collected no tests: failing" >&2
    exit 1
fi
step "done (rc=$rc)"
exit "$rc"

"""Multi-scale deformable attention: the grid_sample reference and the fast paths against an
independent float64 implementation written with explicit loops."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.network.deform_attn import (
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_pytorch,
    resolve_impl,
    triton_available,
)

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(5, 7), (3, 4), (1, 2)]  # non-square levels, one of them a single row


def random_inputs(seed: int = 0, batch=2, queries=6, heads=2, head_dim=4, points=3, margin=0.3):
    """Locations spill past the map by ``margin`` on every side to exercise zero padding."""
    gen = torch.Generator().manual_seed(seed)
    keys = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, keys, heads, head_dim, generator=gen)
    loc = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=gen)
    loc = loc * (1 + 2 * margin) - margin
    attn = torch.rand(batch, queries, heads, len(SHAPES), points, generator=gen)
    attn = attn / attn.sum(dim=(-1, -2), keepdim=True)
    return value, loc, attn


def msda_float64_loops(value, shapes, loc, attn) -> torch.Tensor:
    """Deformable attention the slow, obvious way: loop over every sample, read four pixels."""
    value, loc, attn = value.double(), loc.double(), attn.double()
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = loc.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(points):
                        # Pixel centre i sits at normalised (i + 0.5) / size.
                        x = float(loc[b, q, m, lvl, p, 0]) * w - 0.5
                        y = float(loc[b, q, m, lvl, p, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(head_dim, dtype=torch.float64)
                        for yi in (y0, y0 + 1):
                            for xi in (x0, x0 + 1):
                                if 0 <= yi < h and 0 <= xi < w:
                                    weight = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                    sample += weight * value[b, starts[lvl] + yi * w + xi, m]
                        out[b, q, m] += attn[b, q, m, lvl, p] * sample
    return out.view(batch, queries, heads * head_dim)


def test_reference_matches_float64_loops_in_float32():
    value, loc, attn = random_inputs()
    got = multi_scale_deformable_attn_pytorch(value, SHAPES, loc, attn)
    expected = msda_float64_loops(value, SHAPES, loc, attn)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_reference_reads_pixel_centres_exactly():
    value, loc, attn = random_inputs(seed=1, batch=1, queries=1, heads=1, points=1)
    h, w = SHAPES[0]
    row, col = 3, 5
    loc[..., 0], loc[..., 1] = (col + 0.5) / w, (row + 0.5) / h
    attn[:] = 0.0
    attn[:, :, :, 0] = 1.0
    got = multi_scale_deformable_attn_pytorch(value, SHAPES, loc, attn)
    torch.testing.assert_close(got[0, 0], value[0, row * w + col, 0])


def test_reference_gradients_match_finite_differences_in_float64():
    value, loc, attn = random_inputs(seed=2, batch=1, queries=3, heads=2, head_dim=2, points=2)
    inputs = tuple(t.double().requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, xy, a: multi_scale_deformable_attn_pytorch(v, SHAPES, xy, a), inputs
    )


def test_auto_uses_the_reference_on_cpu_and_refuses_unavailable_fast_paths():
    assert resolve_impl("auto", torch.device("cpu")) == "pytorch"
    assert resolve_impl("pytorch", torch.device("cpu")) == "pytorch"
    with pytest.raises(RuntimeError, match="mmcv"):
        resolve_impl("mmcv", torch.device("cpu"))
    with pytest.raises(ValueError):
        resolve_impl("cuda-magic", torch.device("cpu"))
    value, loc, attn = random_inputs()
    torch.testing.assert_close(
        multi_scale_deformable_attn(value, SHAPES, loc, attn, impl="auto"),
        multi_scale_deformable_attn_pytorch(value, SHAPES, loc, attn),
    )


TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from model.network.deform_attn import (
        multi_scale_deformable_attn,
        multi_scale_deformable_attn_pytorch,
    )
    from tests.test_deform_attn import SHAPES, random_inputs, msda_float64_loops

    def rel_err(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    for seed, head_dim in ((0, 4), (1, 6)):  # 6: not a power of two, masked channels
        value, loc, attn = random_inputs(seed=seed, queries=37, head_dim=head_dim)
        inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
        fast = multi_scale_deformable_attn(inputs[0], SHAPES, inputs[1], inputs[2], impl="triton")
        refs = [t.clone().requires_grad_() for t in (value, loc, attn)]
        ref = multi_scale_deformable_attn_pytorch(refs[0], SHAPES, refs[1], refs[2])
        assert rel_err(fast, ref) < 1e-5, ("forward", rel_err(fast, ref))
        assert rel_err(fast, msda_float64_loops(value, SHAPES, loc, attn)) < 1e-5
        grad = torch.randn_like(ref)
        fast_grads = torch.autograd.grad(fast, inputs, grad)
        ref_grads = torch.autograd.grad(ref, refs, grad)
        for name, a, b in zip(("value", "loc", "attn"), fast_grads, ref_grads, strict=True):
            assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))
    print("TRITON_OK")
    """
)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernels_match_reference_in_the_interpreter():
    """The Triton forward and backward kernels, run by TRITON_INTERPRET=1 on CPU tensors.

    A subprocess, because ``triton.jit`` reads the variable when model.network.deform_attn is
    imported.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "TRITON_OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["triton", "mmcv"])
def test_cuda_fast_paths_match_reference(impl):
    if impl == "mmcv":
        pytest.importorskip("mmcv.ops")
    value, loc, attn = (t.cuda() for t in random_inputs(queries=300, head_dim=32))
    inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
    refs = [t.clone().requires_grad_() for t in (value, loc, attn)]
    fast = multi_scale_deformable_attn(inputs[0], SHAPES, inputs[1], inputs[2], impl=impl)
    ref = multi_scale_deformable_attn_pytorch(refs[0], SHAPES, refs[1], refs[2])
    scale = ref.abs().max()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * float(scale))
    grad = torch.randn_like(ref)
    fast_grads = torch.autograd.grad(fast, inputs, grad)
    for a, b in zip(fast_grads, torch.autograd.grad(ref, refs, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))

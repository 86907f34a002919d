"""Our deformable attention against mmcv's: the sampling core, the dispatch, and the layer layouts
the official checkpoints were trained with (transcribed from fundamentalvision/BEVFormer)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mmcv.ops import MultiScaleDeformableAttention
from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch as mmcv_msda
from official_reference import official_msda3d, official_tsa

from model.network.deform_attn import (
    mmcv_available,
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_pytorch,
    resolve_impl,
    triton_available,
)
from model.network.encoder import MSDeformableAttention3D, TemporalSelfAttention

REPO = Path(__file__).resolve().parents[2]
SHAPES = [(6, 9), (3, 5), (1, 3)]  # non-square levels, one a single row


def random_inputs(seed=0, batch=2, queries=7, heads=2, head_dim=8, points=4, margin=0.3):
    """Locations spill past the maps by ``margin`` to exercise the zero padding."""
    gen = torch.Generator().manual_seed(seed)
    keys = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, keys, heads, head_dim, generator=gen)
    loc = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=gen)
    loc = loc * (1 + 2 * margin) - margin
    attn = torch.rand(batch, queries, heads, len(SHAPES), points, generator=gen).softmax(-1)
    return value, loc, attn


def shapes_tensor(shapes=SHAPES) -> torch.Tensor:
    return torch.tensor(shapes, dtype=torch.long)


# --- the sampling core ----------------------------------------------------------------------


def test_mmcv_is_what_the_dispatch_sees():
    assert mmcv_available()


def test_reference_forward_matches_mmcv_fallback_in_float32():
    value, loc, attn = random_inputs()
    ours = multi_scale_deformable_attn_pytorch(value, SHAPES, loc, attn)
    theirs = mmcv_msda(value, shapes_tensor(), loc, attn)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_reference_gradients_match_mmcv_fallback_in_float32():
    grads = []
    for fn, shapes in ((multi_scale_deformable_attn_pytorch, SHAPES), (mmcv_msda, shapes_tensor())):
        value, loc, attn = (t.requires_grad_() for t in random_inputs(seed=1))
        out = fn(value, shapes, loc, attn)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads.append((value.grad, loc.grad, attn.grad))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_auto_dispatch_on_cpu_matches_mmcv_fallback():
    value, loc, attn = random_inputs(seed=2)
    assert resolve_impl("auto", torch.device("cpu")) == "pytorch"
    ours = multi_scale_deformable_attn(value, SHAPES, loc, attn, impl="auto")
    torch.testing.assert_close(ours, mmcv_msda(value, shapes_tensor(), loc, attn))


def test_mmcv_impl_on_cpu_is_refused_with_a_clear_error():
    # mmcv 2.1.0 has no CPU kernel for this op; asking for it must not crash inside mmcv.
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_impl("mmcv", torch.device("cpu"))


TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch as mmcv_msda
    from model.network.deform_attn import multi_scale_deformable_attn
    torch.manual_seed(0)
    shapes = [(6, 9), (3, 5), (1, 3)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 2, 8)
    loc = torch.rand(2, 7, 2, 3, 4, 2) * 1.6 - 0.3
    attn = torch.rand(2, 7, 2, 3, 4).softmax(-1)
    ours = multi_scale_deformable_attn(value, shapes, loc, attn, impl="triton")
    theirs = mmcv_msda(value, torch.tensor(shapes), loc, attn)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    print("TRITON_OK")
    """
)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernel_matches_mmcv_fallback_in_the_interpreter():
    # A subprocess: triton.jit reads TRITON_INTERPRET when model.network.deform_attn is imported.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0 and "TRITON_OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mmcv's compiled op runs on CUDA only")
@pytest.mark.parametrize("impl", ["mmcv", "triton"])
def test_cuda_kernels_match_mmcv_fallback(impl):
    if impl == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    value, loc, attn = (t.cuda() for t in random_inputs(seed=3))
    ours = multi_scale_deformable_attn(value, SHAPES, loc, attn, impl=impl)
    theirs = mmcv_msda(value, shapes_tensor().cuda(), loc, attn)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# --- layer layouts ------------------------------------------------------------------------


def test_spatial_attention_core_has_mmcv_parameter_layout():
    """mmcv's MultiScaleDeformableAttention weights in our MSDeformableAttention3D (one anchor,
    the same reference point on every level) give mmcv's output before its output_proj."""
    torch.manual_seed(0)
    dim, heads, levels, points = 16, 2, len(SHAPES), 4
    theirs = MultiScaleDeformableAttention(
        embed_dims=dim, num_heads=heads, num_levels=levels, num_points=points, dropout=0.0,
        batch_first=True,
    ).eval()  # fmt: skip
    for p in theirs.parameters():  # the init has zero attention weights: make them matter
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        theirs.output_proj.weight.copy_(torch.eye(dim))
        theirs.output_proj.bias.zero_()
    ours = MSDeformableAttention3D(dim, heads, levels, points, impl="pytorch")
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("output_proj")}
    ours.load_state_dict(state)

    batch, queries = 2, 5
    keys = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(batch, queries, dim), torch.randn(batch, keys, dim)
    ref = torch.rand(batch, queries, 1, 2)
    expected = theirs(
        query, value=value, identity=torch.zeros_like(query),
        reference_points=ref.expand(-1, -1, levels, -1), spatial_shapes=shapes_tensor(),
        level_start_index=torch.tensor([0, 54, 69]),
    )  # fmt: skip
    torch.testing.assert_close(ours(query, value, ref, SHAPES), expected, rtol=1e-5, atol=1e-5)


def _random_state(module: torch.nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in module.state_dict().items()}


@pytest.mark.parametrize("num_z", [1, 2, 4])
def test_spatial_attention_matches_official_point_layout(num_z):
    """Point p of a head and level belongs to pillar anchor p % Z (the official reshape)."""
    dim, heads, levels, points = 16, 2, len(SHAPES), 8
    ours = MSDeformableAttention3D(dim, heads, levels, points, impl="pytorch")
    official = _random_state(ours, seed=num_z)
    ours.load_state_dict(official)
    torch.manual_seed(num_z)
    query = torch.randn(2, 5, dim)
    value = torch.randn(2, sum(h * w for h, w in SHAPES), dim)
    ref = torch.rand(2, 5, num_z, 2)
    expected = official_msda3d(official, query, value, ref, shapes_tensor(), heads, levels, points)
    torch.testing.assert_close(ours(query, value, ref, SHAPES), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_history", [False, True])
def test_temporal_attention_matches_official_layout(with_history):
    dim, heads, points, bev_hw = 16, 2, 4, (4, 3)
    ours = TemporalSelfAttention(dim, heads, points, dropout=0.0, impl="pytorch").eval()
    official = _random_state(ours, seed=7)
    ours.load_state_dict(official)
    torch.manual_seed(1)
    n = bev_hw[0] * bev_hw[1]
    query, pos, history, initial = (torch.randn(1, n, dim) for _ in range(4))
    rows = (torch.arange(bev_hw[0]) + 0.5) / bev_hw[0]
    cols = (torch.arange(bev_hw[1]) + 0.5) / bev_hw[1]
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    ref_2d = torch.stack([xx, yy], -1).view(-1, 2)
    kwargs = dict(history=history, initial_query=initial) if with_history else {}
    got = ours(query, pos, ref_2d, bev_hw, **kwargs)
    expected = official_tsa(
        official, query, pos, ref_2d, bev_hw, heads, points,
        prev_bev=history if with_history else None, initial_query=initial,
    )  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

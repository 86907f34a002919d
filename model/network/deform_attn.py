"""Multi-scale deformable attention (Deformable DETR), the sampling core of BEVFormer.

Shapes follow mmcv's ``multi_scale_deformable_attn_pytorch``:

- ``value`` (B, S, M, Dh): S = sum over levels of H_l * W_l keys, M heads of Dh channels,
  levels flattened row-major and concatenated finest first;
- ``spatial_shapes``: the (H_l, W_l) of each level;
- ``sampling_locations`` (B, Q, M, L, P, 2): normalised (x, y) in [0, 1], where 0 and 1 are the
  outer edges of the feature map (``grid_sample(align_corners=False)``): pixel centre i sits at
  (i + 0.5) / W;
- ``attention_weights`` (B, Q, M, L, P);
- result (B, Q, M * Dh): per head, the attention-weighted sum of bilinear samples, zero outside.

Implementations, picked by ``resolve_impl``:

- ``pytorch``: ``F.grid_sample`` per level; the reference, runs anywhere.
- ``mmcv``: mmcv's compiled CUDA op (``MultiScaleDeformableAttnFunction``), when ``mmcv.ops``
  imports and the tensors are on CUDA.
- ``triton``: our Triton kernels (forward and backward) on CUDA; with ``TRITON_INTERPRET=1``
  they also run on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Shapes = Sequence[tuple[int, int]]


def multi_scale_deformable_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: Shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference implementation with ``F.grid_sample``; see the module docstring for shapes."""
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    value_per_level = value.split(sizes, dim=1)
    grids = 2.0 * sampling_locations - 1.0
    samples = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (B, h*w, M, Dh) -> (B*M, Dh, h, w)
        v = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
        # (B, Q, M, P, 2) -> (B*M, Q, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*M, Dh, Q, P)
    weights = attention_weights.transpose(1, 2).reshape(
        batch * heads, 1, num_queries, num_levels * num_points
    )
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # (B*M, Dh, Q)
    return out.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous()


def autocast_off(device: torch.device):
    """A region computed in float32 whatever autocast says (no-op where autocast cannot run)."""
    device_type = torch.device(device).type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Implementation choice


@functools.lru_cache(maxsize=1)
def mmcv_available() -> bool:
    try:
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction  # noqa: F401
    except Exception:  # ImportError, or a broken build raising something else
        return False
    return True


def triton_available() -> bool:
    return triton is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation that ``impl`` ("auto" | "pytorch" | "mmcv" | "triton") means here.

    "auto" is mmcv's compiled op on CUDA when mmcv is installed, else our Triton kernel on CUDA,
    else the PyTorch reference. Asking for a fast path that cannot run here raises.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if impl == "auto":
        if on_cuda and mmcv_available():
            return "mmcv"
        if on_cuda and triton_available():
            return "triton"
        return "pytorch"
    if impl == "mmcv" and not (on_cuda and mmcv_available()):
        raise RuntimeError("attention_impl='mmcv' needs mmcv.ops (openmmlab extra) and CUDA")
    if impl == "triton" and not (triton_available() and (on_cuda or triton_interpreting())):
        raise RuntimeError("attention_impl='triton' needs triton and CUDA (or TRITON_INTERPRET=1)")
    if impl not in ("pytorch", "mmcv", "triton"):
        raise ValueError(f"unknown deformable attention implementation {impl!r}")
    return impl


def multi_scale_deformable_attn(
    value: torch.Tensor,
    spatial_shapes: Shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention with the implementation ``impl`` resolves to.

    The fast paths compute in float32 (as BEVFormer's ``MultiScaleDeformableAttnFunction_fp32``
    does under fp16/bf16 training) and return float32.
    """
    chosen = resolve_impl(impl, value.device)
    if chosen == "pytorch":
        return multi_scale_deformable_attn_pytorch(
            value, spatial_shapes, sampling_locations, attention_weights
        )
    shapes = torch.as_tensor(
        [[int(h), int(w)] for h, w in spatial_shapes], dtype=torch.long, device=value.device
    )
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    args = (
        value.float().contiguous(),
        shapes,
        starts,
        sampling_locations.float().contiguous(),
        attention_weights.float().contiguous(),
    )
    with autocast_off(value.device):
        if chosen == "mmcv":
            from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction

            return MultiScaleDeformableAttnFunction.apply(*args, 64)
        return TritonMSDeformAttn.apply(*args)


# --------------------------------------------------------------------------------------------
# Triton kernels. ``triton.jit`` reads TRITON_INTERPRET when this module is imported: set it
# before the import to run them on CPU tensors (the tests do so in a subprocess).
#
# One program handles BLOCK_Q queries of one (batch, head) pair and all Dh channels. Bilinear
# sampling follows grid_sample(align_corners=False, padding_mode="zeros"): the location
# (x, y) in [0, 1] is pixel (x * W - 0.5, y * H - 0.5), and corners outside the map read zero.
# The backward pass recomputes the four corners, writes d/d(attention) and d/d(location) per
# sampling point, and scatters d/d(value) with atomic adds.


try:
    import triton
    import triton.language as tl
except Exception:  # not installed, or broken
    triton = None

if triton is not None:

    @triton.jit
    def _corner(row_base, y, x, h, w, start, q_mask, M, DH):
        """Element offset of value[b, key(y, x), m, 0] and whether the corner is on the map."""
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w) & q_mask
        key = start + y * w + x
        return (row_base + key.to(tl.int64) * M) * DH, inside

    @triton.jit
    def _queries(Q, S, M, DH, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's queries and channels: their masks, the element row of value[b, 0, m]
        (value[b, s, m, :] lives at ((b * S + s) * M + m) * DH) and each query's row of the
        (B, Q, M) layouts (BLOCK_Q,)."""
        pid_q = tl.program_id(0)
        pid_bm = tl.program_id(1)
        b = pid_bm // M
        m = pid_bm % M
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        row_base = b.to(tl.int64) * S * M + m
        query_row = (b.to(tl.int64) * Q + offs_q) * M + m
        return offs_d, offs_q < Q, offs_d < DH, row_base, query_row

    @triton.jit
    def _level(shapes_ptr, starts_ptr, level):
        """Height, width and first key of feature level `level`."""
        h = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        w = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        return h, w, tl.load(starts_ptr + level).to(tl.int32)

    @triton.jit
    def _point(loc_ptr, attn_ptr, sp, h, w, q_mask):
        """Sampling point `sp` of each query: its attention weight, the fractional parts of its
        pixel position and its top-left corner."""
        lx = tl.load(loc_ptr + sp * 2, mask=q_mask, other=0.0)
        ly = tl.load(loc_ptr + sp * 2 + 1, mask=q_mask, other=0.0)
        a = tl.load(attn_ptr + sp, mask=q_mask, other=0.0)
        x0f = tl.floor(lx * w - 0.5)
        y0f = tl.floor(ly * h - 0.5)
        fx = lx * w - 0.5 - x0f
        fy = ly * h - 0.5 - y0f
        return a, fx, fy, x0f.to(tl.int32), y0f.to(tl.int32)

    @triton.jit
    def _msda_fwd_kernel(
        value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr,  # the inputs
        out_ptr,
        Q, S, M: tl.constexpr, DH: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        offs_d, q_mask, d_mask, row_base, query_row = _queries(Q, S, M, DH, BLOCK_Q, BLOCK_D)
        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
        for level in tl.static_range(L):
            h, w, start = _level(shapes_ptr, starts_ptr, level)
            for point in tl.static_range(P):
                sp = (query_row * L + level) * P + point
                a, fx, fy, x0, y0 = _point(loc_ptr, attn_ptr, sp, h, w, q_mask)
                sample = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
                for dy in tl.static_range(2):
                    for dx in tl.static_range(2):
                        off, inside = _corner(
                            row_base, y0 + dy, x0 + dx, h, w, start, q_mask, M, DH
                        )
                        v = tl.load(
                            value_ptr + off[:, None] + offs_d[None, :],
                            mask=inside[:, None] & d_mask[None, :],
                            other=0.0,
                        )
                        wy = fy if dy == 1 else 1.0 - fy
                        wx = fx if dx == 1 else 1.0 - fx
                        sample += (wy * wx)[:, None] * v
                acc += a[:, None] * sample
        out_ptrs = out_ptr + query_row[:, None] * DH + offs_d[None, :]
        tl.store(out_ptrs, acc, mask=q_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _msda_bwd_kernel(
        value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr,  # the inputs
        grad_out_ptr,
        grad_value_ptr,
        grad_loc_ptr,
        grad_attn_ptr,
        Q, S, M: tl.constexpr, DH: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        offs_d, q_mask, d_mask, row_base, query_row = _queries(Q, S, M, DH, BLOCK_Q, BLOCK_D)
        qd_mask = q_mask[:, None] & d_mask[None, :]
        g = tl.load(
            grad_out_ptr + query_row[:, None] * DH + offs_d[None, :], mask=qd_mask, other=0.0
        )
        for level in tl.static_range(L):
            h, w, start = _level(shapes_ptr, starts_ptr, level)
            for point in tl.static_range(P):
                sp = (query_row * L + level) * P + point
                a, fx, fy, x0, y0 = _point(loc_ptr, attn_ptr, sp, h, w, q_mask)
                d_fx = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)  # d sample / d fx
                d_fy = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
                sample = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
                for dy in tl.static_range(2):
                    for dx in tl.static_range(2):
                        off, inside = _corner(
                            row_base, y0 + dy, x0 + dx, h, w, start, q_mask, M, DH
                        )
                        corner_mask = inside[:, None] & d_mask[None, :]
                        ptrs = off[:, None] + offs_d[None, :]
                        v = tl.load(value_ptr + ptrs, mask=corner_mask, other=0.0)
                        wy = fy if dy == 1 else 1.0 - fy
                        wx = fx if dx == 1 else 1.0 - fx
                        sign_x = 1.0 if dx == 1 else -1.0
                        sign_y = 1.0 if dy == 1 else -1.0
                        sample += (wy * wx)[:, None] * v
                        d_fx += (sign_x * wy)[:, None] * v
                        d_fy += (sign_y * wx)[:, None] * v
                        tl.atomic_add(
                            grad_value_ptr + ptrs,
                            (a * wy * wx)[:, None] * g,
                            mask=corner_mask,
                        )
                tl.store(grad_attn_ptr + sp, tl.sum(g * sample, axis=1), mask=q_mask)
                gx = tl.sum(g * d_fx, axis=1) * a * w
                gy = tl.sum(g * d_fy, axis=1) * a * h
                tl.store(grad_loc_ptr + sp * 2, gx, mask=q_mask)
                tl.store(grad_loc_ptr + sp * 2 + 1, gy, mask=q_mask)


def _launch_shape(value: torch.Tensor, loc: torch.Tensor) -> tuple[int, ...]:
    batch, num_keys, heads, head_dim = value.shape
    num_queries, num_levels, num_points = loc.shape[1], loc.shape[3], loc.shape[4]
    return batch, num_keys, heads, head_dim, num_queries, num_levels, num_points


class TritonMSDeformAttn(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; float32, contiguous inputs."""

    BLOCK_Q = 32

    @staticmethod
    def forward(ctx, value, shapes, starts, loc, attn):
        batch, num_keys, heads, head_dim, num_q, num_levels, num_points = _launch_shape(value, loc)
        out = value.new_empty(batch, num_q, heads, head_dim)
        grid = (triton.cdiv(num_q, TritonMSDeformAttn.BLOCK_Q), batch * heads)
        _msda_fwd_kernel[grid](
            value, shapes, starts, loc, attn, out, num_q, num_keys,
            M=heads, DH=head_dim, L=num_levels, P=num_points,
            BLOCK_Q=TritonMSDeformAttn.BLOCK_Q, BLOCK_D=triton.next_power_of_2(head_dim),
        )  # fmt: skip
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        return out.view(batch, num_q, heads * head_dim)

    @staticmethod
    def backward(ctx, grad_out):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        batch, num_keys, heads, head_dim, num_q, num_levels, num_points = _launch_shape(value, loc)
        grad_value = torch.zeros_like(value)
        grad_loc = torch.empty_like(loc)
        grad_attn = torch.empty_like(attn)
        grid = (triton.cdiv(num_q, TritonMSDeformAttn.BLOCK_Q), batch * heads)
        _msda_bwd_kernel[grid](
            value, shapes, starts, loc, attn, grad_out.float().contiguous(),
            grad_value, grad_loc, grad_attn, num_q, num_keys,
            M=heads, DH=head_dim, L=num_levels, P=num_points,
            BLOCK_Q=TritonMSDeformAttn.BLOCK_Q, BLOCK_D=triton.next_power_of_2(head_dim),
        )  # fmt: skip
        return grad_value, None, None, grad_loc, grad_attn

"""Speed switches of the training step that leave the method as it is: bf16 autocast (CUDA, and
CPUs with native bf16), fused AdamW, channels_last for the image backbone, frozen norms folded into
their convolutions.

Each one is a plain function the loop calls once; ``python -m model.tools.bench --compare`` measures
each against its off state on the machine at hand (docs/model.md has the numbers).

- ``autocast``: bf16 mixed precision. Convolutions and matmuls run in bf16; what autocast keeps
  in float32 (losses, softmax, norms' statistics) and what the model wraps in ``autocast_off``
  (deformable-attention sampling coordinates, the history warp) stays float32. On CPU it is on
  only where the CPU has bf16 dot products (``cpu_supports_bf16``): elsewhere oneDNN emulates
  bf16 and it would be slower than float32.
- ``make_adamw``: the same AdamW update in one fused kernel over all parameters (CPU and CUDA)
  instead of a Python loop over tensors; equal to float32 rounding.
- ``to_channels_last``: the ResNet + FPN weights and the images they see in NHWC memory order,
  where oneDNN's convolutions and the stem's max-pool are fastest. Only the memory layout
  changes: shapes and values are the same, and everything after the FPN is unchanged.
- ``fold_frozen_norms``: a frozen BatchNorm (``norm_eval``, frozen stages: the pretrained
  backbones of ``tiny`` and up) is a fixed affine map, folded into the convolution before it at
  each forward: no norm pass forward or backward. Values equal to rounding; trained norms (all
  of ``nano``'s) are left as they are.
- ``keep_freed_memory``: glibc keeps the heap memory a step frees for the next step instead of
  returning it to the kernel, so the next step's tensors do not fault in fresh pages (on the
  CPU profile, ``aten::empty`` was 10 % of a nano step). Process-wide; values are unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    """True when this CPU computes bf16 dot products natively: AVX512-BF16 or AMX tiles.

    ``torch.cpu._is_avx512_bf16_supported`` / ``torch.cpu._is_amx_tile_supported`` read CPUID
    (private but stable since torch 2.1). We do not use
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported``: it is also true on plain AVX512 cores,
    where oneDNN emulates bf16 and bf16 convolutions are slower than float32.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def bf16_autocast_active(device: torch.device, bf16: bool) -> bool:
    """Whether ``autocast(device, bf16)`` computes in bf16 on this machine."""
    device = torch.device(device)
    if not bf16:
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16())


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, and on CPUs with native bf16, when ``bf16``; else a no-op.

    The returned object may be entered again after it exits (the loop enters it for the
    history pass and again for the forward)."""
    device = torch.device(device)
    if bf16_autocast_active(device, bf16):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether this torch has a fused AdamW kernel for ``device``'s type."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return torch.device(device).type in _get_fused_kernels_supported_devices()


def make_adamw(
    param_groups: Iterable[dict[str, Any]],
    lr: float,
    weight_decay: float,
    device: torch.device,
    fused: bool,
) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (their extra keys, e.g. ``base_lr`` and ``name``, are kept).

    ``fused``: one fused kernel where torch has one for the device, else the multi-tensor
    (foreach) path. Without it: torch's default (foreach on CUDA, a per-tensor loop on CPU), the
    optimiser the loop has always used. The parameters must already be on ``device``. The
    group dicts are copied: torch writes its defaults (``fused``, ``foreach``, ...) into them.
    """
    kwargs: dict[str, bool] = {}
    if fused:
        if fused_adamw_supported(device):
            kwargs["fused"] = True
        else:
            log.info("no fused AdamW for %s in torch %s: foreach", device, torch.__version__)
            kwargs["foreach"] = True
    groups = [dict(group) for group in param_groups]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **kwargs)


def to_channels_last(net: nn.Module) -> nn.Module:
    """Put the image backbone + FPN of ``net`` (a ``BEVFormerSeg`` or a ``ResNetFPN``) in
    channels_last: its weights now, the images it receives in every forward. In place; returns
    ``net``. Call it after ``net.to(device)`` (``.to`` keeps the memory format either way)."""
    backbone = getattr(net, "backbone", net)
    if not hasattr(backbone, "channels_last"):
        raise TypeError(f"{type(backbone).__name__} has no channels_last switch (not ResNetFPN)")
    backbone.to(memory_format=torch.channels_last)
    backbone.channels_last = True
    return net


def fold_frozen_norms(net: nn.Module) -> nn.Module:
    """Fold the frozen BatchNorms of ``net``'s image backbone (a ``BEVFormerSeg`` or a
    ``ResNetFPN``) into the convolutions before them, at every forward
    (``model.network.backbone.conv_bn``). In place; returns ``net``. Does nothing to a norm
    that trains (the ``nano`` preset has none frozen)."""
    backbone = getattr(net, "backbone", net)
    if not hasattr(backbone, "fold_frozen_norms"):
        raise TypeError(f"{type(backbone).__name__} has no norms to fold (not ResNetFPN)")
    backbone.fold_frozen_norms = True
    return net


# glibc's mallopt parameters (malloc.h) and the values its static defaults have.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DEFAULT_THRESHOLD_B = 128 << 10
# Kept: allocations up to 32 MiB (glibc's largest mmap threshold on 64-bit) come from the heap,
# and up to 1 GiB freed at its top stays mapped.
_KEPT_MMAP_THRESHOLD_B, _KEPT_TRIM_THRESHOLD_B = 32 << 20, 1 << 30


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def can_keep_freed_memory() -> bool:
    """Whether this process's C library is glibc (``keep_freed_memory`` can act)."""
    return _glibc() is not None


def keep_freed_memory(keep: bool = True) -> bool:
    """Keep freed heap memory mapped for reuse (``keep``), or set glibc's static defaults back
    (128 KiB thresholds; ``model.tools.bench --compare`` toggles it between blocks). Returns whether
    glibc took the setting (False on another C library, where it does nothing)."""
    libc = _glibc()
    if libc is None:
        return False
    mmap_b, trim_b = (
        (_KEPT_MMAP_THRESHOLD_B, _KEPT_TRIM_THRESHOLD_B)
        if keep
        else (_DEFAULT_THRESHOLD_B, _DEFAULT_THRESHOLD_B)
    )
    took = libc.mallopt(_M_MMAP_THRESHOLD, mmap_b) and libc.mallopt(_M_TRIM_THRESHOLD, trim_b)
    if not keep:
        libc.malloc_trim(0)
    return bool(took)

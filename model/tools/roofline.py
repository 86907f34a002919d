"""How fast could a training step be here? Its arithmetic against this device's measured peak.

A speed switch that keeps the arithmetic (memory layout, kernels, a fused optimizer) cannot make
a step faster than the step's floating-point operations take at the device's best convolution
rate; only lower precision (a higher peak) or fewer operations can. ``python -m model.tools.bench
--compare`` prints that floor next to its ratios, so a user sees on their own machine how much of
a speed-up target the hardware allows.

- ``count_flops``: the operations of one call, by ``torch.utils.flop_counter``'s formulas
  (convolutions and matrix products, forward and backward; elementwise work, norms, pooling and
  ``grid_sample`` are not counted, so the floor is a lower bound).
- ``conv_peak``: the best rate of a few 3x3 convolutions measured here, in the precision a step
  runs in (the bench takes the better of the two memory layouts). It is an empirical peak, not
  the datasheet's: a kernel that beats every shape measured would beat the floor too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# (batch, channels, height, width) of the convolutions timed for the peak: ResNet stage widths on
# the stride-4 and stride-8 maps of a nano image batch (12 camera images of 96 x 160); on CUDA,
# tiny-sized ones large enough to fill the GPU.
CPU_SHAPES = ((12, 64, 24, 40), (12, 128, 12, 20), (12, 128, 24, 40), (12, 256, 12, 20))
CUDA_SHAPES = ((64, 256, 56, 100), (64, 512, 28, 50))


class _FlopTotal(TorchDispatchMode):
    """Adds up ``torch.utils.flop_counter``'s formulas over every operator dispatched.

    ``FlopCounterMode`` itself is not used: its per-module attribution hooks fail on a step that
    runs a ``no_grad`` pass (the history) before a recorded one ("Expected gradient function to
    be set", torch 2.14), and only the total is wanted here."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``fn``: a multiply-add counts two.

    A dispatch mode does not see the operations run under ``torch.inference_mode`` (measured:
    the loop's history pass counted 0 FLOP), so while counting, ``torch.inference_mode`` is
    ``torch.no_grad``: the same operations, visible."""
    inference_mode = torch.inference_mode
    torch.inference_mode = torch.no_grad
    try:
        with _FlopTotal() as total:
            fn()
    finally:
        torch.inference_mode = inference_mode
    return int(total.flops)


def conv_flops(shape: tuple[int, int, int, int], kernel: int = 3) -> int:
    """Forward operations of a same-width, same-size ``kernel`` x ``kernel`` convolution."""
    batch, channels, height, width = shape
    return 2 * batch * channels * channels * kernel * kernel * height * width


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_peak(
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    shapes: tuple[tuple[int, int, int, int], ...] | None = None,
    repeats: int = 5,
) -> float:
    """FLOP/s: the fastest of ``repeats`` timed forward passes over each 3x3 convolution shape."""
    device = torch.device(device)
    if shapes is None:
        shapes = CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    layout = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    best = 0.0
    for shape in shapes:
        batch, channels, height, width = shape
        x = torch.randn(shape, generator=gen).to(device, dtype).to(memory_format=layout)
        w = torch.randn(channels, channels, 3, 3, generator=gen).to(device, dtype)
        w = w.to(memory_format=layout)
        with torch.no_grad():
            F.conv2d(x, w, padding=1)  # warm-up: oneDNN / cuDNN pick their kernel here
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                F.conv2d(x, w, padding=1)
                _sync(device)
                best = max(best, conv_flops(shape) / (time.perf_counter() - start))
    return best


@dataclass(frozen=True)
class Roofline:
    """A step's operations against a peak rate: the fastest that step could run here."""

    step_flops: int
    peak_flops_per_s: float
    peak_what: str  # the precision the peak was measured in (float32 or bf16)

    @property
    def floor_ms(self) -> float:
        """The step at the peak rate, nothing else counted."""
        return 1e3 * self.step_flops / self.peak_flops_per_s

    def rate(self, step_ms: float) -> float:
        """FLOP/s a step of ``step_ms`` achieves."""
        return self.step_flops / (step_ms / 1e3)

    def speedup_bound(self, baseline_ms: float) -> float:
        """The largest speed-up over ``baseline_ms`` a step at this peak allows."""
        return baseline_ms / self.floor_ms

    def describe(self, off_ms: float, on_ms: float, off_what: str, on_what: str) -> str:
        """Markdown lines for the bench: work, rates, floor and the bound it puts on a ratio."""
        gflop = self.step_flops / 1e9
        return (
            f"step work: {gflop:.1f} GFLOP (convolutions and matrix products, forward and "
            f"backward, counted by torch.utils.flop_counter)\n\n"
            f"| arm | ms/step | GFLOP/s |\n|---|---|---|\n"
            f"| {off_what} | {off_ms:.1f} | {self.rate(off_ms) / 1e9:.1f} |\n"
            f"| {on_what} | {on_ms:.1f} | {self.rate(on_ms) / 1e9:.1f} |\n"
            f"| 3x3 convolution peak measured here ({self.peak_what}) | "
            f"{self.floor_ms:.1f} | {self.peak_flops_per_s / 1e9:.1f} |\n\n"
            f"At that peak the step would take {self.floor_ms:.1f} ms: a switch that keeps "
            f"the step's operations (layout, kernels, optimizer; precision up to "
            f"{self.peak_what}) cannot make it more than {self.speedup_bound(off_ms):.2f}x "
            f"faster than the first arm here, and less in practice (the floor counts no "
            f"elementwise work and runs every convolution at the best rate measured). The "
            f"all-on arm reaches {100 * self.floor_ms / on_ms:.0f} % of the peak."
        )

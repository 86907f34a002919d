"""Where a training step's time goes, by operation class, from ``torch.profiler``.

    classes = op_breakdown(lambda: step(...), steps=3, device=device)   # class -> ms per step
    print(breakdown_table(classes))

Each ATen operator's *self* time (CPU; on CUDA the kernels' device time) is put in one class
by its name, so nested operators are not counted twice: ``aten::conv2d`` spends its time in
``aten::mkldnn_convolution`` (a convolution), ``aten::batch_norm`` in
``aten::native_batch_norm`` (a norm). Time outside ATen operators (autograd's bookkeeping, the
Python between operators) is left out; the table says how much of the profiled wall time the
operators account for.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# First match wins, in this order; an ATen operator matching none is "elementwise" (adds,
# multiplies, activations, reductions), anything else is left out.
CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("optimizer", ("adam", "_foreach_", "clip_grad")),
    ("convolution", ("conv", "cudnn_", "mkldnn_convolution")),
    ("matrix product", ("mm", "matmul", "linear", "baddbmm", "addmm", "bmm", "einsum")),
    ("norm", ("batch_norm", "layer_norm", "group_norm", "_norm")),
    (
        "sampling / gather",
        ("grid_sampler", "gather", "scatter", "index", "embedding", "upsample", "interpolate"),
    ),
    (
        "copies / layout",
        (
            "copy",
            "_to_copy",
            "clone",
            "contiguous",
            "cat",
            "stack",
            "pad",
            "fill_",
            "zero_",
            "empty",
            "as_strided",
            "permute",
            "transpose",
            "expand",
            "view",
            "reshape",
            "flip",
            "roll",
            "unfold",
            "split",
            "select",
            "slice",
            "narrow",
            "squeeze",
            "unsqueeze",
        ),
    ),  # fmt: skip
)
ELEMENTWISE = "elementwise"


def op_class(name: str) -> str | None:
    """The class of a profiler event name (``aten::mkldnn_convolution`` -> convolution);
    None for what is not an ATen operator."""
    if not name.startswith("aten::"):
        return None
    op = name[len("aten::") :]
    for label, needles in CLASSES:
        if any(needle in op for needle in needles):
            return label
    return ELEMENTWISE


def op_breakdown(
    step: Callable[[], object], steps: int, device: torch.device
) -> tuple[dict[str, float], float]:
    """(class -> ms per step, wall ms per step under the profiler) over ``steps`` calls of
    ``step``."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = 1e3 * (time.perf_counter() - start) / steps
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        label = op_class(event.key)
        if label is None:
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        totals[label] = totals.get(label, 0.0) + us / 1e3 / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])), wall_ms


def breakdown_table(classes: dict[str, float], wall_ms: float, what: str) -> str:
    """A Markdown table of ``op_breakdown``'s result, shares of the operators' total."""
    total = sum(classes.values())
    lines = [
        f"step time by operation class ({what}; self time of the ATen operators, torch.profiler):",
        "",
        "| operation class | ms / step | share |",
        "|---|---|---|",
    ]
    for label, ms in classes.items():
        lines.append(f"| {label} | {ms:.1f} | {100 * ms / max(total, 1e-9):.0f}% |")
    lines.append(f"| all operators | {total:.1f} | of {wall_ms:.1f} ms per profiled step |")
    return "\n".join(lines)

"""The floor under a training step: its counted operations against a measured convolution peak."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from model.geometry import BevGrid
from model.network.bevformer import BEVFormerSeg
from model.presets import get_preset
from model.tools.roofline import Roofline, conv_flops, conv_peak, count_flops

SHAPE = (2, 8, 6, 10)


def _conv_step(x_requires_grad: bool, backward: bool) -> int:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen).requires_grad_(x_requires_grad)
    w = torch.randn(SHAPE[1], SHAPE[1], 3, 3, generator=gen).requires_grad_()

    def step():
        out = F.conv2d(x, w, padding=1)
        if backward:
            out.sum().backward()

    return count_flops(step)


def test_count_flops_counts_a_convolution_forward_as_two_operations_per_multiply_add():
    assert _conv_step(x_requires_grad=False, backward=False) == conv_flops(SHAPE)
    assert conv_flops(SHAPE) == 2 * 2 * 8 * 8 * 9 * 6 * 10


def test_count_flops_counts_the_backward_pass_once_per_gradient_it_computes():
    # The weight gradient always; the input gradient only where the input needs one (a
    # network's first convolution does not), each as much work as the forward.
    assert _conv_step(x_requires_grad=False, backward=True) == 2 * conv_flops(SHAPE)
    assert _conv_step(x_requires_grad=True, backward=True) == 3 * conv_flops(SHAPE)


def test_the_floor_is_the_work_at_the_peak_and_bounds_every_ratio_against_a_baseline():
    roof = Roofline(step_flops=3_000_000_000, peak_flops_per_s=1e11, peak_what="float32")
    assert roof.floor_ms == pytest.approx(30.0)
    assert roof.speedup_bound(90.0) == pytest.approx(3.0)
    assert roof.rate(60.0) == pytest.approx(5e10)
    text = roof.describe(90.0, 60.0, "float32, NCHW, AdamW", "all switches on")
    assert "more than 3.00x faster than the first arm" in text
    assert "reaches 50 % of the peak" in text
    assert "| float32, NCHW, AdamW | 90.0 | 33.3 |" in text


def test_conv_peak_measures_a_positive_rate_in_either_layout():
    shapes = ((1, 8, 8, 8),)
    for channels_last in (True, False):
        rate = conv_peak(torch.device("cpu"), channels_last=channels_last, shapes=shapes, repeats=2)
        assert 0 < rate < float("inf")


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the bench's output:\n{text}"
    return float(match.group(1))


def test_bench_compare_prints_the_floor_against_the_arms_it_timed(capsys):
    from model.tools import bench, bench_step

    bench.main(
        ["--preset", "nano", "--device", "cpu", "--compare", "--batch", "1", "--steps", "1",
         "--warmup", "0", "--repeats", "1"]
    )  # fmt: skip
    out = capsys.readouterr().out
    off_ms = _number(r"\| all together \| ([\d.]+) \|", out)
    on_ms = _number(r"\| all together \| [\d.]+ \| ([\d.]+) \|", out)
    gflop = _number(r"step work: ([\d.]+) GFLOP", out)
    peak_row = r"\| 3x3 convolution peak measured here \((?:float32|bf16)\) \| "  # bf16 if native
    floor_ms = _number(peak_row + r"([\d.]+) \|", out)
    peak = _number(peak_row + r"[\d.]+ \| ([\d.]+) \|", out)
    bound = _number(r"more than ([\d.]+)x faster than the first arm", out)
    # The floor row and the bound are computed against the arms of the "all together" row.
    assert _number(r"\| float32, NCHW, AdamW \| ([\d.]+) \|", out) == off_ms
    assert _number(r"\| all switches on \| ([\d.]+) \|", out) == on_ms
    assert floor_ms == pytest.approx(1e3 * gflop / peak, rel=0.01)
    assert bound == pytest.approx(off_ms / floor_ms, rel=0.01)
    # And the evaluation row: the history pass against forward.EvalForward's reuse.
    assert _number(r"\| forward.EvalForward \| ([\d.]+) \| [\d.]+ \|", out) > 0
    # The step is a history pass, a forward and a backward (twice a forward): about four
    # no-grad passes of the same net, neither one nor a double count.
    cfg, grid = get_preset("nano"), BevGrid(resolution_m=0.5)
    net = BEVFormerSeg(cfg, 4, grid)
    batch = bench_step.make_batch(cfg, grid, 1, 4, "cpu")
    with torch.no_grad():
        one_pass = count_flops(lambda: bench_step._bev_features(net, batch)) / 1e9
    assert 3.5 * one_pass < gflop < 4.5 * one_pass

"""Speed switches of model.training.precision: the training step they make is the float32 NCHW one.

The training comparisons run 20 steps of nano pretraining through ``model.training.loop.run_phase``
with the switches of ``RuntimeConfig`` (the loop's ``prepare`` and ``make_optimizer``; history
BEV in eval mode, reprojection + temporal loss; the lr schedule; gradient clipping) from the
same weights on the same small synthetic batches, once per switch setting, and compare the
loss curves step by step (a step budget reporting every step).

Tolerances are relative to the loss (|a - b| <= tol * |b|): the loss's scale depends on the
terms, their weights and the class count, a relative bound does not. Why they differ:

- fused AdamW reorders the update's float32 arithmetic only: 1e-6 (measured 2e-7);
- channels_last reorders the convolutions' sums. The forward agrees to 1e-6, but a rounding
  difference flips the occasional ReLU whose input lies within ~1e-6 of zero, which moves that
  element's gradient by a whole step (BatchNorm's backward spreads it over the channel); NCHW
  float32 and NCHW float64 differ by such flips just the same. Over 20 AdamW steps the curves
  drift to a few 1e-5 (measured 4.6e-5), so the first step is held to 1e-6 and the curve to 1e-4;
- bf16 autocast rounds every convolution and matmul input to 8 mantissa bits: 1e-3 (measured
  3e-4 with all switches on).
"""

from __future__ import annotations

import copy
import ctypes
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from model import names
from model.config import PretrainConfig, RuntimeConfig
from model.geometry import BevGrid
from model.network.backbone import ResNetFPN
from model.network.bevformer import BEVFormerSeg
from model.presets import ModelConfig, get_preset
from model.tools.bench_step import synthetic_rig
from model.training import precision
from model.training.checkpoint import load_checkpoint
from model.training.loop import Phase, run_phase
from model.training.precision import autocast, make_adamw, to_channels_last
from model.training.train import effective_runtime, pin_threads

CFG = get_preset("nano", image_size=(48, 80))
GRID = BevGrid(resolution_m=1.0)  # 60 m x 30 m: a 60 x 30 label grid
NUM_CLASSES = 4
CPU = torch.device("cpu")
STEPS = 20

needs_bf16_cpu = pytest.mark.skipif(
    not precision.cpu_supports_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 / AMX)"
)


def synthetic_batches(count: int, batch: int = 2) -> list[dict]:
    """Batches as the loader gives them, with the previous keyframe (random images and labels
    on a ring of six cameras, 2 m of ego motion)."""
    gen = torch.Generator().manual_seed(0)
    h, w = CFG.image_size
    intrinsics, ego_from_cam = synthetic_rig(batch, (h, w), CPU)
    prev_ego_from_ego = torch.eye(4).repeat(batch, 1, 1)
    prev_ego_from_ego[:, 0, 3] = 2.0
    rig = {"intrinsics": intrinsics, "ego_from_cam": ego_from_cam}
    return [
        {
            "images": torch.randn(batch, 6, 3, h, w, generator=gen),
            **rig,
            "prev": {"images": torch.randn(batch, 6, 3, h, w, generator=gen), **rig},
            "prev_ego_from_ego": prev_ego_from_ego,
            "has_prev": torch.ones(batch, dtype=torch.bool),
            "pseudo_labels": torch.randint(0, NUM_CLASSES, (batch, 6, h, w), generator=gen),
        }
        for _ in range(count)
    ]


class ConvDtypes:
    """Record the dtypes a module computes in (a forward hook)."""

    def __init__(self, module: nn.Module):
        self.seen: set[torch.dtype] = set()
        module.register_forward_hook(lambda mod, args, out: self.seen.add(out.dtype))


def train_losses(
    tmp_path: Path, channels_last: bool = False, fused: bool = False, bf16: bool = False
) -> tuple[torch.Tensor, set[torch.dtype]]:
    """The loss of every step of a short nano pretraining run through ``run_phase`` (the
    training path: ``prepare``, ``make_optimizer``, autocast, lr schedule, clipping) with the
    given switches, and the dtypes the backbone's first convolution computed in."""
    cfg = PretrainConfig(budget={"unit": "steps", "value": STEPS, "every": 1}, val_every=None)
    torch.manual_seed(0)
    net = BEVFormerSeg(CFG, NUM_CLASSES, GRID)
    conv_dtypes = ConvDtypes(net.backbone.body.conv1)
    runtime = RuntimeConfig(
        device="cpu", progress=False, channels_last=channels_last, fused_adamw=fused, bf16=bf16
    )
    phase = Phase(
        name="pretrain",
        cfg=cfg,
        net=net,
        loader=DataLoader(synthetic_batches(4), batch_size=None),  # the batches as they are
        val=None,
        seed=0,
        labelled_samples=0,
        protocol="hdmapnet",
        grid=GRID,
        device=CPU,
        runtime=runtime,
        checkpoint_path=tmp_path / f"cl{channels_last:d}-fused{fused:d}-bf16{bf16:d}.pt",
        meta={},
    )
    reports = run_phase(phase, on_epoch=None)
    assert [r.steps for r in reports] == list(range(1, STEPS + 1))  # one report per step
    # The loop switched what it was told to, and nothing else.
    conv = net.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
    adamw = load_checkpoint(phase.checkpoint_path)["optimizer"]["param_groups"][0]
    assert bool(adamw["fused"]) == fused
    assert net.backbone.fold_frozen_norms == runtime.fold_frozen_norms  # a no-op on nano
    losses = [r.losses[names.loss_metric("pretrain", "loss")] for r in reports]
    return torch.tensor(losses, dtype=torch.float64), conv_dtypes.seen


def relative_gap(losses: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (losses - reference).abs() / reference.abs()


@pytest.fixture(scope="module")
def float32_nchw_losses(tmp_path_factory) -> torch.Tensor:
    losses, conv_dtypes = train_losses(tmp_path_factory.mktemp("fp32"))
    assert conv_dtypes == {torch.float32}
    return losses


@pytest.fixture(autouse=True, scope="module")
def pinned_threads():
    """The runtime's thread count, as ``pretrain``/``finetune`` pin it (run_phase does not)."""
    pin_threads(RuntimeConfig().threads)


# --- what each switch does to training ---------------------------------------------------


@needs_bf16_cpu
def test_all_switches_keep_the_loss_curve_within_1e3_of_float32_nchw(float32_nchw_losses, tmp_path):
    losses, conv_dtypes = train_losses(tmp_path, channels_last=True, fused=True, bf16=True)
    assert conv_dtypes == {torch.bfloat16}  # bf16 really was on, in the history pass too
    assert relative_gap(losses, float32_nchw_losses).max() <= 1e-3


def test_channels_last_alone_keeps_the_loss_curve_of_nchw(float32_nchw_losses, tmp_path):
    gap = relative_gap(train_losses(tmp_path, channels_last=True)[0], float32_nchw_losses)
    assert gap[0] <= 1e-6  # same weights, same batch: only the sums' order differs
    assert gap.max() <= 1e-4  # then ReLU flips drift it (module docstring)


def test_fused_adamw_alone_keeps_the_loss_curve_of_plain_adamw(float32_nchw_losses, tmp_path):
    gap = relative_gap(train_losses(tmp_path, fused=True)[0], float32_nchw_losses)
    # Rounding only: the fused kernel orders its float32 arithmetic differently, and 20 steps
    # carry that forward (measured: at most 1e-7 on an AMD EPYC, 5.0e-6 on an Intel Xeon with
    # AMX). A changed update rule (lr, betas, weight decay) moves the curve by far more.
    assert gap.max() <= 2e-5


def test_runtime_switches_are_on_by_default_and_record_what_they_do_here():
    on = effective_runtime(RuntimeConfig(device="cpu"))
    assert on == {
        "effective.bf16": precision.cpu_supports_bf16(),
        "effective.adamw": "fused",
        "effective.keep_freed_memory": precision.can_keep_freed_memory(),
    }
    off = RuntimeConfig(device="cpu", bf16=False, fused_adamw=False, keep_freed_memory=False)
    assert effective_runtime(off) == {
        "effective.bf16": False,
        "effective.adamw": "default",
        "effective.keep_freed_memory": False,
    }


# --- channels_last backbone ----------------------------------------------------------------

# ResNet-18 with DCNv2 in stage 2, two FPN inputs and an extra level: every kind of layer.
MIXED_BACKBONE = ModelConfig(
    backbone="resnet18",
    backbone_out_stages=(1, 2),
    dcn_stages=(2,),
    num_levels=3,
    frozen_stages=-1,
    norm_eval=False,
    embed_dim=32,
    num_heads=4,
    num_points=4,
    z_anchors_m=(0.0, 1.0),
)


@pytest.mark.parametrize("cfg", [get_preset("nano"), MIXED_BACKBONE], ids=["nano", "dcn+fpn"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_backbone_forward_equals_nchw(cfg, training):
    torch.manual_seed(0)
    nchw = ResNetFPN(cfg).train(training)
    nhwc = to_channels_last(copy.deepcopy(nchw))
    images = torch.randn(4, 3, 64, 96)
    with torch.no_grad():
        want, got = nchw(images), nhwc(images)
    assert len(got) == len(want) == cfg.num_levels
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert a.is_contiguous(memory_format=torch.channels_last)  # the switch is on
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_to_channels_last_converts_backbone_weights_only():
    net = to_channels_last(BEVFormerSeg(CFG, NUM_CLASSES, GRID))
    conv = net.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    head = net.head.classifier.weight
    assert head.is_contiguous()  # after the FPN everything stays NCHW
    with pytest.raises(TypeError, match="channels_last"):
        to_channels_last(nn.Linear(2, 2))


# --- frozen norms folded into their convolutions -------------------------------------------

# The pretrained presets' backbone: stem and stage 1 frozen, every norm in eval mode with
# frozen parameters; with DCNv2 in stage 2 (its norm is not folded: not a plain convolution).
FROZEN_BACKBONE = replace(MIXED_BACKBONE, frozen_stages=1, norm_eval=True)


class NormCalls:
    """How many times the BatchNorms of a module ran (forward hooks)."""

    def __init__(self, module: nn.Module):
        self.count = 0
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))


def _forward_and_grads(net: ResNetFPN, images: torch.Tensor):
    net.zero_grad()
    feats = net(images)
    sum(f.square().mean() for f in feats).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return [f.detach() for f in feats], grads


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_folding_frozen_norms_keeps_the_backbone_forward_and_gradients(channels_last, training):
    torch.manual_seed(0)
    plain = ResNetFPN(FROZEN_BACKBONE).train(training)
    for m in plain.modules():  # running statistics away from (0, 1), so folding has work to do
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    if channels_last:
        to_channels_last(plain)
    folded = precision.fold_frozen_norms(copy.deepcopy(plain))
    calls = NormCalls(folded)
    images = torch.randn(2, 3, 64, 96)
    want, want_grads = _forward_and_grads(plain, images)
    got, got_grads = _forward_and_grads(folded, images)
    # Every norm is frozen but the DCN block's (stage 2, block 0 and 1: one each).
    assert calls.count == 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    assert got_grads.keys() == want_grads.keys() and want_grads  # stage 2 and the FPN train
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=0, atol=1e-4 * float(g.abs().max()))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval (history pass)"])
def test_folding_leaves_trained_norms_alone_so_nano_is_bit_for_bit_unchanged(training):
    torch.manual_seed(0)
    plain = ResNetFPN(CFG).train(training)
    folded = precision.fold_frozen_norms(copy.deepcopy(plain))
    calls = NormCalls(folded)
    images = torch.randn(2, 3, 48, 80)
    want, want_grads = _forward_and_grads(plain, images)
    got, got_grads = _forward_and_grads(folded, images)
    assert calls.count == sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert all(torch.equal(got_grads[n], g) for n, g in want_grads.items())
    with pytest.raises(TypeError, match="fold"):
        precision.fold_frozen_norms(nn.Linear(2, 2))


# --- autocast ----------------------------------------------------------------------------------


def _conv_output_dtype(amp) -> torch.dtype:
    conv = nn.Conv2d(3, 4, 3)
    with amp:
        return conv(torch.randn(1, 3, 8, 8)).dtype


@pytest.mark.parametrize("supported", [True, False])
def test_cpu_autocast_computes_convs_in_bf16_only_where_the_cpu_has_bf16(monkeypatch, supported):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: supported)
    want = torch.bfloat16 if supported else torch.float32
    assert _conv_output_dtype(autocast(CPU, bf16=True)) == want
    assert _conv_output_dtype(autocast(CPU, bf16=False)) == torch.float32


@needs_bf16_cpu
def test_cpu_autocast_runs_bf16_on_this_cpu():
    assert _conv_output_dtype(autocast(CPU, bf16=True)) == torch.bfloat16


def test_autocast_can_be_entered_again_after_it_exits():
    amp = autocast(CPU, bf16=True)
    assert _conv_output_dtype(amp) == _conv_output_dtype(amp)


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads /proc/cpuinfo")
def test_cpu_supports_bf16_matches_the_cpu_flags():
    flags = set(re.findall(r"\S+", Path("/proc/cpuinfo").read_text()))
    assert precision.cpu_supports_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


# --- fused AdamW ------------------------------------------------------------------------------


def test_make_adamw_is_fused_on_cpu_and_keeps_the_groups_extra_keys():
    params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))]
    groups = [
        {"params": params[:1], "lr": 0.1, "base_lr": 0.1, "name": "img_backbone"},
        {"params": params[1:], "lr": 1.0, "base_lr": 1.0, "name": "rest"},
    ]
    fused = make_adamw(groups, lr=1.0, weight_decay=0.01, device=CPU, fused=True)
    assert [g["fused"] for g in fused.param_groups] == [True, True]
    assert [(g["base_lr"], g["name"]) for g in fused.param_groups] == [
        (0.1, "img_backbone"),
        (1.0, "rest"),
    ]
    plain = make_adamw(groups, lr=1.0, weight_decay=0.01, device=CPU, fused=False)
    assert [g["fused"] for g in plain.param_groups] == [None, None]


def test_make_adamw_falls_back_to_foreach_without_a_fused_kernel(monkeypatch):
    monkeypatch.setattr(precision, "fused_adamw_supported", lambda device: False)
    opt = make_adamw([{"params": [nn.Parameter(torch.ones(3))]}], 1.0, 0.0, CPU, fused=True)
    assert opt.param_groups[0]["foreach"] is True and not opt.param_groups[0]["fused"]


# --- the bench that measures them (python -m model.tools.bench --compare) -------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "huge"], "error: argument --preset: invalid choice: 'huge'"),
        (["--steps", "0"], "error: argument --steps: must be > 0, got 0"),
        (["--device", "tpu"], "error: --device tpu: not a device"),
    ],
)
def test_bench_user_errors_exit_2_with_one_line_naming_the_argument(argv, message, capsys):
    from model.tools import bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_bench_refuses_cuda_without_cuda(capsys):
    from model.tools import bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda", "--compare"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --device cuda: CUDA is not available\n"


def test_bench_compares_each_switch_with_float32_and_fast_attention_with_all_switches_on():
    from model.tools.bench_compare import compare_arms

    arms, comparisons = compare_arms(["triton"], frozen_norms=False)
    off, everything = comparisons[0][1], comparisons[4][2]
    assert [(label, a is off) for label, a, _ in comparisons[:5]] == [
        ("channels_last backbone", True),
        ("fused AdamW", True),
        ("bf16 autocast", True),
        ("keep freed memory", True),
        ("all together", True),
    ]
    assert not (off.channels_last or off.fused_adamw or off.bf16 or off.keep_memory)
    assert everything.channels_last and everything.fused_adamw and everything.bf16
    assert everything.keep_memory
    assert comparisons[5][1:] == (
        everything,
        replace(everything, name=comparisons[5][2].name, attention_impl="triton"),
    )
    assert len(arms) == 7  # off, four singles, all, all + triton
    arms, comparisons = compare_arms([], frozen_norms=True)  # a pretrained preset on a CPU
    everything = comparisons[4][2]
    assert comparisons[5] == (
        "fold frozen norms (all on)",
        everything,
        replace(everything, name=comparisons[5][2].name, fold_norms=True),
    )
    assert len(arms) == 7  # off, four singles, all, all + folded


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def _mmapped_after_malloc(libc, nbytes: int) -> bool:
    """Whether glibc serves a malloc of ``nbytes`` with a fresh mmap (not from the heap)."""
    libc.mallinfo2.restype = _Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblks
    block = libc.malloc(nbytes)
    try:
        return libc.mallinfo2().hblks > before
    finally:
        libc.free(block)


def test_keeping_freed_memory_serves_step_sized_tensors_from_the_heap():
    libc = precision._glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    try:
        assert precision.keep_freed_memory(True)
        assert not _mmapped_after_malloc(libc, 16 << 20)  # a nano activation is ~12 MiB
        # Off again: glibc's static thresholds. Not asserted through a malloc: after other
        # tests the heap may hold a free 16 MiB chunk that glibc serves before any mmap.
        assert precision.keep_freed_memory(False)
    finally:
        precision.keep_freed_memory(True)


@pytest.mark.parametrize(
    "cfg", [CFG, MIXED_BACKBONE, replace(MIXED_BACKBONE, frozen_stages=0), FROZEN_BACKBONE]
)
def test_has_frozen_norms_says_whether_the_built_backbone_has_any(cfg):
    from model.network.backbone import _frozen, has_frozen_norms

    net = ResNetFPN(replace(cfg, image_size=(32, 32))).train()
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert has_frozen_norms(cfg) == any(_frozen(bn) for bn in norms)

"""Training-step benchmark of a preset on synthetic inputs.

    python -m model.tools.bench --preset nano --device cpu
    python -m model.tools.bench --preset tiny --device cuda --batch 1
    python -m model.tools.bench --preset nano --device cpu --compare

Prints a markdown table: train samples/s, peak memory, the step broken down into its stages,
and multi-scale deformable attention (spatial cross-attention shapes of the preset) timed for
every implementation that can run on the device.

``--compare`` instead times each speed switch of ``model.training.precision`` (channels_last, fused
AdamW, bf16 autocast, keeping freed memory, all together; on CUDA also the attention
implementations) against the plain float32 step, the step of the loop before these switches
(the loop's own step in every arm). Keeping
freed memory is process-wide: it is set before each arm's block (off: glibc's static 128 KiB
thresholds). The arms are interleaved in one process: every repeat runs a block of
``--steps`` steps of each arm, in an order that rotates between repeats, on the same inputs
from the same initial weights, after ``--warmup`` untimed steps per arm. Load from other
processes then slows every arm alike; the ratio printed is the median over repeats of the
paired per-repeat ratios. It ends with the floor under the step (``model.tools.roofline``): the
step's counted operations at the best convolution rate measured here, and the largest speed-up
over the first arm that any switch keeping those operations could reach on this machine; then
an evaluation pass with the history pass against ``forward.EvalForward``'s reuse of it.

The step is the training loop's own (``model.training.loop.train_step``) on a pretraining phase with
the reprojection objective: the previous keyframe's BEV under inference mode (the history, as
the official BEVFormer computes it), forward, loss, backward, the NaN/inf guard, clipping and
an AdamW step. The stage rows come from forward hooks on the backbone, the encoder and the
seg head; the losses, backward and optimizer are the rest of the step.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from model.config import PretrainConfig, RuntimeConfig
from model.evaluation.forward import EvalForward, eval_mode, forward, history_pass
from model.geometry import BevGrid
from model.network.bevformer import BEVFormerSeg
from model.network.deform_attn import multi_scale_deformable_attn, resolve_impl
from model.network.encoder import project_pillars
from model.presets import PRESETS, ModelConfig, get_preset
from model.tools.op_profile import breakdown_table, op_breakdown
from model.tools.roofline import Roofline, conv_peak, count_flops
from model.training.loop import Phase, train_step
from model.training.precision import (
    autocast,
    bf16_autocast_active,
    fused_adamw_supported,
    keep_freed_memory,
    make_adamw,
    to_channels_last,
)

# nuScenes-like camera yaws (CAMERAS order) and a focal length of 0.79 image widths
# (1266 px at 1600 px wide).
_YAWS_DEG = (55.0, 0.0, -55.0, 110.0, 180.0, -110.0)


def synthetic_rig(batch: int, image_hw: tuple[int, int], device) -> tuple[torch.Tensor, ...]:
    """(intrinsics (B, 6, 3, 3), ego_from_cam (B, 6, 4, 4)): a ring of cameras 1.5 m up."""
    h, w = image_hw
    focal = 0.79 * w
    intrinsics = torch.tensor([[focal, 0, (w - 1) / 2], [0, focal, (h - 1) / 2], [0, 0, 1.0]])
    ego_from_cam = torch.eye(4).repeat(6, 1, 1)
    for i, yaw_deg in enumerate(_YAWS_DEG):
        yaw = math.radians(yaw_deg)
        right = [math.sin(yaw), -math.cos(yaw), 0.0]
        down = [0.0, 0.0, -1.0]
        forward = [math.cos(yaw), math.sin(yaw), 0.0]
        ego_from_cam[i, :3, :3] = torch.tensor([right, down, forward]).T
        ego_from_cam[i, :3, 3] = torch.tensor([1.0, 0.0, 1.5])
    return (
        intrinsics.expand(batch, 6, 3, 3).contiguous().to(device),
        ego_from_cam.expand(batch, 6, 4, 4).contiguous().to(device),
    )


class Timer:
    """Accumulates wall time per named stage, synchronising CUDA around each."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, name: str, fn: Callable, *args, **kwargs):
        self.sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
        return out


def make_batch(cfg: ModelConfig, grid: BevGrid, batch: int, num_classes: int, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    h, w = cfg.image_size
    intrinsics, ego_from_cam = synthetic_rig(batch, (h, w), device)
    prev_ego_from_ego = torch.eye(4).repeat(batch, 1, 1)
    prev_ego_from_ego[:, 0, 3] = 2.0  # drove 2 m forward since the previous keyframe
    out = {
        "images": torch.randn(batch, 6, 3, h, w, generator=gen).to(device),
        "intrinsics": intrinsics,
        "ego_from_cam": ego_from_cam,
        "prev_ego_from_ego": prev_ego_from_ego.to(device),
        "bev_label": torch.randint(0, num_classes, (batch, *grid.shape), generator=gen).to(device),
        "pseudo_labels": torch.randint(0, num_classes, (batch, 6, h, w), generator=gen).to(device),
    }
    # The previous keyframe (the history pass's input): the same images, as if standing still.
    out["prev"] = {k: out[k] for k in ("images", "intrinsics", "ego_from_cam")}
    out["has_prev"] = torch.ones(batch, dtype=torch.bool, device=device)
    return out


def bench_phase(net: BEVFormerSeg, grid: BevGrid, device, bf16: bool) -> Phase:
    """The loop's ``Phase`` for the bench's step: pretraining's reprojection objective on the
    synthetic batch, with the history pass (the temporal term off: the batch's previous
    keyframe is the current one). No data, no checkpoint: the bench calls ``train_step``."""
    return Phase(
        name="pretrain",
        cfg=PretrainConfig(w_reproj=1.0, w_temporal=0.0),
        net=net,
        loader=None,
        val=None,
        seed=0,
        labelled_samples=0,
        protocol="hdmapnet",
        grid=grid,
        device=torch.device(device),
        runtime=RuntimeConfig(bf16=bf16),
        checkpoint_path=Path(),
        meta={},
    )


def step(phase: Phase, opt: torch.optim.Optimizer, batch: dict, amp) -> None:
    """One step of the training loop itself (``model.training.loop.train_step``)."""
    train_step(phase, batch, opt, amp, "bench")


class StageTimer:
    """Wall time per stage of whole loop steps, from forward hooks on the network's parts
    (CUDA synchronised around each): backbone + FPN, encoder and seg head, those of the
    history pass (the network in eval mode) apart; the rest of the step (losses, backward,
    optimizer) is what the stages leave of the step's time."""

    STAGES = (("backbone", "backbone + FPN"), ("encoder", "encoder"), ("head", "seg head"))
    HISTORY = "history BEV (no_grad)"

    def __init__(self, net: BEVFormerSeg, device: torch.device):
        self.device, self.totals, self._started = device, {}, {}
        for attr, name in self.STAGES:
            module = getattr(net, attr)
            module.register_forward_pre_hook(lambda m, args, name=name: self._start(name))
            module.register_forward_hook(lambda m, args, out, name=name: self._stop(m, name))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, name: str) -> None:
        self.sync()
        self._started[name] = time.perf_counter()

    def _stop(self, module: torch.nn.Module, name: str) -> None:
        self.sync()
        key = name if module.training else self.HISTORY
        self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - self._started[name]

    def add_rest(self, step_total_s: float) -> None:
        self.totals["losses, backward, optimizer"] = step_total_s - sum(self.totals.values())


def _bev_features(net: BEVFormerSeg, batch: dict) -> torch.Tensor:
    feats = net.extract_features(batch["images"])
    return net.encode(feats, batch["intrinsics"], batch["ego_from_cam"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_deform_attn(
    net: BEVFormerSeg, batch: dict, device: torch.device, repeats: int
) -> tuple[list[tuple[str, float, float]], tuple[int, ...]]:
    """(impl, forward ms, forward+backward ms) on the SCA shapes of the first encoder layer."""
    cfg = net.cfg
    with torch.no_grad():
        feats = net.extract_features(batch["images"])
        _, visible = project_pillars(
            net.encoder.pillars_ego,
            batch["intrinsics"],
            batch["ego_from_cam"],
            feats.image_hw,
            feats.padded_hw,
        )
    n = visible.shape[0] * visible.shape[1]
    queries = int(visible.any(-1).sum(-1).max())
    keys = feats.value.shape[2]
    heads, head_dim = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(n, keys, heads, head_dim, generator=gen).to(device)
    loc = torch.rand(n, queries, heads, cfg.num_levels, cfg.num_points, 2, generator=gen)
    attn = torch.rand(n, queries, heads, cfg.num_levels, cfg.num_points, generator=gen)
    loc, attn = loc.to(device), attn.softmax(-1).to(device)
    impls = ["pytorch"]
    for fast in ("triton", "mmcv"):
        try:
            resolve_impl(fast, device)
        except RuntimeError:
            continue
        impls.append(fast)
    timer = Timer(device)
    rows = []
    for impl in impls:
        v, xy, a = (t.clone().requires_grad_() for t in (value, loc, attn))

        def fwd(impl=impl, v=v, xy=xy, a=a):
            return multi_scale_deformable_attn(v, feats.spatial_shapes, xy, a, impl)

        def fwd_bwd(fwd=fwd):
            fwd().sum().backward()

        fwd(), fwd_bwd()  # warm-up (Triton compiles here)
        timer.totals.clear()
        for _ in range(repeats):
            with torch.no_grad():
                timer("fwd", fwd)
            timer("fwd+bwd", fwd_bwd)
        rows.append(
            (impl, 1e3 * timer.totals["fwd"] / repeats, 1e3 * timer.totals["fwd+bwd"] / repeats)
        )
    return rows, (n, queries, keys, heads, head_dim)


# --- --compare: each switch on vs off, interleaved ------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One way to run the step."""

    name: str
    channels_last: bool = False
    fused_adamw: bool = False
    bf16: bool = False
    # model.training.precision.keep_freed_memory (process-wide, set per block)
    keep_memory: bool = False
    attention_impl: str | None = None  # None: the preset's


@dataclass
class ArmState:
    arm: Arm
    net: BEVFormerSeg
    opt: torch.optim.Optimizer
    amp: AbstractContextManager
    block_ms: list[float]  # mean ms/step of each timed block
    step_peak_mb: float = 0.0  # CUDA: peak allocated during a block above what was resident
    phase: Phase | None = None  # the loop's view of the arm's step


def compare_arms(attention_impls: list[str]) -> tuple[list[Arm], list]:
    """The arms and the (label, off arm, on arm) comparisons the bench prints."""
    off = Arm("float32, NCHW, AdamW", attention_impl="pytorch" if attention_impls else None)
    single = [
        ("channels_last backbone", replace(off, name="channels_last", channels_last=True)),
        ("fused AdamW", replace(off, name="fused AdamW", fused_adamw=True)),
        ("bf16 autocast", replace(off, name="bf16 autocast", bf16=True)),
        ("keep freed memory", replace(off, name="keep freed memory", keep_memory=True)),
    ]
    everything = Arm("all", channels_last=True, fused_adamw=True, bf16=True, keep_memory=True)
    everything = replace(everything, attention_impl=off.attention_impl)
    comparisons = [(label, off, arm) for label, arm in single]
    comparisons.append(("all together", off, everything))
    for impl in attention_impls:
        fast = replace(everything, name=f"all, attention {impl}", attention_impl=impl)
        comparisons.append((f"attention {impl} vs pytorch (all on)", everything, fast))
    arms = list(dict.fromkeys(a for _, x, y in comparisons for a in (x, y)))
    return arms, comparisons


def build_arm(arm: Arm, cfg: ModelConfig, grid: BevGrid, num_classes: int, device) -> ArmState:
    if arm.attention_impl is not None:
        cfg = replace(cfg, attention_impl=arm.attention_impl)
    torch.manual_seed(0)  # every arm starts from the same weights
    net = BEVFormerSeg(cfg, num_classes, grid).to(device).train()
    if arm.channels_last:
        to_channels_last(net)
    opt = make_adamw(net.param_groups(2e-4), 2e-4, 0.01, device, fused=arm.fused_adamw)
    phase = bench_phase(net, grid, device, arm.bf16)
    return ArmState(arm, net, opt, autocast(device, arm.bf16), [], phase=phase)


def run_interleaved(
    states: list[ArmState], batch: dict, steps: int, repeats: int, warmup: int
) -> None:
    """Fill every state's ``block_ms``: ``repeats`` rounds of one ``steps``-step block per arm,
    the arm order rotated by one each round."""
    device = next(states[0].net.parameters()).device
    sync = Timer(device).sync
    for state in states:
        keep_freed_memory(state.arm.keep_memory)
        for _ in range(warmup):
            step(state.phase, state.opt, batch, state.amp)
    for round_ in range(repeats):
        k = round_ % len(states)
        for state in states[k:] + states[:k]:
            keep_freed_memory(state.arm.keep_memory)
            sync()
            if device.type == "cuda":  # every arm's weights stay resident: count the step's own
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            for _ in range(steps):
                step(state.phase, state.opt, batch, state.amp)
            sync()
            state.block_ms.append(1e3 * (time.perf_counter() - start) / steps)
            if device.type == "cuda":
                step_mb = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
                state.step_peak_mb = max(state.step_peak_mb, step_mb)


def paired_ratios(off: ArmState, on: ArmState) -> list[float]:
    """off/on per repeat: speed-up factors (> 1: the switch is faster)."""
    return [a / b for a, b in zip(off.block_ms, on.block_ms, strict=True)]


def print_comparison(states: dict[Arm, ArmState], comparisons: list, device: torch.device) -> None:
    cuda = device.type == "cuda"
    head = "| switch | off (ms/step) | on (ms/step) | speed-up off/on | range over repeats |"
    print(head + (" step peak MiB off | step peak MiB on |" if cuda else ""))
    print("|---|---|---|---|---|" + ("---|---|" if cuda else ""))
    for label, off_arm, on_arm in comparisons:
        off, on = states[off_arm], states[on_arm]
        ratios = paired_ratios(off, on)
        row = (
            f"| {label} | {statistics.median(off.block_ms):.1f} | "
            f"{statistics.median(on.block_ms):.1f} | {statistics.median(ratios):.2f}x | "
            f"{min(ratios):.2f}-{max(ratios):.2f}x |"
        )
        if cuda:
            row += f" {off.step_peak_mb:.0f} | {on.step_peak_mb:.0f} |"
        print(row)


def compare(args, cfg: ModelConfig, grid: BevGrid, device: torch.device) -> None:
    impls = []
    if device.type == "cuda":
        for fast in ("triton", "mmcv"):
            try:
                resolve_impl(fast, device)
            except RuntimeError:
                continue
            impls.append(fast)
    arms, comparisons = compare_arms(impls)
    states = {arm: build_arm(arm, cfg, grid, args.num_classes, device) for arm in arms}
    batch = make_batch(cfg, grid, args.batch, args.num_classes, device)
    run_interleaved(list(states.values()), batch, args.steps, args.repeats, args.warmup)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    bf16_note = (
        "bf16 autocast active"
        if bf16_autocast_active(device, True)
        else "bf16 autocast not available here: that arm runs float32"
    )
    fused_note = "fused" if fused_adamw_supported(device) else "no fused kernel: foreach"
    print(
        f"## model.tools.bench --compare: preset `{cfg.name}` on {dev_name} "
        f"({torch.get_num_threads()} CPU threads, torch {torch.__version__})\n"
    )
    print(
        f"batch {args.batch} x 6 cameras at {cfg.image_size[0]}x{cfg.image_size[1]}, "
        f"{args.repeats} interleaved repeats of {args.steps} step(s) per arm after "
        f"{args.warmup} warm-up step(s); {bf16_note}; AdamW {fused_note}; "
        "the loop's step (model.training.loop.train_step), reprojection objective\n"
    )
    print_comparison(states, comparisons, device)
    off, everything = next((off, on) for label, off, on in comparisons if label == "all together")
    roof = step_roofline(states[everything], batch, device)
    off_ms = statistics.median(states[off].block_ms)
    on_ms = statistics.median(states[everything].block_ms)
    print("\n" + roof.describe(off_ms, on_ms, off.name, "all switches on"))
    state = states[everything]
    classes, wall_ms = op_breakdown(
        lambda: step(state.phase, state.opt, batch, state.amp), max(args.steps, 2), device
    )
    print("\n" + breakdown_table(classes, wall_ms, "all switches on"))
    history_ms, reused_ms, ratios = compare_eval(states[everything], batch, args.repeats)
    print(
        f"\nevaluation ({EVAL_BATCHES} batches of consecutive keyframes, all switches on, "
        f"ms/batch):\n\n| evaluation | history pass | history reused | speed-up | "
        f"range over repeats |\n|---|---|---|---|---|\n"
        f"| forward.EvalForward | {history_ms:.1f} | {reused_ms:.1f} | "
        f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x |"
    )
    if device.type == "cuda":
        print(
            "\nstep peak: torch.cuda.max_memory_allocated during a block minus what was "
            "allocated before it (weights and optimizer state of every arm stay resident)"
        )
    else:
        print(f"\nprocess peak RSS, all arms: {peak_memory_mb(device):.0f} MiB")


EVAL_BATCHES = 4


def keyframe_batches(batch: dict, count: int) -> list[dict]:
    """``count`` batches of consecutive keyframes (each sample's previous keyframe is the one
    before it), as a validation loader in split order gives them; same images throughout."""
    size = batch["images"].shape[0]
    prev = {k: batch[k] for k in ("images", "intrinsics", "ego_from_cam")}
    out = []
    for first in range(0, count * size, size):
        tokens = [f"keyframe-{first + i}" for i in range(size)]
        prev_tokens = [f"keyframe-{first + i - 1}" if first + i else "" for i in range(size)]
        has_prev = torch.tensor([bool(t) for t in prev_tokens], device=batch["images"].device)
        out.append(
            {**batch, "sample_token": tokens, "prev_token": prev_tokens, "has_prev": has_prev}
            | {"prev": prev}
        )
    return out


@torch.no_grad()
def compare_eval(state: ArmState, batch: dict, repeats: int) -> tuple[float, float, list[float]]:
    """An evaluation pass with the history pass against ``forward.EvalForward``'s reuse:
    (ms/batch with the pass, ms/batch reused, per-repeat ratios), interleaved."""
    net, amp = state.net, state.amp
    batches = keyframe_batches(batch, EVAL_BATCHES)
    sync = Timer(next(net.parameters()).device).sync

    def with_history_pass():
        for b in batches:
            forward(net, b, history_pass(net, b, amp), True, amp)

    def with_reuse():
        forward = EvalForward(net, amp, use_history=True)
        for b in batches:
            forward(b)

    times: dict[str, list[float]] = {"pass": [], "reuse": []}
    with eval_mode(net):
        with_history_pass(), with_reuse()  # warm-up
        for round_ in range(repeats):
            order = [("pass", with_history_pass), ("reuse", with_reuse)]
            for name, fn in order[round_ % 2 :] + order[: round_ % 2]:
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(1e3 * (time.perf_counter() - start) / len(batches))
    ratios = [a / b for a, b in zip(times["pass"], times["reuse"], strict=True)]
    return statistics.median(times["pass"]), statistics.median(times["reuse"]), ratios


def step_roofline(state: ArmState, batch: dict, device) -> Roofline:
    """The operations of one step of ``state``'s arm against the best 3x3 convolution rate
    measured here in that arm's precision, either memory layout (one more step of that arm)."""
    flops = count_flops(lambda: step(state.phase, state.opt, batch, state.amp))
    bf16 = bf16_autocast_active(device, state.arm.bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = max(conv_peak(device, dtype, channels_last=layout) for layout in (True, False))
    return Roofline(flops, peak, "bf16" if bf16 else "float32")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


# --- command line ----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line naming the argument, exit 2
        _usage_error(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m model.tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", default="nano", choices=sorted(PRESETS), help="model preset (default nano)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N (default cuda when available)",
    )
    parser.add_argument("--batch", type=_positive_int, default=2, help="samples per step")
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="timed steps (default 5); with --compare, steps per block (default 3)",
    )
    parser.add_argument(
        "--warmup", type=_non_negative_int, default=2, help="untimed steps first (per arm)"
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=5,
        help="--compare: interleaved rounds; the medians are over these (default 5)",
    )
    parser.add_argument(
        "--num-classes", type=_positive_int, default=4, help="BEV classes (default 4)"
    )
    parser.add_argument(
        "--label-resolution",
        type=float,
        default=None,
        help="label grid cell in metres over 60 m x 30 m (default 0.5 for nano, else 0.15)",
    )
    parser.add_argument("--attention-impl", default=None, help="override the preset's")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast in the table (default: on CUDA yes, on CPU no; --amp on a CPU "
        "without native bf16 runs float32)",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="channels_last backbone in the table"
    )
    parser.add_argument("--fused-adamw", action="store_true", help="fused AdamW in the table")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="time each speed switch on vs off, interleaved, instead of the table",
    )
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.compare else 5
    return args


def _device_or_exit(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        _usage_error(f"--device {name}: not a device (cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        _usage_error(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            _usage_error(f"--device {name}: CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            _usage_error(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = _device_or_exit(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"attention_impl": args.attention_impl} if args.attention_impl else {}
    try:
        cfg = get_preset(args.preset, **overrides)
    except ValueError as e:
        _usage_error(f"--attention-impl {args.attention_impl}: {e}")
    resolution = args.label_resolution or (0.5 if args.preset == "nano" else 0.15)
    grid = BevGrid(resolution_m=resolution)
    if args.compare:
        compare(args, cfg, grid, device)
        return
    table(args, cfg, grid, device, resolution)


def table(args, cfg: ModelConfig, grid: BevGrid, device: torch.device, resolution: float) -> None:
    torch.manual_seed(0)
    net = BEVFormerSeg(cfg, args.num_classes, grid).to(device).train()
    if args.channels_last:
        to_channels_last(net)
    opt = make_adamw(net.param_groups(2e-4), 2e-4, 0.01, device, fused=args.fused_adamw)
    batch = make_batch(cfg, grid, args.batch, args.num_classes, device)
    bf16 = bf16_autocast_active(device, device.type == "cuda" if args.amp is None else args.amp)
    amp = autocast(device, bf16)
    phase = bench_phase(net, grid, device, bf16)

    for _ in range(args.warmup):
        step(phase, opt, batch, amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StageTimer(net, device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(phase, opt, batch, amp)
    timer.sync()
    step_s = (time.perf_counter() - start) / args.steps
    timer.add_rest(step_s * args.steps)
    memory_mb = peak_memory_mb(device)
    attn_rows, attn_shape = bench_deform_attn(net, batch, device, repeats=max(args.steps, 3))

    impl_used = resolve_impl(cfg.attention_impl, device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = torch.get_num_threads()
    switches = ["bf16 autocast" if bf16 else "float32"]
    switches += ["channels_last backbone"] if args.channels_last else []
    switches += ["fused AdamW"] if args.fused_adamw else []
    print(f"## model.tools.bench: preset `{cfg.name}` on {dev_name} ({threads} CPU threads)\n")
    print(
        f"batch {args.batch} x 6 cameras at {cfg.image_size[0]}x{cfg.image_size[1]}, "
        f"BEV queries {cfg.bev_h}x{cfg.bev_w}, label grid {grid.height}x{grid.width} "
        f"({resolution} m), {cfg.num_layers} encoder layer(s), attention `{impl_used}`, "
        f"{', '.join(switches)}; the loop's step (model.training.loop.train_step), reprojection\n"
    )
    print("| metric | value |\n|---|---|")
    print(f"| train step (ms) | {1e3 * step_s:.1f} |")
    print(f"| train samples/s | {args.batch / step_s:.2f} |")
    kind = "max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    print(f"| peak memory (MiB, {kind}) | {memory_mb:.0f} |")
    print("\n| stage | ms / step | share |\n|---|---|---|")
    total = sum(timer.totals.values())
    for name, seconds in timer.totals.items():
        ms = 1e3 * seconds / args.steps
        print(f"| {name} | {ms:.1f} | {100 * seconds / total:.0f}% |")
    n, q, k, m, dh = attn_shape
    print(
        f"\nDeformable attention, SCA shapes: {n} camera-batches x {q} visible queries, "
        f"{k} keys, {m} heads x {dh}, {cfg.num_levels} level(s) x {cfg.num_points} points\n"
    )
    print("| implementation | forward (ms) | forward + backward (ms) |\n|---|---|---|")
    for impl, fwd_ms, fwd_bwd_ms in attn_rows:
        print(f"| {impl} | {fwd_ms:.2f} | {fwd_bwd_ms:.2f} |")
    if len(attn_rows) == 1:
        print(f"\n(no fast path on {device.type}: Triton and mmcv's op need CUDA)")


if __name__ == "__main__":
    main()

"""``python -m model.tools.bench --compare``: each speed switch of
``model.training.precision`` on against off, the arms interleaved in one process (the method in
the CLI's docstring, ``model.tools.bench``), then the roofline under the step, its breakdown by
operation class and an evaluation pass with and without the history reuse."""

from __future__ import annotations

import statistics
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import torch

from model.evaluation.forward import EvalForward, eval_mode, forward, history_pass
from model.geometry import BevGrid
from model.network.backbone import has_frozen_norms
from model.network.bevformer import BEVFormerSeg
from model.presets import ModelConfig
from model.tools.bench_step import (
    Timer,
    bench_phase,
    fast_attention_impls,
    make_batch,
    peak_memory_mb,
    step,
)
from model.tools.op_profile import breakdown_table, op_breakdown
from model.tools.roofline import Roofline, conv_peak, count_flops
from model.training.loop import Phase
from model.training.precision import (
    autocast,
    bf16_autocast_active,
    fold_frozen_norms,
    fused_adamw_supported,
    keep_freed_memory,
    make_adamw,
    to_channels_last,
)


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
    fold_norms: bool = False  # model.training.precision.fold_frozen_norms


@dataclass
class ArmState:
    arm: Arm
    net: BEVFormerSeg
    opt: torch.optim.Optimizer
    amp: AbstractContextManager
    block_ms: list[float]  # mean ms/step of each timed block
    step_peak_mb: float = 0.0  # CUDA: peak allocated during a block above what was resident
    phase: Phase | None = None  # the loop's view of the arm's step


def compare_arms(attention_impls: list[str], frozen_norms: bool) -> tuple[list[Arm], list]:
    """The arms and the (label, off arm, on arm) comparisons the bench prints: each switch
    against float32 NCHW, all of them together; then against all on, folding frozen norms
    (where the preset has frozen norms) and each fast attention implementation."""
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
    if frozen_norms:
        folded = replace(everything, name="all, frozen norms folded", fold_norms=True)
        comparisons.append(("fold frozen norms (all on)", everything, folded))
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
    if arm.fold_norms:
        fold_frozen_norms(net)
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
    impls = fast_attention_impls(device) if device.type == "cuda" else []
    arms, comparisons = compare_arms(impls, has_frozen_norms(cfg))
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
    folded = [arm for _, base, arm in comparisons if base is everything and arm.fold_norms]
    for arm in [everything, *folded]:  # the breakdown before and after folding
        state = states[arm]
        classes, wall_ms = op_breakdown(
            lambda state=state: step(state.phase, state.opt, batch, state.amp),
            max(args.steps, 2),
            device,
        )
        what = "all switches on" if arm is everything else arm.name
        print("\n" + breakdown_table(classes, wall_ms, what))
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

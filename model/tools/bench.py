"""Training-step benchmark of a preset on synthetic inputs.

    python -m model.tools.bench --preset nano --device cpu
    python -m model.tools.bench --preset tiny --device cuda --batch 1
    python -m model.tools.bench --preset nano --device cpu --compare

Prints a markdown table: train samples/s, peak memory, the step broken down into its stages,
and multi-scale deformable attention (spatial cross-attention shapes of the preset) timed for
every implementation that can run on the device.

``--compare`` instead times each speed switch of ``model.training.precision`` (channels_last, fused
AdamW, bf16 autocast, keeping freed memory, all together; on CUDA also the attention
implementations; for a preset with frozen norms, folding them) against the plain float32 step
(the last ones against all switches on), the step of the loop before these switches
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
seg head; the losses, backward and optimizer are the rest of the step. The step and its
synthetic inputs are ``model.tools.bench_step``'s, ``--compare`` is ``model.tools.bench_compare``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from model.geometry import BevGrid
from model.network.bevformer import BEVFormerSeg
from model.network.deform_attn import multi_scale_deformable_attn, resolve_impl
from model.network.encoder import project_pillars
from model.presets import PRESETS, ModelConfig, get_preset
from model.tools import bench_step
from model.tools.bench_compare import compare
from model.training import precision


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
    impls = ["pytorch", *bench_step.fast_attention_impls(device)]
    timer = bench_step.Timer(device)
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
    numbers = (
        ("--batch", _positive_int, 2, "samples per step"),
        ("--steps", _positive_int, None, "timed steps (default 5); with --compare, per block (3)"),
        ("--warmup", _non_negative_int, 2, "untimed steps first (per arm)"),
        ("--repeats", _positive_int, 5, "--compare: interleaved rounds, the medians' (default 5)"),
        ("--num-classes", _positive_int, 4, "BEV classes (default 4)"),
        ("--label-resolution", float, None, "label cell in metres (default 0.5 nano, else 0.15)"),
        ("--threads", _positive_int, None, "torch CPU threads"),
    )
    for flag, kind, default, text in numbers:
        parser.add_argument(flag, type=kind, default=default, help=text)
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
        precision.to_channels_last(net)
    opt = precision.make_adamw(net.param_groups(2e-4), 2e-4, 0.01, device, fused=args.fused_adamw)
    batch = bench_step.make_batch(cfg, grid, args.batch, args.num_classes, device)
    wanted = device.type == "cuda" if args.amp is None else args.amp
    bf16 = precision.bf16_autocast_active(device, wanted)
    amp = precision.autocast(device, bf16)
    phase = bench_step.bench_phase(net, grid, device, bf16)

    for _ in range(args.warmup):
        bench_step.step(phase, opt, batch, amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StageTimer(net, device)
    start = time.perf_counter()
    for _ in range(args.steps):
        bench_step.step(phase, opt, batch, amp)
    timer.sync()
    step_s = (time.perf_counter() - start) / args.steps
    timer.add_rest(step_s * args.steps)
    memory_mb = bench_step.peak_memory_mb(device)
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

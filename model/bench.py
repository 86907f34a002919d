"""Training-step benchmark of a preset on synthetic inputs.

    python -m model.bench --preset nano --device cpu
    python -m model.bench --preset tiny --device cuda --batch 1

Prints a markdown table: train samples/s, peak memory, the step broken down into its stages,
and multi-scale deformable attention (spatial cross-attention shapes of the preset) timed for
every implementation that can run on the device.

The step is what a training loop does per batch: the previous keyframe's BEV under no_grad
(the history, as the official BEVFormer computes it), then forward, loss, backward and an
AdamW step. The reprojection and loss rows use ``model.reprojection`` / ``model.losses`` when
they exist; without them the loss is a stand-in cross-entropy on ``bev_logits`` and the
table says so.
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.bevformer import BEVFormerSeg
from model.deform_attn import multi_scale_deformable_attn, resolve_impl
from model.encoder import project_pillars
from model.geometry import BevGrid
from model.presets import PRESETS, ModelConfig, get_preset

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


@dataclass
class LossHooks:
    """How the bench computes reprojection and the loss; C2's modules when present."""

    description: str
    reprojection: Callable | None
    loss: Callable


def _loss_hooks(num_classes: int) -> LossHooks:
    try:
        from model import losses, reprojection  # owned by the training-core helper
    except ImportError:
        why = "model.reprojection / model.losses not found"
    else:
        hooks = _project_loss_hooks(reprojection, losses)
        if hooks is not None:
            return hooks
        why = "model.reprojection / model.losses lack the functions the bench knows"

    def stand_in(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits, batch["bev_label"])

    return LossHooks(f"stand-in BEV cross-entropy ({why})", None, stand_in)


def _project_loss_hooks(reprojection, losses) -> LossHooks | None:
    """Wire the project's reprojection + losses in, if their API is the one we know."""
    sample_fn = getattr(reprojection, "reproject_bev_logits", None)
    grids_fn = getattr(reprojection, "reprojection_grids", None)
    loss_fn = getattr(losses, "reprojection_loss", None)
    if sample_fn is None or grids_fn is None or loss_fn is None:
        return None

    def reproject(logits: torch.Tensor, batch: dict):
        grids = grids_fn(
            batch["intrinsics"], batch["ego_from_cam"], batch["image_hw"], batch["grid"]
        )
        return sample_fn(logits, grids)

    def loss(reprojected, batch: dict) -> torch.Tensor:
        return loss_fn(reprojected, batch["pseudo_labels"])

    return LossHooks("model.reprojection + model.losses.reprojection_loss", reproject, loss)


def make_batch(cfg: ModelConfig, grid: BevGrid, batch: int, num_classes: int, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    h, w = cfg.image_size
    intrinsics, ego_from_cam = synthetic_rig(batch, (h, w), device)
    prev_ego_from_ego = torch.eye(4).repeat(batch, 1, 1)
    prev_ego_from_ego[:, 0, 3] = 2.0  # drove 2 m forward since the previous keyframe
    return {
        "images": torch.randn(batch, 6, 3, h, w, generator=gen).to(device),
        "intrinsics": intrinsics,
        "ego_from_cam": ego_from_cam,
        "prev_ego_from_ego": prev_ego_from_ego.to(device),
        "bev_label": torch.randint(0, num_classes, (batch, *grid.shape), generator=gen).to(device),
        "pseudo_labels": torch.randint(0, num_classes, (batch, 6, h, w), generator=gen).to(device),
        "image_hw": (h, w),
        "grid": grid,
    }


def train_step(net, opt, batch, hooks: LossHooks, timer: Timer, autocast: bool) -> float:
    device_type = timer.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            prev_bev = timer("history BEV (no_grad)", _bev_features, net, batch)
        feats = timer("backbone + FPN", net.extract_features, batch["images"])
        bev = timer(
            "encoder",
            net.encode,
            feats,
            batch["intrinsics"],
            batch["ego_from_cam"],
            prev_bev,
            batch["prev_ego_from_ego"],
        )
        logits = timer("seg head", net.decode, bev)
        target = logits
        if hooks.reprojection is not None:
            target = timer("reprojection", hooks.reprojection, logits.float(), batch)
        loss = timer("loss", hooks.loss, target.float(), batch)
    timer("backward", loss.backward)
    timer("optimizer", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
    return loss.item()


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="nano", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument(
        "--label-resolution",
        type=float,
        default=None,
        help="label grid cell in metres over 60 m x 30 m (default 0.5 for nano, else 0.15)",
    )
    parser.add_argument("--attention-impl", default=None, help="override the preset's")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = {"attention_impl": args.attention_impl} if args.attention_impl else {}
    cfg = get_preset(args.preset, **overrides)
    resolution = args.label_resolution or (0.5 if args.preset == "nano" else 0.15)
    grid = BevGrid(resolution_m=resolution)
    torch.manual_seed(0)
    net = BEVFormerSeg(cfg, args.num_classes, grid).to(device).train()
    opt = torch.optim.AdamW(net.param_groups(2e-4), lr=2e-4, weight_decay=0.01)
    batch = make_batch(cfg, grid, args.batch, args.num_classes, device)
    hooks = _loss_hooks(args.num_classes)
    autocast = device.type == "cuda" and not args.no_amp
    timer = Timer(device)

    for _ in range(args.warmup):
        train_step(net, opt, batch, hooks, timer, autocast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer.totals.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(net, opt, batch, hooks, timer, autocast)
    timer.sync()
    step_s = (time.perf_counter() - start) / args.steps
    memory_mb = peak_memory_mb(device)
    attn_rows, attn_shape = bench_deform_attn(net, batch, device, repeats=max(args.steps, 3))

    impl_used = resolve_impl(cfg.attention_impl, device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = torch.get_num_threads()
    print(f"## model.bench: preset `{cfg.name}` on {dev_name} ({threads} CPU threads)\n")
    print(
        f"batch {args.batch} x 6 cameras at {cfg.image_size[0]}x{cfg.image_size[1]}, "
        f"BEV queries {cfg.bev_h}x{cfg.bev_w}, label grid {grid.height}x{grid.width} "
        f"({resolution} m), {cfg.num_layers} encoder layer(s), attention `{impl_used}`, "
        f"{'bf16 autocast' if autocast else 'float32'}, loss: {hooks.description}\n"
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
    if hooks.reprojection is None:
        print("| reprojection | not measured: model.reprojection not available | |")
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

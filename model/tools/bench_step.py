"""What the step benchmarks time: synthetic inputs (a nuScenes-like camera ring, a batch), the
training loop's own step on a pretraining phase with the reprojection objective
(``model.training.loop.train_step``), a timer and the peak memory."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.config import PretrainConfig, RuntimeConfig
from model.geometry import BevGrid
from model.network.bevformer import BEVFormerSeg
from model.network.deform_attn import resolve_impl
from model.presets import ModelConfig
from model.training.loop import Phase, train_step

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


def _bev_features(net: BEVFormerSeg, batch: dict) -> torch.Tensor:
    feats = net.extract_features(batch["images"])
    return net.encode(feats, batch["intrinsics"], batch["ego_from_cam"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fast_attention_impls(device: torch.device) -> list[str]:
    """The fast deformable attention implementations that run on ``device`` (our Triton
    kernels, mmcv's op), in that order."""
    impls = []
    for fast in ("triton", "mmcv"):
        try:
            resolve_impl(fast, device)
        except RuntimeError:
            continue
        impls.append(fast)
    return impls

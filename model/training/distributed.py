"""Data parallelism for the loop: what changes when a phase runs on N processes.

The loop calls these where one process and N differ; with no process group (the default, one
process) every function here is the identity or a no-op, so a one-process run is exactly what it
was. Who starts the processes and their group (``torch.distributed``: gloo on CPU, NCCL on CUDA)
is the caller's business (``harness.distributed`` starts them with Ray Train); this module knows
only ``torch.distributed``.

Semantics (docs/training.md, "Data-parallel trials"):

- The spec's batch size is per process; a step's global batch is ``N x batch_size``. Process
  ``r`` reads samples ``r, r + N, ...`` of the permutation the one-process loader draws for the
  same pass (``ShardSampler``), so N processes x batch b step through the same global batches as
  one process x batch N*b, and every sample is read once per pass (a pass of n samples is padded
  with its first ``-n mod N`` samples, as ``DistributedSampler`` pads, so every process takes as
  many steps).
- Gradients are averaged over the processes (``DistributedDataParallel``); BatchNorm layers that
  train use the statistics of the global batch (``sync_batchnorm``): ``torch.nn.SyncBatchNorm``
  on CUDA, ``GlobalBatchNorm2d`` on CPU, where torch has no SyncBatchNorm kernel.
- Validation splits the val keyframes into N contiguous, unpadded runs (``val_shard``), each
  counted once, and sums the metric's counts over the processes before dividing
  (``sum_counts``).
- Process 0 alone writes checkpoints (``is_main``); every process reads them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler


def active() -> bool:
    """Whether this process is one of a process group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Process 0 (or the only process): the one that writes checkpoints."""
    return rank() == 0


class ShardSampler(Sampler[int]):
    """This process's share of the order ``sampler`` yields (the one-process loader's sampler,
    drawing from the loader's generator exactly as that loader does): positions ``rank``,
    ``rank + N``, ... of the pass, padded to a multiple of N with its first positions."""

    def __init__(self, sampler: Sampler[int], num_replicas: int, rank_: int):
        self.sampler, self.num_replicas, self.rank = sampler, num_replicas, rank_

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        order += order[: len(self) * self.num_replicas - len(order)]
        return iter(order[self.rank :: self.num_replicas])


def val_shard(n: int, workers: int | None = None, index: int | None = None) -> range:
    """Process ``index``'s (default: this process's) contiguous run of ``n`` val samples; the
    runs of the ``workers`` processes cover each sample once (no padding: a duplicate would be
    counted twice). Contiguous, so evaluation reuses each keyframe's BEV as the next one's
    history within a run."""
    workers = world_size() if workers is None else workers
    index = rank() if index is None else index
    size, extra = divmod(n, workers)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def sum_counts(tensors: list[torch.Tensor]) -> None:
    """Sum count tensors over the processes, in place (through the device under NCCL)."""
    if not active():
        return
    nccl = dist.get_backend() == "nccl"
    for tensor in tensors:
        moved = tensor.cuda() if nccl else tensor
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not tensor:
            tensor.copy_(moved.cpu())


def mean_over_processes(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each value averaged over the processes (the keys are the same on every process)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64) for k in keys])
    stacked = stacked.cpu() if dist.get_backend() == "gloo" else stacked
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(keys, stacked / world_size(), strict=True))


def sum_over_processes(value: float, device: torch.device) -> float:
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor)


def barrier() -> None:
    if active():
        dist.barrier()


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every process's output
    depends on every process's input."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that trains on the statistics of the global batch across the processes, as
    ``torch.nn.SyncBatchNorm`` does on CUDA: per-channel sum, sum of squares and count are
    summed with a differentiable all-reduce, so each process's gradient carries the other
    processes' share through the statistics (and DDP's averaging then makes it the global
    batch's). Evaluation and frozen layers use the running statistics, with no communication.
    Same parameters and buffers as ``nn.BatchNorm2d``: checkpoints load either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        xf = x.float()
        count = torch.full((1,), xf.numel() / xf.shape[1], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count])
        stats = _SumOverProcesses.apply(stats)
        channels = xf.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(
                    self.num_batches_tracked
                )
                unbiased = var * total / (total - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        shape = (1, channels, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` with its BatchNorm2d layers computing global-batch statistics when trained
    (no change without a process group). Layers kept in eval mode (``norm_eval``, frozen
    stages) use their running statistics either way."""
    if not active():
        return net
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for name, child in list(net.named_children()):
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            replacement.load_state_dict(child.state_dict())
            replacement.to(child.running_mean.device if child.running_mean is not None else "cpu")
            replacement.train(child.training)
            setattr(net, name, replacement)
        else:
            sync_batchnorm(child, device)
    return net


class _Objectives(nn.Module):
    """The phase's loss terms as one module call, so that DDP sees the forward it wraps (the
    loop calls the network's stages, not its ``forward``)."""

    def __init__(self, net: nn.Module, terms):
        super().__init__()
        self.net = net
        self._terms = terms

    def forward(self, batch: dict, amp) -> dict[str, torch.Tensor]:
        return self._terms(batch, amp)


def data_parallel(net: nn.Module, terms, device: torch.device):
    """``terms(batch, amp)`` (the phase's loss terms on ``net``) as a callable whose backward
    averages the gradients over the processes; ``terms`` itself without a process group.
    ``find_unused_parameters``: a phase's objectives need not use every head."""
    if not active():
        return terms
    from torch.nn.parallel import DistributedDataParallel

    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    module = DistributedDataParallel(
        _Objectives(net, terms),
        device_ids=ids,
        find_unused_parameters=True,
    )
    return module

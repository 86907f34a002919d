"""One training phase, step by step, and the evaluation pass both phases share.

One step, as BEVFormer trains with its history queue of length 2:

1. the previous keyframe's BEV is computed without gradients with the model in eval mode
   (``obtain_history_bev`` in the official code); it feeds temporal self-attention and, warped
   by ego motion, is the target of the temporal loss;
2. forward on the current keyframe with that history, then the phase's weighted loss terms;
3. NaN/inf guard on every term and on the gradient norm (one host sync per step), gradient
   clipping, AdamW step with the learning rate of that step.

The cosine runs per iteration, not per epoch (our runs are a few epochs long, and an
epoch-wise cosine would be a staircase), and the warmup is capped at ``warmup_max_fraction`` of
the phase's iterations (500 warmup iterations would be the whole of a short CPU run).

Clocks: ``cum_wall_s`` is the wall time of the training epochs (data loading, steps), without
validation or checkpoint writes, summed over epochs and across resumes. ``cum_gpu_s`` is the
GPU time of the steps (CUDA events around each step); on CPU it is 0.0.

WSD (``optim.schedule: wsd``): up to a length's decay start the lr does not depend on the
length, so a run may stop there (``Phase.stop_step``: a trunk segment) and another length's run
may start from that state (``Phase.init_from``: its branch, or the trunk's next segment).

Determinism: every step reseeds torch's global RNG from (seed, step) and every pass over the
loader reseeds its shuffling generator from (seed, pass), so a run resumed from a checkpoint,
or a branch started from a trunk's state, sees the same batches and random draws as an
uninterrupted run (on the same device and thread count).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import names, objectives
from model.config import EarlyStopping, EpochReport, OptimConfig, PhaseConfig, RuntimeConfig
from model.evaluation.forward import evaluate, forward, history_pass, preview, to_device
from model.geometry import BevGrid
from model.network.interface import BevModel
from model.network.warp import rotate_ego_frame
from model.training import distributed
from model.training.checkpoint import load_checkpoint, save_checkpoint
from model.training.compat import check_resumable, check_trunk
from model.training.losses import NonFiniteLossError, check_finite, weighted_sum
from model.training.precision import (
    autocast,
    fold_frozen_norms,
    make_adamw,
    to_channels_last,
)

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % 2**63


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_033 + step * 104_729 + 1) % 2**63


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at iteration ``step`` (0-based) of ``total_steps``."""
    if cfg.schedule == "wsd":
        start = cfg.decay_start(total_steps)
        progress = min(max(0, step + 1 - start) / max(total_steps - start, 1), 1.0)
        factor = 1.0 - (1.0 - cfg.min_lr_ratio) * progress  # the last step is at min_lr_ratio
    else:
        progress = min(step / max(total_steps, 1), 1.0)
        factor = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )
    warmup = cfg.warmup_steps(total_steps)
    if step < warmup:
        # mmcv's linear warmup: from warmup_ratio x the regular lr up to the regular lr.
        factor *= 1.0 - (1.0 - step / warmup) * (1.0 - cfg.warmup_ratio)
    return factor


# --- one phase -----------------------------------------------------------------------------------


@dataclass
class Phase:
    """A phase as the loop runs it: the network, its data and what it optimises."""

    name: str  # pretrain | finetune
    cfg: PhaseConfig
    net: BevModel
    loader: DataLoader
    val: DataLoader | None
    seed: int
    labelled_samples: int
    protocol: str
    grid: BevGrid
    device: torch.device
    runtime: RuntimeConfig  # precision switches, progress bars
    checkpoint_path: Path
    meta: dict  # plain values stored with the checkpoint (configs, subset)
    bev_class_weights: tuple[float, ...] | None = None
    bev_pos_weight: tuple[float, ...] | None = None
    reproj_class_weights: tuple[float, ...] | None = None
    extra_steps: int = 0  # added to the budget (the compute-matched supervised arm)
    early_stopping: EarlyStopping | None = None
    preview: bool = False  # render EpochReport.preview after each validation
    # WSD: end at this step (a trunk segment ends at a length's decay start) ...
    stop_step: int | None = None
    # ... and start, when there is no checkpoint of its own, from such a state (weights,
    # optimiser, step) of the same configuration at another length; clocks start at 0.
    init_from: Path | None = None

    @property
    def weights(self) -> dict[str, float]:
        return self.cfg.weights


def loss_terms(phase: Phase, batch: dict, amp) -> dict[str, torch.Tensor]:
    """The phase's active objectives (``model.objectives``) on one batch: ``{name: loss}``."""
    net, weights, cfg = phase.net, phase.weights, phase.cfg
    need_prev = cfg.use_history or "prev" in objectives.needs(weights)
    history = history_pass(net, batch, amp) if need_prev else None
    out = forward(net, batch, history, cfg.use_history, amp)
    logits = out["bev_logits"].float()
    labelled = batch.get("labelled")  # only in fine-tuning batches that mix unlabelled samples

    step = {"cfg": cfg, "grid": phase.grid, "protocol": phase.protocol, "net": net}
    seen = {"batch": batch, "out": out, "logits": logits, "history": history}
    weights_of_classes = {
        "bev_class_weights": phase.bev_class_weights,
        "bev_pos_weight": phase.bev_pos_weight,
        "pseudo_class_weights": phase.reproj_class_weights,
    }

    def inputs(objective: objectives.Objective) -> objectives.LossInputs:
        mask = labelled if objective.samples == "labelled" else None
        return objectives.LossInputs(**step, **seen, mask=mask, **weights_of_classes)

    return objectives.loss_terms(inputs, weights)


def train_step(
    phase: Phase,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    amp,
    where: str = "",
    terms_of: Callable | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step on ``batch`` (on the phase's device): the weighted sum of the
    objectives, backward, NaN/inf guard (one host sync), gradient clipping, AdamW. Returns the
    total loss and the terms, detached from nothing (the caller sums them). ``terms_of(batch,
    amp)``: the loss terms through ``distributed.data_parallel`` (gradients averaged over the
    processes); default ``loss_terms`` of the phase."""
    terms = terms_of(batch, amp) if terms_of else loss_terms(phase, batch, amp)
    loss = weighted_sum(terms, phase.weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        phase.net.parameters(), phase.cfg.optim.grad_clip_norm
    )
    check_finite({**terms, "loss": loss.detach()}, where)
    if not bool(torch.isfinite(grad_norm)):
        raise NonFiniteLossError(f"non-finite gradient norm {float(grad_norm)} at {where}")
    optimizer.step()
    return loss, terms


def prepare(net: BevModel, device: torch.device, runtime: RuntimeConfig) -> BevModel:
    """``net`` on ``device``, its backbone + FPN in channels_last and its frozen norms folded if
    ``runtime`` says so."""
    net.to(device)
    if runtime.fold_frozen_norms:
        fold_frozen_norms(net)
    return to_channels_last(net) if runtime.channels_last else net


def make_optimizer(
    net: BevModel, cfg: OptimConfig, device: torch.device, fused: bool
) -> torch.optim.AdamW:
    """AdamW over the network's parameter groups (``base_lr``: the lr the schedule scales)."""
    groups = net.param_groups(cfg.lr, cfg.backbone_lr_mult)
    for group in groups:
        group["base_lr"] = group["lr"]
    return make_adamw(groups, cfg.lr, cfg.weight_decay, device, fused)


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


@dataclass(frozen=True)
class Schedule:
    """A phase's budget in optimiser steps, cut into reporting periods."""

    total_steps: int
    period_steps: int  # steps between reports (validation, checkpoint, on_epoch)

    @property
    def periods(self) -> int:
        return max(1, math.ceil(self.total_steps / self.period_steps))


def schedule(
    cfg: PhaseConfig, steps_per_pass: int, extra_steps: int = 0, workers: int = 1
) -> Schedule:
    """The phase's steps: ``budget`` in epochs (passes over the loader), steps or samples,
    plus ``extra_steps`` (the compute-matched arm). Epoch budgets report once per epoch.
    Steps are optimiser steps; with ``workers`` processes a step reads ``workers x
    batch_size`` samples (a samples budget counts them all)."""
    budget = cfg.budget
    steps_per_pass = max(steps_per_pass, 1)
    if budget.unit == "epochs":
        return Schedule(budget.value * steps_per_pass + extra_steps, steps_per_pass)
    total, period = budget.steps(cfg.batch_size, workers)
    return Schedule(total + extra_steps, period)


class _Batches:
    """The loader's batches as one endless stream: pass k (1-based) shuffles with the seed
    (seed, k), so step s of the phase always sees the same batch, resumed or not."""

    def __init__(self, loader: DataLoader, seed: int):
        self.loader, self.seed = loader, seed
        self.per_pass = max(len(loader), 1)
        self.iterator = None

    def seek(self, step: int) -> None:
        """Position before step ``step`` (0-based) of the phase."""
        passes, offset = divmod(step, self.per_pass)
        self._start_pass(passes + 1)
        for _ in range(offset):  # a resume inside a pass (step budgets): skip what was seen
            next(self.iterator)

    def _start_pass(self, index: int) -> None:
        if self.loader.generator is not None:
            self.loader.generator.manual_seed(_epoch_seed(self.seed, index))
        self.iterator = iter(self.loader)
        self.pass_index = index

    def next(self) -> dict:
        try:
            return next(self.iterator)
        except StopIteration:
            self._start_pass(self.pass_index + 1)
            return next(self.iterator)


def _val_due(cfg: PhaseConfig, period: int, periods: int) -> bool:
    if cfg.val_every is None:
        return False
    return period == periods or (cfg.val_every > 0 and period % cfg.val_every == 0)


@dataclass
class _Best:
    """The best validation so far, for early stopping and the best/* metrics."""

    epoch: int = 0
    miou: float = -math.inf
    metrics: dict = None
    bad: int = 0  # validations since the last improvement

    def update(self, epoch: int, val: dict, miou_key: str, min_delta: float) -> None:
        miou = val[miou_key]
        if miou > self.miou + min_delta or self.epoch == 0:
            self.epoch, self.miou, self.metrics, self.bad = epoch, miou, dict(val), 0
        else:
            self.bad += 1

    def report(self) -> dict[str, float]:
        if not self.epoch:
            return {}
        best = {names.best_metric(k): v for k, v in self.metrics.items()}
        return {**best, names.BEST_EPOCH: float(self.epoch)}


def run_phase(phase: Phase, on_epoch: Callable[[EpochReport], None] | None) -> list[EpochReport]:
    """Train the phase's budget, resuming from ``phase.checkpoint_path`` if it exists."""
    net, device, cfg, runtime = phase.net, phase.device, phase.cfg, phase.runtime
    distributed.sync_batchnorm(net, device)
    prepare(net, device, runtime)
    optimizer = make_optimizer(net, cfg.optim, device, runtime.fused_adamw)
    workers = distributed.world_size()
    plan = schedule(cfg, len(phase.loader), phase.extra_steps, workers)
    history: list[EpochReport] = []
    start, step, cum_wall_s, cum_gpu_s = 0, 0, 0.0, 0.0
    best = _Best()
    stopping = phase.early_stopping
    if phase.checkpoint_path.is_file():
        state = load_checkpoint(phase.checkpoint_path)
        check_resumable(state, phase.name, phase.meta, phase.checkpoint_path)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
        step = int(state.get("step", start * plan.period_steps))
        cum_wall_s, cum_gpu_s = float(state["cum_wall_s"]), float(state["cum_gpu_s"])
        history = [EpochReport(**r) for r in state["history"]]
        best = _Best(**state["best"]) if state.get("best") else best
        log.info("%s resumes after period %d from %s", phase.name, start, phase.checkpoint_path)
        if history and history[-1].stopped_early or step == phase.stop_step:
            return history
    elif phase.init_from is not None:
        state = load_checkpoint(phase.init_from)
        check_trunk(state, phase.name, phase.meta, phase.init_from)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        start = step // plan.period_steps  # the branch may start inside a period
        log.info("%s starts at step %d from %s", phase.name, step, phase.init_from)
    _check_wsd(cfg, plan, phase.stop_step)
    batches = _Batches(phase.loader, phase.seed)
    batches.seek(step)
    amp = autocast(device, runtime.bf16)
    cuda = device.type == "cuda"
    terms_of = distributed.data_parallel(
        net, lambda batch, amp: loss_terms(phase, batch, amp), device
    ) if workers > 1 else None  # fmt: skip
    miou_key = names.val_metric(phase.name, names.MIOU)
    for period in range(start + 1, plan.periods + 1):
        net.train()
        sums: dict[str, torch.Tensor] = {}
        events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        started = time.perf_counter()
        end = min(period * plan.period_steps, plan.total_steps, phase.stop_step or math.inf)
        n = end - step
        bar = tqdm(
            total=n,
            desc=f"{phase.name} {period}/{plan.periods}",
            leave=False,
            disable=None if runtime.progress else True,
        )
        for i in range(n):
            torch.manual_seed(_step_seed(phase.seed, step))
            batch = batches.next()
            _set_lr(optimizer, lr_factor(step, plan.total_steps, cfg.optim))
            batch = to_device(batch, device)
            if cuda:
                events.append(_event_pair())
                events[-1][0].record()
            if cfg.bev_aug_yaw_deg > 0:
                batch = rotate_ego_frame(batch, phase.grid, cfg.bev_aug_yaw_deg)
            where = f"{phase.name} epoch {period} step {i + 1}"
            loss, terms = train_step(phase, batch, optimizer, amp, where, terms_of)
            step += 1
            bar.update()
            if cuda:
                events[-1][1].record()
            for term, value in {"loss": loss, **terms}.items():
                key = names.loss_metric(phase.name, term)
                sums[key] = sums.get(key, 0.0) + value.detach()
        bar.close()
        if cuda:
            torch.cuda.synchronize(device)
            gpu_s = sum(a.elapsed_time(b) for a, b in events) / 1000.0
            cum_gpu_s += distributed.sum_over_processes(gpu_s, device)  # every device's time
        epoch_wall_s = time.perf_counter() - started
        cum_wall_s += epoch_wall_s
        sums = distributed.mean_over_processes(sums)  # the global batch's mean
        losses = {k: float(v) / max(n, 1) for k, v in sums.items()}
        val: dict[str, float] = {}
        val_start = time.perf_counter()
        if phase.val is not None and _val_due(cfg, period, plan.periods):
            metrics = evaluate(
                net, phase.val, phase.protocol, device, runtime.bf16, cfg.use_history
            )
            val = {names.val_metric(phase.name, k): v for k, v in metrics.items()}
            if stopping is not None:
                best.update(period, val, miou_key, stopping.min_delta)
            image = (
                preview(net, phase.val, phase.protocol, device, runtime.bf16, cfg.use_history)
                if phase.preview and distributed.is_main()
                else None
            )
        else:
            image = None
        stop = stopping is not None and best.bad >= stopping.patience and period < plan.periods
        report = EpochReport(
            phase=phase.name,
            epoch=period,
            epochs=plan.periods,
            losses=losses,
            val=val,
            cum_wall_s=cum_wall_s,
            cum_gpu_s=cum_gpu_s,
            labelled_samples=phase.labelled_samples,
            checkpoint=str(phase.checkpoint_path),
            lr=optimizer.param_groups[-1]["lr"],
            epoch_wall_s=epoch_wall_s,
            val_wall_s=time.perf_counter() - val_start,
            steps=step,
            best=best.report(),
            stopped_early=stop,
            preview=image,
        )
        history.append(report)
        if distributed.is_main():  # every process reads it; one writes it
            save_checkpoint(
                phase.checkpoint_path,
                {
                    "phase": phase.name,
                    "epoch": period,
                    "epochs": plan.periods,
                    "step": step,
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "cum_wall_s": cum_wall_s,
                    "cum_gpu_s": cum_gpu_s,
                    "history": [r.to_dict() for r in history],
                    "best": dataclasses.asdict(best) if best.epoch else None,
                    **phase.meta,
                },
            )
        miou = val.get(miou_key)
        log.info(
            "%s %d/%d (%d steps): %s; val mIoU %s; %.1f s%s",
            phase.name,
            period,
            plan.periods,
            step,
            ", ".join(f"{k} {v:.4f}" for k, v in losses.items()),
            f"{miou:.4f}" if miou is not None else "-",
            epoch_wall_s,
            "; stopping early" if stop else "",
        )
        if on_epoch is not None:
            on_epoch(report)
        if stop or step == phase.stop_step:
            break
    return history


def _check_wsd(cfg: PhaseConfig, plan: Schedule, stop_step: int | None) -> None:
    """A WSD run's warmup must end before its decay (epoch budgets: known only here), and a
    trunk segment stops at a step where the lr does not yet depend on the length."""
    optim = cfg.optim
    if optim.schedule != "wsd":
        if stop_step is not None:
            raise ValueError("only a wsd schedule can stop at a decay start (stop_step)")
        return
    start = optim.decay_start(plan.total_steps)
    if optim.warmup_iters > start:
        raise ValueError(
            f"optim.warmup_iters: {optim.warmup_iters} warmup steps run past the wsd decay "
            f"start (step {start} of {plan.total_steps})"
        )
    if stop_step is not None and stop_step > start:
        raise ValueError(f"stop_step {stop_step} is past the decay start (step {start})")


def _event_pair() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

"""One trial: (shared) pretraining, fine-tuning on a label fraction, MLflow logging, Tune reports.

`run_trial(config, context)` is the Ray Tune function trainable. `config["trial"]` is a
`Trial` as a dict (a method, a seed and the search axes' values); `context` is the same for
every trial of a sweep. The trial resolves its settings with the spec model, calls the training
core's public functions (`model.training.train`) with the spec's sections as they are, and writes
the run layout of docs/architecture.md through `harness.tracking`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import console, distributed, lifetime
from harness.context import SweepContext, core_data, core_runtime, run_monitor
from harness.pretraining import Pretraining, ensure_pretraining
from harness.rounds import ROUND_TAG, round_of
from harness.spec import stable_hash
from harness.tracking import Tracker, error_text, flatten
from harness.trials import ResolvedTrial, Trial, fraction_text
from model import names
from model.config import DataConfig
from model.names import PARENT, PRETRAIN_KEY, ROLE, TRIAL_ID

log = logging.getLogger(__name__)


def run_trial(config: dict, context: SweepContext) -> None:
    """Ray Tune function trainable: run one trial and report each fine-tuning epoch."""
    lifetime.die_with_parent()  # a killed sweep's worker writes nothing more
    lifetime.exit_on_ignored_exit()  # Ray's SIGTERM ends an idle worker without a traceback
    console.quiet_worker_loggers()
    trial = Trial.from_dict(config["trial"])
    resolved = trial.resolve(context.spec)  # the spec's one validation in this trial
    tracker = Tracker(context.tracking_uri, context.experiment)
    run_id, _ = tracker.open_run(
        {ROLE: "trial", TRIAL_ID: trial.key, PARENT: context.sweep_run_id},
        run_name=resolved.name,
        tags={
            names.STUDY: context.study,
            "bev.method": trial.method,
            "bev.label_fraction": fraction_text(resolved.finetune.label_fraction),
            "bev.seed": str(trial.seed),
            ROUND_TAG: str(round_of(resolved.spec, trial.seed)),
            **context.source_tags,
        },
    )
    tracker.set_tags(run_id, _placement())
    monitor = run_monitor(tracker, run_id, resolved)
    try:
        with monitor:
            _run(resolved, context, tracker, run_id)
    except Exception as exc:
        # The retry (FailureConfig) reopens this same run; after the last one it stays FAILED.
        tracker.finish(run_id, "FAILED", error=error_text(exc))
        raise
    # SystemExit (Tune stopping the trial) and KeyboardInterrupt leave the run RUNNING: the
    # driver decides (FINISHED for an early stop, KILLED for an interrupted sweep).
    tracker.finish(run_id, "FINISHED")


def _run(resolved: ResolvedTrial, context: SweepContext, tracker: Tracker, run_id: str) -> None:
    from ray import tune

    from model.training import train as core

    data = core_data(resolved, context)
    runtime = core_runtime(resolved)
    pretraining = None
    if resolved.pretrain is not None:
        pretraining = ensure_pretraining(resolved, context, tracker)
        tracker.set_tags(
            run_id, {PRETRAIN_KEY: pretraining.key, "bev.pretrain_run_id": pretraining.run_id}
        )
    shares = context.pretrain_shares.get(pretraining.key, 1) if pretraining else 1
    finetune_cfg = resolved.finetune
    if resolved.twin is not None:
        finetune_cfg = matched_finetune(resolved, data, context)
    effective = core.effective_runtime(runtime) if resolved.spec.resources.workers == 1 else {}
    tracker.log_params(run_id, {**trial_params(resolved, context, finetune_cfg), **effective})
    config = trial_config(resolved, context, pretraining, shares)
    tracker.log_json(run_id, config, "trial_config.json")
    subset = core.labelled_subset(data, finetune_cfg, resolved.trial.seed)
    log_datasets(tracker, run_id, resolved, context, subset.scenes)

    job = FinetuneJob(resolved, context, run_id, pretraining, shares, finetune_cfg, subset)
    if resolved.spec.resources.workers > 1:
        work = distributed.work_dir(context.storage_dir, "finetune")
        distributed.run_job(_finetune_worker, {"job": job, "work": str(work)},
                            resolved.spec, context.storage_dir, to_tune=True)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
        return
    work = Path(tempfile.mkdtemp(prefix="bev-trial-"))
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            shutil.copytree(folder, work, dirs_exist_ok=True)
        log.info("trial %s resumes from its last checkpoint", resolved.name)

    def report(metrics: dict, checkpoint) -> None:
        with _checkpoint_dir(checkpoint) as folder:
            checkpoint = tune.Checkpoint.from_directory(folder) if folder else None
            tune.report(metrics, checkpoint=checkpoint)

    try:
        train_finetune(job, tracker, work, runtime, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class FinetuneJob:
    """What a trial's fine-tuning needs, in its process or on each of its workers."""

    resolved: ResolvedTrial
    context: SweepContext
    run_id: str
    pretraining: Pretraining | None
    shares: int
    finetune_cfg: Any
    subset: Any


def train_finetune(job: FinetuneJob, tracker: Tracker | None, work: Path, runtime,
                   report: Callable[[dict, Any], None]) -> None:  # fmt: skip
    """The core's fine-tuning of `job` into `work`, each epoch logged to the trial's run
    (`tracker`; None on the workers of rank > 0, which log nothing) and `report`ed to Tune
    with its checkpoint."""
    from model.training import train as core

    resolved, context, run_id = job.resolved, job.context, job.run_id
    pretraining, shares = job.pretraining, job.shares
    data, model = core_data(resolved, context), resolved.spec.model.build()
    last: dict[str, Any] = {}

    def on_epoch(report_) -> None:
        metrics = epoch_metrics(report_, pretraining, shares)
        if tracker is not None:
            tracker.log_metrics(run_id, metrics, step=report_.epoch)
            if "labelled_samples" not in last:
                tracker.log_params(run_id, {names.LABELLED_SAMPLES: report_.labelled_samples})
        last.update(metrics=metrics, labelled_samples=report_.labelled_samples)
        if tracker is not None:
            if report_.val:
                # Written every evaluated epoch: a trial ASHA stops inside tune.report never
                # returns.
                log_per_class(tracker, run_id, report_.val, report_.epoch)
            if report_.stopped_early:  # the core's early stopping (ASHA's: the driver tags it)
                tracker.set_tags(run_id, {"bev.stopped_early": "true"})
            if report_.preview is not None:
                tracker.log_image(run_id, report_.preview, key="bev_prediction",
                                  step=report_.epoch)  # fmt: skip
        tune_metrics = {"epoch": report_.epoch, "epochs": report_.epochs, **metrics}
        report(tune_metrics, report_.checkpoint)

    result = core.finetune(
        data,
        model,
        job.finetune_cfg,
        out_dir=work,
        seed=resolved.trial.seed,
        init_checkpoint=pretraining.checkpoint if pretraining else None,
        runtime=runtime,
        on_epoch=on_epoch,
        subset=job.subset,
    )
    if tracker is None:
        return
    tracker.log_params(run_id, {names.LABELLED_SAMPLES: result.labelled_samples})
    if not last:  # resumed after its last epoch: nothing was reported in this attempt
        log_per_class(tracker, run_id, result.val, result.epochs)
    if resolved.spec.mlflow.log_checkpoint and result.checkpoint is not None:
        where = tracker.log_artifact(run_id, result.checkpoint, "model")
        tracker.set_tags(run_id, {"bev.model_artifact": where})


def _finetune_worker(config: dict) -> None:
    """One Ray Train worker of a trial's fine-tuning (`distributed.run_job`)."""
    import ray.train

    lifetime.die_with_parent()
    console.quiet_worker_loggers()
    job: FinetuneJob = config["job"]
    rank_zero = distributed.is_rank_zero()
    context = job.context
    tracker = Tracker(context.tracking_uri, context.experiment) if rank_zero else None
    runtime = distributed.worker_runtime(core_runtime(job.resolved))
    if tracker is not None:  # what the switches do on a worker's device, not the driver's
        from model.training.train import effective_runtime

        tracker.log_params(job.run_id, effective_runtime(runtime))
    work = Path(config["work"])
    work.mkdir(parents=True, exist_ok=True)
    # Every rank reports (Ray Train waits for all); Tune takes rank 0's metrics. The phase's
    # checkpoint stays in `work`, where a restarted job finds it.
    with distributed.node_system_metrics(job.resolved.spec, context.tracking_uri, job.run_id):
        train_finetune(job, tracker, work, runtime, lambda metrics, _: ray.train.report(metrics))


# --- the core's arguments ----------------------------------------------------------------------


def matched_finetune(resolved: ResolvedTrial, data: DataConfig, context: SweepContext):
    """The compute-matched arm's fine-tuning: its budget plus the optimiser steps its
    pretrained twin spent in pretraining (whole, or divided among the trials sharing it)."""
    from model.training import train as core

    twin = resolved.twin
    steps = core.planned_steps(data, twin.pretrain, resolved.spec.resources.workers)
    if resolved.spec.compute_matched == "amortised":
        key = twin.pretrain_key(context.dataset_fingerprint)
        steps = round(steps / max(1, context.pretrain_shares.get(key, 1)))
    return resolved.finetune.model_copy(update={"extra_steps": steps})


# --- what goes to MLflow -----------------------------------------------------------------------


def trial_params(resolved: ResolvedTrial, context: SweepContext, finetune=None) -> dict:
    """A trial run's params: its sections flat (`finetune.label_fraction`, `pretrain.w_reproj`;
    no `pretrain.*` for a supervised trial), plus the method, seed and arm of the trial.
    `finetune`: the fine-tuning as run, when the harness changed it (`finetune.extra_steps`)."""
    spec = resolved.spec
    sections = {
        "data": spec.data.model_dump(mode="json"),
        "model": spec.model.model_dump(mode="json"),
        "finetune": (finetune or resolved.finetune).model_dump(mode="json"),
        "runtime": spec.runtime.model_dump(mode="json"),
    }
    if resolved.pretrain is not None:
        sections["pretrain"] = resolved.pretrain.model_dump(mode="json")
    return {
        **flatten(sections),
        names.METHOD: resolved.trial.method,
        names.SEED: resolved.trial.seed,
        "variant": resolved.cell,
        "data.resolved_version": context.version,
        "dataset_fingerprint": context.dataset_fingerprint,
        "trial_id": resolved.trial.key,
        "resources.cpu": spec.resources.cpu,
        "resources.gpu": spec.resources.gpu,
        **distributed_params(resolved, finetune),
    }


def distributed_params(resolved: ResolvedTrial, finetune=None) -> dict:
    """A data-parallel trial's workers and global batches (the spec's batch sizes are per
    worker, and the learning rate is not rescaled); nothing for a one-process trial."""
    spec = resolved.spec
    workers = spec.resources.workers
    if workers == 1:
        return {}
    params = {
        "resources.workers": workers,
        "finetune.global_batch_size": workers * (finetune or resolved.finetune).batch_size,
    }
    if resolved.pretrain is not None:
        params["pretrain.global_batch_size"] = workers * resolved.pretrain.batch_size
    return params


def trial_config(
    resolved: ResolvedTrial, context: SweepContext, pre: Pretraining | None, shares: int
) -> dict:
    return {
        "trial": resolved.trial.to_dict(),
        "trial_id": resolved.trial.key,
        "name": resolved.name,
        "spec": resolved.spec.model_dump(mode="json"),
        "dataroot": context.dataroot,
        "dataset_fingerprint": context.dataset_fingerprint,
        "pretraining": None
        if pre is None
        else {
            "key": pre.key,
            "run_id": pre.run_id,
            "checkpoint": str(pre.checkpoint),
            "wall_s": pre.wall_s,
            "gpu_s": pre.gpu_s,
            "shared_by": shares,
            "computed_by_this_trial": pre.built_here,
        },
    }


def epoch_metrics(report, pre: Pretraining | None, shares: int) -> dict[str, float]:
    """A fine-tuning EpochReport -> the trial's metrics: the core's names, plus the clocks
    that count the trial's pretraining (whole, and amortised over the trials sharing it)."""
    wall, gpu = float(report.cum_wall_s), float(report.cum_gpu_s)
    pre_wall = pre.wall_s if pre else 0.0
    pre_gpu = pre.gpu_s if pre else 0.0
    shared_wall = (pre.shared_wall_s if pre else 0.0) / max(1, shares)
    shared_gpu = (pre.shared_gpu_s if pre else 0.0) / max(1, shares)
    return {
        **report.losses,
        **report.val,
        names.CUM_WALL_S: wall,
        names.CUM_GPU_S: gpu,
        names.CUM_WALL_S + names.INCL_PRETRAIN: wall + pre_wall,
        names.CUM_GPU_S + names.INCL_PRETRAIN: gpu + pre_gpu,
        names.CUM_WALL_S + names.AMORTISED: wall + shared_wall,
        names.CUM_GPU_S + names.AMORTISED: gpu + shared_gpu,
        names.LABELLED_SAMPLES: report.labelled_samples,
        names.VAL_WALL_S: float(report.val_wall_s),  # this epoch's validation
        names.STEPS: float(report.steps),
        **report.best,
    }


def log_datasets(
    tracker: Tracker,
    run_id: str,
    resolved: ResolvedTrial,
    context: SweepContext,
    scenes: tuple[str, ...],
) -> None:
    """The trial's inputs as MLflow datasets: the train split (digest: the dataset
    fingerprint), its labelled subset (``scenes``: its own digest and scene list) and the val
    split."""
    data = resolved.spec.data
    root, version = context.dataroot, context.version
    base = f"{data.source}-{version}"
    scenes = list(scenes)
    fingerprint = context.dataset_fingerprint
    tracker.log_dataset(
        run_id, f"{base}-{data.train_split}", fingerprint, root, {"split": data.train_split},
        "train",
    )  # fmt: skip
    tracker.log_dataset(
        run_id,
        f"{base}-labels@{fraction_text(resolved.finetune.label_fraction)}-s{resolved.trial.seed}",
        stable_hash({"dataset": fingerprint, "scenes": scenes}),
        root,
        {"scenes": scenes, "fraction": resolved.finetune.label_fraction},
        "train_labelled",
    )
    tracker.log_dataset(
        run_id, f"{base}-{data.val_split}", fingerprint, root, {"split": data.val_split},
        "validation",
    )  # fmt: skip


def log_per_class(tracker: Tracker, run_id: str, val: dict[str, float], epoch: int) -> None:
    """Per-class IoU as an MLflow table, one row per class and validated epoch (MLflow appends
    to a logged table), and the last epoch's as CSV, for tools that read files."""
    rows = [
        (key[len(names.VAL_IOU_PREFIX) :], value)
        for key, value in val.items()
        if key.startswith(names.VAL_IOU_PREFIX)
    ]
    if names.VAL_MIOU in val:
        rows.append((names.MIOU, val[names.VAL_MIOU]))
    table = {"epoch": [epoch] * len(rows), "class": [c for c, _ in rows]}
    tracker.log_table(run_id, {**table, "iou": [v for _, v in rows]}, "per_class_iou.json")
    tracker.log_text(run_id, per_class_csv(val), "per_class_iou.csv")


def per_class_csv(val: dict[str, float]) -> str:
    lines = ["class,iou"]
    for key, value in val.items():
        if key.startswith(names.VAL_IOU_PREFIX):
            lines.append(f"{key[len(names.VAL_IOU_PREFIX) :]},{value:.6f}")
    if names.VAL_MIOU in val:
        lines.append(f"mIoU,{val[names.VAL_MIOU]:.6f}")
    return "\n".join(lines) + "\n"


# --- process plumbing --------------------------------------------------------------------------


@contextlib.contextmanager
def _checkpoint_dir(checkpoint: str | Path | None):
    """A fresh folder holding the core's checkpoint, for Tune to persist (then removed)."""
    if checkpoint is None or not Path(checkpoint).exists():
        yield None
        return
    source = Path(checkpoint)
    folder = Path(tempfile.mkdtemp(prefix="bev-ckpt-"))
    try:
        if source.is_dir():
            shutil.copytree(source, folder, dirs_exist_ok=True)
        else:
            try:
                (folder / source.name).hardlink_to(source)
            except OSError:
                shutil.copy2(source, folder / source.name)
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _placement() -> dict[str, str]:
    """Where this attempt runs (a retried or resumed trial may land on another node)."""
    import socket

    import ray

    return {
        "bev.host": socket.gethostname(),
        "bev.ray_node_id": ray.get_runtime_context().get_node_id(),
    }

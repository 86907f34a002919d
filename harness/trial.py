"""One trial: (shared) pretraining, fine-tuning on a label fraction, MLflow logging, Tune reports.

`run_trial(config, context)` is the Ray Tune function trainable. `config["trial"]` is a
`TrialSpec` as a dict (one grid point or one Optuna sample); `context` is the same for every
trial of a sweep. The trial only calls the training core's public functions (`model.train`),
and writes the run layout of docs/architecture.md through `harness.tracking`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import cache
from harness.spec import Spec, TrialSpec, stable_hash
from harness.tracking import (
    PARENT,
    PRETRAIN_KEY,
    ROLE,
    TRIAL_ID,
    Tracker,
    error_text,
)

log = logging.getLogger(__name__)

# Bump when the meaning of a cached pretraining changes without its config changing.
PRETRAIN_CACHE_VERSION = 2  # 2: reprojection class weights default to "auto"


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one sweep shares; decided by the sweep driver."""

    study: str
    tracking_uri: str
    experiment: str
    sweep_run_id: str
    storage_dir: str
    dataroot: str
    version: str
    dataset_fingerprint: str
    spec: dict  # the validated spec, as JSON
    pretrain_shares: dict[str, int] = field(default_factory=dict)  # repr(group) -> trials


@dataclass(frozen=True)
class Pretraining:
    key: str
    checkpoint: Path
    wall_s: float
    gpu_s: float
    run_id: str
    built_here: bool


def trial_key(trial: TrialSpec) -> str:
    """The trial's identity (`bev.trial_id`): stable across retries, resumes and processes."""
    return stable_hash(trial.to_dict(), 12)


def run_trial(config: dict, context: SweepContext) -> None:
    """Ray Tune function trainable: run one trial and report each fine-tuning epoch."""
    trial = TrialSpec(**config["trial"])
    spec = Spec.model_validate(context.spec)
    _limit_threads(spec.resources.cpu)
    tracker = Tracker(context.tracking_uri, context.experiment)
    run_id, created = tracker.open_run(
        {ROLE: "trial", TRIAL_ID: trial_key(trial), PARENT: context.sweep_run_id},
        run_name=trial.name,
        tags={
            "bev.study": context.study,
            "bev.method": trial.method,
            "bev.label_fraction": f"{trial.label_fraction:g}",
            "bev.seed": str(trial.seed),
        },
    )
    tracker.set_tags(run_id, _placement())
    monitor = (
        tracker.system_metrics(run_id, spec.mlflow.system_metrics_interval_s, resumed=not created)
        if spec.mlflow.system_metrics
        else contextlib.nullcontext()
    )
    try:
        with monitor:
            _run(trial, spec, context, tracker, run_id)
    except Exception as exc:
        # The retry (FailureConfig) reopens this same run; after the last one it stays FAILED.
        tracker.finish(run_id, "FAILED", error=error_text(exc))
        raise
    # SystemExit (Tune stopping the trial) and KeyboardInterrupt leave the run RUNNING: the
    # driver decides (FINISHED for an early stop, KILLED for an interrupted sweep).
    tracker.finish(run_id, "FINISHED")


def _run(trial: TrialSpec, spec: Spec, context: SweepContext, tracker: Tracker, run_id: str):
    from ray import tune

    from model import train as core

    data_cfg, model_cfg, train_cfg = core_configs(spec, context, trial)
    pretraining = None
    if trial.method == "pretrained":
        pretraining = ensure_pretraining(trial, spec, context, tracker)
        tracker.set_tags(
            run_id,
            {PRETRAIN_KEY: pretraining.key, "bev.pretrain_run_id": pretraining.run_id},
        )
    shares = context.pretrain_shares.get(repr(trial.pretrain_group), 1)
    tracker.log_params(run_id, trial_params(trial, spec, context))
    tracker.log_json(
        run_id, trial_config(trial, spec, context, pretraining, shares), "trial_config.json"
    )

    work = Path(tempfile.mkdtemp(prefix="bev-trial-"))
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            shutil.copytree(folder, work, dirs_exist_ok=True)
        log.info("trial %s resumes from its last checkpoint", trial.name)
    last: dict[str, Any] = {}

    def on_epoch(report) -> None:
        if report.phase != "finetune":
            return
        metrics = epoch_metrics(report, pretraining, shares)
        tracker.log_metrics(run_id, metrics, step=report.epoch)
        if "labelled_samples" not in last:
            tracker.log_params(run_id, {"labelled_samples": report.labelled_samples})
        last.update(metrics=metrics, labelled_samples=report.labelled_samples)
        if report.val:
            # Written every evaluated epoch: a trial ASHA stops inside tune.report never returns.
            tracker.log_text(run_id, per_class_csv(metrics), "per_class_iou.csv")
        tune_metrics = {"epoch": report.epoch, **metrics}
        with _checkpoint_dir(report.checkpoint) as folder:
            checkpoint = tune.Checkpoint.from_directory(folder) if folder else None
            tune.report(tune_metrics, checkpoint=checkpoint)

    try:
        result = core.finetune(
            data_cfg,
            model_cfg,
            train_cfg,
            out_dir=work,
            label_fraction=trial.label_fraction,
            subset_seed=trial.seed,
            init_checkpoint=pretraining.checkpoint if pretraining else None,
            on_epoch=on_epoch,
        )
        tracker.log_params(run_id, {"labelled_samples": result.labelled_samples})
        if not last:  # resumed after its last epoch: nothing was reported in this attempt
            tracker.log_text(run_id, per_class_csv(_final_metrics(result)), "per_class_iou.csv")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- pretraining, shared -----------------------------------------------------------------------


def pretrain_key(trial: TrialSpec, spec: Spec, context: SweepContext) -> str:
    """Everything that decides a pretraining's weights, hashed: trials with equal keys share it."""
    data_cfg, model_cfg, train_cfg = core_configs(spec, context, trial)
    train = train_cfg.to_dict()
    # Settings that only shape fine-tuning, evaluation or logging leave the weights alone.
    for name in (
        "finetune_epochs", "w_bev", "finetune_w_reproj", "finetune_w_temporal",
        "bev_class_weights", "bev_pos_weight", "pretrain_val", "val_every", "device", "progress",
    ):  # fmt: skip
        train.pop(name, None)
    return stable_hash(
        {
            "cache_version": PRETRAIN_CACHE_VERSION,
            "dataset": context.dataset_fingerprint,
            "version": context.version,
            "protocol": data_cfg.protocol,
            "pseudo_labels": data_cfg.pseudo_labels,
            "grid": dataclasses.asdict(data_cfg.label_grid(model_cfg)),
            "model": model_cfg.to_dict(),
            "train": train,
        }
    )


def ensure_pretraining(
    trial: TrialSpec, spec: Spec, context: SweepContext, tracker: Tracker
) -> Pretraining:
    """The checkpoint of this trial's pretraining, computed once per key across all trials.

    The computing trial logs it as its own MLflow run (`bev.role=pretrain`); the others wait on
    the cache lock and reuse it.
    """
    from model import train as core

    key = pretrain_key(trial, spec, context)

    def build(work: Path) -> dict:
        run_id, created = tracker.open_run(
            {ROLE: "pretrain", PRETRAIN_KEY: key},
            run_name=f"pretrain-s{trial.seed}-{key[:8]}",
            tags={
                PARENT: context.sweep_run_id,
                "bev.seed": str(trial.seed),
                "bev.study": context.study,
            },
        )
        data_cfg, model_cfg, train_cfg = core_configs(spec, context, trial)
        tracker.log_params(run_id, pretrain_params(trial, spec))

        def on_epoch(report) -> None:
            tracker.log_metrics(run_id, pretrain_metrics(report), step=report.epoch)

        monitor = (
            tracker.system_metrics(run_id, spec.mlflow.system_metrics_interval_s, not created)
            if spec.mlflow.system_metrics
            else contextlib.nullcontext()
        )
        try:
            with monitor:
                checkpoint = core.pretrain(
                    data_cfg, model_cfg, train_cfg, out_dir=work / "train", on_epoch=on_epoch
                )
        except Exception as exc:
            tracker.finish(run_id, "FAILED", error=error_text(exc))
            raise
        # The run's last logged clock includes epochs logged before a crash and resume.
        logged = tracker.client.get_run(run_id).data.metrics
        tracker.finish(run_id, "FINISHED")
        return {
            "checkpoint": str(Path(checkpoint).resolve().relative_to(work.resolve())),
            "wall_s": logged.get("time/cum_wall_s", 0.0),
            "gpu_s": logged.get("time/cum_gpu_s", 0.0),
            "run_id": run_id,
            "seed": trial.seed,
            "params": pretrain_params(trial, spec),
        }

    entry = cache.compute_once(
        Path(context.storage_dir) / "pretrain",
        key,
        build,
        on_wait=lambda: log.info("trial %s waits for pretraining %s", trial.name, key),
    )
    return Pretraining(
        key=key,
        checkpoint=entry.path / entry.meta["checkpoint"],
        wall_s=float(entry.meta["wall_s"]),
        gpu_s=float(entry.meta["gpu_s"]),
        run_id=entry.meta["run_id"],
        built_here=entry.built_here,
    )


# --- the core's configs ------------------------------------------------------------------------


def core_configs(spec: Spec, context: SweepContext, trial: TrialSpec):
    """Spec + trial -> the training core's (DataConfig, ModelConfig, TrainConfig)."""
    from model import train as core
    from model.presets import get_preset

    t, d = spec.training, spec.data
    device = t.device
    if device == "auto":
        device = "cuda" if spec.resources.gpu > 0 else "cpu"
    data_cfg = core.DataConfig(
        dataroot=context.dataroot,
        version=context.version,
        protocol=d.protocol,
        pseudo_labels=d.resolved_pseudo_labels,
        num_workers=d.num_workers,
        max_val_samples=d.max_val_samples,
        cache_dir=str(Path(context.storage_dir) / "labels") if context.storage_dir else None,
    )
    model_cfg = get_preset(spec.model.preset, **spec.model.overrides)
    train_cfg = core.TrainConfig(
        **{
            **t.options,
            "pretrain_epochs": trial.pretrain_epochs,
            "finetune_epochs": trial.finetune_epochs,
            "batch_size": t.batch_size,
            "lr": t.lr,
            "weight_decay": t.weight_decay,
            "w_bev": trial.w_bev,
            "w_reproj": trial.w_reproj,
            "w_temporal": trial.w_temporal,
            "seed": trial.seed,
            "device": device,
            "progress": False,
        }
    )
    return data_cfg, model_cfg, train_cfg


# --- what goes to MLflow -----------------------------------------------------------------------


def trial_params(trial: TrialSpec, spec: Spec, context: SweepContext) -> dict:
    """The trial run's params: what its pretraining depends on, plus the rest of the trial."""
    return {
        **pretrain_params(trial, spec),
        "method": trial.method,
        "label_fraction": trial.label_fraction,
        "finetune_epochs": trial.finetune_epochs,
        "w_bev": trial.w_bev,
        "data_source": spec.data.source,
        "data_version": context.version,
        "dataset_fingerprint": context.dataset_fingerprint,
        "trial_id": trial_key(trial),
        "cpu": spec.resources.cpu,
        "gpu": spec.resources.gpu,
    }


def pretrain_params(trial: TrialSpec, spec: Spec) -> dict:
    t = spec.training
    return {
        "pretrain_epochs": trial.pretrain_epochs,
        "w_reproj": trial.w_reproj,
        "w_temporal": trial.w_temporal,
        "seed": trial.seed,
        "preset": spec.model.preset,
        "model_overrides": json.dumps(spec.model.overrides, sort_keys=True),
        "batch_size": t.batch_size,
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "protocol": spec.data.protocol,
        "pseudo_labels": spec.data.resolved_pseudo_labels,
        "training_options": json.dumps(t.options, sort_keys=True),
    }


def trial_config(
    trial: TrialSpec, spec: Spec, context: SweepContext, pre: Pretraining | None, shares: int
) -> dict:
    return {
        "trial": trial.to_dict(),
        "trial_id": trial_key(trial),
        "name": trial.name,
        "spec": context.spec,
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


def _metric_name(prefix: str, key: str) -> str:
    if key.startswith("IoU/"):
        return f"{prefix}/IoU_{key[len('IoU/') :]}"
    return f"{prefix}/{key.replace('/', '_')}"


def epoch_metrics(report, pre: Pretraining | None, shares: int) -> dict[str, float]:
    """A fine-tuning EpochReport -> the trial's metrics (docs/architecture.md names)."""
    metrics: dict[str, float] = {}
    for name, value in (report.losses or {}).items():
        metrics[_loss_name("train", name)] = value
    for name, value in (report.val or {}).items():
        metrics[_metric_name("val", name)] = value
    wall, gpu = float(report.cum_wall_s), float(report.cum_gpu_s)
    pre_wall = pre.wall_s if pre else 0.0
    pre_gpu = pre.gpu_s if pre else 0.0
    metrics.update(
        {
            "time/cum_wall_s": wall,
            "time/cum_gpu_s": gpu,
            "time/cum_wall_s_incl_pretrain": wall + pre_wall,
            "time/cum_gpu_s_incl_pretrain": gpu + pre_gpu,
            "time/cum_wall_s_amortised": wall + pre_wall / max(1, shares),
            "time/cum_gpu_s_amortised": gpu + pre_gpu / max(1, shares),
            "labelled_samples": report.labelled_samples,
            "time/val_wall_s": float(report.val_wall_s),  # this epoch's validation
        }
    )
    return metrics


def pretrain_metrics(report) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, value in (report.losses or {}).items():
        metrics[_loss_name("pretrain", name)] = value
    for name, value in (report.val or {}).items():
        metrics[_metric_name("pretrain/val", name).replace("pretrain/val/", "pretrain/val_")] = (
            value
        )
    metrics["time/cum_wall_s"] = float(report.cum_wall_s)
    metrics["time/cum_gpu_s"] = float(report.cum_gpu_s)
    metrics["time/val_wall_s"] = float(report.val_wall_s)
    return metrics


def _loss_name(prefix: str, name: str) -> str:
    name = name.replace("/", "_")
    return f"{prefix}/{name if name.startswith('loss') else 'loss_' + name}"


def _final_metrics(result) -> dict[str, float]:
    return {_metric_name("val", k): v for k, v in (result.val or {}).items()}


def per_class_csv(final: dict[str, float]) -> str:
    lines = ["class,iou"]
    for key, value in final.items():
        if key.startswith("val/IoU_"):
            lines.append(f"{key[len('val/IoU_') :]},{value:.6f}")
    if "val/mIoU" in final:
        lines.append(f"mIoU,{final['val/mIoU']:.6f}")
    return "\n".join(lines) + "\n"


# --- process plumbing --------------------------------------------------------------------------


def _limit_threads(cpus: float) -> None:
    """One trial gets `resources.cpu` cores: keep torch's pools inside them."""
    import torch

    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
        torch.set_num_interop_threads(1)


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

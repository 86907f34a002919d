"""A pretraining (or a WSD trunk segment) as a Ray Train job of the trial's workers
(`resources.workers > 1`, `harness.distributed`): rank 0 logs each period to the pretraining's
MLflow run; every worker reads and rank 0 writes the checkpoint in the cache's work folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness import console, distributed, lifetime
from harness.context import core_runtime
from harness.tracking import Tracker


def pretrain(
    resolved,
    context,
    run_id: str,
    metrics_of: Callable,
    after: Callable | None = None,
    **core_kwargs,
) -> Path:
    """`model.training.train.pretrain(data, model, cfg, out_dir=..., seed=..., ...)` on the
    trial's workers; rank 0 logs `metrics_of(report)` to `run_id` after every period and, at
    the end, calls `after(tracker, checkpoint)`. `out_dir` must be readable by every worker
    (the pretraining cache's work folder, in the study folder)."""
    config = {
        "resolved": resolved,
        "context": context,
        "run_id": run_id,
        "metrics_of": metrics_of,
        "after": after,
        "kwargs": core_kwargs,
    }
    spec, storage = resolved.spec, context.storage_dir
    distributed.run_job(_pretrain_worker, config, spec, storage, to_tune=False)
    return Path(core_kwargs["out_dir"]) / "pretrain.pt"


def _pretrain_worker(config: dict) -> None:
    """One Ray Train worker of the pretraining (`distributed.run_job`)."""
    from model.training import train as core

    lifetime.die_with_parent()
    console.quiet_worker_loggers()
    context, run_id = config["context"], config["run_id"]
    rank_zero = distributed.is_rank_zero()
    tracker = Tracker(context.tracking_uri, context.experiment) if rank_zero else None
    runtime = distributed.worker_runtime(core_runtime(config["resolved"]))
    if tracker is not None:
        tracker.log_params(run_id, core.effective_runtime(runtime))

    def on_epoch(report) -> None:
        if tracker is not None:
            tracker.log_metrics(run_id, config["metrics_of"](report), step=report.epoch)

    spec = config["resolved"].spec
    with distributed.node_system_metrics(spec, context.tracking_uri, run_id):
        checkpoint = core.pretrain(**config["kwargs"], runtime=runtime, on_epoch=on_epoch)
    if tracker is not None and config["after"] is not None:
        config["after"](tracker, checkpoint)

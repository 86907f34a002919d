"""A trial's pretraining, computed once per key across all the trials of a sweep (and their
retries and resumes), logged as its own MLflow run, and read back from the cache by the rest."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from harness import cache, pretrain_job
from harness.context import (
    SweepContext,
    core_data,
    core_runtime,
    pretrain_metrics,
    pretrain_params,
    run_monitor,
)
from harness.tracking import Tracker, error_text
from harness.trials import ResolvedTrial
from harness.trunk import ensure_trunk
from model import names
from model.names import PARENT, PRETRAIN_KEY, ROLE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pretraining:
    key: str
    checkpoint: Path
    wall_s: float  # whole: a WSD length counts its trunk up to its decay start, plus its branch
    gpu_s: float
    run_id: str
    built_here: bool
    # The clocks with work shared with other pretrainings (a WSD trunk) divided among them.
    shared_wall_s: float
    shared_gpu_s: float


def ensure_pretraining(
    resolved: ResolvedTrial, context: SweepContext, tracker: Tracker
) -> Pretraining:
    """The checkpoint of this trial's pretraining, computed once per key across all trials.

    The computing trial logs it as its own MLflow run (`bev.role=pretrain`); the others wait on
    the cache lock and reuse it. A WSD pretraining is its trunk's state at its decay start
    (`ensure_trunk`) plus its own decay branch, cached under its own key all the same.
    """
    from model.training import train as core

    key = resolved.pretrain_key(context.dataset_fingerprint)
    seed = resolved.trial.seed
    params = pretrain_params(resolved)
    trunk_key = resolved.trunk_key(context.dataset_fingerprint)

    def build(work: Path) -> dict:
        trunk = ensure_trunk(resolved, context, tracker) if trunk_key else None
        run_id, _ = tracker.open_run(
            {ROLE: "pretrain", PRETRAIN_KEY: key},
            run_name=f"pretrain-s{seed}-{key[:8]}",
            tags={
                PARENT: context.sweep_run_id,
                "bev.seed": str(seed),
                names.STUDY: context.study,
                **({names.TRUNK_KEY: trunk_key} if trunk_key else {}),
                **context.source_tags,
            },
        )
        runtime = core_runtime(resolved)
        spec = resolved.spec
        if spec.resources.workers > 1:
            checkpoint = _pretrain_on_workers(resolved, context, tracker, run_id, trunk, work)
            return _finished(tracker, run_id, work, checkpoint, seed, params)
        tracker.log_params(run_id, {**params, **core.effective_runtime(runtime)})

        def on_epoch(report) -> None:
            tracker.log_metrics(run_id, pretrain_metrics(report, trunk), step=report.epoch)

        monitor = run_monitor(tracker, run_id, resolved)
        try:
            with monitor:
                checkpoint = core.pretrain(
                    core_data(resolved, context),
                    spec.model.build(),
                    resolved.pretrain,
                    out_dir=work / "train",
                    seed=seed,
                    runtime=runtime,
                    on_epoch=on_epoch,
                    init_from=trunk.checkpoint if trunk else None,
                )
            log_alignment(tracker, run_id, resolved, context, checkpoint)
        except Exception as exc:
            tracker.finish(run_id, "FAILED", error=error_text(exc))
            raise
        return _finished(tracker, run_id, work, checkpoint, seed, params)

    entry = cache.compute_once(
        Path(context.storage_dir) / "pretrain",
        key,
        build,
        on_wait=lambda: log.info("trial %s waits for pretraining %s", resolved.name, key),
    )
    return Pretraining(
        key=key,
        checkpoint=entry.path / entry.meta["checkpoint"],
        wall_s=float(entry.meta["wall_s"]),
        gpu_s=float(entry.meta["gpu_s"]),
        run_id=entry.meta["run_id"],
        built_here=entry.built_here,
        shared_wall_s=float(entry.meta.get("shared_wall_s", entry.meta["wall_s"])),
        shared_gpu_s=float(entry.meta.get("shared_gpu_s", entry.meta["gpu_s"])),
    )


def _finished(tracker: Tracker, run_id: str, work: Path, checkpoint, seed: int,
              params: dict) -> dict:  # fmt: skip
    """Close the pretraining's run; its cache entry's metadata."""
    # The run's last logged clock includes epochs logged before a crash and resume.
    logged = tracker.client.get_run(run_id).data.metrics
    tracker.finish(run_id, "FINISHED")
    wall_s, gpu_s = logged.get(names.CUM_WALL_S, 0.0), logged.get(names.CUM_GPU_S, 0.0)
    return {
        "checkpoint": str(Path(checkpoint).resolve().relative_to(work.resolve())),
        "wall_s": wall_s,
        "gpu_s": gpu_s,
        "shared_wall_s": logged.get(names.CUM_WALL_S + names.AMORTISED, wall_s),
        "shared_gpu_s": logged.get(names.CUM_GPU_S + names.AMORTISED, gpu_s),
        "run_id": run_id,
        "seed": seed,
        "params": params,
    }


def _pretrain_on_workers(resolved: ResolvedTrial, context: SweepContext, tracker: Tracker,
                         run_id: str, trunk, work: Path) -> Path:  # fmt: skip
    """The pretraining as a Ray Train job of the trial's workers (`harness.distributed`)."""
    workers = resolved.spec.resources.workers
    tracker.log_params(run_id, {
        **pretrain_params(resolved), "resources.workers": workers,
        "pretrain.global_batch_size": workers * resolved.pretrain.batch_size,
    })  # fmt: skip
    try:
        return pretrain_job.pretrain(
            resolved, context, run_id,
            metrics_of=functools.partial(pretrain_metrics, trunk=trunk),
            after=functools.partial(_log_alignment_on_worker, resolved=resolved, run_id=run_id,
                                    context=context),
            data=core_data(resolved, context), model=resolved.spec.model.build(),
            cfg=resolved.pretrain, out_dir=work / "train", seed=resolved.trial.seed,
            init_from=trunk.checkpoint if trunk else None,
        )  # fmt: skip
    except Exception as exc:
        tracker.finish(run_id, "FAILED", error=error_text(exc))
        raise


def _log_alignment_on_worker(tracker: Tracker, checkpoint, resolved: ResolvedTrial,
                             run_id: str, context: SweepContext) -> None:  # fmt: skip
    log_alignment(tracker, run_id, resolved, context, checkpoint)


def log_alignment(
    tracker: Tracker, run_id: str, resolved: ResolvedTrial, context: SweepContext, checkpoint
) -> None:
    """The pretraining's target alignment on val (``align/*``, model.evaluation.diagnostics),
    logged at its last epoch; skipped with ``runtime.alignment: false``."""
    runtime = core_runtime(resolved)
    if not runtime.alignment:
        return
    from model.evaluation.diagnostics import checkpoint_alignment

    metrics = checkpoint_alignment(
        core_data(resolved, context), checkpoint, resolved.pretrain, runtime
    )
    tracker.log_metrics(run_id, metrics, step=0)

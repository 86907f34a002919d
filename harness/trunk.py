"""A WSD pretraining's trunk: the shared prefix of every length, cut at their decay starts.

Under ``pretrain.optim.schedule: wsd`` the lr before a length's decay start does not depend on
the length (``model.config.OptimConfig``), so the lengths of one trunk key
(``ResolvedTrial.trunk_key``: the pretraining key without the length) share one run up to the
longest one's decay start; each length then only adds its own decay (``harness.trial``'s
``ensure_pretraining``). docs/harness.md, "Pretraining lengths".
"""

from __future__ import annotations

import functools
from pathlib import Path

from harness import cache, pretrain_job
from harness.context import (
    SweepContext,
    TrunkState,
    core_data,
    core_runtime,
    pretrain_metrics,
    pretrain_params,
)
from harness.tracking import Tracker, error_text
from harness.trials import ResolvedTrial
from model import names
from model.names import PARENT, ROLE


def ensure_trunk(resolved: ResolvedTrial, context: SweepContext, tracker: Tracker) -> TrunkState:
    """The WSD trunk of this trial's pretraining, at the decay start of its length.

    The trunk is cut into segments at the decay starts of the sweep's lengths (shortest
    first); segment j runs from the state at the previous decay start to the j-th, as length j
    does, and is a cache entry of its own (`trunk-<trunk key>-<step>`), computed once across
    trials and resumed from its work folder after a kill. Its state depends on the trunk key
    and the step only (the prefix of a WSD schedule does not depend on the length). All
    segments log into one MLflow run (`bev.role=pretrain_trunk`).
    """
    from model.training import train as core

    fingerprint = context.dataset_fingerprint
    trunk_key = resolved.trunk_key(fingerprint)
    pre, seed = resolved.pretrain, resolved.trial.seed
    mine = pre.budget.value
    data, model = core_data(resolved, context), resolved.spec.model.build()

    def at_length(value: int):
        return pre.model_copy(update={"budget": pre.budget.model_copy(update={"value": value})})

    lengths = sorted({*context.wsd_trunks.get(trunk_key, []), mine})
    workers = resolved.spec.resources.workers
    stops = {
        n: pre.optim.decay_start(core.planned_steps(data, at_length(n), workers)) for n in lengths
    }
    runtime = core_runtime(resolved)
    params = {k: v for k, v in pretrain_params(resolved).items() if k != names.PRETRAIN_EPOCHS}
    previous: cache.CacheEntry | None = None
    whole, shared = [0.0, 0.0], [0.0, 0.0]
    for length in (n for n in lengths if n <= mine):
        stop, start_dir = stops[length], previous

        def build(work: Path, length=length, stop=stop, start_dir=start_dir) -> dict:
            run_id, created = tracker.open_run(
                {ROLE: names.TRUNK, names.TRUNK_KEY: trunk_key},
                run_name=f"trunk-s{seed}-{trunk_key[:8]}",
                tags={PARENT: context.sweep_run_id, "bev.seed": str(seed),
                      names.STUDY: context.study, **context.source_tags},
            )  # fmt: skip
            tracker.log_params(run_id, params)
            offset = (0.0, 0.0) if start_dir is None else _trunk_clocks(start_dir)

            def on_epoch(report) -> None:
                tracker.log_metrics(run_id, _segment_metrics(report, offset), step=report.epoch)

            try:
                arguments = dict(
                    data=data, model=model, cfg=at_length(length), out_dir=work / "train",
                    seed=seed, stop_step=stop,
                    init_from=None if start_dir is None else _checkpoint(start_dir),
                )  # fmt: skip
                if workers > 1:  # a Ray Train job of the trial's workers; rank 0 logs
                    metrics_of = functools.partial(_segment_metrics, offset=offset)
                    checkpoint = pretrain_job.pretrain(
                        resolved, context, run_id, metrics_of, **arguments
                    )
                else:
                    checkpoint = core.pretrain(**arguments, runtime=runtime, on_epoch=on_epoch)
            except Exception as exc:
                tracker.finish(run_id, "FAILED", error=error_text(exc))
                raise
            logged = tracker.client.get_run(run_id).data.metrics
            tracker.finish(run_id, "FINISHED")
            return {
                "checkpoint": str(Path(checkpoint).resolve().relative_to(work.resolve())),
                "step": stop,
                "trunk_wall_s": logged.get(names.CUM_WALL_S, offset[0]),
                "trunk_gpu_s": logged.get(names.CUM_GPU_S, offset[1]),
                "run_id": run_id,
            }

        entry = cache.compute_once(
            Path(context.storage_dir) / "pretrain", f"trunk-{trunk_key}-{stop}", build
        )
        users = sum(1 for n in lengths if stops[n] >= stop)  # lengths branching off after it
        before = (0.0, 0.0) if previous is None else _trunk_clocks(previous)
        for i, total in enumerate(_trunk_clocks(entry)):
            whole[i] = total
            shared[i] += (total - before[i]) / users
        previous = entry
    return TrunkState(_checkpoint(previous), *whole, *shared)


def _segment_metrics(report, offset: tuple[float, float]) -> dict[str, float]:
    """A trunk segment's metrics, its clocks counting the segments before it."""
    metrics = pretrain_metrics(report)
    metrics[names.CUM_WALL_S] += offset[0]
    metrics[names.CUM_GPU_S] += offset[1]
    return metrics


def _trunk_clocks(entry: cache.CacheEntry) -> tuple[float, float]:
    return float(entry.meta["trunk_wall_s"]), float(entry.meta["trunk_gpu_s"])


def _checkpoint(entry: cache.CacheEntry) -> Path:
    return entry.path / entry.meta["checkpoint"]

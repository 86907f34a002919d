"""What the parts of a trial share: the sweep's context, the core's arguments, and what a
pretraining run logs (its params and metrics, a WSD trunk's clocks included).

``harness.trial`` runs a trial, ``harness.pretraining`` its shared pretraining, and
``harness.trunk`` a WSD pretraining's shared trunk; all three read this module, and it reads
none of them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from harness.tracking import Tracker, flatten
from harness.trials import ResolvedTrial
from model import names
from model.config import DataConfig, RuntimeConfig


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
    pretrain_shares: dict[str, int] = field(default_factory=dict)  # pretrain key -> trials
    wsd_trunks: dict[str, list[int]] = field(default_factory=dict)  # trunk key -> its lengths
    source_tags: dict[str, str] = field(default_factory=dict)  # mlflow.source.* of the code


@dataclass(frozen=True)
class TrunkState:
    """A WSD trunk at one length's decay start, and what it cost to get there."""

    checkpoint: Path
    wall_s: float  # the whole trunk up to here
    gpu_s: float
    shared_wall_s: float  # each segment divided among the lengths that branch off after it
    shared_gpu_s: float


def label_cache_dir(storage_dir: str | Path) -> Path:
    """The study folder's cache of BEV labels and keyframe indexes, shared by its trials."""
    return Path(storage_dir) / "labels"


def core_data(resolved: ResolvedTrial, context: SweepContext) -> DataConfig:
    """The spec's data section with what the sweep decided: the dataroot (generated for
    synthetic data), its version, and the study folder's label cache."""
    return resolved.spec.data.model_copy(
        update={
            "dataroot": context.dataroot,
            "version": context.version,
            "cache_dir": str(label_cache_dir(context.storage_dir)),
        }
    )


def core_runtime(resolved: ResolvedTrial) -> RuntimeConfig:
    """The spec's runtime section; "auto" becomes the device Ray gave the trial, and no bars."""
    spec = resolved.spec
    device = spec.runtime.device
    if device == "auto":
        device = "cuda" if spec.resources.gpu > 0 else "cpu"
    update = {"device": device, "progress": False, "preview": spec.mlflow.log_images}
    return spec.runtime.model_copy(update=update)


def pretrain_params(resolved: ResolvedTrial) -> dict:
    """A pretraining run's params: the sections that decide it, with the spec's dotted names."""
    spec = resolved.spec
    return {
        **flatten(
            {
                "data": spec.data.model_dump(mode="json"),
                "model": spec.model.model_dump(mode="json"),
                "pretrain": resolved.pretrain.model_dump(mode="json"),
            }
        ),
        names.SEED: resolved.trial.seed,
    }


def pretrain_metrics(report, trunk: TrunkState | None = None) -> dict[str, float]:
    """A pretraining EpochReport -> its run's metrics. A WSD branch's clocks add its trunk:
    whole (`time/cum_wall_s`) and divided among the lengths sharing it (`..._amortised`)."""
    wall, gpu = float(report.cum_wall_s), float(report.cum_gpu_s)
    metrics = {**report.losses, **report.val, names.VAL_WALL_S: float(report.val_wall_s)}
    if trunk is None:
        return {**metrics, names.CUM_WALL_S: wall, names.CUM_GPU_S: gpu}
    return {
        **metrics,
        names.CUM_WALL_S: wall + trunk.wall_s,
        names.CUM_GPU_S: gpu + trunk.gpu_s,
        names.CUM_WALL_S + names.AMORTISED: wall + trunk.shared_wall_s,
        names.CUM_GPU_S + names.AMORTISED: gpu + trunk.shared_gpu_s,
        "time/branch_wall_s": wall,
    }


def run_monitor(tracker: Tracker, run_id: str, resolved: ResolvedTrial):
    """MLflow's system metrics for a run while it trains, if the spec asks for them."""
    spec = resolved.spec
    if not spec.mlflow.system_metrics:
        return contextlib.nullcontext()
    return tracker.system_metrics(run_id, spec.mlflow.system_metrics_interval_s)

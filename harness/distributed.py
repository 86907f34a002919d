"""Trials larger than one device: a trial's phases as a Ray Train data-parallel job.

With `resources.workers: N > 1` a Tune trial is a driver that holds no CPU or GPU of its own
(`trial_bundle`): it opens the trial's MLflow run, waits on the shared pretraining cache, and
runs each phase (`pretrain`, `finetune`) as a `ray.train.torch.TorchTrainer` job of N workers,
each with the spec's per-worker `resources.cpu`/`gpu` (gloo on CPU, NCCL on CUDA): Ray's
Train-in-Tune pattern. The workers run the training core's own entry points; the core shards
the data, averages gradients and sums the validation counts (`model.training.distributed`).

Rank 0 alone logs to MLflow and writes checkpoints; every rank reports to Ray Train, whose
`TuneReportCallback` forwards rank 0's metrics to Tune. A phase's checkpoint lives in a folder
every worker can read (the study folder: shared storage on a cluster), so a retried or resumed
trial's job starts from its last period. A worker that fails fails the job at once
(`FailureConfig(max_failures=0)`), and the trial with it: Tune's retries (`retries`) decide.

With `workers: 1` (the default) none of this runs: the trial trains in its own process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

from harness.spec import ResourcesSection, Spec, SpecError

log = logging.getLogger(__name__)

# The Tune trial's own bundle when its workers do the training: Ray refuses an empty bundle,
# and a CPU held here would be one its workers cannot have (on 2 cores: 1 + 2 never fits).
DRIVER_BUNDLE = {"cpu": 0, "memory": 1 << 20}


def trial_bundle(resources: ResourcesSection) -> dict:
    """What `tune.with_resources` reserves for a trial's own process."""
    if resources.workers == 1:
        return {"cpu": resources.cpu, "gpu": resources.gpu}
    return dict(DRIVER_BUNDLE)


def trial_devices(resources: ResourcesSection) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds while it trains: its workers' (or its own) share."""
    return resources.workers * resources.cpu, resources.workers * resources.gpu


def trials_at_once(resources: ResourcesSection, cpus: float, gpus: float) -> int:
    """How many trials a cluster of `cpus` and `gpus` runs at once (0: not even one)."""
    need_cpu, need_gpu = trial_devices(resources)
    slots = math.floor(cpus / need_cpu + 1e-9)
    if need_gpu > 0:
        slots = min(slots, math.floor(gpus / need_gpu + 1e-9))
    return max(0, slots)


def local_capacity() -> tuple[float, float]:
    """The CPUs and GPUs a local Ray started here offers (Ray's own count: the CPUs this
    process may use, the CUDA devices torch sees)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    import torch

    return float(cpus), float(torch.cuda.device_count() if torch.cuda.is_available() else 0)


def check_placeable(spec: Spec, where: str, cpus: float, gpus: float, cluster: str) -> None:
    """Refuse (exit 2) a trial that the cluster could never place: its workers' CPUs or GPUs
    exceed what `cluster` has (one line naming the file and key)."""
    res = spec.resources
    need_cpu, need_gpu = trial_devices(res)
    if need_cpu > cpus + 1e-9:
        raise SpecError(
            f"{where}: resources.workers: {res.workers} workers x {res.cpu:g} CPU need "
            f"{need_cpu:g} CPUs; {cluster} has {cpus:g}"
        )
    if need_gpu > gpus + 1e-9:
        raise SpecError(
            f"{where}: resources.workers: {res.workers} workers x {res.gpu:g} GPU need "
            f"{need_gpu:g} GPUs; {cluster} has {gpus:g}"
        )


# --- inside a trial ------------------------------------------------------------------------


def is_rank_zero() -> bool:
    import ray.train

    return ray.train.get_context().get_world_rank() == 0


def worker_runtime(runtime):
    """The trial's runtime on this worker: its own device (the GPU Ray Train gave it)."""
    if runtime.device == "cpu":
        return runtime
    import ray.train.torch

    return runtime.model_copy(update={"device": str(ray.train.torch.get_device())})


@contextlib.contextmanager
def node_system_metrics(spec: Spec, tracking_uri: str, run_id: str):
    """MLflow's system metrics of this worker's node into `run_id`, under
    `system/<host>/...`, from the node's local rank 0 alone; nothing with
    `mlflow.system_metrics: false`. (The trial's driver logs its own node's as `system/...`.)"""
    import ray.train

    if not spec.mlflow.system_metrics or ray.train.get_context().get_local_rank() != 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=spec.mlflow.system_metrics_interval_s,
        resume_logging=True,
        node_id=socket.gethostname(),
        tracking_uri=tracking_uri,
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def work_dir(storage_dir: str | Path, phase: str) -> Path:
    """A folder every worker of this trial reads, kept across the trial's retries and the
    sweep's resumes (Tune keeps the trial's id): the study folder's `train/<experiment>/`."""
    from ray import tune

    context = tune.get_context()
    folder = Path(storage_dir) / "train" / context.get_experiment_name()
    return folder / f"{context.get_trial_id()}-{phase}"


def run_job(
    worker: Callable[[dict], None],
    config: dict,
    spec: Spec,
    storage_dir: str | Path,
    to_tune: bool,
) -> None:
    """`worker(config)` on `spec.resources.workers` Ray Train workers, from inside a Tune trial.

    `to_tune`: rank 0's `ray.train.report` metrics become the trial's Tune results. Raises
    when a worker fails (no restart inside the job: the trial's retries restart it)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = spec.resources
    use_gpu = res.gpu > 0
    per_worker = {"CPU": res.cpu, **({"GPU": res.gpu} if use_gpu else {})}
    trainer = TorchTrainer(
        worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            # A fresh name per attempt: the phase resumes from its own checkpoint, not Ray's.
            name=f"job-{uuid.uuid4().hex[:12]}",
            storage_path=str(Path(storage_dir) / "train" / "ray"),
            callbacks=[TuneReportCallback()] if to_tune else [],
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()


# --- the sweep's view ------------------------------------------------------------------------


def check_cluster(spec: Spec, where: str) -> None:
    """`check_placeable` against the connected Ray cluster (a local one was checked before
    Ray started: `harness.preflight`)."""
    import ray

    cluster = ray.cluster_resources()
    check_placeable(spec, where, cluster.get("CPU", 0.0), cluster.get("GPU", 0.0), "the cluster")


def max_concurrent(spec: Spec) -> int | None:
    """Tune's `max_concurrent_trials`: the spec's; for trials whose drivers hold nothing
    (workers > 1), at most as many as the cluster can train at once, so that drivers do not
    start jobs that only queue."""
    if spec.resources.workers == 1:
        return spec.max_concurrent
    import ray

    cluster = ray.cluster_resources()
    slots = max(1, trials_at_once(spec.resources, cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)))
    return min(slots, spec.max_concurrent or slots)

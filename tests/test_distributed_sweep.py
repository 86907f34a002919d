"""A sweep of data-parallel trials (`resources.workers: 2`) end to end: Ray Tune trials whose
drivers hold no CPU, each phase a Ray Train job of two gloo workers on this 2-core machine, rank
0 logging into one MLflow run per trial; and the kill -9 / --resume case.

`python -m harness.sweep` runs as a subprocess on a tiny synthetic study, as in
tests/test_harness_sweep.py and tests/test_harness_resilience.py.
"""

from __future__ import annotations

import os
import signal
import socket

import psutil
import pytest
from test_harness_resilience import runs, start, wait_until
from test_harness_sweep import _kill_group, assert_ok, run_sweep, write_study

pytestmark = pytest.mark.slow

TWO_WORKERS = dict(
    search={"finetune.label_fraction": [1.0]},
    finetune={"budget": {"value": 2}, "batch_size": 1},
    pretrain={"budget": {"value": 1}, "batch_size": 1},
    resources={"cpu": 1, "workers": 2},
    mlflow={"system_metrics": False, "log_images": False},
)


def _check_one_run_per_trial(sweep, trials: int) -> None:
    runs_ = sweep.runs("trial")
    assert len(runs_) == len({r.data.tags["bev.trial_id"] for r in runs_}) == trials
    for run in runs_:
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["resources.workers"] == "2"
        assert params["finetune.global_batch_size"] == "2"  # 2 workers x batch 1
        steps = [m.step for m in sweep.history(run.info.run_id, "val/mIoU")]
        assert steps == [1, 2], "each epoch logged once, by rank 0 alone"
        assert 0.0 <= run.data.metrics["val/mIoU"] <= 1.0
    (parent,) = sweep.runs("sweep")
    assert parent.info.status == "FINISHED"
    assert {status for _, status in runs(sweep)} == {"FINISHED"}


def test_a_sweep_of_two_worker_trials_logs_one_run_per_trial(tmp_path):
    monitored = {**TWO_WORKERS, "mlflow": {"system_metrics_interval_s": 1, "log_images": False}}
    sweep = write_study(tmp_path, "dp", methods=["supervised", "pretrained"], **monitored)
    assert_ok(run_sweep(sweep, "--quiet"))
    _check_one_run_per_trial(sweep, trials=2)
    for run in sweep.runs("trial"):  # the node's, from its local rank 0
        node = f"system/{socket.gethostname()}/"
        assert any(key.startswith(node) for key in run.data.metrics), sorted(run.data.metrics)
    (pretrain,) = sweep.runs("pretrain")
    assert pretrain.info.status == "FINISHED"
    assert pretrain.data.params["pretrain.global_batch_size"] == "2"
    assert [m.step for m in sweep.history(pretrain.info.run_id, "pretrain/loss")] == [1]


def test_kill_9_mid_finetuning_then_resume_restarts_the_job_from_its_checkpoint(tmp_path):
    longer = {**TWO_WORKERS, "finetune": {"budget": {"value": 3}, "batch_size": 1}}
    sweep = write_study(tmp_path, "dpkill", methods=["supervised"], **longer)
    proc = start(sweep)
    try:
        # Killed once the first epoch is logged and checkpointed, mid-phase.
        def first_epoch_logged() -> bool:
            trials = runs(sweep, "trial")
            return bool(trials) and any(
                sweep.history(run_id, "val/mIoU") for run_id, _ in trials
            )

        wait_until(proc, first_epoch_logged, "the first fine-tuning epoch")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _kill_group(proc)
    (train,) = (sweep.storage / "train").glob("*/*-finetune/finetune.pt")  # rank 0's checkpoint

    assert_ok(run_sweep(sweep, "--resume", "--quiet"))
    (run,) = sweep.runs("trial")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in sweep.history(run.info.run_id, "val/mIoU")]
    assert steps[0] == 1 and sorted(set(steps)) == [1, 2, 3]
    assert steps.count(1) == 1, "the resumed job started from its checkpoint, not from scratch"
    assert {status for _, status in runs(sweep)} == {"FINISHED"}
    assert not train.exists()  # the finished trial's work folder is removed


def test_a_killed_worker_fails_the_trial_and_tunes_retry_finishes_it(tmp_path):
    longer = {**TWO_WORKERS, "finetune": {"budget": {"value": 3}, "batch_size": 1}}
    sweep = write_study(tmp_path, "dpfail", methods=["supervised"], retries=1, **longer)
    proc = start(sweep, "--quiet")
    try:
        def first_epoch_logged() -> bool:
            return any(sweep.history(run_id, "val/mIoU") for run_id, _ in runs(sweep, "trial"))

        wait_until(proc, first_epoch_logged, "the first fine-tuning epoch")
        workers = [p for p in psutil.process_iter(["cmdline"])
                   if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]  # fmt: skip
        assert len(workers) == 2
        workers[-1].kill()  # one worker dies (SIGKILL), mid-phase
        out, err = proc.communicate(timeout=600)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err[-4000:]
    assert list(sweep.storage.glob("ray/*/*/error.txt")), "the trial did not fail and retry"
    (run,) = sweep.runs("trial")
    assert run.info.status == "FINISHED" and "bev.error" not in run.data.tags
    steps = [m.step for m in sweep.history(run.info.run_id, "val/mIoU")]
    assert sorted(set(steps)) == [1, 2, 3] and steps.count(1) == 1

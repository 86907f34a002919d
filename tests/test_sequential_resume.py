"""A sequential sweep end to end (slow tier): seeds in rounds on the real training core, Ray
Tune and a SQLite MLflow store; killed with SIGKILL between two rounds and again during one,
then resumed: no trial runs twice, no run is left RUNNING or duplicated, and the verdicts are
those of the same sweep run without a kill (CPU training is deterministic per seed)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from test_harness_sweep import (
    SWEEP_TIMEOUT_S,
    _kill_group,
    assert_ok,
    run_sweep,
    start_sweep,
    write_study,
)

# Two cells of one arm, rounds of 3, 1 and 1 seeds: round 1 cannot decide (its boundary on t
# is 12.8), so at least two rounds run.
SECTIONS = dict(
    methods=["supervised"],
    seeds={"sequential": {"first": 3, "step": 1, "max": 5}},
    max_concurrent=1,
    mlflow={"system_metrics": False, "log_images": False, "log_checkpoint": False},
)


def sequential_table(sweep) -> list[tuple]:
    from analysis.findings import analyse
    from analysis.load import load_study

    analysis = analyse(load_study(sweep.experiment, sweep.tracking_uri, progress=False), n_boot=10)
    table = analysis.sequential
    return [
        (r.variant, r.label_fraction, r.round, r.n_seeds, r.verdict, round(r.mean_diff, 9))
        for r in table.itertuples()
    ]


def state(sweep) -> dict:
    try:
        return json.loads((sweep.storage / "sweep_state.json").read_text())
    except (OSError, ValueError):
        return {}


def trial_runs(sweep) -> list:
    try:
        return sweep.runs("trial")
    except Exception:  # the store is being created
        return []


def kill_when(proc, condition, what: str, settle_s: float = 0.0) -> None:
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while not condition():
        assert proc.poll() is None, f"the sweep ended before {what}"
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.05)
    time.sleep(settle_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _kill_group(proc)


@pytest.mark.slow
def test_a_sequential_sweep_killed_between_and_during_rounds_resumes_to_the_same_verdicts(
    tmp_path,
):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    reference = write_study(tmp_path / "a", "rounds", **SECTIONS)
    assert_ok(run_sweep(reference))
    expected = sequential_table(reference)
    expected_trials = {r.data.tags["bev.trial_id"] for r in reference.runs("trial")}
    rounds_run = {r.data.tags["bev.round"] for r in reference.runs("trial")}
    assert len(rounds_run) >= 2, "the sweep should need more than one round"

    sweep = write_study(tmp_path / "b", "rounds", **SECTIONS)
    # Kill 1: round 1 done, before any trial of round 2 finished.
    proc = start_sweep(sweep, tmp_path)
    kill_when(proc, lambda: [r.get("done") for r in state(sweep).get("rounds", [])][:1] == [True],
              "round 1 finished")  # fmt: skip
    assert not [r for r in trial_runs(sweep) if r.data.tags.get("bev.round") == "2"
                and r.info.status == "FINISHED"]  # fmt: skip
    # Kill 2: during round 2, after one of its trials finished.
    proc = start_sweep(sweep, tmp_path, "--resume")
    kill_when(
        proc,
        lambda: any(r.data.tags.get("bev.round") == "2" and r.info.status == "FINISHED"
                    for r in trial_runs(sweep)),
        "a round-2 trial finished",
        settle_s=1.0,  # let Tune persist that trial's end, as a kill a second later would
    )  # fmt: skip
    finished_before = {r.info.run_id for r in trial_runs(sweep) if r.info.status == "FINISHED"}
    resumed_at_ms = time.time() * 1000
    assert_ok(run_sweep(sweep, "--resume"))

    trials = sweep.runs("trial")
    keys = [r.data.tags["bev.trial_id"] for r in trials]
    assert len(keys) == len(set(keys)), "a trial has two runs"
    assert set(keys) == expected_trials
    assert {r.info.status for r in trials} == {"FINISHED"}
    for run in trials:  # no finished trial ran again
        history = sweep.history(run.info.run_id, "val/mIoU")
        assert len({m.step for m in history}) == len(history)
        if run.info.run_id in finished_before:
            assert not [m for m in history if m.timestamp >= resumed_at_ms], run.info.run_name
    assert sequential_table(sweep) == expected
    (sweep_run,) = sweep.runs("sweep")
    assert sweep_run.info.status == "FINISHED"
    recorded = state(sweep)["rounds"]
    assert [r["round"] for r in recorded] == list(range(1, len(rounds_run) + 1))
    assert all(r["done"] for r in recorded)
    opened = sweep.history(sweep_run.info.run_id, "sweep/comparisons_open")
    assert [m.step for m in opened] == [r["round"] for r in recorded]

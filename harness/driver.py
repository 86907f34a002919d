"""The sweep driver's bookkeeping: its state file, its clocks, and MLflow kept in step with Ray.

`sweep_state.json` in the study folder says which Ray experiment and MLflow sweep run a
`--resume` continues, with the `--set` overrides and the wall time of every process that ran
the sweep. The callbacks run in the driver process, inside `Tuner.fit`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray.tune import Callback as _TuneCallback

from harness.spec import Spec, SpecError
from harness.tracking import Tracker
from harness.trials import Trial
from model import names
from model.names import PARENT, ROLE, TRIAL_ID

log = logging.getLogger(__name__)

STATE_FILE = "sweep_state.json"
STATE_KEYS = ("ray_path", "tracking_uri", "experiment")  # what a resume needs
# The driver's main thread and its SweepClock both read-modify-write the state file.
_STATE_LOCK = threading.Lock()


def trial_of(trial) -> Trial:
    """The `Trial` of a Ray Tune trial (its config's `trial` entry)."""
    return Trial.from_dict(trial.config["trial"])


def read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_state(path: Path) -> dict | None:
    """The state file of the study's last sweep (None: there is none); a file that is not one
    (truncated, `{}`, an old one missing a key) is a `SpecError` naming it and the key."""
    if not path.exists():
        return None
    fix = "remove it to start a new sweep"
    try:
        state = json.loads(path.read_text())
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the sweep state: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid JSON (truncated?): {exc}; {fix}") from None
    if not isinstance(state, dict):
        raise SpecError(f"{path}: expected a JSON object, got {type(state).__name__}; {fix}")
    for key in STATE_KEYS:
        if key not in state:
            raise SpecError(f"{path}: {key}: required key is missing; {fix}")
    return state


def write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def begin_state(path: Path, previous: dict | None, ray_path: Path, **fields) -> dict:
    """The sweep's state, written before anything else it does (data, MLflow, Ray), so a kill
    at any point leaves a sweep `--resume` continues. `previous`: the state being resumed."""
    state = dict(previous or {})
    state.setdefault("ray_path", str(ray_path))
    state.setdefault("sweep_run_id", None)  # set once the parent MLflow run exists
    state.setdefault("started", time.strftime("%Y-%m-%d %H:%M:%S"))
    state.update(fields, status="running")
    # Wall time of every process that ran this sweep (a resume adds one): SweepClock keeps the
    # last one current, so a kill -9 loses at most a second.
    state["segments_s"] = [*state.get("segments_s", []), process_age_s()]
    write_state(path, state)
    return state


def update_state(path: Path, **fields) -> None:
    with _STATE_LOCK:
        write_state(path, {**(read_state(path) or {}), **fields})


def stop_like_ctrl_c() -> None:
    """SIGTERM and SIGHUP stop the sweep as Ctrl-C does: through Ray Tune's SIGINT handler
    while trials run (it saves the experiment and stops them), a KeyboardInterrupt otherwise.
    Call it again after `ray.init`, which installs its own SIGTERM handler."""

    def forward(signum, frame) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)


def close_sweep(
    state_path: Path,
    tracker: Tracker | None,
    sweep_run_id: str | None,
    status: str,
    outcome: SweepOutcome,
    slots: int,
    complete: bool,
) -> float:
    """Record the sweep's end: children still RUNNING and the sweep run get `status`, the
    outcome's metrics are logged, and with `complete` (Tune ran every trial to its end) the
    state says `finished`: a finished sweep is never reopened. Does what it can when the disk
    or the store fails. Returns the sweep's wall time, every process that ran it summed."""
    try:
        segments = record_segment(state_path, process_age_s())
    except OSError as exc:
        log.error("cannot write %s: %s", state_path, exc)
        segments = (read_state(state_path) or {}).get("segments_s") or [process_age_s()]
    wall_s = sum(segments)
    if tracker is None or sweep_run_id is None:
        return wall_s
    try:
        closed = tracker.close_unfinished(sweep_run_id, status=status)
        if closed:
            log.warning("%d run(s) were still RUNNING; marked %s", closed, status)
        tracker.log_metrics(sweep_run_id, outcome.metrics(wall_s, slots), step=0)
        tracker.log_metrics(sweep_run_id, {"sweep/segments": len(segments)}, step=0)
        tracker.finish(sweep_run_id, status)
    except Exception as exc:  # a full disk, a store gone: what could be marked is marked
        log.error("cannot record the end of sweep run %s: %s", sweep_run_id, exc)
        return wall_s
    if complete:
        update_state(state_path, status="finished")
    return wall_s


class SweepCallback(_TuneCallback):
    """Keeps MLflow's view of each trial in step with Ray Tune's on the driver.

    Trials mark their own runs FAILED when they raise. This callback covers what a trial cannot:
    a worker process that died (FAILED with the reason), a trial stopped early by ASHA (FINISHED,
    tagged `bev.stopped_early`), and retries (`bev.retries`). Ray Tune pickles it with the
    experiment, so it keeps only the state file's path and reads where MLflow is on `setup`.
    """

    def __init__(self, state_path: str):
        self.state_path = state_path
        self._tracker: Tracker | None = None
        self._sweep_run_id: str | None = None

    def __getstate__(self) -> dict:
        return {"state_path": self.state_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["state_path"])

    def setup(self, **info) -> None:
        state = read_state(Path(self.state_path)) or {}
        if state:
            self._tracker = Tracker(state["tracking_uri"], state["experiment"])
            self._sweep_run_id = state["sweep_run_id"]

    def _run(self, trial):
        if self._tracker is None:
            return None
        found = self._tracker.find(
            {ROLE: "trial", TRIAL_ID: trial_of(trial).key, PARENT: self._sweep_run_id}
        )
        return found[0] if found else None

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        run = self._run(trial)
        if run is not None:
            retries = int(run.data.tags.get("bev.retries", "0")) + 1
            self._tracker.set_tags(run.info.run_id, {"bev.retries": retries})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run = self._run(trial)
        if run is None:
            return
        error = run.data.tags.get("bev.error") or _trial_error(trial)
        self._tracker.finish(run.info.run_id, "FAILED", error=error)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run = self._run(trial)
        if run is None or run.info.status != "RUNNING":
            return
        last = trial.last_result or {}
        if last.get("epoch", 0) < last.get("epochs", 0):
            self._tracker.set_tags(run.info.run_id, {"bev.stopped_early": "true"})
        self._tracker.finish(run.info.run_id, "FINISHED")


class SweepClock:
    """Keeps this process's wall-time segment in the state file current, once a second, from a
    daemon thread: the sweep's total wall time survives a kill -9 at any point (dataset
    generation and pseudo-labels included) to within a second. `start()` it after `begin_state`
    and `stop()` it before `close_sweep`."""

    def __init__(self, state_path: Path, period_s: float = 1.0):
        self.state_path, self.period_s = state_path, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="sweep-clock", daemon=True)

    def start(self) -> SweepClock:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _tick(self) -> None:
        failing = False
        while not self._stop.wait(self.period_s):
            try:
                record_segment(self.state_path, process_age_s())
                failing = False
            except OSError as exc:  # a full disk: said once, retried next tick
                if not failing:
                    log.warning("cannot update %s: %s", self.state_path, exc)
                failing = True


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text().strip().splitlines()
        return text[-1] if text else "trial failed"
    except OSError:
        return "trial failed (worker process died)"


@dataclass
class SweepOutcome:
    """What the sweep achieved, read back from Ray Tune's experiment state and MLflow."""

    planned: int = 0  # trials the spec asks for (grid points or Optuna samples)
    statuses: dict[str, str] = field(default_factory=dict)  # Ray trial id -> Tune status
    core_wall_s: float = 0.0  # the core's training clocks, summed over trials and pretrainings
    val_wall_s: float = 0.0  # their validation passes, summed the same way

    @property
    def finished(self) -> int:
        return sum(s == "TERMINATED" for s in self.statuses.values())

    @property
    def failed(self) -> int:
        return sum(s == "ERROR" for s in self.statuses.values())

    @property
    def unfinished(self) -> int:
        # Ray creates grid trials lazily: an interrupted sweep may not know all of them yet.
        return max(self.planned, len(self.statuses)) - self.finished - self.failed

    def add(self, other: SweepOutcome) -> None:
        """Count another round's trials in. Its clocks are the whole sweep's so far (`read`
        sums every run under the sweep run), so they replace this one's."""
        self.planned += other.planned
        self.statuses.update(other.statuses)  # Tune's trial ids carry their experiment's id
        self.core_wall_s, self.val_wall_s = other.core_wall_s, other.val_wall_s

    @classmethod
    def read(cls, planned: int, ray_path: Path, tracker: Tracker, sweep_run_id: str):
        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(str(ray_path))
        statuses = {t.trial_id: str(t.status) for t in analysis.trials}
        core = val = 0.0
        for run in tracker.find({PARENT: sweep_run_id}):
            if run.data.tags.get(ROLE) in ("trial", "pretrain"):
                core += run.data.metrics.get(names.CUM_WALL_S, 0.0)
                history = tracker.client.get_metric_history(run.info.run_id, names.VAL_WALL_S)
                # One value per epoch; a resumed epoch logs its step again: count it once.
                val += sum({m.step: m.value for m in history}.values())
        return cls(planned, statuses, core, val)

    def metrics(self, wall_s: float, slots: int) -> dict[str, float]:
        values = {
            "sweep/trials_total": max(self.planned, len(self.statuses)),
            "sweep/trials_finished": self.finished,
            "sweep/trials_failed": self.failed,
            "sweep/wall_s": wall_s,
        }
        if self.core_wall_s:
            held = wall_s * slots
            values["sweep/core_wall_s"] = self.core_wall_s
            values["sweep/val_wall_s"] = self.val_wall_s
            values["sweep/slots"] = slots
            values["sweep/train_share"] = min(1.0, self.core_wall_s / held)
            values["sweep/val_share"] = min(1.0, self.val_wall_s / held)
            # Share of the slot-seconds the sweep held that went to anything but the core's
            # training and validation loops: startup, data, caches, MLflow, Ray, idle slots.
            values["sweep/overhead_share"] = max(
                0.0, 1.0 - (self.core_wall_s + self.val_wall_s) / held
            )
        return values


def trial_slots(spec: Spec, planned: int) -> int:
    """How many trials can run at once on the connected Ray cluster."""
    import ray

    from harness.distributed import trials_at_once

    cluster = ray.cluster_resources()
    slots = max(1, trials_at_once(spec.resources, cluster.get("CPU", 1.0), cluster.get("GPU", 0)))
    if spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    return max(1, min(slots, planned or slots))


def process_age_s() -> float:
    """Seconds since this process started: the wall a user waits, imports and Ray included."""
    import psutil

    return time.time() - psutil.Process().create_time()


def record_segment(state_path: Path, elapsed_s: float) -> list[float]:
    """Set this process's segment of the sweep's wall time; returns all segments."""
    with _STATE_LOCK:
        state = read_state(state_path) or {}
        segments = list(state.get("segments_s") or [0.0])
        segments[-1] = elapsed_s
        state["segments_s"] = segments
        if state.get("ray_path"):
            write_state(state_path, state)
    return segments

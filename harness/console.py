"""What `python -m harness.sweep` prints: a progress table with the study's columns, the shared
pretraining's progress, and at the end a summary with the next two commands.

Three levels (`--quiet`, default, `-v`):

- quiet: errors and the summary only;
- default: our own progress table (Ray's old output engine, which honours a custom reporter;
  the new one ignores `RunConfig(progress_reporter=...)`), known-harmless warnings switched
  off where they are made;
- verbose: Ray Tune's own output engine and every log line, debug included.

The table is a `ray.tune.ProgressReporter` (not a `CLIReporter`: that one prints a "Current
best trial" across methods and label fractions, which means nothing in a label-efficiency
study). It prints when a trial starts, reports an epoch or ends, at most every few seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from ray.tune import ProgressReporter

from model import names
from model.cli import stay_offline
from model.names import PARENT, ROLE

log = logging.getLogger("harness.console")

QUIET, DEFAULT, VERBOSE = "quiet", "default", "verbose"

# Where each known-harmless message is made, and the switch that turns it off there. Set only
# where the user has not set them; the driver's environment is inherited by a local Ray's
# workers.
HARMLESS = {
    # Tune's legacy output engine, so that the custom progress reporter is used.
    "RAY_AIR_NEW_OUTPUT": "0",
    # "Experiment state snapshotting has been triggered multiple times": forced by
    # `CheckpointConfig(num_to_keep=1)` after every trial checkpoint, which a resume needs.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Tune's automatic loggers include TensorBoard's (and its "tensorboard --logdir" hint);
    # the sweep passes the CSV and JSON loggers that ExperimentAnalysis reads itself.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # MLflow's INFO lines from every trial ("Started monitoring system metrics", "Creating
    # initial MLflow database tables") and its artifact download bars (log_table appends).
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

# Ray Train's "Checkpoint successfully created at: ..." after every epoch a trial reports.
WORKER_INFO_LOGGERS = ("ray.train._internal.storage",)
# ExperimentAnalysis's "Failed to fetch metrics for N trial(s)", one line per trial, twice, when
# the driver reads an interrupted sweep: trials that never started have no results yet, and
# SweepOutcome counts them unfinished.
# Ray 2.60's "Token authentication is enabled for this Ray cluster", at every local start: the
# token is Ray's default (~/.ray/auth_token), and the local cluster listens on loopback only.
DRIVER_WARNING_LOGGERS = (
    "ray.tune.analysis.experiment_analysis",
    "ray._private.authentication.authentication_token_setup",
)
LEVEL_VARIABLE = "BEVLABELS_CONSOLE"  # the level, for the trials of a local Ray

REPORT_EVERY_S = 10.0  # at most one table per this many seconds, unless a trial ended
PRETRAINING_POLL_S = 2.0  # how often the reporter asks MLflow which pretrainings run


def configure(level: str) -> None:
    """Logging and Ray's output switches for `level`, and no telemetry (at every level); call
    before Ray and MLflow start."""
    os.environ[LEVEL_VARIABLE] = level
    stay_offline()
    if level == VERBOSE:
        logging.basicConfig(
            level=logging.DEBUG,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        return
    for key, value in HARMLESS.items():
        os.environ.setdefault(key, value)
    if level == QUIET:
        os.environ.setdefault("TQDM_DISABLE", "1")  # bars of child processes (read at import)
    logging.basicConfig(
        level=logging.ERROR if level == QUIET else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # The table and the summary read as text, not as log records.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.ERROR if level == QUIET else logging.INFO)
    for name in DRIVER_WARNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_worker_loggers() -> None:
    """In a trial: raise the loggers of WORKER_INFO_LOGGERS to WARNING unless -v."""
    if os.environ.get(LEVEL_VARIABLE, DEFAULT) != VERBOSE:
        for name in WORKER_INFO_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def tune_verbosity(level: str) -> int:
    """`RunConfig(verbose=...)`: silent when quiet, status tables by default, all of Ray's
    output (trial configs and results) with -v."""
    return {QUIET: 0, DEFAULT: 1, VERBOSE: 2}[level]


# --- the progress table ------------------------------------------------------------------------

ENDED = ("TERMINATED", "ERROR")
COLUMNS = ("trial", "method", "label_fraction", "seed", "status", "epoch", "val/mIoU")


def trial_row(trial, pretraining: bool = False) -> tuple[str, ...]:
    """A Ray Tune trial as a row of COLUMNS. `pretraining`: a shared pretraining is running, so
    a pretrained trial that has not reported an epoch yet waits for it or runs it."""
    from harness.driver import trial_of

    spec_trial = trial_of(trial)
    fraction = dict(spec_trial.overrides).get("finetune.label_fraction", "-")
    last = trial.last_result or {}
    status = str(trial.status)
    epoch = "-"
    if "epoch" in last:
        epoch = f"{last['epoch']}/{last.get('epochs', '?')}"
    elif status == "RUNNING" and pretraining and spec_trial.arm.pretrains:
        epoch = "pretraining"
    miou = last.get(names.VAL_MIOU)
    return (
        trial.trial_id,
        spec_trial.method,
        f"{fraction:g}" if isinstance(fraction, float) else str(fraction),
        str(spec_trial.seed),
        status,
        epoch,
        "-" if miou is None else f"{miou:.4f}",
    )


def columns_text(rows: list[tuple[str, ...]], indent: str = "  ") -> str:
    """Rows of strings as left-aligned columns (the first row is the header)."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


class StudyReporter(ProgressReporter):
    """Ray Tune's progress report for a study: one row per started trial (method, label
    fraction, seed, status, epoch, val/mIoU) and a line per shared pretraining while it runs.

    Tune pickles the reporter with the experiment: it keeps only where MLflow is."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_run_id: str):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep_run_id = sweep_run_id
        self._tracker = None
        self._state: tuple = ()
        self._ended: set[str] = set()
        self._pretraining: list[str] = []
        self._running: list[str] = []  # the pretrainings running at the last table
        self._last_time = self._polled = 0.0
        self._start = time.time()

    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in ("tracking_uri", "experiment", "sweep_run_id")}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def setup(self, start_time=None, total_samples=None, metric=None, mode=None, **kwargs):
        self._start = start_time or time.time()

    def should_report(self, trials, done: bool = False) -> bool:
        """A table when a trial ends or a shared pretraining starts or ends; otherwise at most
        every REPORT_EVERY_S, and only when a trial started or reported an epoch, or a shared
        pretraining advanced. (A pretraining shorter than REPORT_EVERY_S is still shown.)"""
        ended = {t.trial_id for t in trials if str(t.status) in ENDED}
        now = time.time()
        if done or now - self._polled >= PRETRAINING_POLL_S:
            self._polled = now
            self._pretraining = self.pretraining_lines()
        running = [line.split(":")[0] for line in self._pretraining]
        news = done or ended != self._ended or running != self._running
        if not news and now - self._last_time < REPORT_EVERY_S:
            return False
        epochs = tuple(
            (t.trial_id, str(t.status), (t.last_result or {}).get("epoch")) for t in trials
        )
        state = (epochs, tuple(self._pretraining))
        started = any(str(t.status) != "PENDING" for t in trials)
        if state == self._state or not started:
            return False
        self._state, self._running, self._last_time = state, running, now
        return True

    def report(self, trials, done: bool, *sys_info: str) -> None:
        """The counts, then a row per running trial and per trial that ended since the last
        report (every started trial at the end), then the running pretrainings."""
        ended = {t.trial_id for t in trials if str(t.status) in ENDED}
        shown = [
            t
            for t in trials
            if str(t.status) == "RUNNING" or (t.trial_id in ended - self._ended)
            or (done and str(t.status) != "PENDING")
        ]  # fmt: skip
        self._ended = ended
        counts: dict[str, int] = {}
        for trial in trials:
            counts[str(trial.status).lower()] = counts.get(str(trial.status).lower(), 0) + 1
        head = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        lines = [f"[{time.time() - self._start:4.0f} s] {head}"]
        if shown:
            waiting = bool(self._pretraining)
            lines.append(columns_text([COLUMNS, *[trial_row(t, waiting) for t in shown]]))
        lines.extend(self._pretraining)
        log.info("%s", "\n".join(lines))

    def pretraining_lines(self) -> list[str]:
        """One line per shared pretraining still running, from its MLflow run."""
        from harness.tracking import Tracker

        try:
            if self._tracker is None:
                self._tracker = Tracker(self.tracking_uri, self.experiment, create=False)
            runs = self._tracker.find({ROLE: "pretrain", PARENT: self.sweep_run_id})
        except Exception as exc:  # the progress display must never stop a sweep
            log.debug("no pretraining progress: %s", exc)
            return []
        lines = []
        for run in runs:
            if run.info.status != "RUNNING":
                continue
            history = self._tracker.client.get_metric_history(run.info.run_id, names.CUM_WALL_S)
            epochs = len({m.step for m in history})
            lines.append(
                f"  shared pretraining {run.info.run_name}: {epochs} epoch(s) done; "
                "the pretrained trials that need it wait"
            )
        return lines


# --- the summary -------------------------------------------------------------------------------


def summary_text(experiment: str, tracking_uri: str, experiment_id: str) -> str:
    """Mean final val mIoU per method and label fraction, the paired verdicts against
    supervised at 100 % labels when there are at least two seeds, and the next commands."""
    from analysis.load import AnalysisError, analysed_trials, load_study
    from analysis.sequential_study import design_of
    from analysis.stats import paired_verdicts, summarise

    lines = []
    try:
        study = load_study(experiment, tracking_uri=tracking_uri, progress=False)
        trials = analysed_trials(study.trials, include_partial=False)
    except AnalysisError as exc:
        lines.append(f"no results to summarise: {exc}")
        trials = None
    if trials is not None and not trials.empty:
        summary = summarise(trials)
        rows = [("variant", "label_fraction", "seeds", "val/mIoU (mean)")]
        rows += [
            (r.variant, f"{r.label_fraction:g}", str(r.n_seeds), f"{r.mean:.4f}")
            for r in summary.itertuples()
        ]
        lines.append("val mIoU, final epoch, mean over seeds:")
        lines.append(columns_text(rows))
        design = design_of(study.sweep)
        if design is not None:
            lines += _sequential_lines(trials, design)
        elif int(summary["n_seeds"].max()) >= 2:
            verdicts = paired_verdicts(trials)
            if not verdicts.empty:
                rows = [("variant", "label_fraction", "vs", "paired diff [95% CI]", "verdict")]
                rows += [
                    (
                        v.variant,
                        f"{v.label_fraction:g}",
                        v.reference,
                        f"{v.mean_diff:+.4f} [{v.t_low:+.4f}, {v.t_high:+.4f}]",
                        v.verdict,
                    )
                    for v in verdicts.itertuples()
                ]
                lines.append("paired by seed against the reference:")
                lines.append(columns_text(rows))
        else:
            lines.append("one seed per cell: no paired verdicts (they need at least 2 seeds)")
    report = f"python -m analysis.report --experiment {experiment}"
    if tracking_uri != _default_uri(experiment):
        report += f" --tracking-uri {tracking_uri}"
    lines.append(f"report:    {report}")
    lines.append(f"MLflow UI: {ui_command(tracking_uri, experiment_id)}")
    return "\n".join(lines)


def _sequential_lines(trials, design) -> list[str]:
    """A sequential study's verdicts: the round each comparison stopped at, and its repeated
    CI (valid wherever the rounds stopped)."""
    from analysis.sequential_study import sequential_verdicts
    from analysis.stats import default_reference

    table = sequential_verdicts(trials, design[0], design[1] or default_reference(trials))
    if table.empty:
        return []
    rows = [("variant", "label_fraction", "vs", "round", "seeds", "diff [repeated CI]", "verdict")]
    rows += [
        (
            v.variant,
            f"{v.label_fraction:g}",
            v.reference,
            f"{v.round} of {v.rounds}",
            str(v.n_seeds),
            f"{v.mean_diff:+.4f} [{v.rci_low:+.4f}, {v.rci_high:+.4f}]",
            v.verdict,
        )
        for v in table.itertuples()
    ]
    return ["sequential verdicts (seeds in rounds; repeated CIs):", columns_text(rows)]


def ui_command(tracking_uri: str, experiment_id: str) -> str:
    """How to see the study view (docs/analysis.md) of this store."""
    from harness.tracking import study_view_url

    if tracking_uri.startswith(("http://", "https://")):
        return f"open {study_view_url(tracking_uri, experiment_id)}"
    ui = "http://127.0.0.1:5000"
    return (
        f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000 --workers 1, "
        f"then open {study_view_url(ui, experiment_id)}"
    )


def _default_uri(experiment: str) -> str:
    from harness.tracking import sqlite_uri

    return sqlite_uri(os.path.join("studies", experiment, "mlflow.db"))

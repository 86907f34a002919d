"""MLflow -> tidy pandas frames: one row per trial and epoch, and one row per trial.

Reads only what docs/architecture.md ("MLflow layout") says the harness writes, by the names
of `model.names` (a standard-library module: no torch, no Ray, no `harness`). Works on a
store that a sweep is still writing: trials whose run is RUNNING are kept and marked `partial`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

from analysis.alignment import alignment_runs
from model import arms, names

log = logging.getLogger(__name__)

DEFAULT_STORE_TEMPLATE = "sqlite:///studies/{experiment}/mlflow.db"
FINISHED = "FINISHED"
# MLflow run statuses whose data is still growing: marked `partial`.
UNFINISHED = ("RUNNING", "SCHEDULED")
FAILED = ("FAILED", "KILLED")

# Cumulative-time accounting variants, as column suffixes of `cum_{wall,gpu}_s{suffix}`:
# own = this trial only, incl_pretrain = plus the whole pretraining it used,
# amortised = plus its share of the pretraining (pretraining / trials sharing it).
TIME_ACCOUNTING = {"own": "", "incl_pretrain": "_incl_pretrain", "amortised": "_amortised"}
TIME_COLUMNS = [
    f"cum_{clock}_s{suffix}" for clock in ("wall", "gpu") for suffix in TIME_ACCOUNTING.values()
]

# Frame column -> the MLflow param it is read from (the spec's dotted names).
PARAM_COLUMNS = {
    "labelled_samples": names.LABELLED_SAMPLES,
    "pretrain_epochs": names.PRETRAIN_EPOCHS,
    "finetune_epochs": names.FINETUNE_EPOCHS,
    "seed": names.SEED,
    "label_fraction": names.LABEL_FRACTION,
    "w_reproj": names.W_REPROJ,
    "w_temporal": names.W_TEMPORAL,
    "w_bev": names.W_BEV,
}
INT_PARAMS = ("labelled_samples", "pretrain_epochs", "finetune_epochs", "seed")
FLOAT_PARAMS = ("label_fraction", "w_reproj", "w_temporal", "w_bev")
# Params that split one method into several configurations ("variants") when they differ
# between trials of the same method, label fraction and seed (e.g. a loss-weight study).
VARIANT_PARAMS = ("pretrain_epochs", "finetune_epochs", "w_reproj", "w_temporal", "w_bev", "preset",
                  "pseudo_labels")  # fmt: skip


class AnalysisError(Exception):
    """A problem with the input (store, experiment, runs) that the user can fix: one line."""


@dataclass
class SweepInfo:
    """The sweep's parent run (`bev.role=sweep`): provenance for the report."""

    run_id: str
    run_name: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    spec_yaml: str | None = None
    environment: dict | None = None


@dataclass
class Study:
    """Everything the curves and the report need, read from one experiment."""

    tracking_uri: str
    experiment_name: str
    experiment_id: str
    epochs: pd.DataFrame  # one row per trial and epoch
    trials: pd.DataFrame  # one row per trial (its last logged epoch)
    class_names: list[str]
    sweep: SweepInfo | None = None
    warnings: list[str] = field(default_factory=list)
    # One row per pretraining run with its target alignment (analysis.alignment).
    alignment: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def status_counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.trials["status"].value_counts().items() if v}


def resolve_tracking_uri(
    cli_uri: str | None,
    experiment: str | None = None,
    *,
    spec: str | None = None,
    default: str | None = None,
) -> str:
    """Tracking URI precedence: the CLI flag, then $MLFLOW_TRACKING_URI (empty counts as
    unset), then a study spec's ``mlflow.tracking_uri`` (``spec``), then ``default``, then the
    study's own store.

    The analysis CLIs pass the flag and the experiment: their default is the local SQLite store
    a sweep writes, `studies/<experiment>/mlflow.db` relative to the working directory (the
    experiment name is the study name by default). The sweep (`harness.preflight`) passes the
    flag, the spec's URI and its study folder's store as ``default``. ValueError when nothing
    names a store.
    """
    study_store = (
        None if experiment is None else DEFAULT_STORE_TEMPLATE.format(experiment=experiment)
    )
    candidates = (
        ("command line", cli_uri),
        ("$MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI")),
        ("spec", spec),
        ("default", default),
        ("the study's store", study_store),
    )
    for source, uri in candidates:
        if uri:
            log.debug("MLflow tracking URI %s (from %s)", uri, source)
            return uri
    raise ValueError("no MLflow tracking URI: pass one, set $MLFLOW_TRACKING_URI or a default")


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:"):
        return None
    path = unquote(urlparse(uri).path)
    if uri.startswith("sqlite:////"):
        return Path("/" + path.lstrip("/"))
    return Path(path[1:] if path.startswith("/") else path)


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    path = sqlite_path(tracking_uri)
    # Opening a missing SQLite file would silently create an empty store: refuse instead.
    if path is not None and str(path) not in ("", ":memory:") and not path.is_file():
        raise AnalysisError(f"no MLflow store at {tracking_uri} (file {path} does not exist)")
    if tracking_uri.startswith(("file:", "/", ".")):  # a file store (a directory)
        root = Path(unquote(urlparse(tracking_uri).path) if "://" in tracking_uri else tracking_uri)
        if not root.is_dir():
            raise AnalysisError(f"no MLflow store at {tracking_uri} (directory does not exist)")
    return MlflowClient(tracking_uri=tracking_uri)


def _search_all(client, experiment_id: str, role: str) -> list:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`bev.role` = '{role}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _metric_frame(client, run) -> pd.DataFrame:
    """All of one run's metric histories, one row per step (= epoch), last value per step."""
    series = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        if not history:
            continue
        hist = pd.DataFrame(
            [(m.step, m.timestamp, m.value) for m in history], columns=["step", "ts", "value"]
        )
        # A resumed trial may log an epoch twice: the later value wins.
        hist = hist.sort_values(["step", "ts"]).drop_duplicates("step", keep="last")
        series[_column_name(key)] = hist.set_index("step")["value"]
    if not series:
        return pd.DataFrame(index=pd.Index([], name="epoch"))
    frame = pd.DataFrame(series)
    frame.index.name = "epoch"
    return frame


def _column_name(metric_key: str) -> str:
    """A frame column (a Python identifier) per MLflow metric: `val/mIoU` -> `val_mIoU`,
    `val/IoU_<c>` -> `IoU_<c>`, `time/cum_wall_s` -> `cum_wall_s`."""
    if metric_key.startswith(names.VAL_IOU_PREFIX):
        return metric_key[len("val/") :]
    if metric_key.startswith("time/"):
        return metric_key[len("time/") :]
    return metric_key.replace("/", "_")


def _trial_params(run) -> dict:
    params, tags = run.data.params, run.data.tags
    row = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or "",
        "trial_id": tags.get(names.TRIAL_ID) or run.info.run_name or run.info.run_id,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "method": params.get(names.METHOD, tags.get("bev.method")),
        "label_fraction": params.get(names.LABEL_FRACTION, tags.get("bev.label_fraction")),
        "seed": params.get(names.SEED, tags.get("bev.seed")),
        "preset": params.get(names.PRESET),
        "pretrain_key": tags.get(names.PRETRAIN_KEY),
        "pseudo_labels": names.pseudo_label_name(
            params.get(names.PSEUDO_LABELS), params.get(names.PSEUDO_LABEL_SOURCE),
            params.get(names.PSEUDO_LABEL_NOISE),
        ),  # fmt: skip
    }
    for column, param in PARAM_COLUMNS.items():
        if row.get(column) is None:
            row[column] = params.get(param)
    return row


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for name in FLOAT_PARAMS:
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    for name in INT_PARAMS:
        values = pd.to_numeric(frame[name], errors="coerce")
        frame[name] = values.round().astype("Int64")
    present = set(frame["method"].dropna())
    methods = sorted(present, key=lambda m: (arms.order(m), m))
    frame["method"] = pd.Categorical(frame["method"], categories=methods)
    frame["status"] = frame["status"].astype("string")
    for name in ("preset", "pseudo_labels"):
        frame[name] = frame[name].astype("string")
    for name in ("run_id", "run_name", "trial_id", "pretrain_key"):
        frame[name] = frame[name].astype("string")
    frame["start_time"] = pd.to_datetime(frame["start_time"], unit="ms", utc=True)
    return frame


def _variants(trials: pd.DataFrame) -> pd.Series:
    """A label per configuration: the method, plus any param that tells apart trials sharing
    method, label fraction and seed (so a loss-weight study gets one line per weight set)."""
    cell = ["label_fraction", "seed"]
    labels = pd.Series("", index=trials.index, dtype="string")
    for method, group in trials.groupby("method", observed=True):
        varying = [
            p
            for p in VARIANT_PARAMS
            if p in group and group.groupby(cell, dropna=False)[p].nunique(dropna=False).gt(1).any()
        ]
        for index, row in group.iterrows():
            parts = [f"{p}={_fmt(row[p])}" for p in varying if not pd.isna(row[p])]
            labels[index] = f"{method} ({', '.join(parts)})" if parts else str(method)
    return labels


def _fmt(value) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:g}"
    return str(value)


def _dedupe_trials(runs: list, warnings: list[str]) -> list:
    """Keep one run per trial id: a finished one if any, else the latest started."""
    by_trial: dict[str, list] = {}
    for run in runs:
        key = run.data.tags.get(names.TRIAL_ID) or run.info.run_id
        by_trial.setdefault(key, []).append(run)
    kept = []
    for key, group in by_trial.items():
        if len(group) > 1:
            warnings.append(f"trial {key} has {len(group)} runs; using one")
        group.sort(key=lambda r: (r.info.status == FINISHED, r.info.start_time or 0))
        kept.append(group[-1])
    return kept


def _sweep_info(client, experiment_id: str, trial_runs: list) -> SweepInfo | None:
    sweeps = _search_all(client, experiment_id, "sweep")
    if not sweeps:
        return None
    parents = pd.Series([r.data.tags.get("mlflow.parentRunId") for r in trial_runs]).dropna()
    by_id = {r.info.run_id: r for r in sweeps}
    chosen = None
    if not parents.empty:
        for parent_id in parents.value_counts().index:
            if parent_id in by_id:
                chosen = by_id[parent_id]
                break
    if chosen is None:
        chosen = max(sweeps, key=lambda r: r.info.start_time or 0)
    info = SweepInfo(
        run_id=chosen.info.run_id,
        run_name=chosen.info.run_name or "",
        status=chosen.info.status,
        tags={k: v for k, v in chosen.data.tags.items() if not k.startswith("mlflow.")},
        params=dict(chosen.data.params),
        metrics=dict(chosen.data.metrics),
    )
    info.spec_yaml = _read_artifact_text(client, info.run_id, "spec.yaml")
    env_text = _read_artifact_text(client, info.run_id, "environment.json")
    if env_text:
        try:
            info.environment = json.loads(env_text)
        except json.JSONDecodeError:
            info.environment = {"raw": env_text}
    return info


def _read_artifact_text(client, run_id: str, path: str) -> str | None:
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one small file: no bar
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, path, tmp)
            return Path(local).read_text()
    except Exception as exc:  # a missing artifact is normal for an old or running sweep
        log.debug("artifact %s of run %s not readable: %s", path, run_id, exc)
        return None
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


def load_study(experiment: str, tracking_uri: str | None = None, progress: bool = True) -> Study:
    """Read every trial of `experiment` from the store at `tracking_uri` (see
    `resolve_tracking_uri` for the default) into tidy frames.

    Raises AnalysisError, with a one-line message, for an unknown or empty experiment, a store
    whose trials all failed, or trials that have not logged `val/mIoU` yet.
    """
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri, experiment)
    client = _client(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except MlflowException as exc:
        raise AnalysisError(f"cannot read MLflow store {uri}: {exc.message}") from exc
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise AnalysisError(
            f"experiment {experiment!r} not found in {uri}"
            + (f" (experiments there: {', '.join(known)})" if known else " (the store is empty)")
        )

    warnings: list[str] = []
    runs = _search_all(client, exp.experiment_id, "trial")
    if not runs:
        raise AnalysisError(
            f"experiment {experiment!r} in {uri} has no trial runs (tag bev.role=trial) yet"
        )
    usable = [r for r in runs if r.info.status not in FAILED]
    if not usable:
        raise AnalysisError(
            f"experiment {experiment!r} in {uri}: all {len(runs)} trial runs failed or were "
            "killed; nothing to analyse"
        )
    runs = _dedupe_trials(runs, warnings)

    from tqdm.auto import tqdm

    rows = []
    for run in tqdm(
        runs, desc="reading trials", unit="run", disable=not progress or len(runs) < 20
    ):
        metrics = _metric_frame(client, run)
        if metrics.empty:
            continue
        metrics = metrics.reset_index()
        for name, value in _trial_params(run).items():
            if value is None and name in metrics:
                continue  # e.g. `labelled_samples` logged as a metric but not as a param
            metrics[name] = value
        rows.append(metrics)
    if not rows or all("val_mIoU" not in r for r in rows):
        raise AnalysisError(f"experiment {experiment!r} in {uri}: no trial has logged val/mIoU yet")

    epochs = pd.concat(rows, ignore_index=True)
    epochs = epochs[epochs.get("val_mIoU").notna()] if "val_mIoU" in epochs else epochs
    epochs = _typed(epochs)
    for column in TIME_COLUMNS:
        if column not in epochs:
            epochs[column] = np.nan
    # A trial of an arm without pretraining: its incl_pretrain and amortised clocks are its own.
    supervised = ~epochs["method"].isin(arms.pretraining())
    for clock in ("wall", "gpu"):
        own = f"cum_{clock}_s"
        for suffix in ("_incl_pretrain", "_amortised"):
            column = own + suffix
            epochs.loc[supervised, column] = epochs.loc[supervised, column].fillna(
                epochs.loc[supervised, own]
            )
    epochs["epoch"] = epochs["epoch"].astype("int64")
    epochs["partial"] = epochs["status"].isin(UNFINISHED)
    epochs["status"] = pd.Categorical(epochs["status"])

    logged = {c[len("IoU_") :] for c in epochs.columns if c.startswith("IoU_")}
    class_names = [c for c in names.CLASS_ORDER if c in logged] + sorted(
        logged - set(names.CLASS_ORDER)
    )
    identity = [
        "trial_id",
        "run_id",
        "run_name",
        "method",
        "label_fraction",
        "labelled_samples",
        "pretrain_epochs",
        "finetune_epochs",
        "w_reproj",
        "w_temporal",
        "w_bev",
        "seed",
        "preset",
        "pseudo_labels",
        "pretrain_key",
        "status",
        "partial",
        "start_time",
        "epoch",
        "val_mIoU",
    ]
    ordered = identity + [f"IoU_{c}" for c in class_names] + TIME_COLUMNS
    rest = sorted(c for c in epochs.columns if c not in ordered)
    epochs = epochs[ordered + rest].sort_values(
        ["method", "label_fraction", "seed", "trial_id", "epoch"]
    )
    epochs = epochs.reset_index(drop=True)

    trials = final_view(epochs)
    epochs["variant"] = (
        epochs["trial_id"].map(trials.set_index("trial_id")["variant"]).astype("string")
    )
    n_failed = int(trials["status"].isin(FAILED).sum())
    n_partial = int(trials["partial"].sum())
    if n_failed:
        warnings.append(
            f"{n_failed} trial(s) failed or were killed; they are left out of the statistics"
        )
    if n_partial:
        warnings.append(f"{n_partial} trial(s) still running: their data is partial")

    return Study(
        tracking_uri=uri,
        experiment_name=experiment,
        experiment_id=exp.experiment_id,
        epochs=epochs,
        trials=trials,
        class_names=class_names,
        sweep=_sweep_info(client, exp.experiment_id, runs),
        warnings=warnings,
        alignment=alignment_runs(_search_all(client, exp.experiment_id, "pretrain")),
    )


def final_view(epochs: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: its last logged epoch, with `epochs_done`, `complete` and `variant`."""
    last = epochs.sort_values("epoch").groupby("trial_id", observed=True).tail(1).copy()
    last = last.rename(columns={"epoch": "epochs_done"})
    last["complete"] = last["status"].astype("string").eq(FINISHED).fillna(False).astype(bool)
    last["variant"] = _variants(last)
    return last.sort_values(["method", "variant", "label_fraction", "seed"]).reset_index(drop=True)


def analysed_trials(trials: pd.DataFrame, include_partial: bool | None = None) -> pd.DataFrame:
    """The trials the statistics use: finished ones; running ones too when `include_partial`
    (default: only while no trial has finished yet, so an early look at a sweep shows
    something). Failed and killed trials never count."""
    ok = ~trials["status"].isin(FAILED)
    finished = trials["complete"]
    if include_partial is None:
        include_partial = not bool((ok & finished).any())
    keep = ok & (finished | trials["partial"]) if include_partial else ok & finished
    return trials[keep].reset_index(drop=True)

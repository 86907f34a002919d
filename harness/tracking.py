"""The MLflow run layout of docs/architecture.md ("MLflow layout"), written in one place.

One parent run per sweep (`bev.role=sweep`), one run per pretraining (`bev.role=pretrain`) and
one per trial (`bev.role=trial`), both children of the sweep. Runs are found again by tag
(`bev.trial_id`, `bev.pretrain_key`), never created twice: a resumed or retried trial reopens
its run. `analysis/load.py` reads what this module writes.

Where settings come from is decided by `analysis.load.resolve_tracking_uri` and
`resolve_ray_address`: CLI flag > environment variable > spec > default.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The run layout's tag names live with the rest of the study's vocabulary.
from harness.spec_errors import SpecError
from harness.study_view import (  # noqa: F401 (callers import the view's names from here)
    EXPERIMENT_KIND,
    study_note,
    study_view_link,
    study_view_tags,
    study_view_url,
)
from model.names import (  # noqa: F401
    AMORTISED,
    CUM_WALL_S,
    ERROR,
    LABEL_FRACTION,
    LABELLED_SAMPLES,
    METHOD,
    PARENT,
    PRETRAIN_KEY,
    ROLE,
    SEED,
    TRIAL_ID,
    VAL_MIOU,
)

log = logging.getLogger(__name__)

MAX_TAG_CHARS = 5000  # MLflow keeps tag values up to 8000 characters; leave room

PACKAGES = (
    "bevlabels",
    "torch",
    "torchvision",
    "numpy",
    "ray",
    "mlflow",
    "optuna",
    "pydantic",
    "nuscenes-devkit",
    "transformers",
    "shapely",
)


# --- where things are --------------------------------------------------------------------------


def _first_set(*candidates: tuple[str, str | None]) -> tuple[str | None, str]:
    for source, value in candidates:
        if value:
            return value, source
    return None, "unset"


def resolve_ray_address(cli: str | None = None, spec: str | None = None) -> str | None:
    """Ray cluster address: `cli` (`--address`) > $RAY_ADDRESS > `spec` > None (a local Ray)."""
    address, source = _first_set(
        ("command line", cli), ("$RAY_ADDRESS", os.environ.get("RAY_ADDRESS")), ("spec", spec)
    )
    log.debug("Ray address %s (from %s)", address or "local", source)
    return address


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


# --- values ------------------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> {"a.b": "v"}; lists of scalars stay one JSON value."""
    out: dict[str, str] = {}
    if isinstance(value, Mapping):
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list | tuple) and any(isinstance(v, Mapping) for v in value):
        for i, item in enumerate(value):  # MLflow keys allow no brackets: `search.x.0.patience`
            out.update(flatten(item, f"{prefix}.{i}"))
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def git_commit(where: Path | None = None) -> tuple[str, bool]:
    """(commit, dirty) of the repository holding `where` (default: this package)."""
    where = where or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        # No .git (the Docker image): the commit its build argument recorded.
        return os.environ.get("BEVLABELS_GIT_COMMIT") or "unknown", False


def source_tags(entry_point: str) -> dict[str, str]:
    """MLflow's own source tags (`mlflow.source.*`, `mlflow.user`) for a run of this code."""
    import getpass

    commit, _ = git_commit()
    tags = {
        "mlflow.source.name": entry_point,
        "mlflow.source.type": "LOCAL",
        "mlflow.user": getpass.getuser(),
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def local_artifact_location(tracking_uri: str, study_dir: Path) -> str | None:
    """Where a new experiment keeps its artifacts: inside the study folder for a local store
    (SQLite or files), so copying the folder keeps the reports; a tracking server's own
    artifact store otherwise (None)."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    return (Path(study_dir) / "artifacts").resolve().as_uri()


def check_artifact_location(tracking_uri: str, experiment: str, study_dir: Path) -> None:
    """Refuse, before a sweep writes anything, a local artifact location that cannot be written
    (raises SpecError, one line). The store itself is checked first, by
    ``analysis.inputs.check_store``."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from analysis.load import sqlite_path

    location = local_artifact_location(tracking_uri, study_dir)
    store = sqlite_path(tracking_uri)
    if store is not None and store.is_file():  # an existing experiment keeps its location
        from mlflow.tracking import MlflowClient

        found = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
        location = found.artifact_location if found else location
    if location is None or urlparse(location).scheme not in ("", "file"):
        return  # a tracking server's or an object store's: MLflow's to check
    path = Path(url2pathname(urlparse(location).path))
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(
            f"MLflow artifact location {path} of experiment {experiment!r} cannot be written: "
            f"{existing} is {'not a directory' if not existing.is_dir() else 'read-only'}"
        )


def environment_info() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
    }


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_TAG_CHARS else text[: MAX_TAG_CHARS - 3] + "..."


# --- runs --------------------------------------------------------------------------------------


class Tracker:
    """An MLflow client bound to one tracking URI and one experiment."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        create: bool = True,
        artifact_location: str | None = None,
        description: str | None = None,
    ):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            if not create:
                raise LookupError(f"no experiment {experiment!r} in {tracking_uri}")
            # A training study, not a GenAI one: the UI opens on runs, not on traces.
            tags = {**EXPERIMENT_KIND, **study_view_tags()}
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=artifact_location, tags=tags
                )
                self.client.set_experiment_tag(
                    self.experiment_id,
                    "mlflow.note.content",
                    study_note(description, self.experiment_id),
                )
            except Exception:  # created meanwhile by a concurrent sweep or trial
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                self.experiment_id = found.experiment_id
        else:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            self.experiment_id = found.experiment_id
            if create:
                self._upgrade(found.tags)
        self.experiment = experiment

    def _upgrade(self, tags: Mapping[str, str]) -> None:
        """An experiment older than the view, the kind or the note's link gets them; a view
        of an older layout is replaced (a user's own views have other keys)."""
        wanted = {**EXPERIMENT_KIND, **study_view_tags()}
        for key, value in wanted.items():
            if tags.get(key) != value:
                self.client.set_experiment_tag(self.experiment_id, key, value)
        note = tags.get("mlflow.note.content")
        if note is None or study_view_link(self.experiment_id) not in note:
            self.client.set_experiment_tag(
                self.experiment_id, "mlflow.note.content", study_note(note, self.experiment_id)
            )

    # finding and opening

    def find(self, tags: Mapping[str, str]) -> list:
        """Active runs of the experiment carrying all `tags`, oldest first."""
        from mlflow.entities import ViewType

        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=" and ".join(clauses),
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
        )
        return list(runs)

    def open_run(
        self, identity: Mapping[str, str], run_name: str, tags: Mapping[str, str] | None = None
    ) -> tuple[str, bool]:
        """The run carrying the `identity` tags, reopened (RUNNING), or a new one.

        Returns (run_id, created). Idempotence by tag is what makes retries and resumes leave
        exactly one run per trial and per pretraining.
        """
        found = self.find(identity)
        if found:
            if len(found) > 1:
                log.warning("%d runs carry %s; using the first", len(found), dict(identity))
            run = found[0]
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            if ERROR in run.data.tags:
                self.client.delete_tag(run.info.run_id, ERROR)
            return run.info.run_id, False
        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={**identity, **(tags or {})}
        )
        return run.info.run_id, True

    def finish(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        if error:
            self.client.set_tag(run_id, ERROR, error[:MAX_TAG_CHARS])
        self.client.set_terminated(run_id, status=status)

    def close_unfinished(self, parent_run_id: str, status: str = "KILLED") -> int:
        """Mark children of the sweep still RUNNING (their process died) as `status`."""
        closed = 0
        for run in self.find({PARENT: parent_run_id}):
            if run.info.status == "RUNNING":
                self.finish(run.info.run_id, status, error=None)
                closed += 1
        return closed

    # writing

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params that the run does not hold yet (MLflow refuses to change a param)."""
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        fresh = [
            Param(k, str(v)[:6000])
            for k, v in params.items()
            if k not in existing and v is not None
        ]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(run_id, params=fresh[start : start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[start : start + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if batch:
            self.client.log_batch(run_id, tags=batch)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_table(self, run_id: str, table: Mapping[str, list], artifact_file: str) -> None:
        """A table MLflow's UI shows as one (artifact view, and across runs)."""
        self.client.log_table(run_id, data=dict(table), artifact_file=artifact_file)

    def log_image(self, run_id: str, image, key: str, step: int) -> None:
        """An image per step: the UI's image view lets a user step through a trial's epochs."""
        self.client.log_image(run_id, image, key=key, step=step)

    def log_dataset(
        self, run_id: str, name: str, digest: str, source: str, profile: dict, context: str
    ) -> None:
        """A dataset input of the run (`mlflow.log_input`): `digest` identifies the content,
        `profile` says what it holds (e.g. the scene list of a label subset)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        dataset = Dataset(
            name=name,
            digest=digest[:36],
            source_type="local",
            source=json.dumps({"uri": source}),
            profile=json.dumps(profile, default=str),
        )
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        try:
            self.client.log_inputs(run_id, datasets=inputs)
        except MlflowException as e:
            # Two trials logging the same dataset at once: MLflow's SQL store looks the dataset
            # up, then inserts it, so the later insert breaks the unique key (experiment, name,
            # digest) and rolls back. The dataset exists now: logging again links it to the run.
            if "unique constraint" not in str(e).lower():
                raise
            log.info("dataset %s was logged by another trial at the same time: linking it", name)
            self.client.log_inputs(run_id, datasets=inputs)

    def log_artifact(self, run_id: str, path: Path, folder: str) -> str:
        """Upload one file; returns its artifact path (what a tag can point to)."""
        self.client.log_artifact(run_id, str(path), folder)
        return f"{folder}/{Path(path).name}"

    def log_json(self, run_id: str, value: Any, artifact_file: str) -> None:
        self.client.log_text(run_id, json.dumps(value, indent=2, default=str), artifact_file)

    @contextmanager
    def system_metrics(self, run_id: str, interval_s: float) -> Iterator[None]:
        """MLflow's system metrics (CPU, memory, disk, network; GPU with pynvml) of `run_id`
        for the duration of the block, through MLflow's public switch: the run is made the
        active run with `log_system_metrics=True` (nested, when a trial runs a pretraining).

        Leaving the block stops the monitor and leaves the run's status as the block left it:
        the caller finishes the run (FINISHED, FAILED, or RUNNING for the driver to decide)."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_system_metrics_sampling_interval(interval_s)
        mlflow.start_run(
            run_id=run_id, nested=mlflow.active_run() is not None, log_system_metrics=True
        )
        try:
            yield
        finally:
            mlflow.end_run(status=self.client.get_run(run_id).info.status)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True

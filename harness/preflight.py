"""What a sweep checks before it takes the study lock or writes anything.

`plan_sweep` reads the study folder's state file, resolves the MLflow store and the Ray address,
and refuses with a one-line `SpecError` (exit 2) what would otherwise fail later with a
traceback, minutes of retries or a half-written study folder: a dataroot or `storage_path` that
is a file, a state file that is truncated or incomplete, a plain rerun of an interrupted sweep,
a store that is not an MLflow store, a tracking server or Ray cluster that does not answer.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from harness.distributed import check_placeable, local_capacity
from harness.driver import STATE_FILE, load_state
from harness.spec import Spec, SpecError
from harness.tracking import check_artifact_location, resolve_ray_address, sqlite_uri
from harness.trials import needs_pseudo_labels

CONNECT_TIMEOUT_S = 3.0
DONE = "finished"  # the state file's `status` once Tune ran every trial to its end


@dataclass(frozen=True)
class SweepPlan:
    previous: dict | None  # the state of the sweep `--resume` continues; None: a new sweep
    tracking_uri: str
    address: str | None  # None: a local Ray

    @property
    def finished(self) -> bool:
        return self.previous is not None and self.previous.get("status") == DONE


def plan_sweep(spec: Spec, spec_path: Path, resume: bool, uri_flag: str | None,
               address_flag: str | None) -> SweepPlan:  # fmt: skip
    from analysis.inputs import check_store  # analysis imports pandas and scipy: only here
    from analysis.load import AnalysisError, resolve_tracking_uri

    storage = spec.storage_dir()
    if spec.data.dataroot:
        check_dir(Path(spec.data.dataroot).expanduser(), f"{spec_path}: data.dataroot")
    check_dir(storage, f"{spec_path}: storage_path", create=True)
    if spec.data.dataroot and needs_pseudo_labels(spec):
        dataroot = Path(spec.data.dataroot).expanduser().resolve()
        if problem := missing_pseudo_labels(spec, dataroot, spec.data.resolved_version):
            raise SpecError(f"{spec_path}: {problem}")
    state_path = storage / STATE_FILE
    state = load_state(state_path)
    if resume and state is None:
        raise SpecError(f"{spec_path}: --resume: no sweep to resume ({state_path} not found)")
    previous = state if resume else None
    # A resumed sweep goes on writing where it started, unless told otherwise.
    default_uri = previous["tracking_uri"] if previous else sqlite_uri(storage / "mlflow.db")
    uri = resolve_tracking_uri(uri_flag, spec=spec.mlflow.tracking_uri, default=default_uri)
    where = "--tracking-uri" if uri_flag else f"{spec_path}: mlflow.tracking_uri"
    try:
        check_store(uri, CONNECT_TIMEOUT_S)
    except AnalysisError as exc:
        raise SpecError(f"{where}: {exc}") from None
    check_artifact_location(uri, spec.experiment, storage)
    address = resolve_ray_address(address_flag, spec.ray.address)
    if address_flag:
        where = "--address"
    elif os.environ.get("RAY_ADDRESS"):
        where = "$RAY_ADDRESS"
    else:
        where = f"{spec_path}: ray.address"
    check_address(address, where)
    if not address:  # a cluster's size is known once connected (harness.distributed)
        check_placeable(spec, str(spec_path), *local_capacity(), "this machine")
    return SweepPlan(previous, uri, address)


def refuse_interrupted(spec: Spec) -> None:
    """A new sweep of a study whose last sweep was interrupted is refused: `--resume` is the
    one way on (a second parent run would split the study). Call it holding the study lock:
    a `running` state is then one whose process is gone."""
    state_path = spec.storage_dir() / STATE_FILE
    state = load_state(state_path)
    if state is not None and state.get("status") == "running":
        raise SpecError(
            f"{state_path}: status: the sweep that started at {state.get('started', '?')} was "
            "interrupted; continue it with --resume (or remove this file to start a new sweep)"
        )


def missing_pseudo_labels(spec: Spec, dataroot: Path, version: str) -> str | None:
    """What is wrong with pretraining's pseudo-labels (None: nothing). Simulated ones and the
    oracle are written by the sweep; Mask2Former ones (shuffled or not) must have been made
    beforehand."""
    from model.data.labels import PSEUDO_LABEL_PROTOCOL
    from model.data.pseudo_sources import pseudo_label_command

    labeler, protocol = spec.data.resolved_pseudo_labels, PSEUDO_LABEL_PROTOCOL[spec.data.protocol]
    if labeler == "synthetic" or spec.data.pseudo_label_source == "oracle":
        return None
    if (dataroot / "pseudo_labels" / labeler / protocol).is_dir():
        return None
    command = pseudo_label_command(dataroot, version, labeler, protocol)
    where = f"data.pseudo_labels: no {labeler} pseudo-labels under {dataroot}"
    return f"{where}; make them with: {command}"


def check_dir(path: Path, where: str, create: bool = False) -> None:
    """`path` is a directory (or, with `create`, can be made one and written: its nearest
    existing ancestor is a directory this process can write, which a read-only mount is not,
    even for root)."""
    for existing in (path, *path.parents) if create else (path,):
        if existing.exists():
            if not existing.is_dir():
                raise SpecError(f"{where}: {existing} is a file, not a directory")
            if create and not os.access(existing, os.W_OK | os.X_OK):
                raise SpecError(f"{where}: {existing} is read-only")
            return
        if not create:
            raise SpecError(f"{where}: directory {path} does not exist")


def check_address(address: str | None, where: str) -> None:
    """A cluster address given as HOST:PORT (or ray://HOST:PORT) answers within seconds."""
    if address in (None, "", "auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise SpecError(f"{where}: Ray address {address!r} is not HOST:PORT (or 'auto')")
    _connect(host, port, f"{where}: cannot reach a Ray cluster at {address}")


def _connect(host: str, port: int, problem: str) -> None:
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise SpecError(f"{problem}: {exc.strerror or exc}") from None

"""What every analysis CLI shares: its arguments (``--experiment``, ``--tracking-uri``,
``--reference``, levels and fractions) and how it reports an input problem, as one line and
exit status 2 (``python -m analysis.report``, ``python -m analysis.plan``)."""

from __future__ import annotations

import argparse
import contextlib
import socket
import sqlite3
import sys
from urllib.parse import urlparse

from analysis.load import AnalysisError, sqlite_path
from analysis.stats import Cell, parse_cell
from model.cli import OneLineParser


def _fraction(upper_inclusive: bool):
    """A number in (0, 1), or in (0, 1] with `upper_inclusive`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (0 < value < 1 or (upper_inclusive and value == 1)):
            interval = "0 < x <= 1" if upper_inclusive else "0 < x < 1"
            raise argparse.ArgumentTypeError(f"must be {interval}, got {text}")
        return value

    return parse


def _experiment(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _cell(text: str) -> Cell:
    try:
        return parse_cell(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def study_parser(prog: str, description: str, experiment_help: str) -> argparse.ArgumentParser:
    """A parser with the options every analysis CLI shares: `--experiment`, `--tracking-uri`,
    `--reference`; usage errors are one line."""
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("--experiment", type=_experiment, required=True, help=experiment_help)
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///studies/<experiment>/mlflow.db",
    )
    parser.add_argument(
        "--reference",
        type=_cell,
        default=None,
        help="VARIANT@FRACTION the other cells are compared with, seed by seed "
        "(default supervised@1.0)",
    )
    return parser


probability_arg = _fraction(upper_inclusive=False)  # a level, a power: 0 < x < 1
fraction_arg = _fraction(upper_inclusive=True)  # an mIoU, a difference of mIoUs: 0 < x <= 1


def check_store(uri: str, timeout_s: float = 10.0) -> None:
    """Refuse, with an AnalysisError, what MLflow would meet with a traceback or minutes of
    retries: a file that is not an MLflow SQLite store (MLflow would also write its tables into
    an empty one), an http(s) server that does not answer within `timeout_s`, and a URI of a
    scheme MLflow does not know. The analysis CLIs call it before they read a store, the sweep
    (`harness.preflight`) before it writes one."""
    path = sqlite_path(uri)
    if path is not None:
        if path.is_file():
            try:
                with contextlib.closing(
                    sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
                ) as db:
                    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            except sqlite3.DatabaseError as exc:
                raise AnalysisError(
                    f"cannot read MLflow store {uri}: {path} is not a SQLite database ({exc})"
                ) from None
            if "experiments" not in tables:
                raise AnalysisError(
                    f"cannot read MLflow store {uri}: {path} is a SQLite database without MLflow "
                    "tables"
                )
        return
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            address = (parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80))
            socket.create_connection(address, timeout=timeout_s).close()
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise AnalysisError(f"cannot reach MLflow server {uri}: {reason}") from None
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri)
    except MlflowException:
        raise AnalysisError(_unsupported_uri(uri)) from None


def _unsupported_uri(uri: str | None) -> str:
    return (
        f"unsupported MLflow tracking URI {uri!r}: use sqlite:///PATH, a directory, "
        "http(s)://HOST:PORT or a database URL"
    )


def input_errors() -> tuple[type[Exception], ...]:
    """The exceptions an analysis CLI reports as one line (imports MLflow: call it late)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import DatabaseError

    return AnalysisError, MlflowException, DatabaseError


def one_line_error(exc: Exception, uri: str | None = None) -> int:
    """Print an input problem as one `error:` line on stderr; returns the exit status, 2."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    if isinstance(exc, AnalysisError):
        message = str(exc)
    elif isinstance(exc, UnsupportedModelRegistryStoreURIException):
        message = _unsupported_uri(uri)
    elif isinstance(exc, MlflowException):
        message = f"MLflow store {uri}: {exc.message}"
    else:  # the database behind a SQL store
        message = f"cannot read MLflow store {uri}: {getattr(exc, 'orig', None) or exc}"
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2

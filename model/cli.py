"""The command-line vocabulary every bevlabels tool shares (standard library only).

A usage error is one line, ``PROG: error: argument --x: problem``, with exit status 2, before
anything is written (plain argparse prints the usage first); the ``type=`` checks below name
the problem in the words those lines use.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

# No tool of ours opens a connection beyond the user's own servers, and the libraries are asked
# not to either: MLflow 3 sends usage telemetry (an HTTPS request to config.mlflow-telemetry.io,
# from `import mlflow` on, in the driver and in every trial) and Ray reports usage stats, unless
# these are set. Set only where the user has not set them; a local Ray's workers inherit the
# driver's environment.
OFFLINE = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}


def stay_offline() -> None:
    """Turn off the libraries' telemetry (OFFLINE) for this process and its children; call it
    before MLflow or Ray is imported."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, ``PROG: error: argument --x: problem``, status 2 (plain
    argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def reject(self, option: str, problem: str):
        """A problem with `option` found after parsing (it needs the dataroot, say)."""
        self.error(f"argument {option}: {problem}")


def one_line(exc: BaseException) -> str:
    """An input error's message on one line (some carry a command on a second line)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def existing_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is not a directory")
    return path


def dir_to_create(text: str) -> Path:
    """A directory that may not exist yet, but whose nearest existing ancestor is one."""
    path = Path(text).expanduser()
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise argparse.ArgumentTypeError(f"{existing} is a file, not a directory")
            break
    return path


def int_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (``why`` is appended to the complaint)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{why}, got {value}")
        return value

    return parse

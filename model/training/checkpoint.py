"""Checkpoints that survive a kill at any moment and load with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values only (dict, list, tuple, str, int,
float, bool, None): configs go in as ``to_dict()`` / ``dataclasses.asdict`` output, never as
objects, so loading never unpickles code. ``save_checkpoint`` checks that before writing, and
writes to a temporary file in the same folder, fsyncs it and ``os.replace``-s it over the
target: a reader sees the old checkpoint or the whole new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

FORMAT_VERSION = 1
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value, where: str = "checkpoint") -> None:
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where} has a key of type {type(key).__name__}: {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; checkpoints hold only tensors and plain values "
        "so that torch.load(weights_only=True) can read them"
    )


def save_checkpoint(path: Path | str, state: Mapping) -> Path:
    """Atomically write ``state`` (tensors and plain values) to ``path``."""
    path = Path(path)
    state = {"format": FORMAT_VERSION, **state}
    _check_plain(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(
            f"{path} is not a training checkpoint of model.training.train (no 'model' entry)"
        )
    if state.get("format", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {state['format']}, newer than this code")
    return state

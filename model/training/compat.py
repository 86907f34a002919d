"""Is a checkpoint compatible with the run that wants to use it?

A phase resumes only from its own checkpoint (same phase, model, protocol, grid, classes and
label subset); fine-tuning starts only from a pretraining of the same model, protocol and grid.
Checkpoints carry those values as plain data (``checkpoint_meta``) next to the weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from model.config import DataConfig, PhaseConfig
from model.geometry import BevGrid
from model.presets import ModelConfig

RESUME_KEYS = ("model_cfg", "protocol", "grid", "num_classes", "subset")


def checkpoint_meta(
    data: DataConfig, model: ModelConfig, phase: PhaseConfig, seed: int, grid: BevGrid, num: int
) -> dict:
    return {
        "model_cfg": model.to_dict(),
        "num_classes": num,
        "protocol": data.protocol,
        "grid": dataclasses.asdict(grid),
        "phase_cfg": phase.model_dump(mode="json"),
        "seed": seed,
        "dataroot": data.dataroot,
        "version": data.resolved_version,
    }


def check_resumable(state: dict, phase: str, meta: dict, path: Path) -> None:
    """Raise unless checkpoint ``state`` (at ``path``) was written by this same phase."""
    wants = {"phase": phase, **{k: meta[k] for k in RESUME_KEYS if k in meta}}
    for key, want in wants.items():
        have = state.get(key)
        if plain(have) != plain(want):
            raise ValueError(
                f"{path} belongs to another run ({key}: {have!r} here, {want!r} requested); "
                "use a fresh out_dir"
            )


def check_init(state: dict, path, model: ModelConfig, protocol: str, grid: BevGrid) -> None:
    """Raise unless a pretraining checkpoint fits the fine-tuning that starts from it."""
    for key, want in (
        ("model_cfg", model.to_dict()),
        ("protocol", protocol),
        ("grid", dataclasses.asdict(grid)),
    ):
        if key in state and plain(state[key]) != plain(want):
            raise ValueError(
                f"init checkpoint {path} was trained with another {key} "
                f"({state[key]!r}, this run: {want!r})"
            )


def plain(value):
    """Tuples and lists compare equal (a checkpoint may hold either)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def check_trunk(state: dict, phase: str, meta: dict, path: Path) -> None:
    """Raise unless ``state`` (a WSD trunk's state at ``path``) is this run's own prefix: the
    same phase, model, data, seed and phase config up to the length (``budget.value``)."""
    check_resumable(state, phase, meta, path)
    for key in ("seed", "dataroot", "version"):
        if plain(state.get(key)) != plain(meta[key]):
            raise ValueError(f"{path} is not a trunk of this run ({key} differs)")
    if _without_length(state.get("phase_cfg")) != _without_length(meta["phase_cfg"]):
        raise ValueError(f"{path} is not a trunk of this run (its phase config differs)")


def _without_length(phase_cfg: dict | None) -> dict | None:
    if phase_cfg is None:
        return None
    budget = {k: v for k, v in phase_cfg["budget"].items() if k != "value"}
    return plain({**phase_cfg, "budget": budget})

"""Errors raised for bad input data, each saying what is wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """Base class: the dataroot or something derived from it is unusable."""


class DatarootNotFoundError(DataError, FileNotFoundError):
    """The dataroot or its version folder does not exist."""


class MapNotFoundError(DataError, FileNotFoundError):
    """A scene's map location has no vector map in the dataroot."""


class MissingPseudoLabelsError(DataError, FileNotFoundError):
    """Pseudo-label PNGs the dataset needs are absent."""

    def __init__(self, missing: list[Path], total: int, command: str) -> None:
        self.missing = missing
        self.total = total
        self.command = command
        examples = ", ".join(str(p) for p in missing[:3])
        super().__init__(
            f"{len(missing)} of {total} pseudo-label files are missing (e.g. {examples}). "
            f"Make them with:\n    {command}"
        )


class CorruptImageError(DataError, ValueError):
    """An image file cannot be decoded."""

    def __init__(self, path: Path, reason: str = "cannot be decoded") -> None:
        self.path = Path(path)
        super().__init__(f"corrupt image {self.path}: {reason}")

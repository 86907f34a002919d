"""What `--resume` can restore from a Ray Tune experiment folder, after a kill or a full disk.

Tune writes its experiment state and each trial's failure record (`error.pkl`, `error.txt`) in
place, so a crash or a full disk can leave them empty or cut short. Restoring must not trip over
such files (Tune's `ResultGrid` raises `EOFError` on an empty `error.pkl`), and trials that
failed only because the disk was full must run again once the user has freed space, while
trials that failed by themselves (a NaN, a bug) stay failed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# What a full disk looks like in a trial's error.txt (an OSError's str, errno 28: ENOSPC).
NO_SPACE = ("[Errno 28]", "No space left on device")
# A complete pickle ends with the STOP opcode; one cut short by a full disk does not.
_PICKLE_STOP = b"."


def _set_aside(path: Path, why: str) -> None:
    aside = path.with_name(f"{path.name}.corrupt")
    path.rename(aside)
    log.warning("%s is not readable (%s), set aside as %s", path, why, aside.name)


def can_restore(ray_path: Path) -> bool:
    """Ray Tune saved a state to continue from. An unreadable `experiment_state-*.json` is set
    aside (with a warning) and the experiment starts afresh, as after a kill before Tune's first
    save: its trials reopen their MLflow runs by tag; trials that had finished run again."""
    from ray import tune

    states = []
    for path in ray_path.glob("experiment_state*.json"):
        try:
            json.loads(path.read_text())
            states.append(path)
        except (OSError, ValueError) as exc:
            _set_aside(path, f"{exc}; the sweep's trials start afresh")
    # Tuner.can_restore looks for Tune's tuner.pkl only; restoring needs a state file too.
    return bool(states) and tune.Tuner.can_restore(str(ray_path))


def failures_for_lack_of_space(ray_path: Path) -> list[str]:
    """Trial folders whose failure was a full disk: their `error.txt` names ENOSPC, or their
    failure record is empty or cut short (it was being written when the disk filled). An
    unreadable `error.pkl` is set aside, so that Tune reads the failure from `error.txt`."""
    found = []
    for trial_dir in sorted(p for p in ray_path.iterdir() if p.is_dir()):
        pickled, text = trial_dir / "error.pkl", trial_dir / "error.txt"
        full = False
        if pickled.is_file():
            data = pickled.read_bytes()
            if not data.endswith(_PICKLE_STOP):
                _set_aside(pickled, "empty" if not data else "cut short")
                full = True
        if text.is_file():
            message = text.read_text(errors="replace")
            full |= not message.strip() or any(marker in message for marker in NO_SPACE)
        if full:
            found.append(trial_dir.name)
    return found

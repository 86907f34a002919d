"""One sweep per study folder: an exclusive lock file naming its holder.

    with study_lock(study_dir):      # raises StudyLocked naming the running sweep
        ...

The lock is a POSIX record lock (`fcntl.lockf`) on `<study>/study.lock`: the kernel drops it
when the holder dies, however it dies, and NFSv4 implements it on the server (unlike `flock`,
which Linux only emulates there with the same POSIX locks). The file holds the holder's pid,
host, start time and command as JSON, so a second sweep can say which one is running; it is
emptied on release, never removed (removing it would let two processes lock two different
files of the same name).

A lock file that still names a holder when the lock is free was left by a sweep that died
without releasing it (killed, crashed, its host lost): it is taken over with a warning.

POSIX locks belong to a process, not to a file descriptor: the same process locking twice gets
no error from the kernel, and closing any descriptor of the file releases its lock. So this
module keeps its own table of the folders this process holds, and never opens a held lock file
again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "study.lock"
_HELD: dict[Path, Holder] = {}  # lock file -> this process's holder record
_HELD_GUARD = threading.Lock()


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    since: str  # ISO 8601, UTC
    command: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}"

    @classmethod
    def me(cls) -> Holder:
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), since, " ".join(sys.argv))

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            record = json.loads(text)
            pid, host, since = int(record["pid"]), str(record["host"]), str(record["since"])
            return cls(pid, host, since, str(record.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None


class StudyLocked(RuntimeError):
    """Another process holds the study folder's lock; `holder` is who (None: not yet known)."""

    def __init__(self, folder: Path, holder: Holder | None) -> None:
        self.folder, self.holder = Path(folder), holder
        who = holder.describe() if holder else "another process (it has not written its pid yet)"
        super().__init__(f"study {self.folder} is in use by {who}")


@contextmanager
def study_lock(folder: Path) -> Iterator[Holder]:
    """Hold `folder`'s study lock for the `with` block (creating the folder if needed);
    yields this process's holder record. Raises `StudyLocked` if another process, or this
    one, holds it already."""
    path = Path(folder).resolve() / LOCK_FILE
    with _HELD_GUARD:
        if path in _HELD:
            raise StudyLocked(path.parent, _HELD[path])
        fd = _acquire(path)
        me = Holder.me()
        _HELD[path] = me
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
        os.fsync(fd)
        yield me
    finally:
        with _HELD_GUARD:
            os.ftruncate(fd, 0)
            os.close(fd)  # releases the lock
            del _HELD[path]


def _acquire(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise StudyLocked(path.parent, _read_holder(path)) from None
    left = Holder.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
    if left is not None:
        log.warning(
            "taking over the study lock %s left by %s, which %s",
            path,
            left.describe(),
            "is no longer running" if _is_dead(left) else "no longer holds it",
        )
    return fd


def _read_holder(path: Path) -> Holder | None:
    # The holder writes its record right after locking: give it a moment.
    for _ in range(20):
        holder = Holder.parse(path.read_text(errors="replace"))
        if holder is not None:
            return holder
        time.sleep(0.05)
    return None


def _is_dead(holder: Holder) -> bool:
    if holder.host != socket.gethostname():
        return False  # cannot tell from here
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        pass
    return False

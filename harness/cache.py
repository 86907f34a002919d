"""Content-addressed "compute once" entries under the study folder, safe across processes.

An entry is a directory `<root>/<key>/` holding what a build function wrote plus `entry.json`
(its metadata). Builders run under an exclusive file lock (`<root>/<key>.lock`), in
`<root>/<key>.partial/`, which is renamed to `<root>/<key>/` only when complete: a reader sees a
whole entry or none. A builder killed midway leaves `.partial/` behind, so the next one can
resume from what it wrote (the training core's `pretrain` resumes from its `out_dir`).

Used for the two things a sweep must not compute twice: synthetic datasets (keyed by the
generator's arguments) and pretraining checkpoints (keyed by pretraining config and seed).
The lock is `fcntl`-based (`filelock`): it holds across processes on one machine and on shared
file systems with working POSIX locks; a dead holder releases it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"


@dataclass(frozen=True)
class CacheEntry:
    path: Path  # the entry's directory
    meta: dict  # what the build function returned (plus `key` and `built_at`)
    built_here: bool  # True when this call ran the build function


def lookup(root: Path, key: str) -> CacheEntry | None:
    path = Path(root) / key
    entry = path / ENTRY_FILE
    if not entry.is_file():
        return None
    return CacheEntry(path, json.loads(entry.read_text()), built_here=False)


def compute_once(
    root: Path, key: str, build: Callable[[Path], dict], on_wait: Callable[[], None] | None = None
) -> CacheEntry:
    """Return entry `key`, running `build(workdir) -> metadata` if no process has yet.

    Concurrent callers with the same key block until the first one finishes, then share its
    entry. If `build` raises, nothing is published and the exception propagates; the next
    caller builds again, resuming from the files left in the work directory.
    """
    root = Path(root)
    found = lookup(root, key)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log.info("cache entry %s is being built by another process; waiting", key)
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        found = lookup(root, key)
        if found is not None:
            return found
        work = root / f"{key}.partial"
        work.mkdir(exist_ok=True)
        meta = dict(build(work))
        meta.update(key=key, built_at=time.time())
        _write_json_atomic(work / ENTRY_FILE, meta)
        final = root / key
        if final.exists():  # a stale, incomplete entry (no entry.json): replace it
            shutil.rmtree(final)
        os.replace(work, final)
        return CacheEntry(final, meta, built_here=True)
    finally:
        lock.release()


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)

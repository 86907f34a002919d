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

Validation. At publish, `entry.json` records every file the build wrote (`checksums`) and a
sha256 of its own other fields (`entry_sha256`); every lookup checks them:

- an entry of at most `HASHED_FILES_MAX` files (a pretraining: a checkpoint or two) records each
  file's size and sha256: the trial reads the checkpoint whole anyway, so hashing it costs about
  one more read, and a flipped byte in weights is otherwise silent;
- a larger entry (a dataroot of thousands of images) records each file's size and `mtime_ns`:
  a lookup is one `stat` per file, no reads, and still catches a missing, truncated, replaced or
  rewritten file. It does not catch a bit flip that leaves size and mtime alone.

Files added to an entry after it was published (pseudo-labels written into a synthetic
dataroot) are not checked. A corrupt entry (a recorded file missing or changed, `entry.json`
missing, unreadable or edited) is logged as a warning, moved aside to `<root>/<key>.corrupt/`
and rebuilt once. If it is found corrupt again while that copy is still there, `CorruptEntry`
is raised naming the file: something keeps damaging it (a failing disk, another tool writing
into the cache), and rebuilding a pretraining again would hide that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"
HASHED_FILES_MAX = 64  # entries with more files are checked by size and mtime only
_RECORD_KEYS = ("checksums", "entry_sha256")  # what entry.json adds to the build's metadata


class CorruptEntry(Exception):
    """A cache entry whose files do not match what `entry.json` recorded at publish."""

    def __init__(self, entry: Path, file: Path, problem: str) -> None:
        self.entry, self.file, self.problem = Path(entry), Path(file), problem
        super().__init__(f"corrupt cache entry {self.entry}: {self.file} {problem}")


@dataclass(frozen=True)
class CacheEntry:
    path: Path  # the entry's directory
    meta: dict  # what the build function returned (plus `key` and `built_at`)
    built_here: bool  # True when this call ran the build function


def lookup(root: Path, key: str) -> CacheEntry | None:
    """The published entry `key`, validated; None when there is none. Raises `CorruptEntry`."""
    path = Path(root) / key
    if not path.exists():
        return None
    record = _read_record(path)
    checksums = record.get("checksums")
    if checksums is None:  # published before entries carried checksums
        log.warning("cache entry %s has no checksums: using it unverified", path)
    else:
        _verify_files(path, checksums)
    meta = {k: v for k, v in record.items() if k not in _RECORD_KEYS}
    return CacheEntry(path, meta, built_here=False)


def compute_once(
    root: Path, key: str, build: Callable[[Path], dict], on_wait: Callable[[], None] | None = None
) -> CacheEntry:
    """Return entry `key`, running `build(workdir) -> metadata` if no process has yet.

    Concurrent callers with the same key block until the first one finishes, then share its
    entry. If `build` raises, nothing is published and the exception propagates; the next
    caller builds again, resuming from the files left in the work directory. A corrupt entry
    is rebuilt once (see the module docstring); corrupt again, `CorruptEntry` is raised.
    """
    root = Path(root)
    try:
        found = lookup(root, key)
        if found is not None:
            return found
    except CorruptEntry:
        pass  # dealt with under the lock, where no other process is rebuilding it
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
        try:
            found = lookup(root, key)
            if found is not None:
                return found
        except CorruptEntry as exc:
            _set_aside(root, key, exc)
        return _build(root, key, build)
    finally:
        lock.release()


def _build(root: Path, key: str, build: Callable[[Path], dict]) -> CacheEntry:
    work = root / f"{key}.partial"
    work.mkdir(exist_ok=True)
    meta = dict(build(work))
    meta.update(key=key, built_at=time.time())
    # Through JSON first, so the digest is of what a reader will load (tuples become lists).
    record = json.loads(json.dumps({**meta, "checksums": _checksums(work)}, default=str))
    record["entry_sha256"] = _digest(record)
    _write_json_atomic(work / ENTRY_FILE, record)
    os.replace(work, root / key)
    return CacheEntry(root / key, meta, built_here=True)


def _set_aside(root: Path, key: str, exc: CorruptEntry) -> None:
    aside = root / f"{key}.corrupt"
    if aside.exists():
        raise CorruptEntry(
            exc.entry,
            exc.file,
            f"{exc.problem}, again after one rebuild (the first corrupt copy is {aside}); "
            "check the disk, then remove both directories to rebuild",
        ) from exc
    log.warning("%s; moving it to %s and rebuilding it", exc, aside)
    os.replace(exc.entry, aside)


def _read_record(path: Path) -> dict:
    entry = path / ENTRY_FILE
    try:
        record = json.loads(entry.read_text())
    except FileNotFoundError:
        raise CorruptEntry(path, entry, "is missing") from None
    except (OSError, ValueError) as exc:
        raise CorruptEntry(path, entry, f"is unreadable ({exc})") from None
    if not isinstance(record, dict):
        raise CorruptEntry(path, entry, "is not a JSON object")
    recorded = record.get("entry_sha256")
    if recorded is not None and recorded != _digest(record):
        raise CorruptEntry(path, entry, "was changed after publish (entry_sha256 differs)")
    return record


def _checksums(work: Path) -> dict[str, dict]:
    files = sorted(
        p for p in work.rglob("*") if p.is_file() and p.relative_to(work).as_posix() != ENTRY_FILE
    )
    by_content = len(files) <= HASHED_FILES_MAX
    return {p.relative_to(work).as_posix(): _describe(p, by_content) for p in files}


def _describe(path: Path, by_content: bool) -> dict:
    stat = path.stat()
    if by_content:
        return {"size": stat.st_size, "sha256": _sha256(path)}
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _verify_files(path: Path, checksums: dict[str, dict]) -> None:
    for rel, expected in checksums.items():
        file = path / rel
        try:
            stat = file.stat()
        except FileNotFoundError:
            raise CorruptEntry(path, file, "is missing") from None
        if stat.st_size != expected["size"]:
            raise CorruptEntry(path, file, f"has {stat.st_size} bytes, not {expected['size']}")
        if "mtime_ns" in expected and stat.st_mtime_ns != expected["mtime_ns"]:
            raise CorruptEntry(path, file, "was modified after publish (mtime differs)")
        if "sha256" in expected and _sha256(file) != expected["sha256"]:
            raise CorruptEntry(path, file, "has changed bytes (sha256 differs)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(record: dict) -> str:
    fields = {k: v for k, v in record.items() if k != "entry_sha256"}
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)

"""The compute-once cache behind shared pretraining and synthetic datasets (harness/cache.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import cache

# A process that asks the cache for entry "k"; the build takes a while and logs who ran it.
WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from harness import cache

    root, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build(work):
        with log.open("a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        (work / "weights.bin").write_bytes(b"w" * 1000)
        return {"builder": os.getpid()}

    entry = cache.compute_once(root, "k", build)
    print(json.dumps({"builder": entry.meta["builder"], "path": str(entry.path)}))
    """
)


def test_concurrent_processes_build_an_entry_once_and_all_share_it(tmp_path):
    root, log = tmp_path / "cache", tmp_path / "builds.log"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), str(log)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    answers = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(log.read_text().split()) == 1
    assert len({a["builder"] for a in answers}) == 1
    assert {a["path"] for a in answers} == {str(root / "k")}
    assert (root / "k" / "weights.bin").stat().st_size == 1000
    assert not (root / "k.partial").exists()


def test_a_finished_entry_is_returned_without_building(tmp_path):
    first = cache.compute_once(tmp_path, "k", lambda work: {"n": 1})
    again = cache.compute_once(tmp_path, "k", lambda work: pytest.fail("built twice"))
    assert first.built_here and not again.built_here
    assert again.meta["n"] == 1 and again.meta["key"] == "k"


def test_a_failed_build_publishes_nothing_and_the_next_build_resumes_from_its_files(tmp_path):
    def crash(work: Path) -> dict:
        (work / "epoch1.ckpt").write_text("half done")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError):
        cache.compute_once(tmp_path, "k", crash)
    assert cache.lookup(tmp_path, "k") is None

    def resume(work: Path) -> dict:
        return {"resumed_from": (work / "epoch1.ckpt").read_text()}

    entry = cache.compute_once(tmp_path, "k", resume)
    assert entry.meta["resumed_from"] == "half done"
    assert (entry.path / "epoch1.ckpt").exists()


# --- validation: entry.json records every file at publish; a lookup checks them ---------------


class Builder:
    """A build function that writes a small "checkpoint" and counts its runs."""

    def __init__(self, files: int = 1) -> None:
        self.files, self.runs = files, 0

    def __call__(self, work: Path) -> dict:
        self.runs += 1
        for i in range(self.files):
            (work / f"part{i}.bin").write_bytes(bytes(range(256)) * 4)
        (work / "model.ckpt").write_bytes(b"weights" * 100)
        return {"checkpoint": "model.ckpt"}


def flip_a_byte(path: Path) -> None:
    """Bit rot: one byte changes, size and mtime stay."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


CORRUPTIONS = {
    "flipped byte": (lambda e: flip_a_byte(e / "model.ckpt"), "model.ckpt"),
    "missing file": (lambda e: (e / "model.ckpt").unlink(), "model.ckpt"),
    "truncated file": (lambda e: (e / "model.ckpt").write_bytes(b"w"), "model.ckpt"),
    "unreadable entry.json": (lambda e: (e / "entry.json").write_text("{not json"), "entry.json"),
    "missing entry.json": (lambda e: (e / "entry.json").unlink(), "entry.json"),
    "edited entry.json": (
        lambda e: (e / "entry.json").write_text(
            (e / "entry.json").read_text().replace('"model.ckpt"', '"other.ckpt"', 1)
        ),
        "entry.json",
    ),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_entry_is_logged_set_aside_and_rebuilt_once(tmp_path, caplog, corruption):
    damage, damaged_file = CORRUPTIONS[corruption]
    build = Builder()
    cache.compute_once(tmp_path, "k", build)
    damage(tmp_path / "k")

    entry = cache.compute_once(tmp_path, "k", build)

    assert build.runs == 2 and entry.built_here
    assert (entry.path / "model.ckpt").read_bytes() == b"weights" * 100
    assert cache.lookup(tmp_path, "k").meta["checkpoint"] == "model.ckpt"  # valid again
    assert (tmp_path / "k.corrupt").is_dir()  # the damaged copy, kept for inspection
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(tmp_path / "k") in warning and damaged_file in warning


def test_an_entry_corrupt_again_after_its_rebuild_raises_naming_the_file(tmp_path):
    build = Builder()
    cache.compute_once(tmp_path, "k", build)
    flip_a_byte(tmp_path / "k" / "model.ckpt")
    cache.compute_once(tmp_path, "k", build)
    flip_a_byte(tmp_path / "k" / "model.ckpt")

    with pytest.raises(cache.CorruptEntry, match="again after one rebuild") as raised:
        cache.compute_once(tmp_path, "k", build)
    assert str(tmp_path / "k" / "model.ckpt") in str(raised.value)
    assert build.runs == 2


def test_a_valid_entry_is_verified_and_not_rebuilt(tmp_path, caplog):
    build = Builder()
    cache.compute_once(tmp_path, "k", build)
    for _ in range(2):
        entry = cache.compute_once(tmp_path, "k", build)
    assert build.runs == 1 and not entry.built_here
    assert "checksums" not in entry.meta and entry.meta["checkpoint"] == "model.ckpt"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert not (tmp_path / "k.corrupt").exists()


def test_a_small_entry_is_checked_by_content_a_large_one_by_size_and_mtime(tmp_path):
    cache.compute_once(tmp_path, "small", Builder(files=2))
    cache.compute_once(tmp_path, "large", Builder(files=cache.HASHED_FILES_MAX))
    small = json.loads((tmp_path / "small" / "entry.json").read_text())["checksums"]
    large = json.loads((tmp_path / "large" / "entry.json").read_text())["checksums"]
    assert len(small) == 3 and all(set(c) == {"size", "sha256"} for c in small.values())
    assert len(large) == cache.HASHED_FILES_MAX + 1
    assert all(set(c) == {"size", "mtime_ns"} for c in large.values())

    # A rewrite that keeps the size shows in the mtime (nanoseconds; set it to be sure).
    part = tmp_path / "large" / "part3.bin"
    part.write_bytes(part.read_bytes()[::-1])
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 1))
    with pytest.raises(cache.CorruptEntry, match="part3.bin was modified"):
        cache.lookup(tmp_path, "large")


def test_files_added_to_an_entry_after_publish_are_not_checked(tmp_path):
    build = Builder()
    cache.compute_once(tmp_path, "k", build)
    (tmp_path / "k" / "pseudo_labels").mkdir()
    (tmp_path / "k" / "pseudo_labels" / "noise.json").write_text("{}")
    assert not cache.compute_once(tmp_path, "k", build).built_here

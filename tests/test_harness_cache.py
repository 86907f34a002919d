"""The compute-once cache behind shared pretraining and synthetic datasets (harness/cache.py)."""

from __future__ import annotations

import json
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

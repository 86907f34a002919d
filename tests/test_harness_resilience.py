"""A sweep survives what happens to real processes: a second sweep of the same study, SIGTERM,
kill -9 at any point, a resume of a finished sweep, a cluster address that does not answer.

Every test drives `python -m harness.sweep` as a subprocess on a tiny synthetic study and
decides when to kill by watching the state file and MLflow, never by sleeping a fixed time.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import tmpfs
from test_harness_sweep import (
    SWEEP_TIMEOUT_S,
    Sweep,
    _kill_group,
    assert_ok,
    run_sweep,
    sweep_env,
    write_study,
)

TINY = dict(
    search={"finetune.label_fraction": [1.0]},
    finetune={"budget": {"value": 2}},
    max_concurrent=1,
    mlflow={"system_metrics": False},
)


def start(sweep: Sweep, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "harness.sweep", str(sweep.spec_path), *args],
        cwd=sweep.spec_path.parent,
        env=sweep_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: Ray's helpers die with it
    )


def wait_until(proc: subprocess.Popen, condition, what: str) -> None:
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before {what}:\n{err[-4000:]}")
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)


def state(sweep: Sweep) -> dict:
    try:
        return json.loads((sweep.storage / "sweep_state.json").read_text())
    except (OSError, ValueError):
        return {}


def store(sweep: Sweep) -> Path:
    """The sweep's SQLite MLflow store (in the study folder unless its spec names another)."""
    return Path(sweep.tracking_uri.removeprefix("sqlite:///"))


def read_store(sweep: Sweep, query: str, *params) -> list[tuple]:
    """Rows of a query on the sweep's store, opened read-only (polling must never create the
    file before the sweep does); no rows while it does not exist or is locked."""
    try:
        with sqlite3.connect(f"file:{store(sweep)}?mode=ro", uri=True, timeout=1) as con:
            return con.execute(query, params).fetchall()
    except sqlite3.Error:
        return []


def runs(sweep: Sweep, role: str | None = None) -> list[tuple[str, str]]:
    """(run_uuid, status) of the study's runs with `role` (all roles: None), from SQLite."""
    query = "SELECT r.run_uuid, r.status FROM runs r"
    if role:
        query += " JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = 'bev.role' AND t.value = ?"
    return read_store(sweep, query, *((role,) if role else ()))


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_second_sweep_of_a_running_study_exits_2_naming_the_running_one(tmp_path):
    sweep = write_study(tmp_path, "locked", **TINY)
    first = start(sweep)
    try:
        wait_until(first, lambda: state(sweep), "the first sweep's state")
        second = run_sweep(sweep)
        assert second.returncode == 2, second.stderr
        line = error_line(second)
        assert f"in use by pid {first.pid}" in line and "storage_path" in line, line
        assert "Traceback" not in second.stderr
    finally:
        _kill_group(first)
        first.wait(timeout=60)


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_then_resume_finishes_and_a_finished_sweep_stays_finished(
    tmp_path,
):
    sweep = write_study(tmp_path, "terminated", **TINY)
    proc = start(sweep, "--quiet")  # the resume hint is printed at every loudness
    try:
        wait_until(proc, lambda: runs(sweep, "trial"), "a trial run")
        # To the driver, as a job scheduler or `kill` sends it (to the whole group it would
        # also stop Ray's own GCS and raylet, which the driver then cannot reach).
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 130, err[-4000:]
    assert f"resume with: python -m harness.sweep {sweep.spec_path} --resume" in err, err[-4000:]
    # --quiet: neither the dataset generator's bar nor its closing line
    assert "img/s" not in err and "images/s rendering" not in out + err, out + err
    assert {s for _, s in runs(sweep)} <= {"FINISHED", "KILLED"}

    assert_ok(run_sweep(sweep, "--resume"))
    ((parent, status),) = runs(sweep, "sweep")
    assert status == "FINISHED"
    assert {s for _, s in runs(sweep)} == {"FINISHED"}

    again = run_sweep(sweep, "--resume")
    assert_ok(again)
    assert "already finished" in again.stdout
    assert runs(sweep, "sweep") == [(parent, "FINISHED")]


# --- kill -9 at four points, then --resume ---------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, float]:
    """Final val mIoU per trial id of the study run without interruption."""
    sweep = write_study(tmp_path_factory.mktemp("reference"), "killed", **TINY)
    assert_ok(run_sweep(sweep))
    return final_miou(sweep)


def final_miou(sweep: Sweep) -> dict[str, float]:
    return {r.data.tags["bev.trial_id"]: r.data.metrics["val/mIoU"] for r in sweep.runs("trial")}


def _ray_saved(sweep: Sweep) -> bool:
    path = state(sweep).get("ray_path")
    return bool(path) and any(Path(path).glob("experiment_state*.json"))


def _in_pretraining(sweep: Sweep) -> bool:
    return any(s == "RUNNING" for _, s in runs(sweep, "pretrain"))


def _in_finetuning(sweep: Sweep) -> bool:
    return bool(
        read_store(
            sweep,
            """SELECT 1 FROM runs r JOIN metrics m ON m.run_uuid = r.run_uuid
               WHERE r.status = 'RUNNING' AND m.key = 'val/mIoU'""",
        )
    )


def _generating(sweep: Sweep) -> bool:
    """The state exists, the parent run does not yet, and the dataset has been generating for a
    second and a half (long enough that a clock written only at the start would be off by it)."""
    if not state(sweep) or state(sweep).get("sweep_run_id"):
        return False
    work = [p for p in (sweep.storage / "data").glob("*") if p.is_dir()]
    return bool(work) and time.time() - min(p.stat().st_mtime for p in work) >= 1.5


KILL_POINTS = {
    # The state exists, the parent MLflow run does not yet: the dataset is being generated.
    "dataset-generation": _generating,
    # The parent run exists, Ray Tune has not saved its experiment state yet.
    "before-ray-tune-state": lambda s: state(s).get("sweep_run_id") and not _ray_saved(s),
    "mid-pretraining": _in_pretraining,
    "mid-finetuning": _in_finetuning,
}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three sweeps on a loaded 2-core machine took over 15 minutes
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_at_any_point_then_resume_loses_reruns_and_duplicates_nothing(
    tmp_path, uninterrupted, point
):
    sweep = write_study(tmp_path, "killed", **TINY)
    proc = start(sweep)
    born = psutil.Process(proc.pid).create_time()
    try:
        wait_until(proc, lambda: KILL_POINTS[point](sweep), point)
        os.killpg(proc.pid, signal.SIGKILL)
        killed_after_s = time.time() - born
        proc.wait(timeout=30)
    finally:
        _kill_group(proc)
    finished_before = {run for run, s in runs(sweep, "trial") if s == "FINISHED"}

    assert_ok(run_sweep(sweep, "--resume"))

    (parent,) = sweep.runs("sweep")
    assert parent.info.status == "FINISHED"
    trials = sweep.runs("trial")
    assert len(trials) == len({r.data.tags["bev.trial_id"] for r in trials}) == 2
    assert {s for _, s in runs(sweep)} == {"FINISHED"}  # nothing RUNNING or KILLED
    assert len(sweep.runs("pretrain")) == 1
    for run in trials:  # every epoch logged once per step; finished ones not rerun
        steps = [m.step for m in sweep.history(run.info.run_id, "val/mIoU")]
        assert sorted(set(steps)) == [1, 2]
        if run.info.run_id in finished_before:
            assert steps == [1, 2], "a finished trial ran again"
    assert final_miou(sweep) == pytest.approx(uninterrupted, abs=1e-6)
    # Honest clocks: the wall is the sum of both processes' segments, and the killed process's
    # segment is its wall up to the kill, to the second.
    segments = state(sweep)["segments_s"]
    assert len(segments) == 2 and parent.data.metrics["sweep/segments"] == 2
    assert segments[0] == pytest.approx(killed_after_s, abs=1.5)
    assert parent.data.metrics["sweep/wall_s"] == pytest.approx(sum(segments), abs=2.0)
    assert 0 < parent.data.metrics["sweep/overhead_share"] < 1


def _last_write_ms(sweep: Sweep) -> int:
    """The newest timestamp (ms) of any metric or run end in the study's store."""
    with sqlite3.connect(store(sweep), timeout=5) as con:
        (metric,) = con.execute("SELECT COALESCE(MAX(timestamp), 0) FROM metrics").fetchone()
        (ended,) = con.execute("SELECT COALESCE(MAX(end_time), 0) FROM runs").fetchone()
    return max(metric, ended)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_after_kill_9_of_the_sweep_its_trial_workers_are_gone_and_write_nothing(tmp_path):
    # The driver's process group holds the raylet; each trial's worker sits in a group of its own.
    sweep = write_study(tmp_path, "stray", **{**TINY, "mlflow": {"system_metrics": False}})
    proc, workers = start(sweep), []
    try:
        wait_until(proc, lambda: _in_finetuning(sweep), "a fine-tuning trial")
        workers = [p for p in _process_tree(proc.pid) if "ImplicitFunc" in _cmdline(p)]
        assert workers, "found no process running a trial"
        os.killpg(proc.pid, signal.SIGKILL)
        killed_ms = time.time() * 1000
        proc.wait(timeout=30)
        time.sleep(0.5)
        alive = [p for p in workers if _alive(p)]
        time.sleep(3)  # what a stray worker would write, it writes in this time
    finally:
        _kill_group(proc)
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    assert not alive, f"trial workers still alive 0.5 s after the sweep was killed: {alive}"
    late = _last_write_ms(sweep) - killed_ms
    assert late < 200, f"the store was written {late:.0f} ms after the kill"


def test_an_address_that_does_not_answer_fails_in_seconds_before_any_mlflow_run(tmp_path):
    sweep = write_study(tmp_path, "nowhere", **TINY)
    started = time.monotonic()
    proc = run_sweep(sweep, "--address", "127.0.0.1:1")
    assert time.monotonic() - started < 30  # Python and the spec load included
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc)
    assert "--address" in line and "127.0.0.1:1" in line, line
    assert not sweep.storage.exists()  # no MLflow store, no state, no lock


# --- loopback only -------------------------------------------------------------------------------


def _process_tree(root: int) -> list[int]:
    """`root` and its descendants: Ray's workers (trials) sit in process groups of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))  # state, ppid, ...
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _listening(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, local address, port) of every TCP socket in LISTEN held by `pids`."""
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            addr_hex, port_hex = cols[1].split(":")
            raw = bytes.fromhex(addr_hex)
            # /proc prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(words)
            found.append((inodes[cols[9]], str(ip), int(port_hex, 16)))
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@pytest.mark.slow
def test_a_local_sweep_listens_on_loopback_only(tmp_path):
    sweep = write_study(tmp_path, "loopback", **TINY)
    proc = start(sweep)
    try:
        wait_until(proc, lambda: runs(sweep, "trial"), "a trial run")
        sockets = _listening(_process_tree(proc.pid))
    finally:
        _kill_group(proc)
        proc.wait(timeout=60)
    assert sockets, "found no listening socket of the sweep's processes"
    exposed = [s for s in sockets if not _loopback(s[1])]
    assert not exposed, f"listening beyond loopback (pid, address, port): {exposed}"


# --- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 192 MiB tmpfs at tmp_path/disk (mounting needs root or CAP_SYS_ADMIN: skipped without)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    with tmpfs(disk, "size=192m"):
        yield disk


def _fill(folder: Path) -> Path:
    """Write zeros into `folder` until its filesystem is full; returns the filler file."""
    filler = folder / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_full_disk_mid_finetuning_leaves_nothing_running_and_resume_finishes(
    tmp_path, small_disk
):
    # The study folder (data, checkpoints, Ray's state, artifacts) on the small disk, the MLflow
    # store beside it: what the sweep can still write to, it must leave consistent.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = {"system_metrics": False, "tracking_uri": uri}
    sweep = write_study(small_disk, "diskfull", **{**TINY, "mlflow": tracking})
    sweep.tracking_uri = uri
    proc = start(sweep)
    try:
        wait_until(proc, lambda: _in_finetuning(sweep), "a fine-tuning trial")
        filler = _fill(small_disk)
        _, err = proc.communicate(timeout=SWEEP_TIMEOUT_S)
    finally:
        _kill_group(proc)
    assert proc.returncode not in (0, 2, 130), err[-4000:]
    statuses = {s for _, s in runs(sweep)}
    assert "RUNNING" not in statuses, statuses
    (parent,) = sweep.runs("sweep")
    assert parent.info.status == "FAILED"

    filler.unlink()  # the user frees space, then resumes the same sweep
    assert_ok(run_sweep(sweep, "--resume"))
    (again,) = sweep.runs("sweep")
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    trials = sweep.runs("trial")
    assert len(trials) == len({r.data.tags["bev.trial_id"] for r in trials}) == 2
    assert {s for _, s in runs(sweep)} == {"FINISHED"}

"""The study lock (harness/lock.py): one sweep per study folder, across processes."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from harness.lock import LOCK_FILE, StudyLocked, study_lock

# A process that takes the study lock, says so, and holds it until its stdin closes.
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from harness.lock import study_lock

    with study_lock(Path(sys.argv[1])):
        print("held", flush=True)
        sys.stdin.read()
    """
)


# A process that tries the study lock once and prints what happened.
TRY = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from harness.lock import StudyLocked, study_lock

    try:
        with study_lock(Path(sys.argv[1])):
            print("acquired")
    except StudyLocked as exc:
        print(exc)
    """
)


def try_in_another_process(folder) -> str:
    # (Not by reading the lock file here: closing any descriptor of it would drop our lock.)
    result = subprocess.run(
        [sys.executable, "-c", TRY, str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def holder(tmp_path):
    """A real second process holding the lock of `tmp_path / "study"`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "study")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_a_second_process_gets_study_locked_naming_the_running_one(tmp_path, holder):
    with pytest.raises(StudyLocked) as raised:
        with study_lock(tmp_path / "study"):
            pytest.fail("two holders")
    message = str(raised.value)
    assert f"pid {holder.pid} on {socket.gethostname()} since " in message
    assert str(tmp_path / "study") in message and "\n" not in message
    assert raised.value.holder.pid == holder.pid

    holder.stdin.close()  # the running sweep finishes: the study is free
    assert holder.wait(timeout=60) == 0
    with study_lock(tmp_path / "study") as me:
        assert me.pid != holder.pid


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path, holder, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    left = json.loads((tmp_path / "study" / LOCK_FILE).read_text())
    assert left["pid"] == holder.pid  # it had no chance to clean up

    with caplog.at_level(logging.WARNING, logger="harness.lock"):
        with study_lock(tmp_path / "study") as me:
            seen = try_in_another_process(tmp_path / "study")
    assert f"in use by pid {me.pid} on {socket.gethostname()}" in seen
    [warning] = caplog.messages
    assert f"pid {holder.pid}" in warning and "no longer running" in warning


def test_a_released_lock_is_emptied_and_taken_again_without_a_warning(tmp_path, caplog):
    with study_lock(tmp_path):
        pass
    assert (tmp_path / LOCK_FILE).read_text() == ""
    with caplog.at_level(logging.WARNING, logger="harness.lock"):
        with study_lock(tmp_path):
            pass
    assert not caplog.messages


def test_the_same_process_cannot_hold_a_study_twice(tmp_path):
    with study_lock(tmp_path) as me:
        with pytest.raises(StudyLocked, match=f"pid {me.pid}"):
            with study_lock(tmp_path / "."):
                pass
        # The failed attempt must not have released the lock the outer block holds.
        assert f"in use by pid {me.pid}" in try_in_another_process(tmp_path)

"""A trial worker's exit: a SystemExit that Python would ignore ends the process quietly."""

import subprocess
import sys
import textwrap

INSTALL = "from harness.lifetime import exit_on_ignored_exit; exit_on_ignored_exit()"

# Ray's worker raises SystemExit from its SIGTERM handler; here a weakref callback raises, the
# place where Python cannot propagate an exception ("Exception ignored in ...").
SCRIPT = textwrap.dedent(
    """
    import weakref
    {install}
    class Thing:
        pass
    def callback(_):
        raise {exc}
    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing
    print("still alive")
    """
)


def run(install: str, exc: str = "SystemExit(3)") -> subprocess.CompletedProcess:
    code = SCRIPT.format(install=install, exc=exc)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_an_ignored_system_exit_ends_the_process_with_its_code_and_no_traceback():
    plain = run("")  # Python's own behaviour: a traceback, and the process lives on
    assert plain.returncode == 0 and "still alive" in plain.stdout
    assert "Exception ignored" in plain.stderr and "SystemExit: 3" in plain.stderr

    for install in (INSTALL, f"{INSTALL}; exit_on_ignored_exit()"):  # once or twice: one hook
        quiet = run(install)
        assert quiet.returncode == 3, quiet.stderr
        assert quiet.stdout == "" and quiet.stderr == ""


def test_other_unraisable_exceptions_are_still_reported():
    proc = run(INSTALL, exc="ValueError('x')")
    assert proc.returncode == 0 and "still alive" in proc.stdout
    assert "Exception ignored" in proc.stderr and "ValueError: x" in proc.stderr

"""A trial's worker process ends with the Ray process that started it, and ends quietly.

Ray starts each trial's worker from the node's raylet. When the sweep is killed (kill -9 of its
process group takes the raylet with it), a worker notices only when its next call to the raylet
fails, and measured 1-2 s later: long enough to log a metric or finish a run whose status the
next `--resume` owns. `die_with_parent` asks the kernel (Linux `prctl(PR_SET_PDEATHSIG)`) to
SIGKILL the worker the moment its parent ends, so a killed sweep writes nothing more.

Ray stops an actor it no longer needs (Tune, after a worker's last trial) with SIGTERM, which
Ray's worker turns into ``SystemExit``. Raised while the main thread runs a weakref or ``__del__``
callback, Python cannot propagate it: it prints "Exception ignored in ...", the SystemExit's
traceback, onto the sweep's console (Ray forwards the worker's stderr), and the worker lives on
until Ray's SIGKILL. `exit_on_ignored_exit` ends the process there instead, as the SystemExit
meant to, without the traceback.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_installed = False


def die_with_parent() -> bool:
    """SIGKILL this process when its parent process ends (Linux); False where not available.

    The kernel tracks the parent *thread*: call it from the thread that runs the trial."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return False
    if os.getppid() != parent:  # the parent ended before the kernel was asked
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def exit_on_ignored_exit() -> None:
    """Make a SystemExit that Python would ignore (raised inside a callback it cannot propagate
    from) end the process with its exit code, silently; every other unraisable exception is
    reported as before. Installed once per process."""
    global _installed
    if _installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(code)
        previous(unraisable)

    sys.unraisablehook = hook
    _installed = True

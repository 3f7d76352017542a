"""Benchmark cases in processes of their own that end when the benchmark does.

`es-serve bench` and `benchmarks.compare` run each case in a fresh process (its peak memory its own),
for minutes and with GiBs of model and KV cache. Stopped with SIGTERM or SIGKILL (`timeout`, a job
scheduler, `kill`), the parent used to end and leave its case running on, holding the cores the next
measurement runs on. Ctrl-C reaches the whole process group; those signals reach the parent only.

No library ties a child's life to its parent's (subprocess, multiprocessing and psutil do not), so
it is done here with Linux's parent-death signal, set by the child itself on its first line (not in
`preexec_fn`, which is unsafe once the parent has threads), and a check that the parent it was started
by is still its parent, which closes the race of a parent ending before the signal was set. Elsewhere
(macOS, Windows) the child runs as before.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PARENT_ENV = "ES_SERVE_BENCH_PARENT"
_PR_SET_PDEATHSIG = 1


def run(cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run for a case process that calls `end_with_parent()` first."""
    env = dict(os.environ if env is None else env)
    env[PARENT_ENV] = str(os.getpid())
    return subprocess.run(cmd, env=env, **kwargs)


def end_with_parent() -> bool:
    """Makes this process get SIGTERM when the benchmark that started it ends; True if armed.

    A no-op outside a case process (the variable unset) and where Linux's prctl is missing. If the
    parent already ended, this process ends now.
    """
    # Popped: a process this one starts has another parent and must not take the check for its own.
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != int(parent):  # the parent ended before the signal was set
        os.kill(os.getpid(), signal.SIGTERM)
    return True

"""Small process helpers shared by the daemon, its workers, the profiler and the planner child."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import signal
import subprocess
import time

log = logging.getLogger("packratd")


def set_parent_death_signal(sig=signal.SIGKILL) -> None:
    """Die with the parent even if it is SIGKILLed (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)
    except OSError:
        pass


def signal_quietly(proc, sig) -> None:
    try:
        proc.send_signal(sig)
    except (ProcessLookupError, OSError):
        pass


def stop_processes(procs, grace_s: float, force: bool = False, what: str = "process") -> None:
    """SIGTERM (SIGKILL when ``force``) every live process, wait up to ``grace_s`` in all, then SIGKILL
    what is left and reap everything: the one stop escalation packratd uses."""
    procs = [p for p in procs if p is not None]
    for p in procs:
        if p.poll() is None:
            signal_quietly(p, signal.SIGKILL if force else signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s %d did not stop within %.0fs; SIGKILL", what, p.pid, grace_s)
            signal_quietly(p, signal.SIGKILL)
            p.wait()

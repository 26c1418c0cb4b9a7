"""A supervised helper process of the daemon (the Open Inference Protocol gateway).

It is started from the main loop, restarted with back-off (1 s doubling to 30 s) when it exits
unexpectedly, and left down after an exit that says "my arguments cannot work" (exit 2: bad
arguments, 3: cannot bind or load TLS) within a few seconds of starting, until the next reload
changes its command line.  Stopping is SIGTERM, then SIGKILL after a grace, like the workers.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

from .procutil import signal_quietly

log = logging.getLogger("packratd.sidecar")

FATAL_CODES = (2, 3)
FATAL_WITHIN_S = 10.0


class Sidecar:
    def __init__(self, name: str, argv: list[str] | None):
        self.name = name
        self.argv = argv
        self.proc = None
        self.started = 0.0
        self.failures = 0
        self.next_try = 0.0
        self.given_up: str | None = None
        self.restarts = 0
        self.stopping_since: float | None = None
        self.restart_pending = False

    def _start(self, now: float) -> None:
        env = dict(os.environ)
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(k, None)
        try:
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as e:
            log.error("%s could not be started: %s", self.name, e)
            self._failed(now)
            return
        self.started = now
        log.info("%s started: pid %d", self.name, self.proc.pid)

    def _failed(self, now: float) -> None:
        self.failures += 1
        self.next_try = now + min(30.0, 2.0 ** (self.failures - 1))

    def step(self, now: float, stopping: bool) -> None:
        if self.argv is None and self.proc is None:
            return
        if self.proc is not None:
            rc = self.proc.poll()
            if rc is None:
                if self.stopping_since is not None and now - self.stopping_since > 10.0:
                    signal_quietly(self.proc, signal.SIGKILL)
                elif now - self.started > 60.0:
                    self.failures = 0
                return
            self.proc = None
            self.stopping_since = None
            if stopping:
                return
            if self.restart_pending:           # stopped for a new command line: start it at once
                self.restart_pending = False
                self._start(now)
                return
            lived = now - self.started
            if rc in FATAL_CODES and lived < FATAL_WITHIN_S:
                self.given_up = f"exited with status {rc} {lived:.1f}s after start (see its log); not restarted until reload"
                log.error("%s %s", self.name, self.given_up)
                return
            log.error("%s exited with status %s after %.1fs; restarting", self.name, rc, lived)
            self._failed(now)
            return
        if self.argv is not None and not stopping and self.given_up is None and now >= self.next_try:
            if self.started:
                self.restarts += 1
            self._start(now)

    def reconfigure(self, argv: list[str] | None) -> None:
        """A reload: a new command line restarts it (and lifts a give-up)."""
        if argv == self.argv and self.given_up is None:
            return
        self.argv, self.given_up, self.failures, self.next_try = argv, None, 0, 0.0
        if self.proc is not None:
            self.restart_pending = argv is not None
            self.stop()            # step() starts the new one when the old one has exited

    def stop(self) -> None:
        """SIGTERM (it finishes the requests it holds); step() escalates to SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            signal_quietly(self.proc, signal.SIGTERM)
            self.stopping_since = time.monotonic()

    def status(self) -> dict:
        return {"name": self.name, "enabled": self.argv is not None,
                "pid": self.proc.pid if self.proc is not None and self.proc.poll() is None else None,
                "restarts": self.restarts, "given_up": self.given_up}

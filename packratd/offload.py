"""Run heavy pure functions (solver, monitor scoring) off the daemon's main loop, with a time bound.

The daemon's main loop must never wait: it answers the sockets, heartbeats the workers and forms
batches.  :class:`Offloader` runs one job at a time in a child process (started on first use, spawn
start method, so it holds none of the daemon's sockets or threads) and hands back a :class:`Job`
that the loop polls.  A job that runs past its time bound is failed and the child is killed and
replaced, so a pathological input can cost time on a spare core but can never wedge the daemon.
Being a separate process, the child also never competes for the main loop's GIL.

Only functions of packratd's own modules run there, with arguments built by the daemon itself (a
latency table, a topology, numbers); nothing that came from a client.
"""
from __future__ import annotations

import collections
import importlib
import logging
import multiprocessing
import time
from dataclasses import dataclass, field

log = logging.getLogger("packratd.offload")


class JobError(Exception):
    pass


@dataclass(eq=False)
class Job:
    fn: str                          # "packratd.module:function"
    args: tuple
    timeout_s: float
    what: str = ""
    id: int = 0
    started: float | None = None
    done: bool = False
    result: object = None
    error: str | None = None
    callbacks: list = field(default_factory=list)

    def on_done(self, cb) -> "Job":
        """cb(job) runs on the main loop when the job finishes (at once if it already has)."""
        if self.done:
            cb(self)
        else:
            self.callbacks.append(cb)
        return self

    def _finish(self, result=None, error: str | None = None) -> None:
        self.done, self.result, self.error = True, result, error
        for cb in self.callbacks:
            try:
                cb(self)
            except Exception:  # noqa: BLE001 - a callback's failure must not stop the loop
                log.exception("callback of %s failed", self.what or self.fn)
        self.callbacks.clear()


def _serve(conn, allowed: tuple) -> None:          # runs in the child
    from .procutil import set_parent_death_signal
    set_parent_death_signal()
    while True:
        try:
            job_id, fn, args = conn.recv()
        except EOFError:
            return
        mod, name = fn.split(":")
        try:
            if not mod.startswith(allowed):
                raise JobError(f"{fn}: only packratd's own functions run here")
            out = (job_id, True, getattr(importlib.import_module(mod), name)(*args))
        except Exception as e:  # noqa: BLE001 - reported to the daemon
            out = (job_id, False, f"{type(e).__name__}: {e}")
        try:
            conn.send(out)
        except Exception as e:  # noqa: BLE001 - an unpicklable result
            conn.send((job_id, False, f"result could not be sent back: {e}"))


class Offloader:
    def __init__(self, name: str = "packratd-planner", allowed: tuple = ("packratd.",)):
        self.name = name
        self.allowed = tuple(allowed)
        self.ctx = multiprocessing.get_context("spawn")
        self.proc = None
        self.conn = None
        self.queue: collections.deque[Job] = collections.deque()
        self.current: Job | None = None
        self.next_id = 1
        self.restarts = 0

    def fileno(self) -> int | None:
        """The pipe to poll for results (None while no child runs)."""
        return self.conn.fileno() if self.conn is not None else None

    def submit(self, fn: str, *args, timeout_s: float = 30.0, what: str = "") -> Job:
        job = Job(fn, args, timeout_s, what, self.next_id)
        self.next_id += 1
        self.queue.append(job)
        self.poll(time.monotonic())
        return job

    def busy(self) -> bool:
        return self.current is not None or bool(self.queue)

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_serve, args=(child, self.allowed), name=self.name, daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(timeout=5)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def poll(self, now: float) -> None:
        """Collect a finished job, fail one past its time bound, start the next.  Never blocks."""
        cur = self.current
        if cur is not None:
            try:
                ready = self.conn.poll(0)
                msg = self.conn.recv() if ready else None
            except (EOFError, OSError) as e:
                ready, msg = True, (cur.id, False, f"planner process died ({e or 'EOF'})")
                self._kill()
                self.restarts += 1
            if ready and msg is not None and msg[0] == cur.id:
                self.current = None
                cur._finish(msg[2], None) if msg[1] else cur._finish(None, msg[2])
            elif now - cur.started > cur.timeout_s:
                log.error("%s took longer than %.0fs; stopped (planner process restarted)", cur.what or cur.fn, cur.timeout_s)
                self._kill()
                self.restarts += 1
                self.current = None
                cur._finish(None, f"{cur.what or cur.fn} took longer than {cur.timeout_s:.0f}s and was stopped")
        if self.current is None and self.queue:
            job = self.queue.popleft()
            try:
                if self.proc is None or not self.proc.is_alive():
                    self._kill()
                    self._start()
                self.conn.send((job.id, job.fn, job.args))
            except Exception as e:  # noqa: BLE001 - EMFILE, ENOMEM, a dead pipe...
                self._kill()
                job._finish(None, f"could not start the planner process: {type(e).__name__}: {e}")
                return
            job.started = now
            self.current = job

    def close(self) -> None:
        for job in ([self.current] if self.current else []) + list(self.queue):
            job._finish(None, "packratd is stopping")
        self.current = None
        self.queue.clear()
        self._kill()

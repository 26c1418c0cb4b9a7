"""Worker supervision: every instance of every generation is a :class:`Slot` with a lifecycle.

A slot is one instance of a plan (generation g, index i, its cores).  It runs one worker process
at a time (identity ``g<g>.i<i>.r<restarts>``); when that worker dies, is stuck or cannot be
reached, the slot replaces it on the same cores after a back-off, and gives up after
``workers.max_restarts`` consecutive failures (its cores then go out of service and the daemon
re-plans).  What to do after a worker's exit is one pure function, :func:`after_exit`, tested by a
table of cases.  Stopping a worker is SIGTERM with a deadline, then SIGKILL (:class:`Stopping`).

The supervisor reports to the daemon through ``events``:

* ``("starting_failed", generation, why)`` -- an instance of a generation that is still starting
  failed: the rollout abandons that generation (blue keeps serving);
* ``("instance_failed", slot, why)`` -- a serving instance gave up: take its cores out of service.
"""
from __future__ import annotations

import collections
import logging
import signal
from dataclasses import dataclass
from typing import Callable

from . import worker as worker_mod
from .dispatcher import BOOTING, READY, STOPPING, WorkerHandle
from .generations import ACTIVE, DRAINING, STARTING
from .procutil import signal_quietly

log = logging.getLogger("packratd.supervisor")

STABLE_S = 60.0               # a worker that served this long before dying starts a fresh failure count
MAX_BACKOFF_S = 30.0

# slot states
S_BOOTING, S_READY, S_BACKOFF, S_FAILED, S_STOPPED = "booting", "ready", "backoff", "failed", "stopped"


@dataclass(frozen=True)
class Restart:
    failures: int                 # consecutive failures after this exit
    give_up: bool
    delay_s: float                # back-off before the replacement starts


def after_exit(failures: int, was_booting: bool, lived_s: float, max_restarts: int) -> Restart:
    """What to do when a slot's worker is gone: replace it after a back-off, or give up.

    A worker that dies while booting, or within STABLE_S of starting, adds one to the consecutive
    failures; one that served longer starts the count afresh (a rare crash is not a crash loop)."""
    n = failures + 1 if (was_booting or lived_s < STABLE_S) else 0
    if n > max_restarts:
        return Restart(n, True, 0.0)
    return Restart(n, False, min(MAX_BACKOFF_S, 0.5 * 2 ** (n - 1)) if n else 0.0)


@dataclass(eq=False)
class Slot:
    generation: int
    index: int
    placement: object                 # placement.Placement
    model_path: str
    digest: str
    runtime: str = "eager"
    artifact: str = ""
    warmup_sizes: tuple = (1,)
    state: str = S_BOOTING
    restarts: int = 0
    failures: int = 0
    next_try: float = 0.0
    worker: WorkerHandle | None = None
    last_error: str = ""
    boot_s: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.generation, self.index)

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(self.placement.cpus)

    def to_dict(self) -> dict:
        return {"generation": self.generation, "index": self.index, "state": self.state, "restarts": self.restarts,
                "failures": self.failures, "cpus": list(self.cpus), "last_error": self.last_error or None}


@dataclass(eq=False)
class Stopping:
    handle: WorkerHandle
    deadline: float                   # SIGKILL after this
    killed: bool = False


class Supervisor:
    def __init__(self, cfg, dispatcher, endpoint: str, launcher: Callable = worker_mod.spawn):
        self.cfg = cfg
        self.d = dispatcher
        self.endpoint = endpoint
        self.launcher = launcher      # launcher(cfg, LaunchSpec) -> a Popen-like process
        self.slots: dict[tuple[int, int], Slot] = {}
        self.stopping: list[Stopping] = []
        self.events: list[tuple] = []
        self.restarts_total = 0
        self.spawn_failures = 0
        self.deaths_by: collections.Counter = collections.Counter()   # how each unexpected death was noticed

    # ---- starting --------------------------------------------------------------------------
    def start(self, gen, now: float) -> None:
        """One slot per instance of the generation's plan, each with its worker starting."""
        for pl in gen.placements:
            slot = Slot(gen.number, pl.index, pl, gen.model_path, gen.digest, gen.runtime, gen.artifact,
                        tuple(gen.warmup_sizes.get(pl.index, (pl.spec.batch,))))
            self.slots[slot.key] = slot
            self._spawn(slot, now, gen.state)

    def _spawn(self, slot: Slot, now: float, gen_state: str) -> None:
        ident = f"g{slot.generation}.i{slot.index}.r{slot.restarts}"
        pl = slot.placement
        spec = worker_mod.LaunchSpec(self.endpoint, ident, slot.model_path, pl.spec.threads, tuple(pl.cpus),
                                     slot.warmup_sizes, slot.digest, slot.runtime, slot.artifact)
        try:
            proc = self.launcher(self.cfg, spec)
        except worker_mod.LaunchError as e:
            self.spawn_failures += 1
            log.error("worker %s could not be started: %s", ident, e)
            slot.worker = None
            self._lost(slot, True, 0.0, str(e), now, gen_state)
            return
        h = WorkerHandle(ident.encode(), slot.generation, slot.index, pl.spec.threads, tuple(pl.cpus), pl.spec.batch,
                         digest=slot.digest, proc=proc, spawned_at=now, last_seen=now,
                         hb_limit=self.cfg["workers.heartbeat_interval_s"] * self.cfg["workers.heartbeat_liveness"])
        slot.worker = h
        slot.state = S_BOOTING
        self.d.add_worker(h)
        log.info("worker %s started: pid %d, %d thread(s) on cpus %s", ident, proc.pid, h.threads,
                 ",".join(map(str, pl.cpus)))

    # ---- stopping --------------------------------------------------------------------------
    def _stop_handle(self, h: WorkerHandle, now: float, sig=signal.SIGTERM, grace: float | None = None) -> list:
        poison = self.d.remove_worker(h, "stopped")
        h.state = STOPPING
        signal_quietly(h.proc, sig)
        g = self.cfg["workers.stop_grace_s"] if grace is None else grace
        self.stopping.append(Stopping(h, now + g, killed=sig == signal.SIGKILL))
        return poison

    def stop_generation(self, number: int, now: float, sig=signal.SIGTERM) -> None:
        for key in [k for k in self.slots if k[0] == number]:
            slot = self.slots.pop(key)
            slot.state = S_STOPPED
            if slot.worker is not None:
                self._stop_handle(slot.worker, now, sig)
                slot.worker = None

    def stopping_generation(self, number: int) -> bool:
        return any(s.handle.generation == number for s in self.stopping)

    def all_processes(self) -> list:
        procs = [s.worker.proc for s in self.slots.values() if s.worker is not None]
        return procs + [s.handle.proc for s in self.stopping]

    # ---- the loop step ---------------------------------------------------------------------
    def step(self, now: float, gen_state: Callable[[int], str], stopping: bool) -> None:
        self._events(now, gen_state, stopping)
        self._boot_timeouts(now)
        self._reap_stopping(now)
        self._reap(now, gen_state, stopping)
        if not stopping:
            self._respawn_due(now, gen_state)

    def _events(self, now: float, gen_state, stopping: bool) -> None:
        d = self.d
        while d.events:
            kind, h, detail = d.events.pop(0)
            slot = self.slots.get((h.generation, h.index))
            if slot is None or slot.worker is not h:
                if kind in ("bootfail", "silent", "unreachable"):
                    signal_quietly(h.proc, signal.SIGKILL)
                continue
            if kind == "ready":
                slot.state = S_READY
                slot.boot_s = detail.get("boot_s")
                log.info("worker %s ready in %.1fs (pid %s, %s threads, cpus %s, runtime %s)", h.name,
                         detail.get("boot_s", 0), detail.get("pid"), detail.get("threads"), detail.get("cpus"),
                         detail.get("runtime"))
            elif kind == "bootfail":
                slot.last_error = detail
                log.error("worker %s reports boot failure: %s", h.name, detail)
                signal_quietly(h.proc, signal.SIGKILL)     # reaped below; counted as a failed boot
            elif kind in ("silent", "unreachable"):
                # Stuck (SIGSTOP, a hung kernel ...) or gone without being reaped yet: take its slice back now,
                # stop it (SIGKILL after a short grace) and replace it.
                log.error("worker %s: %s; re-sending its work and replacing it", h.name, detail)
                slot.worker = None
                poison = self._stop_handle(h, now, signal.SIGTERM, min(2.0, self.cfg["workers.stop_grace_s"]))
                if not stopping:
                    self.d.stats.worker_deaths += 1
                    self.deaths_by["heartbeat" if kind == "silent" else "unreachable"] += 1
                    self._lost(slot, False, now - h.spawned_at, detail, now, gen_state(slot.generation),
                               counts=not self._forgive(poison, slot))

    def _boot_timeouts(self, now: float) -> None:
        limit = self.cfg["workers.boot_timeout_s"]
        for slot in self.slots.values():
            h = slot.worker
            if h is not None and h.state == BOOTING and now - h.spawned_at > limit and not h.boot_error:
                h.boot_error = f"not READY after {limit:.0f}s"
                slot.last_error = h.boot_error
                log.error("worker %s %s; killing it", h.name, h.boot_error)
                signal_quietly(h.proc, signal.SIGKILL)

    def _reap_stopping(self, now: float) -> None:
        still = []
        for s in self.stopping:
            if s.handle.proc.poll() is not None:
                continue
            if now > s.deadline and not s.killed:
                log.warning("worker %s did not stop in time; SIGKILL", s.handle.name)
                signal_quietly(s.handle.proc, signal.SIGKILL)
                s.killed = True
            still.append(s)
        self.stopping = still

    def _reap(self, now: float, gen_state, stopping: bool) -> None:
        for slot in list(self.slots.values()):
            h = slot.worker
            if h is None:
                continue
            rc = h.proc.poll()
            if rc is None:
                continue
            was = h.state
            slot.worker = None
            poison = self.d.remove_worker(h, f"exit {rc}")
            if stopping:
                continue
            self.d.stats.worker_deaths += 1
            self.deaths_by["exit"] += 1
            why = h.boot_error or f"exit status {rc}"
            if was in (BOOTING,):
                log.error("worker %s failed to boot: %s", h.name, why)
            else:
                log.error("worker %s (pid %d) lost (%s); replacing it on cpus %s",
                          h.name, h.proc.pid, why, ",".join(map(str, h.cpus)))
            self._lost(slot, was == BOOTING, now - h.spawned_at, why, now, gen_state(slot.generation),
                       counts=not self._forgive(poison, slot))

    def _forgive(self, poison: list, slot: Slot) -> bool:
        """Workers killed by poison data are not a crash loop: undo the failures their deaths counted.
        True when this slot's own death is one of them (then it is not counted either)."""
        for key in poison:
            s = self.slots.get(tuple(key))
            if s is not None and s is not slot and s.failures > 0:
                s.failures -= 1
        mine = [k for k in poison if tuple(k) == slot.key]
        if mine:
            slot.failures = max(0, slot.failures - (len(mine) - 1))
        return bool(mine)

    def _lost(self, slot: Slot, was_booting: bool, lived_s: float, why: str, now: float, gen_state: str,
              counts: bool = True) -> None:
        slot.last_error = why
        if gen_state == STARTING:
            # A generation that never served is not repaired: the rollout abandons it, blue keeps serving.
            slot.state = S_FAILED
            self.events.append(("starting_failed", slot.generation, f"{slot.key}: {why}"))
            return
        if gen_state not in (ACTIVE, DRAINING):
            slot.state = S_STOPPED
            return
        r = after_exit(slot.failures, was_booting, lived_s, self.cfg["workers.max_restarts"]) if counts else \
            Restart(slot.failures, False, 0.0)
        slot.failures = r.failures
        if r.give_up:
            slot.state = S_FAILED
            self.events.append(("instance_failed", slot, why))
            return
        slot.state = S_BACKOFF
        slot.next_try = now + r.delay_s

    def _respawn_due(self, now: float, gen_state) -> None:
        for slot in list(self.slots.values()):
            if slot.state != S_BACKOFF or slot.next_try > now:
                continue
            st = gen_state(slot.generation)
            if st == DRAINING and not self._needed_while_draining(slot.generation):
                continue               # a draining generation only needs workers for slices it still holds
            if st not in (ACTIVE, DRAINING):
                continue
            slot.restarts += 1
            self.restarts_total += 1
            self._spawn(slot, now, st)

    def _needed_while_draining(self, number: int) -> bool:
        return any(sl.batch.generation == number for sl in self.d.orphans)

    # ---- views -----------------------------------------------------------------------------
    def counts(self, number: int) -> tuple[int, int]:
        """(ready instances, failed instances) of a generation."""
        ready = failed = 0
        for (g, _), slot in self.slots.items():
            if g != number:
                continue
            if slot.worker is not None and slot.worker.state == READY:
                ready += 1
            if slot.state == S_FAILED:
                failed += 1
        return ready, failed

    def slots_of(self, number: int) -> list[Slot]:
        return sorted((s for s in self.slots.values() if s.generation == number), key=lambda s: s.index)

    def serving_capacity(self, number: int) -> int:
        """Instances of the generation that serve or will again (not given up)."""
        return sum(1 for s in self.slots_of(number) if s.state != S_FAILED)

    def boot_times(self, number: int) -> list[float]:
        return [s.boot_s for s in self.slots_of(number) if s.boot_s is not None]


"""Rollout: start, switch, retire and abandon worker generations (blue-green, availability first).

A generation is a plan placed on cores, with its own copy of the model (by digest) and runtime.
Starting one hands its instances to the supervisor; every loop step the rollout takes a snapshot
of the live generations (generations.GenView) and applies what the pure policy
``generations.decide`` returns.  Side effects that belong to the daemon (systemd notifications,
the monitor, metrics, the first READY) go through the ``listener`` it is given:

* ``on_switch(new, old, now)``  new receives batches now (old, if any, drains);
* ``on_abandon(gen, why, now)``  a generation that never served was given up;
* ``on_gone(gen, now)``          a retired or abandoned generation's workers have all exited.
"""
from __future__ import annotations

import collections
import logging
import signal
import time

from . import generations as G
from .generations import ACTIVE, DRAINING, FAILED, RETIRED, STARTING, GenView, Generation
from .placement import place
from .plan import Plan

log = logging.getLogger("packratd.rollout")

KEEP_GENERATIONS = 8          # finished generations kept for status (their timelines are in history)


class Rollout:
    def __init__(self, cfg, dispatcher, supervisor, listener):
        self.cfg = cfg
        self.d = dispatcher
        self.sup = supervisor
        self.listener = listener
        self.gens: dict[int, Generation] = {}
        self.active: Generation | None = None
        self.next_number = 1
        self.history: collections.deque = collections.deque(maxlen=20)
        self.reconfigurations = 0

    # ---- starting --------------------------------------------------------------------------
    def start(self, plan: Plan, topo, model_path: str, digest: str, reason: str, now: float,
              runtime: str = "eager", artifact: str = "", predicted_ms: float | None = None,
              measured_ms: float | None = None, warmup_sizes: dict | None = None) -> Generation:
        """Place and start a generation.  Raises PlacementError when the plan does not fit."""
        placements = place(plan.instances, topo, use_smt=self.cfg["workers.use_smt"])
        n = self.next_number
        self.next_number += 1
        g = Generation(n, plan, placements, reason, model_path=model_path, digest=digest, runtime=runtime,
                       artifact=artifact, warmup_sizes=dict(warmup_sizes or {}), created=now,
                       predicted_ms=predicted_ms if predicted_ms is not None else plan.latency_ms, measured_ms=measured_ms)
        self.gens[n] = g
        log.info("generation %d: starting plan %s on runtime %s (%s)", n, g.plan_text, runtime, reason)
        self.sup.start(g, now)
        return g

    def busy(self) -> bool:
        """A generation is still starting (at most one reconfiguration at a time)."""
        return any(g.state == STARTING for g in self.gens.values())

    def state_of(self, number: int) -> str:
        g = self.gens.get(number)
        return g.state if g is not None else RETIRED

    # ---- the loop step ---------------------------------------------------------------------
    def views(self, now: float) -> list[GenView]:
        out = []
        for g in self.gens.values():
            if g.state not in (STARTING, ACTIVE, DRAINING):
                continue
            ready, failed = self.sup.counts(g.number)
            out.append(GenView(g.state, g.size, ready, failed, self.d.inflight(g.number), now - g.created, g.number))
        return out

    def step(self, now: float) -> None:
        for ev in [e for e in self.sup.events if e[0] == "starting_failed"]:
            self.sup.events.remove(ev)
            g = self.gens.get(ev[1])
            if g is not None and g.state == STARTING:
                g.failed_boots += 1
                g.boot_errors.append(ev[2])
        for action, number, why in G.decide(self.views(now), self.cfg["workers.boot_timeout_s"]):
            g = self.gens[number]
            if action == G.SWITCH:
                self._switch(g, now)
            elif action == G.RETIRE:
                self._retire(g, now)
            elif action == G.ABANDON:
                self._abandon(g, why, now)
        for g in list(self.gens.values()):
            if g.state in (RETIRED, FAILED) and g.gone_at is None and not self.sup.stopping_generation(g.number):
                self._gone(g, now)
        self._prune()

    def _switch(self, g: Generation, now: float) -> None:
        g.ready_at = g.active_at = now
        g.state = ACTIVE
        old, self.active = self.active, g
        self.d.active_generation = g.number
        if old is not None:
            old.state = DRAINING
            old.retire_at = now
            self.reconfigurations += 1
            log.info("generation %d active (plan %s) %.2fs after it was started; generation %d draining",
                     g.number, g.plan_text, now - g.created, old.number)
        self.listener.on_switch(g, old, now)

    def _retire(self, g: Generation, now: float) -> None:
        g.state = RETIRED
        log.info("generation %d retired (nothing in flight); stopping its %d worker(s)", g.number, g.size)
        self.sup.stop_generation(g.number, now)

    def _abandon(self, g: Generation, why: str, now: float) -> None:
        g.state = FAILED
        g.error = why
        errors = sorted({s.last_error for s in self.sup.slots_of(g.number) if s.last_error} | set(g.boot_errors))
        if errors:
            g.error += ": " + "; ".join(errors)[:500]
        self.sup.stop_generation(g.number, now, signal.SIGKILL)
        if self.active is not None:
            log.error("generation %d abandoned (%s); generation %d keeps serving", g.number, g.error, self.active.number)
        self.listener.on_abandon(g, g.error, now)

    def retire_active_for_replan(self, now: float) -> None:
        """The active generation lost every instance for good (cores out of service, nothing left to re-plan
        onto): stop it, so that nothing waits on workers that will never come."""
        a = self.active
        if a is None:
            return
        a.state = FAILED
        a.error = "every instance failed"
        self.active = None
        self.d.active_generation = 0
        self.sup.stop_generation(a.number, now, signal.SIGKILL)

    def _gone(self, g: Generation, now: float) -> None:
        g.gone_at = now
        entry = {"at": time.time(), **g.timeline()}
        succ = self.active
        if g.state == RETIRED and succ is not None and succ.active_at is not None and succ.number > g.number:
            # the timeline of a switch is the successor's: started -> active (this one draining) -> this one gone
            entry["switch"] = {"to": succ.number, "green_ready_s": round(succ.ready_at - succ.created, 3),
                               "blue_gone_s": round(now - succ.created, 3), "reason": succ.reason}
        self.history.append(entry)
        self.listener.on_gone(g, now)

    def _prune(self) -> None:
        done = sorted(n for n, g in self.gens.items() if g.state in (RETIRED, FAILED) and g.gone_at is not None)
        for n in done[:-KEEP_GENERATIONS]:
            del self.gens[n]

    def live(self) -> list[Generation]:
        return [g for g in self.gens.values() if g.state in (STARTING, ACTIVE, DRAINING)]

    def digests_in_use(self) -> set[str]:
        return {g.digest for g in self.live()}

    def note(self, reason: str, **fields) -> None:
        """Record a reconfiguration outcome that started no generation (refused, unchanged...)."""
        self.history.append({"at": time.time(), "reason": reason, **fields})


"""Worker generations and the availability-preserving switch policy (pure logic, no processes).

A reconfiguration starts a new ("green") generation beside the serving ("blue") one.  The rules,
like TF Serving's availability-preserving version policy:

* green receives new batches only once every one of its instances is READY (:func:`may_switch`);
* blue is retired only when green is active and blue has nothing in flight (:func:`may_retire`);
* a green that fails to start (a worker failed to boot, crashed or timed out) is abandoned, and
  blue keeps serving untouched (:func:`should_abandon`);
* once green serves, older generations that never served are abandoned ("superseded");
* at most one reconfiguration is in progress; further requests are coalesced into one pending
  request, the latest wins (:class:`ReconfigQueue`).

"Which action now?" is one pure function, :func:`decide`, of a snapshot of every live generation
(:class:`GenView`); the rollout applies what it returns.  tests/test_generations.py holds the table.
"""
from __future__ import annotations

from dataclasses import dataclass, field

STARTING = "starting"     # workers loading and warming up
ACTIVE = "active"         # receives new batches
DRAINING = "draining"     # finishing batches already sent; receives nothing new
RETIRED = "retired"       # workers stopped, cores free
FAILED = "failed"         # abandoned before it served


@dataclass
class Generation:
    number: int
    plan: object                     # packratd.plan.Plan
    placements: list                 # Placement list
    reason: str = ""
    model_path: str = ""             # the content-addressed copy its workers load
    digest: str = ""                 # the model's SHA-256: its workers refuse any other file
    runtime: str = "eager"
    artifact: str = ""
    warmup_sizes: dict = field(default_factory=dict)   # instance index -> batch sizes to warm up at
    state: str = STARTING
    created: float = 0.0             # monotonic times of the transitions
    ready_at: float | None = None
    active_at: float | None = None
    retire_at: float | None = None
    gone_at: float | None = None
    error: str | None = None
    predicted_ms: float | None = None
    measured_ms: float | None = None
    failed_boots: int = 0
    boot_errors: list = field(default_factory=list)

    @property
    def plan_text(self) -> str:
        return str(self.plan)

    @property
    def size(self) -> int:
        return len(self.placements)

    def timeline(self) -> dict:
        t0 = self.created
        rel = lambda t: None if t is None else round(t - t0, 3)  # noqa: E731
        return {"generation": self.number, "state": self.state, "plan": self.plan_text, "reason": self.reason,
                "ready_s": rel(self.ready_at), "active_s": rel(self.active_at),
                "retire_s": rel(self.retire_at), "gone_s": rel(self.gone_at), "error": self.error}


@dataclass(frozen=True)
class GenView:
    """What the policy needs to know about a generation at one instant."""
    state: str
    size: int                 # instances in its plan
    ready: int                # instances READY now
    failed: int = 0           # instances that failed to boot (or died while starting)
    inflight: int = 0         # batches (or re-sent slices) still being computed on it
    age_s: float = 0.0        # since it was created
    number: int = 0


def may_switch(green: GenView) -> bool:
    """May new batches go to green?  Only when every instance it plans is READY."""
    return green.state == STARTING and green.size > 0 and green.ready == green.size and green.failed == 0


def should_abandon(green: GenView, boot_timeout_s: float) -> str | None:
    """Reason to give up on a starting generation, or None."""
    if green.state != STARTING:
        return None
    if green.failed:
        return f"{green.failed} of {green.size} instance(s) failed to start"
    if green.age_s > boot_timeout_s and green.ready < green.size:
        return f"only {green.ready} of {green.size} instance(s) READY after {boot_timeout_s:.0f}s"
    return None


def may_retire(old: GenView, active: GenView | None) -> bool:
    """May the old generation's workers be stopped now?

    Never while no other generation is active with all its instances ready (availability first),
    and never while the old one still has work in flight (no request may be lost)."""
    if old.state not in (DRAINING, ACTIVE):
        return False
    if active is None or active.state != ACTIVE or active.ready < active.size or active.size == 0:
        return False
    return old.inflight == 0


SWITCH, RETIRE, ABANDON = "switch", "retire", "abandon"


def decide(views: list[GenView], boot_timeout_s: float) -> list[tuple[str, int, str]]:
    """Actions for this instant, in order: ``(action, generation, reason)``.

    * each starting generation is abandoned (:func:`should_abandon`), or switched to when it may
      (:func:`may_switch`); of several ready at once the newest wins and the others are superseded;
    * a newly active generation supersedes every older one still starting;
    * each draining generation is retired when :func:`may_retire` allows it, judged against the
      generation active after this instant's switches."""
    actions: list[tuple[str, int, str]] = []
    active = next((v for v in views if v.state == ACTIVE), None)
    starting = sorted((v for v in views if v.state == STARTING), key=lambda v: v.number)
    switch_to = None
    for v in starting:
        why = should_abandon(v, boot_timeout_s)
        if why:
            actions.append((ABANDON, v.number, why))
        elif may_switch(v):
            switch_to = v
    if switch_to is not None:
        actions.append((SWITCH, switch_to.number, "every instance READY"))
        for v in starting:
            if v.number < switch_to.number and not any(a[1] == v.number for a in actions):
                actions.append((ABANDON, v.number, f"superseded by generation {switch_to.number}"))
        active_after = GenView(ACTIVE, switch_to.size, switch_to.ready, 0, 0, switch_to.age_s, switch_to.number)
        draining = [v for v in views if v.state in (DRAINING, ACTIVE) and v.number != switch_to.number]
        draining = [GenView(DRAINING, v.size, v.ready, v.failed, v.inflight, v.age_s, v.number) for v in draining]
    else:
        active_after = active
        draining = [v for v in views if v.state == DRAINING]
    for v in draining:
        if may_retire(v, active_after):
            actions.append((RETIRE, v.number, "nothing in flight"))
    return actions


@dataclass
class ReconfigQueue:
    """At most one pending reconfiguration request; a newer request replaces an older one."""
    pending: dict | None = None
    coalesced: int = 0

    def request(self, req: dict) -> bool:
        """Queue a request; returns True when it replaced (coalesced) one already waiting."""
        replaced = self.pending is not None
        if replaced:
            self.coalesced += 1
        self.pending = req
        return replaced

    def take(self, busy: bool) -> dict | None:
        """The request to start now, or None while a reconfiguration is in progress."""
        if busy or self.pending is None:
            return None
        req, self.pending = self.pending, None
        return req

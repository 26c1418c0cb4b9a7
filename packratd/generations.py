"""Worker generations and the availability-preserving switch policy (pure logic, no processes).

A reconfiguration starts a new ("green") generation beside the serving ("blue") one.  The rules,
like TF Serving's availability-preserving version policy:

* green receives new batches only once every one of its instances is READY (:func:`may_switch`);
* blue is retired only when green is active and blue has nothing in flight (:func:`may_retire`);
* a green that fails to start (a worker failed to boot, crashed or timed out) is abandoned, and
  blue keeps serving untouched (:func:`should_abandon`);
* at most one reconfiguration is in progress; further requests are coalesced into one pending
  request, the latest wins (:class:`ReconfigQueue`).
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
    plan: list                       # InstanceSpec list
    placements: list                 # Placement list
    reason: str = ""
    state: str = STARTING
    created: float = 0.0             # monotonic times of the transitions
    ready_at: float | None = None
    active_at: float | None = None
    retire_at: float | None = None
    gone_at: float | None = None
    error: str | None = None
    predicted_ms: float | None = None
    measured_ms: float | None = None
    plan_text: str = ""
    failed_boots: int = 0
    boot_errors: list = field(default_factory=list)

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


@dataclass
class ReconfigQueue:
    """At most one pending reconfiguration request; a newer request replaces an older one."""
    pending: dict | None = None
    coalesced: int = 0
    history: list = field(default_factory=list)

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

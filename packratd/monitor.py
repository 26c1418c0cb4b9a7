"""Batch-size monitor: should the instance shape change for the traffic we see, and does it pay?

The dispatcher reports every batch it completes (rows, batch latency).  Over a sliding window (by
time and by count) the monitor keeps the distribution of batch sizes.  Deciding is two steps:

1. :func:`score` (heavy, pure; the daemon runs it in the planner process): which instance shape
   (multiset of thread counts) minimises the expected -- or a percentile of -- batch latency over
   the sizes seen, when every batch is split optimally across that shape's instances?
2. :meth:`Monitor.decide` (cheap, on the main loop): hysteresis and economics.  A switch is
   recommended only when all of these hold, each with its own ``kind`` in the :class:`Decision`:

   * ``few_batches``  -- the window holds at least ``min_batches`` batches;
   * ``no_gain``      -- the best shape is predicted at least ``min_improvement`` better;
   * ``below_noise``  -- the gain per batch (ms) is above the run-to-run noise of end-to-end batch
     latency: the interquartile range of the measured latencies of the window's most common batch
     size (same plan, same size: what is left is noise), and at least ``min_gain_ms``;
   * ``no_payback``   -- the switch pays for itself within ``payback_s``: a switch costs about
     ``switch_s`` seconds during which batches run ``slowdown`` times slower (green boots and warms
     up on the cores blue serves on; both measured on the last switch, a prior before the first),
     i.e. ``switch_s * rate * slowdown * current_ms`` ms of added latency in all, against
     ``rate * gain_ms`` ms saved per second afterwards;
   * ``dwell``        -- at least ``min_dwell_s`` since the last reconfiguration;
   * ``confirming``   -- the same shape won ``confirmations`` evaluations in a row;
   * ``switch``       -- all of the above: reconfigure.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from .solver import LatencyTable, solve, split_table


@dataclass
class Decision:
    reconfigure: bool
    kind: str                           # few_batches | no_gain | below_noise | no_payback | dwell | confirming | switch
    reason: str
    shape: tuple = ()                   # thread counts of the recommended instances
    plan: list = field(default_factory=list)   # [(threads, batch share)] for the recommended shape
    current_ms: float | None = None     # objective for the current shape
    best_ms: float | None = None        # objective for the best shape
    gain_ms: float | None = None
    noise_ms: float | None = None
    payback_s: float | None = None
    at: float = 0.0

    def to_dict(self) -> dict:
        return {"reconfigure": self.reconfigure, "kind": self.kind, "reason": self.reason, "shape": list(self.shape),
                "plan": [list(p) for p in self.plan], "current_ms": self.current_ms, "best_ms": self.best_ms,
                "gain_ms": self.gain_ms, "noise_ms": self.noise_ms, "payback_s": self.payback_s}


@dataclass(frozen=True)
class Score:
    current_ms: float
    best_ms: float
    best: tuple          # best shape (descending thread counts)
    plan: tuple          # ((threads, share), ...) of the best shape at the window's modal batch size
    mode: int
    n: int


def _latencies(table: LatencyTable, shape: tuple, sizes: list[int]) -> np.ndarray:
    try:
        tab = split_table(table, list(shape), max(sizes))
    except ValueError:
        return np.full(len(sizes), np.inf)
    out = []
    for b in sizes:
        rows = tab[b]
        out.append(max((table.at(t, r) for t, r in zip(shape, rows) if r > 0), default=0.0))
    return np.array(out, dtype=float)


def _objective_of(lat: np.ndarray, w: np.ndarray, kind: str) -> float:
    if kind == "mean":
        return float(np.sum(w * lat) / np.sum(w))
    q = float(kind[1:]) / 100.0
    order = np.argsort(lat)
    cum = np.cumsum(w[order]) / np.sum(w)
    return float(lat[order][np.searchsorted(cum, q - 1e-12)])


def objective(table: LatencyTable, shape: tuple, hist: dict[int, int], kind: str = "mean") -> float:
    """Expected (kind="mean") or percentile (kind="p90" etc.) batch latency of a shape over a histogram."""
    sizes = sorted(hist)
    return _objective_of(_latencies(table, tuple(shape), sizes), np.array([hist[b] for b in sizes], float), kind)


def candidates(table: LatencyTable, T: int, hist: dict[int, int]) -> set[tuple]:
    """Shapes worth scoring: the optimal plan's shape for each batch size seen (most common first, at most 16)."""
    shapes = set()
    for b, _ in sorted(hist.items(), key=lambda kv: -kv[1])[:16]:
        try:
            sol = solve(table, T, b, top_k=1)
        except ValueError:
            continue
        shapes.add(tuple(sorted(sol.best.threads, reverse=True)))
    return shapes


def score(table: LatencyTable, T: int, current: tuple, hist: dict[int, int], kind: str = "mean") -> Score:
    """The best shape for the histogram and the objective of the current one (pure; may take a while)."""
    current = tuple(sorted(current, reverse=True))
    sizes = sorted(hist)
    w = np.array([hist[b] for b in sizes], float)
    scored = {s: _objective_of(_latencies(table, s, sizes), w, kind) for s in candidates(table, T, hist) | {current}}
    best = min(scored, key=lambda s: (scored[s], len(s), s))
    mode = max(hist.items(), key=lambda kv: (kv[1], kv[0]))[0]
    rows = split_table(table, list(best), mode)[mode] if np.isfinite(scored[best]) else [1] * len(best)
    return Score(scored[current], scored[best], best, tuple((t, max(1, int(r))) for t, r in zip(best, rows)),
                 mode, int(w.sum()))


@dataclass
class SwitchCost:
    """What a switch costs, as last measured (or the prior before the first switch)."""
    switch_s: float = 10.0      # decision -> old generation gone
    slowdown: float = 1.0       # extra batch latency during it, as a fraction of the steady latency
    measured: bool = False


class Monitor:
    def __init__(self, window_s: float = 60.0, window_batches: int = 1000, min_batches: int = 50,
                 min_dwell_s: float = 30.0, min_improvement: float = 0.10, confirmations: int = 2,
                 objective: str = "mean", min_gain_ms: float = 0.0, payback_s: float = float("inf")):
        self.window_s = window_s
        self.samples: collections.deque[tuple[float, int, float]] = collections.deque(maxlen=window_batches)
        self.min_batches = min_batches
        self.min_dwell_s = min_dwell_s
        self.min_improvement = min_improvement
        self.confirmations = confirmations
        self.kind = objective
        self.min_gain_ms = min_gain_ms
        self.payback_s = payback_s
        self.cost = SwitchCost()
        self.last_reconfig = float("-inf")
        self.streak: tuple | None = None
        self.streak_n = 0
        self.last: Decision | None = None

    def observe(self, now: float, rows: int, latency_ms: float = float("nan")) -> None:
        self.samples.append((now, rows, latency_ms))

    def note_reconfigured(self, now: float) -> None:
        self.last_reconfig = now
        self.streak, self.streak_n = None, 0

    def note_switch_cost(self, switch_s: float, slowdown: float) -> None:
        self.cost = SwitchCost(max(0.0, switch_s), max(0.0, slowdown), True)

    def _trim(self, now: float) -> None:
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()

    def histogram(self, now: float) -> dict[int, int]:
        self._trim(now)
        return dict(collections.Counter(r for _, r, _ in self.samples))

    def rate(self, now: float) -> float:
        """Batches per second over the window."""
        self._trim(now)
        if len(self.samples) < 2:
            return 0.0
        span = max(1e-3, now - self.samples[0][0])
        return len(self.samples) / span

    def noise_ms(self, now: float, size: int) -> float | None:
        """Interquartile range of measured latency of batches of one size in the window (None: too few)."""
        self._trim(now)
        xs = [lat for _, r, lat in self.samples if r == size and lat == lat]
        if len(xs) < 8:
            return None
        q1, q3 = np.percentile(xs, [25, 75])
        return float(q3 - q1)

    def evaluate(self, now: float, table: LatencyTable, T: int, current: tuple) -> Decision:
        """Score and decide in one call (tests, tools); the daemon scores in the planner process."""
        hist = self.histogram(now)
        sc = score(table, T, current, hist, self.kind) if sum(hist.values()) >= self.min_batches else None
        return self.decide(now, sc, sum(hist.values()))

    def decide(self, now: float, sc: Score | None, n: int | None = None) -> Decision:
        d = self._decide(now, sc, sc.n if sc is not None else (n or 0))
        d.at = now
        self.last = d
        return d

    def _decide(self, now: float, sc: Score | None, n: int) -> Decision:
        if sc is None or n < self.min_batches:
            return Decision(False, "few_batches", f"only {n} batches in the window (need {self.min_batches})")
        cur_ms, best_ms, best = sc.current_ms, sc.best_ms, sc.best
        gain = cur_ms - best_ms
        base = dict(shape=best, plan=list(sc.plan), current_ms=cur_ms, best_ms=best_ms, gain_ms=gain)
        if gain <= 0 or best_ms >= cur_ms * (1 - self.min_improvement):
            self.streak, self.streak_n = None, 0
            return Decision(False, "no_gain", f"current shape is within {self.min_improvement:.0%} of the best "
                            f"({cur_ms:.2f} vs {best_ms:.2f} ms {self.kind})", **base)
        noise = self.noise_ms(now, sc.mode)
        floor = max(self.min_gain_ms, noise or 0.0)
        base["noise_ms"] = floor
        why = (f"shape {list(best)} predicted {best_ms:.2f} ms vs {cur_ms:.2f} ms ({self.kind}), {gain:.2f} ms "
               f"({1 - best_ms / cur_ms:.0%}) better over {n} batches (mode {sc.mode})")
        if gain < floor:
            self.streak, self.streak_n = None, 0
            return Decision(False, "below_noise", f"{why}; below the noise of measured batch latency ({floor:.2f} ms)", **base)
        rate = self.rate(now)
        cost_ms = self.cost.switch_s * rate * self.cost.slowdown * cur_ms      # latency added during a switch
        payback = cost_ms / (rate * gain) if rate > 0 else float("inf")
        base["payback_s"] = payback
        if payback > self.payback_s:
            self.streak, self.streak_n = None, 0
            return Decision(False, "no_payback", f"{why}; a switch ({self.cost.switch_s:.1f}s at {1 + self.cost.slowdown:.1f}x "
                            f"latency) would pay back after {payback:.0f}s (> {self.payback_s:.0f}s)", **base)
        if best == self.streak:
            self.streak_n += 1
        else:
            self.streak, self.streak_n = best, 1
        if now - self.last_reconfig < self.min_dwell_s:
            return Decision(False, "dwell", f"{why}; last reconfiguration {now - self.last_reconfig:.0f}s ago "
                            f"(< {self.min_dwell_s:.0f}s)", **base)
        if self.streak_n < self.confirmations:
            return Decision(False, "confirming", f"confirming ({self.streak_n}/{self.confirmations}): {why}", **base)
        return Decision(True, "switch", f"{why}; pays back in {payback:.0f}s", **base)

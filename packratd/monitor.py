"""Batch-size monitor and shift detector (pure logic: no processes, no sockets).

The dispatcher reports every batch it forms.  Over a sliding window (by time and by count) the
monitor keeps the distribution of batch sizes, and periodically asks: which instance shape
(multiset of thread counts) minimises the expected -- or a configured percentile of -- batch
latency over the sizes seen, when every batch is split optimally across that shape's instances?
It recommends a reconfiguration only with hysteresis:

* enough batches in the window (``min_batches``),
* at least ``min_dwell_s`` since the last reconfiguration,
* the best shape is predicted at least ``min_improvement`` better than the current one,
* and the same shape wins ``confirmations`` evaluations in a row (a brief burst does not flap it).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from .solver import LatencyTable, solve, split_batch


@dataclass
class Decision:
    reconfigure: bool
    reason: str
    shape: tuple = ()                   # thread counts of the recommended instances
    plan: list = field(default_factory=list)   # [(threads, batch share)] for the recommended shape
    current_ms: float | None = None     # objective for the current shape
    best_ms: float | None = None        # objective for the best shape
    at: float = 0.0

    def to_dict(self) -> dict:
        return {"reconfigure": self.reconfigure, "reason": self.reason, "shape": list(self.shape),
                "plan": [list(p) for p in self.plan], "current_ms": self.current_ms, "best_ms": self.best_ms}


def objective(table: LatencyTable, shape: tuple, hist: dict[int, int], kind: str = "mean") -> float:
    """Expected (kind="mean") or percentile (kind="p90" etc.) batch latency of a shape over a histogram."""
    sizes = sorted(hist)
    lat = []
    for b in sizes:
        try:
            _, ms = split_batch(table, list(shape), b)
        except ValueError:
            ms = float("inf")
        lat.append(ms)
    w = np.array([hist[b] for b in sizes], dtype=float)
    lat = np.array(lat)
    if kind == "mean":
        return float(np.sum(w * lat) / np.sum(w))
    q = float(kind[1:]) / 100.0
    order = np.argsort(lat)
    cum = np.cumsum(w[order]) / np.sum(w)
    return float(lat[order][np.searchsorted(cum, q - 1e-12)])


class Monitor:
    def __init__(self, window_s: float = 60.0, window_batches: int = 1000, min_batches: int = 50,
                 min_dwell_s: float = 30.0, min_improvement: float = 0.10, confirmations: int = 2,
                 objective: str = "mean"):
        self.window_s = window_s
        self.samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=window_batches)
        self.min_batches = min_batches
        self.min_dwell_s = min_dwell_s
        self.min_improvement = min_improvement
        self.confirmations = confirmations
        self.kind = objective
        self.last_reconfig = float("-inf")
        self.streak: tuple | None = None
        self.streak_n = 0
        self.last: Decision | None = None

    def observe(self, now: float, rows: int) -> None:
        self.samples.append((now, rows))

    def note_reconfigured(self, now: float) -> None:
        self.last_reconfig = now
        self.streak, self.streak_n = None, 0

    def histogram(self, now: float) -> dict[int, int]:
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()
        return dict(collections.Counter(r for _, r in self.samples))

    def candidates(self, table: LatencyTable, T: int, hist: dict[int, int]) -> set[tuple]:
        """Shapes worth scoring: the optimal plan's shape for each batch size seen (most common first, at most 16)."""
        shapes = set()
        for b, _ in sorted(hist.items(), key=lambda kv: -kv[1])[:16]:
            try:
                sol = solve(table, T, b, top_k=1)
            except ValueError:
                continue
            shapes.add(tuple(sorted(sol.best.threads, reverse=True)))
        return shapes

    def evaluate(self, now: float, table: LatencyTable, T: int, current: tuple) -> Decision:
        current = tuple(sorted(current, reverse=True))
        hist = self.histogram(now)
        n = sum(hist.values())
        d = self._evaluate(now, table, T, current, hist, n)
        d.at = now
        self.last = d
        return d

    def _evaluate(self, now, table, T, current, hist, n) -> Decision:
        if n < self.min_batches:
            return Decision(False, f"only {n} batches in the window (need {self.min_batches})")
        cur_ms = objective(table, current, hist, self.kind)
        scored = [(objective(table, s, hist, self.kind), s) for s in self.candidates(table, T, hist) | {current}]
        best_ms, best = min(scored, key=lambda x: (x[0], len(x[1]), x[1]))
        mode = max(hist.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if best == current or best_ms >= cur_ms * (1 - self.min_improvement):
            self.streak, self.streak_n = None, 0
            return Decision(False, f"current shape {list(current)} is within {self.min_improvement:.0%} of the best "
                            f"({cur_ms:.2f} vs {best_ms:.2f} ms {self.kind})", current, [], cur_ms, best_ms)
        shares, _ = split_batch(table, list(best), mode)
        plan = [(t, max(1, b)) for t, b in zip(best, shares)]
        if best == self.streak:
            self.streak_n += 1
        else:
            self.streak, self.streak_n = best, 1
        gain = 1 - best_ms / cur_ms
        why = (f"shape {list(best)} predicted {best_ms:.2f} ms vs {cur_ms:.2f} ms ({self.kind}) for current "
               f"{list(current)}, {gain:.0%} better, over {n} batches (mode {mode})")
        if now - self.last_reconfig < self.min_dwell_s:
            return Decision(False, f"dwell: {why}; last reconfiguration {now - self.last_reconfig:.0f}s ago "
                            f"(< {self.min_dwell_s:.0f}s)", best, plan, cur_ms, best_ms)
        if self.streak_n < self.confirmations:
            return Decision(False, f"confirming ({self.streak_n}/{self.confirmations}): {why}", best, plan, cur_ms, best_ms)
        return Decision(True, why, best, plan, cur_ms, best_ms)

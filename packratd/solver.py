"""Packrat plan solver: how to carve T cores and a batch of B rows into instances.

Background (Packrat, ICML 2025, arXiv 2311.18174): for a batch of ``B``
inputs on a host with ``T`` cores, several *thin* model instances running
concurrently -- each pinned to its own ``t_j`` cores and given a slice
``b_j`` of the batch -- can beat one *fat* instance that uses every core.

Input is a profiled latency table ``L[t][b]``: the latency (ms) of ONE
instance with ``t`` threads on a batch of ``b`` rows.  A *plan* is a multiset
of instances ``<t_j, b_j>`` (``b_j >= 1``) with ``sum t_j <= T`` and
``sum b_j == B``; its predicted latency is ``max_j L[t_j][b_j]``.
Instances may differ (``1x<6t,8> + 2x<4t,4>`` is a valid plan).

Algorithm (exact, no monotonicity assumptions on the table)
-----------------------------------------------------------
The optimal latency ``lam*`` is one of the table's values.  For a threshold
``lam`` only the cheapest thread count per slice size matters::

    c[b] = min{ t : L[t][b] <= lam }            (inf if none)
    f[s] = min_{1<=b<=s} f[s-b] + c[b],  f[0] = 0

and ``lam`` is feasible iff ``f[B] <= T``.  Feasibility is monotone in
``lam``, so a binary search over the sorted distinct finite table values
finds ``lam*`` with ``O(log(TB))`` probes.  Each probe costs ``O(TB)`` for
``c`` plus ``O(B^2)`` for the min-plus recurrence (one vectorised numpy
row per ``s``), i.e. ``O((TB + B^2) log(TB))`` overall, versus
``O(T^2 B^2)`` for the paper's 2-D DP.

Tie-break (documented rule): among all plans with the optimal max latency
the solver returns one with the fewest total threads, then the fewest
instances (the recurrence minimises the integer cost ``threads*(B+1) +
instances`` exactly).  Remaining ties are broken deterministically by the
reconstruction, which at every step takes the smallest slice size ``b``
achieving the optimum.  ``Plan.instances`` is sorted descending.

Fixed instances (``split_batch`` / ``split_table``)
---------------------------------------------------
For live instances with given thread counts the best split of ``s`` rows is
a (min, max)-convolution chain ``r = g (*) h``, ``r[s] = min_b max(g[s-b],
h[b])`` with ``h[0] = 0`` (an instance may get 0 rows).  Each convolution is
exact: ``O(N log N)`` by binary search when both operands are non-decreasing
(the usual case), otherwise an ``O(N^2)`` vectorised min over a Toeplitz
view.  Identical instances are combined by repeated squaring (``O(log k)``
convolutions for ``k`` copies).  Every convolution returns the minimum and
its *smallest* argmin, so results for a given total do not depend on the
horizon ``N``: ``split_table(L, th, N)[B] == split_batch(L, th, B)[0]``.
Within a group of equal thread counts the rows are sorted descending and,
where the row of latencies is non-decreasing up to the largest slice,
replaced by the balanced split (never worse; spreads the work).

Pure numpy; no processes, sockets or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .plan import Plan

__all__ = [
    "LatencyTable",
    "Plan",
    "Solution",
    "solve",
    "split_batch",
    "split_table",
]

_INF = math.inf


# ----------------------------------------------------------------------------
# Latency table
# ----------------------------------------------------------------------------


def _as_int_list(name: str, values) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            if isinstance(v, (float, np.floating)) and float(v).is_integer():
                v = int(v)
            else:
                raise ValueError(f"{name} must be integers, got {v!r}")
        out.append(int(v))
    return out


class LatencyTable:
    """Profiled ``L[t][b]`` (ms) on a grid.

    ``threads``: strictly increasing positive ints (e.g. ``1..T1``).
    ``batches``: strictly increasing positive ints (e.g. ``1,2,3,4,6,8,12,...``).
    ``lat_ms``: array ``[len(threads), len(batches)]``; NaN (or +inf) means
    "not measured" (a gap).  Negative values are rejected.

    Interpolation rules of :meth:`at` (and :meth:`dense`, which is exactly
    ``at`` on every cell):

    * ``t`` not in the thread grid -> ``inf``.  Thread counts are never
      invented: scaling across thread counts is not smooth on real hosts
      (SMT siblings, NUMA, cache sharing), so only profiled counts are used.
    * ``b`` between two measured batch sizes of row ``t`` -> linear in ``b``;
      gaps (NaN) are skipped, i.e. interpolation uses the nearest measured
      neighbours.  Exact at measured grid points.
    * ``b`` below the smallest measured batch of row ``t`` -> the value at the
      smallest measured batch (flat; a conservative upper bound as long as
      latency does not decrease with batch size).
    * ``b`` beyond the largest measured batch of row ``t`` -> linear
      extrapolation from the last two measured points, with the slope clamped
      at >= 0 (a noisy negative slope must not predict free rows).  With a
      single measured point, ``L(b) = v0 * b / b0`` (latency proportional to
      rows).
    * row ``t`` with no measured point at all -> ``inf`` (unusable).
    * ``b == 0`` -> ``0.0`` (no work); ``b < 0`` -> ``ValueError``.
    """

    def __init__(self, threads, batches, lat_ms):
        th = _as_int_list("threads", threads)
        bs = _as_int_list("batches", batches)
        if not th or not bs:
            raise ValueError("LatencyTable needs at least one thread count and one batch size")
        if th[0] < 1 or any(b <= a for a, b in zip(th, th[1:])):
            raise ValueError(f"threads must be strictly increasing positive ints, got {th}")
        if bs[0] < 1 or any(b <= a for a, b in zip(bs, bs[1:])):
            raise ValueError(f"batches must be strictly increasing positive ints, got {bs}")
        lat = np.array(lat_ms, dtype=float)
        if lat.shape != (len(th), len(bs)):
            raise ValueError(
                f"lat_ms has shape {lat.shape}, expected {(len(th), len(bs))} "
                "(len(threads), len(batches))"
            )
        if np.any(lat == -_INF) or np.any(lat[np.isfinite(lat)] < 0):
            raise ValueError("latencies must be >= 0 (NaN marks a gap)")
        lat[~np.isfinite(lat)] = np.nan
        lat.setflags(write=False)
        self._threads = tuple(th)
        self._batches = tuple(bs)
        self._lat = lat
        self._tindex = {t: i for i, t in enumerate(th)}
        self._barr = np.array(bs, dtype=float)

    # -- accessors -----------------------------------------------------------
    @property
    def threads(self) -> tuple[int, ...]:
        return self._threads

    @property
    def batches(self) -> tuple[int, ...]:
        return self._batches

    @property
    def lat_ms(self) -> np.ndarray:
        """Read-only ``[len(threads), len(batches)]`` array, NaN = gap."""
        return self._lat

    @property
    def max_threads(self) -> int:
        return self._threads[-1]

    def __repr__(self) -> str:
        return (
            f"LatencyTable(threads={list(self._threads)}, batches={list(self._batches)}, "
            f"measured={int(np.isfinite(self._lat).sum())}/{self._lat.size})"
        )

    def __eq__(self, other) -> bool:
        if not isinstance(other, LatencyTable):
            return NotImplemented
        return (
            self._threads == other._threads
            and self._batches == other._batches
            and np.array_equal(self._lat, other._lat, equal_nan=True)
        )

    __hash__ = None  # mutable-looking container semantics; not hashable

    # -- interpolation ---------------------------------------------------------
    def _row(self, t: int, b: np.ndarray) -> np.ndarray:
        """Latency of ``t`` threads for the positive int batch sizes ``b``."""
        b = np.asarray(b, dtype=float)
        i = self._tindex.get(int(t))
        if i is None:
            return np.full(b.shape, _INF)
        row = self._lat[i]
        m = ~np.isnan(row)
        if not m.any():
            return np.full(b.shape, _INF)
        xs = self._barr[m]
        vs = row[m]
        out = np.empty(b.shape, dtype=float)
        n = len(xs)
        left = b <= xs[0]
        out[left] = vs[0]
        right = b > xs[-1]
        if n == 1:
            out[right] = vs[0] * b[right] / xs[0]
        else:
            slope = max((vs[-1] - vs[-2]) / (xs[-1] - xs[-2]), 0.0)
            out[right] = vs[-1] + slope * (b[right] - xs[-1])
            mid = ~(left | right)
            if mid.any():
                bm = b[mid]
                # xs[j] < bm <= xs[j+1]
                j = np.searchsorted(xs, bm, side="left") - 1
                x0, x1 = xs[j], xs[j + 1]
                v0, v1 = vs[j], vs[j + 1]
                at_hi = bm == x1
                val = v0 + (v1 - v0) * ((bm - x0) / (x1 - x0))
                out[mid] = np.where(at_hi, v1, val)
        return out

    def at(self, t: int, b: int) -> float:
        """Interpolated latency (ms) of one ``t``-thread instance on ``b`` rows."""
        t = int(t)
        b = int(b)
        if b < 0:
            raise ValueError(f"batch size must be >= 0, got {b}")
        if b == 0:
            return 0.0
        return float(self._row(t, np.array([b]))[0])

    def dense(self, T: int, B: int) -> np.ndarray:
        """Array ``[T+1, B+1]`` with ``[t][b] = at(t, b)`` for ``t, b >= 1``.

        Row 0 and column 0 are ``inf`` (callers treat ``b = 0`` as 0 ms);
        rows for ``t`` not in the thread grid (including ``t`` beyond the
        table's max threads) are ``inf``.
        """
        T = int(T)
        B = int(B)
        if T < 0 or B < 0:
            raise ValueError("dense() needs T >= 0 and B >= 0")
        out = np.full((T + 1, B + 1), _INF)
        if B == 0:
            return out
        bs = np.arange(1, B + 1)
        for t in self._threads:
            if t > T:
                break
            out[t, 1:] = self._row(t, bs)
        return out

    # -- serialisation ---------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able dict; gaps are ``None``."""
        return {
            "threads": list(self._threads),
            "batches": list(self._batches),
            "lat_ms": [[None if np.isnan(v) else float(v) for v in row] for row in self._lat],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        try:
            lat = [[np.nan if v is None else float(v) for v in row] for row in d["lat_ms"]]
            return cls(d["threads"], d["batches"], lat)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed latency table dict: {e}") from None


# ----------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Solution:
    """``best`` plan plus next-best plans of different instance shapes.

    ``runners_up`` holds at most ``max(top_k, 1)`` plans sorted best first
    (by latency, then total threads, then instances); every plan has a
    different shape (multiset of thread counts) from ``best`` and from the
    others.  The single fat instance (see :func:`solve`) is always present in
    ``best`` or ``runners_up`` when it is usable at all.
    """

    best: Plan
    runners_up: tuple[Plan, ...]
    fat: Plan | None = None
    """The single fat instance ``<min(T, table max), B>`` (falling back to the
    most threads usable at ``B``); it is ``best`` or one of ``runners_up``
    (same object).  None when ``B == 0`` or no single instance is usable."""

    @property
    def plans(self) -> tuple[Plan, ...]:
        return (self.best,) + self.runners_up


def _make_plan(inst, D) -> Plan:
    inst = tuple(sorted(((int(t), int(b)) for t, b in inst), reverse=True))
    lat = max((float(D[t][b]) for t, b in inst), default=0.0)
    return Plan(inst, lat)


def _rank(p: Plan):
    return (p.latency_ms, p.total_threads, p.n_instances, p.instances)


# ----------------------------------------------------------------------------
# Input normalisation
# ----------------------------------------------------------------------------


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {v!r}")
    v = int(v)
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def _clean_dense(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=float)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"dense latency table must be 2-D [T'+1, B'+1], got shape {a.shape}")
    body = a[1:, 1:]
    if np.any(body == -_INF) or np.any(body[np.isfinite(body)] < 0):
        raise ValueError("latencies must be >= 0 (NaN/inf mark unusable entries)")
    a[~np.isfinite(a)] = _INF
    a[0, :] = _INF
    a[:, 0] = _INF
    return a


def _dense(L, T: int, B: int) -> np.ndarray:
    """Dense ``[Tm+1, B+1]`` table (inf = unusable), ``Tm = min(T, table rows)``."""
    if isinstance(L, LatencyTable):
        return L.dense(min(T, L.max_threads), B)
    if isinstance(L, np.ndarray):
        a = _clean_dense(L)
        if a.shape[1] - 1 < B:
            raise ValueError(
                f"dense table covers batches up to {a.shape[1] - 1}, need {B}; "
                "use a LatencyTable to extrapolate"
            )
        return a[: min(T, a.shape[0] - 1) + 1, : B + 1]
    raise TypeError(f"latency table must be a LatencyTable or numpy array, got {type(L).__name__}")


def _rows(L, threads: Sequence[int], N: int) -> dict[int, np.ndarray]:
    """Per distinct thread count: ``h[0..N]`` with ``h[0] = 0`` and inf = unusable."""
    out: dict[int, np.ndarray] = {}
    if isinstance(L, LatencyTable):
        bs = np.arange(1, N + 1)
        for t in set(threads):
            h = np.empty(N + 1)
            h[0] = 0.0
            h[1:] = L._row(t, bs)
            out[t] = h
        return out
    if isinstance(L, np.ndarray):
        a = _clean_dense(L)
        if a.shape[1] - 1 < N:
            raise ValueError(
                f"dense table covers batches up to {a.shape[1] - 1}, need {N}; "
                "use a LatencyTable to extrapolate"
            )
        for t in set(threads):
            h = np.full(N + 1, _INF)
            if t < a.shape[0]:
                h[1:] = a[t, 1 : N + 1]
            h[0] = 0.0
            out[t] = h
        return out
    raise TypeError(f"latency table must be a LatencyTable or numpy array, got {type(L).__name__}")


# ----------------------------------------------------------------------------
# solve
# ----------------------------------------------------------------------------

_BIG = np.int64(1) << np.int64(60)


def _partition(c: np.ndarray, B: int, K: int):
    """Min-plus recurrence ``f[s] = min_b f[s-b] + w[b]`` with ``w = c*K + 1``.

    ``c[b]`` (b = 1..B) is the thread cost of a slice of ``b`` rows (>= _BIG:
    unusable).  Returns ``(f, arg)``; ``arg[s]`` is the smallest optimal last
    slice.
    """
    usable = c < _BIG
    w = np.where(usable, np.where(usable, c, 0) * K + 1, _BIG)
    w[0] = _BIG
    f = np.empty(B + 1, dtype=np.int64)
    arg = np.zeros(B + 1, dtype=np.int64)
    f[0] = 0
    big = int(_BIG)
    for s in range(1, B + 1):
        cand = f[s - 1 :: -1] + w[1 : s + 1]
        j = int(cand.argmin())
        v = int(cand[j])
        f[s] = v if v < big else big
        arg[s] = j + 1
    return f, arg


class _Probe:
    """Feasibility probes at thresholds over a dense table."""

    def __init__(self, D: np.ndarray, T: int, B: int):
        self.D = D
        self.T = T
        self.B = B
        self.K = B + 1
        self.V = D[1:, 1:]  # [Tm, B]

    def run(self, lam: float):
        """Return the min-(threads, instances) plan with max latency <= lam, or None."""
        ok = self.V <= lam
        anyok = ok.any(axis=0)
        c = np.full(self.B + 1, _BIG, dtype=np.int64)
        c[1:] = np.where(anyok, ok.argmax(axis=0) + 1, _BIG)
        f, arg = _partition(c, self.B, self.K)
        fb = int(f[self.B])
        if fb >= int(_BIG) or fb // self.K > self.T:
            return None
        inst = []
        s = self.B
        while s > 0:
            b = int(arg[s])
            inst.append((int(c[b]), b))
            s -= b
        return _make_plan(inst, self.D)


def _fat_plan(D: np.ndarray, B: int) -> Plan | None:
    """Single instance with the most threads ``<= min(T, table max)`` usable at ``B``."""
    col = D[1:, B]
    usable = np.nonzero(np.isfinite(col))[0]
    if usable.size == 0:
        return None
    t = int(usable[-1]) + 1
    return Plan(((t, B),), float(D[t, B]))


def solve(L, T: int, B: int, top_k: int = 4) -> Solution:
    """Optimal plan for ``B`` rows on ``T`` cores.

    ``L`` is a :class:`LatencyTable` or a dense array ``[T'+1, B'+1]``
    (``[t][b]``, row/column 0 ignored, NaN/inf = unusable, ``B' >= B``).

    ``best`` minimises the max latency exactly; ties -> fewest total threads,
    then fewest instances (module docstring).  ``runners_up`` are the best
    plans found for other instance shapes, drawn from: the plans met during
    the threshold search, homogeneous full-machine shapes ``k x <T//k t>``
    (``k`` a power of two, or ``best``'s instance count; each optimally split
    with :func:`split_batch`'s algorithm) and the single *fat* instance --
    one instance with the most usable threads ``<= min(T, table max)`` --
    which is always included unless it is ``best`` (so the daemon knows when
    to keep one fat instance).  At most ``max(top_k, 1)`` runners-up.

    ``B == 0`` -> empty plan, 0 ms.  Raises ``ValueError`` on bad arguments or
    when no plan exists (e.g. no usable table entries).
    """
    T = _check_int("T", T, 1)
    B = _check_int("B", B, 0)
    top_k = _check_int("top_k", top_k, 0)
    if B == 0:
        return Solution(Plan((), 0.0), (), None)
    D = _dense(L, T, B)
    Tm = D.shape[0] - 1
    V = D[1:, 1:]
    finite = V[np.isfinite(V)]
    if finite.size == 0:
        raise ValueError(f"no usable latency entries for T={T} threads, batches 1..{B}")
    vals = np.unique(finite)
    probe = _Probe(D, T, B)
    found: list[Plan] = []
    top = probe.run(float(vals[-1]))
    if top is None:
        raise ValueError(
            f"no plan covers B={B} rows with at most T={T} threads using the usable table entries"
        )
    found.append(top)
    lo, hi = 0, len(vals) - 1  # vals[hi] feasible
    best = top
    while lo < hi:
        mid = (lo + hi) // 2
        p = probe.run(float(vals[mid]))
        if p is None:
            lo = mid + 1
        else:
            hi = mid
            best = p
            found.append(p)
    # best was produced by the probe at vals[hi], the smallest feasible value,
    # so its max latency is exactly vals[hi].
    assert best.latency_ms == float(vals[hi])

    # ---- runners-up -----------------------------------------------------------
    fat = _fat_plan(D, B)
    cands: dict[tuple[int, ...], Plan] = {}

    def offer(p: Plan | None):
        if p is None or not p.instances:
            return
        old = cands.get(p.shape)
        if old is None or _rank(p) < _rank(old):
            cands[p.shape] = p

    for p in found:
        offer(p)
    offer(fat)
    usable_t = np.nonzero(np.isfinite(V).any(axis=1))[0] + 1  # sorted thread counts
    ks = set()
    k = 1
    while k <= min(T, B):
        ks.add(k)
        k *= 2
    if best.n_instances <= min(T, B):
        ks.add(best.n_instances)
    for k in sorted(ks):
        tmax = min(T // k, Tm)
        pos = np.searchsorted(usable_t, tmax, side="right") - 1
        if pos < 0:
            continue
        t = int(usable_t[pos])
        try:
            rows, _lat = _split(_dense_row(D, t, B), [t] * k, B, single=True)
        except ValueError:
            continue
        offer(_make_plan([(t, b) for b in rows[:, 0] if b > 0], D))

    best_shape = best.shape
    others = sorted((p for s, p in cands.items() if s != best_shape), key=_rank)
    limit = max(top_k, 1)
    runners = [p for p in others if fat is None or p.shape != fat.shape][:top_k]
    if fat is not None:
        if fat.shape == best_shape:
            fat = best
        else:
            fat = cands[fat.shape]
            if len(runners) >= limit:
                runners[-1] = fat
            else:
                runners.append(fat)
            runners.sort(key=_rank)
    return Solution(best, tuple(runners), fat)


def _dense_row(D: np.ndarray, t: int, N: int) -> dict[int, np.ndarray]:
    h = np.empty(N + 1)
    h[0] = 0.0
    h[1:] = D[t, 1 : N + 1]
    return {t: h}


# ----------------------------------------------------------------------------
# (min, max)-convolution machinery for fixed instances
# ----------------------------------------------------------------------------


def _nondecreasing(a: np.ndarray) -> bool:
    return bool(np.all(a[1:] >= a[:-1]))


def _conv_monotone(g: np.ndarray, h: np.ndarray):
    """Exact ``r[s] = min_b max(g[s-b], h[b])`` for non-decreasing g, h (g[0]=0, h>=0).

    Returns the minimum and the smallest argmin, like :func:`_conv_dense`.
    """
    N = len(g) - 1
    s = np.arange(N + 1)
    iters = max(1, int(N).bit_length() + 1)
    # b1 = smallest b in [0, s] with h[b] >= g[s-b]  (true at b = s)
    lo = np.zeros(N + 1, dtype=np.int64)
    hi = s.copy()
    for _ in range(iters):
        mid = (lo + hi) >> 1
        p = h[mid] >= g[s - mid]
        hi = np.where(p, mid, hi)
        lo = np.where(p, lo, mid + 1)
    b1 = hi
    v = h[b1]
    has_left = b1 >= 1
    gl = g[np.where(has_left, s - b1 + 1, 0)]
    v = np.where(has_left, np.minimum(v, gl), v)
    # smallest b in [0, b1] with g[s-b] <= v
    lo = np.zeros(N + 1, dtype=np.int64)
    hi = b1.copy()
    for _ in range(iters):
        mid = (lo + hi) >> 1
        p = g[s - mid] <= v
        hi = np.where(p, mid, hi)
        lo = np.where(p, lo, mid + 1)
    return v, hi


def _conv_dense(g: np.ndarray, h: np.ndarray, chunk: int = 256):
    """Exact ``r[s] = min_b max(g[s-b], h[b])``, smallest argmin; O(N^2) vectorised."""
    N = len(g) - 1
    gp = np.concatenate([np.full(N, _INF), g])
    gr = gp[::-1].copy()
    W = np.lib.stride_tricks.sliding_window_view(gr, N + 1)  # W[i, b] = gr[i + b]
    A = W[::-1]  # A[s, b] = g[s - b] (inf for b > s)
    r = np.empty(N + 1)
    arg = np.empty(N + 1, dtype=np.int64)
    for s0 in range(0, N + 1, chunk):
        s1 = min(N + 1, s0 + chunk)
        M = np.maximum(A[s0:s1, :s1], h[:s1])
        a = M.argmin(axis=1)
        arg[s0:s1] = a
        r[s0:s1] = M[np.arange(s1 - s0), a]
    return r, arg


def _conv(g: np.ndarray, h: np.ndarray):
    if _nondecreasing(g) and _nondecreasing(h):
        return _conv_monotone(g, h)
    return _conv_dense(g, h)


class _Node:
    __slots__ = ("r", "arg", "left", "right")

    def __init__(self, r, arg=None, left=None, right=None):
        self.r = r
        self.arg = arg
        self.left = left
        self.right = right


def _join(a: _Node, b: _Node) -> _Node:
    r, arg = _conv(a.r, b.r)
    return _Node(r, arg, a, b)


def _group_node(h: np.ndarray, k: int) -> _Node:
    powers = [_Node(h)]
    while (1 << len(powers)) <= k:
        powers.append(_join(powers[-1], powers[-1]))
    acc = None
    for i, p in enumerate(powers):
        if (k >> i) & 1:
            acc = p if acc is None else _join(acc, p)
    return acc


def _expand(node: _Node, S: np.ndarray, out: list):
    stack = [(node, S)]
    # iterative pre-order, left before right
    while stack:
        nd, s = stack.pop()
        if nd.arg is None:
            out.append(s)
            continue
        b = nd.arg[s]
        stack.append((nd.right, b))
        stack.append((nd.left, s - b))


def _mono_prefix(h: np.ndarray) -> int:
    """Largest n such that h is non-decreasing on [0..n]."""
    bad = np.nonzero(~(h[1:] >= h[:-1]))[0]
    return int(bad[0]) if bad.size else len(h) - 1


def _split(rows: dict[int, np.ndarray], threads: Sequence[int], N: int, single: bool = False):
    """Best split for every total ``0..N`` (or only ``N`` if ``single``).

    Returns ``(R, lat)``: ``R[i, j]`` rows for instance ``i`` (input order) at
    total ``S[j]`` and the predicted latency per column.  Raises ValueError if
    some total is infeasible.
    """
    n = len(threads)
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(threads):
        groups.setdefault(t, []).append(i)
    order = sorted(groups, reverse=True)
    root = None
    for t in order:
        g = _group_node(rows[t], len(groups[t]))
        root = g if root is None else _join(root, g)
    S = np.array([N]) if single else np.arange(N + 1)
    bad = ~np.isfinite(root.r[S])
    if bad.any():
        first = int(S[np.nonzero(bad)[0][0]])
        raise ValueError(
            f"cannot split {first} rows over instances with threads {list(threads)}: "
            "no usable latency entries"
        )
    leaves: list[np.ndarray] = []
    _expand(root, S, leaves)
    R = np.zeros((n, len(S)), dtype=np.int64)
    pos = 0
    lat = np.zeros(len(S))
    for t in order:
        idx = groups[t]
        k = len(idx)
        G = np.stack(leaves[pos : pos + k])  # [k, m]
        pos += k
        G = -np.sort(-G, axis=0)  # descending per column
        h = rows[t]
        mp = _mono_prefix(h)
        tot = G.sum(axis=0)
        swap = G[0] <= mp
        if swap.any() and k > 1:
            q, rem = np.divmod(tot, k)
            bal = q[None, :] + (np.arange(k)[:, None] < rem[None, :])
            G = np.where(swap[None, :], bal, G)
        R[idx, :] = G
        lat = np.maximum(lat, np.where(G > 0, h[G], 0.0).max(axis=0))
    assert pos == len(leaves)
    return R, lat


def _check_threads(threads) -> list[int]:
    out = []
    for t in threads:
        out.append(_check_int("thread count", t, 1))
    return out


def split_batch(L, threads: Sequence[int], B: int) -> tuple[list[int], float]:
    """Optimal split of ``B`` rows over fixed live instances.

    ``threads[i]`` is instance ``i``'s thread count (order preserved in the
    result).  Minimises the max predicted latency exactly; instances may get
    0 rows (latency 0).  Returns ``(rows per instance, predicted latency ms)``.
    Raises ``ValueError`` when no split is possible (e.g. no instance has a
    usable table row) or on bad arguments.
    """
    th = _check_threads(threads)
    B = _check_int("B", B, 0)
    if B == 0:
        return [0] * len(th), 0.0
    if not th:
        raise ValueError(f"cannot split {B} rows over zero instances")
    R, lat = _split(_rows(L, th, B), th, B, single=True)
    return [int(x) for x in R[:, 0]], float(lat[0])


def split_table(L, threads: Sequence[int], max_batch: int) -> list[list[int]]:
    """``split_batch(L, threads, B)[0]`` for every ``B`` in ``0..max_batch`` (index = B).

    Computed in one pass (the same convolutions serve every ``B``) and
    identical to calling :func:`split_batch` per ``B``.  Raises ``ValueError``
    if some ``B <= max_batch`` cannot be split.
    """
    th = _check_threads(threads)
    N = _check_int("max_batch", max_batch, 0)
    if not th:
        if N > 0:
            raise ValueError("cannot split rows over zero instances")
        return [[]]
    if N == 0:
        return [[0] * len(th)]
    R, _lat = _split(_rows(L, th, N), th, N)
    return R.T.tolist()

"""Tests for packratd.solver: exact plans against brute force, splits, tables."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packratd.solver import (
    LatencyTable,
    Plan,
    Solution,
    solve,
    split_batch,
    split_table,
)

pytestmark = pytest.mark.fast

INF = math.inf


# ----------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------


def _usable(D, t, b):
    return t < D.shape[0] and b < D.shape[1] and np.isfinite(D[t, b])


def brute_force(D, T, B):
    """Enumerate every multiset of <t, b> (b >= 1) with sum t <= T, sum b == B.

    Returns the lexicographic minimum of (max latency, total threads,
    instances) or None when no plan exists.
    """
    items = [
        (t, b)
        for t in range(1, min(T, D.shape[0] - 1) + 1)
        for b in range(1, B + 1)
        if _usable(D, t, b)
    ]
    best = None

    def rec(start, tl, bl, mx, nt, ni):
        nonlocal best
        if bl == 0:
            key = (mx, nt, ni)
            if best is None or key < best:
                best = key
            return
        for i in range(start, len(items)):
            t, b = items[i]
            if t <= tl and b <= bl:
                rec(i, tl - t, bl - b, max(mx, float(D[t, b])), nt + t, ni + 1)

    rec(0, T, B, 0.0, 0, 0)
    return best


def paper_dp(D, T, B):
    """The paper's O(T^2 B^2) DP: opt[t][b] = min max(opt[t-t'][b-b'], L[t'][b'])."""
    D = np.where(np.isnan(D), INF, D)
    Tm = min(T, D.shape[0] - 1)
    opt = np.full((T + 1, B + 1), INF)
    opt[:, 0] = 0.0
    for t in range(1, T + 1):
        for b in range(1, B + 1):
            v = opt[t - 1, b]  # leave a thread idle
            for t1 in range(1, min(t, Tm) + 1):
                row = D[t1, 1 : b + 1]
                cand = np.maximum(opt[t - t1, b - np.arange(1, b + 1)], row)
                v = min(v, float(np.min(cand)))
            opt[t, b] = v
    return opt[T, B]


def brute_split(D, threads, B):
    """Min over all splits (instances may get 0 rows) of the max latency."""
    best = INF
    n = len(threads)
    for comp in itertools.product(range(B + 1), repeat=n):
        if sum(comp) != B:
            continue
        lat = 0.0
        for t, b in zip(threads, comp):
            if b > 0:
                lat = max(lat, float(D[t, b]) if _usable(D, t, b) else INF)
        best = min(best, lat)
    return best


def assert_valid_plan(p: Plan, D, T, B):
    assert isinstance(p, Plan)
    assert p.total_threads <= T
    assert p.total_batch == B
    assert all(t >= 1 and b >= 1 for t, b in p.instances)
    assert list(p.instances) == sorted(p.instances, reverse=True)
    lat = max((float(D[t, b]) for t, b in p.instances), default=0.0)
    assert p.latency_ms == lat


def check_against_brute(solver, D, T, B):
    """The comparison helper the suite is built on (see test_broken_solvers_fail)."""
    ref = brute_force(D, T, B)
    if ref is None:
        with pytest.raises(ValueError):
            solver(D, T, B)
        return
    sol = solver(D, T, B)
    p = sol.best
    assert_valid_plan(p, D, T, B)
    # exact equality, and the documented tie-break (threads, then instances)
    assert (p.latency_ms, p.total_threads, p.n_instances) == ref


# ----------------------------------------------------------------------------
# Table generators (dense [T+1, B+1], row/col 0 unused)
# ----------------------------------------------------------------------------


def monotone_table(rng, T, B):
    """Latency increasing in b, decreasing in t with diminishing returns."""
    a = rng.uniform(0.5, 3.0)
    c = rng.uniform(0.2, 2.0)
    alpha = rng.uniform(0.3, 1.0)
    t = np.arange(T + 1, dtype=float)[:, None]
    b = np.arange(B + 1, dtype=float)[None, :]
    L = a + c * b / np.maximum(t, 1.0) ** alpha + rng.uniform(0, 0.05, (T + 1, 1)) * t
    L = np.round(L, 2)  # coarse values -> ties
    L = np.maximum.accumulate(L, axis=1)
    L[0, :] = INF
    L[:, 0] = INF
    return L


def nonmonotone_table(rng, T, B, gaps=0.0, levels=None):
    L = rng.uniform(1, 10, (T + 1, B + 1))
    if levels:
        L = np.floor(L * levels / 10.0)  # few distinct values -> many ties
    if gaps:
        L[rng.random(L.shape) < gaps] = np.nan
    L[0, :] = INF
    L[:, 0] = INF
    return L


def solve_best(D, T, B):
    return solve(D, T, B)


# ----------------------------------------------------------------------------
# solve vs brute force
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_monotone_vs_brute(seed):
    rng = np.random.default_rng(seed)
    T = int(rng.integers(1, 6))
    B = int(rng.integers(1, 9))
    D = monotone_table(rng, T, B)
    check_against_brute(solve_best, D, T, B)


@pytest.mark.parametrize("seed", range(60))
def test_nonmonotone_vs_brute(seed):
    rng = np.random.default_rng(1000 + seed)
    T = int(rng.integers(1, 6))
    B = int(rng.integers(1, 9))
    D = nonmonotone_table(rng, T, B, gaps=[0.0, 0.2, 0.5][seed % 3], levels=[None, 4][seed % 2])
    check_against_brute(solve_best, D, T, B)


@pytest.mark.parametrize("seed", range(8))
def test_matches_paper_dp_medium(seed):
    rng = np.random.default_rng(2000 + seed)
    T = int(rng.integers(6, 11))
    B = int(rng.integers(8, 20))
    D = monotone_table(rng, T, B) if seed % 2 else nonmonotone_table(rng, T, B, gaps=0.1)
    sol = solve(D, T, B)
    assert_valid_plan(sol.best, D, T, B)
    assert sol.best.latency_ms == paper_dp(D, T, B)


@st.composite
def small_problem(draw):
    T = draw(st.integers(1, 5))
    B = draw(st.integers(1, 8))
    Tr = draw(st.integers(1, 6))  # table rows may be fewer or more than T
    vals = st.one_of(
        st.integers(1, 6).map(float),
        st.just(float("nan")),
        st.floats(0.0, 50.0, allow_nan=False),
    )
    cells = draw(st.lists(vals, min_size=Tr * B, max_size=Tr * B))
    D = np.full((Tr + 1, B + 1), INF)
    D[1:, 1:] = np.array(cells).reshape(Tr, B)
    return D, T, B


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problem())
def test_property_solve_vs_brute(prob):
    D, T, B = prob
    check_against_brute(solve_best, D, T, B)


@settings(max_examples=60, deadline=None)
@given(small_problem(), st.integers(0, 5))
def test_property_runners_up(prob, top_k):
    D, T, B = prob
    if brute_force(D, T, B) is None:
        return
    sol = solve(D, T, B, top_k=top_k)
    check_solution_invariants(sol, D, T, B, top_k)


def check_solution_invariants(sol: Solution, D, T, B, top_k):
    assert isinstance(sol, Solution)
    assert len(sol.runners_up) <= max(top_k, 1)
    shapes = [sol.best.shape] + [p.shape for p in sol.runners_up]
    assert len(set(shapes)) == len(shapes), shapes
    prev = None
    for p in sol.runners_up:
        assert_valid_plan(p, D, T, B)
        assert p.latency_ms >= sol.best.latency_ms
        key = (p.latency_ms, p.total_threads, p.n_instances)
        assert prev is None or key >= prev
        prev = key
    # the fat instance is always reported unless it is the best plan
    col = D[1 : min(T, D.shape[0] - 1) + 1, B]
    usable = np.nonzero(np.isfinite(col))[0]
    if usable.size:
        tf = int(usable[-1]) + 1
        fat = sol.fat
        assert fat is not None and fat.shape == (tf,)
        assert fat.instances == ((tf, B),)
        assert any(p is fat for p in sol.plans)
    else:
        assert sol.fat is None


@pytest.mark.parametrize("seed", range(10))
def test_runners_up_invariants_larger(seed):
    rng = np.random.default_rng(3000 + seed)
    T, B = 16, 40
    D = monotone_table(rng, T, B) if seed % 2 else nonmonotone_table(rng, T, B, gaps=0.1)
    sol = solve(D, T, B, top_k=4)
    assert_valid_plan(sol.best, D, T, B)
    check_solution_invariants(sol, D, T, B, 4)


def test_fat_in_runners_up_when_thin_wins():
    # thin instances are much better: L = 1 + b / t^0.3
    T, B = 8, 16
    t = np.arange(T + 1, dtype=float)[:, None]
    b = np.arange(B + 1, dtype=float)[None, :]
    D = 1 + b / np.maximum(t, 1) ** 0.3
    sol = solve(D, T, B, top_k=1)
    assert sol.best.n_instances > 1
    assert sol.runners_up[-1].instances == ((8, 16),)
    assert sol.fat.instances == ((8, 16),)


def test_fat_best_when_scaling_is_perfect():
    # perfect scaling + big fixed cost per instance: one fat instance wins
    T, B = 8, 16
    t = np.arange(T + 1, dtype=float)[:, None]
    b = np.arange(B + 1, dtype=float)[None, :]
    D = b / np.maximum(t, 1)
    D = D + 0.0  # L[t][b] = b/t ; every full-machine plan ties at B/T
    sol = solve(D, T, B)
    assert sol.best.latency_ms == 2.0
    # ties -> fewest threads (8), then fewest instances (1)
    assert sol.best.instances == ((8, 16),)
    assert sol.runners_up == () or all(p.shape != (8,) for p in sol.runners_up)


def test_mixed_plan_is_found():
    # only <6t,8> and <4t,4> are fast; optimum needs a mixed plan on 14 cores
    T, B = 14, 17
    D = np.full((T + 1, B + 1), 100.0)
    D[6, 9] = 5.0
    D[4, 4] = 5.0
    sol = solve(D, T, B)
    assert sol.best.instances == ((6, 9), (4, 4), (4, 4))
    assert sol.best.latency_ms == 5.0
    assert str(sol.best) == "6:9,2x4:4"
    assert sol.best.describe() == "6:9,2x4:4 (predicted 5.0 ms)"
    assert sol.fat.instances == ((14, 17),) and sol.fat in sol.runners_up


# ----------------------------------------------------------------------------
# Corner cases
# ----------------------------------------------------------------------------


def test_b_zero_empty_plan():
    D = np.ones((3, 3))
    sol = solve(D, 2, 0)
    assert sol.best.instances == () and sol.best.latency_ms == 0.0
    assert sol.runners_up == () and sol.fat is None
    assert str(sol.best) == "<empty>"


def test_b_smaller_than_cores():
    rng = np.random.default_rng(7)
    T, B = 8, 3
    D = monotone_table(rng, T, B)
    sol = solve(D, T, B)
    assert_valid_plan(sol.best, D, T, B)
    assert sol.best.n_instances <= B
    assert sol.best.latency_ms == paper_dp(D, T, B)  # T=8 is past brute force; use the paper DP


def test_t_equals_one():
    rng = np.random.default_rng(8)
    D = monotone_table(rng, 4, 6)
    sol = solve(D, 1, 6)
    assert sol.best.instances == ((1, 6),)
    assert sol.best.latency_ms == D[1, 6]
    assert sol.runners_up == ()  # the fat instance is the best
    assert sol.fat is sol.best


def test_t_equals_one_nonmonotone_still_one_instance():
    D = np.full((2, 5), 9.0)
    D[1, 4] = 100.0
    D[1, 2] = 1.0
    sol = solve(D, 1, 4)
    assert sol.best.instances == ((1, 4),)
    assert sol.best.latency_ms == 100.0


def test_gaps_are_unusable():
    T, B = 4, 4
    D = np.full((T + 1, B + 1), 1.0)
    D[1, :] = np.nan  # thread count 1 never measured
    D[3, :] = np.nan
    D[4, :] = np.nan
    D[2, 4] = np.nan  # <2t,4> not measured
    # one t=2 instance fits in 2 cores, but its b=4 is a gap
    with pytest.raises(ValueError, match="no plan"):
        solve(D, 2, 4)
    sol = solve(D, 4, 4)  # two t=2 instances fit in 4 cores
    assert_valid_plan(sol.best, D, 4, 4)
    assert sol.best.threads == (2, 2)
    assert all(np.isfinite(D[t, b]) for t, b in sol.best.instances)


def test_infeasible_and_bad_arguments():
    with pytest.raises(ValueError, match="no usable"):
        solve(np.full((4, 4), np.nan), 3, 3)
    D = np.ones((4, 4))
    with pytest.raises(ValueError):
        solve(D, 0, 3)
    with pytest.raises(ValueError):
        solve(D, 3, -1)
    with pytest.raises(ValueError):
        solve(D, 3, 3, top_k=-1)
    with pytest.raises(ValueError, match="covers batches"):
        solve(D, 3, 4)
    with pytest.raises(ValueError):
        solve(np.array([[1.0, -2.0], [1.0, -2.0]]), 1, 1)
    with pytest.raises(TypeError):
        solve([[1.0]], 1, 1)
    # thread grid starting above T
    tab = LatencyTable([2, 4], [1, 2], [[1, 2], [1, 2]])
    with pytest.raises(ValueError, match="no usable"):
        solve(tab, 1, 2)


def test_rows_beyond_table_are_ignored():
    D = np.ones((3, 5))  # table only knows t <= 2
    sol = solve(D, 64, 4)
    assert_valid_plan(sol.best, D, 64, 4)
    assert sol.fat.instances == ((2, 4),)


def test_latency_table_input_equals_dense_input():
    rng = np.random.default_rng(11)
    threads = [1, 2, 3, 4, 6, 8]
    batches = [1, 2, 4, 8, 16]
    lat = np.array([[1 + b / t**0.8 for b in batches] for t in threads])
    lat *= rng.uniform(0.95, 1.05, lat.shape)
    tab = LatencyTable(threads, batches, lat)
    for T, B in [(8, 20), (5, 7), (12, 3)]:
        a = solve(tab, T, B)
        b = solve(tab.dense(T, B), T, B)
        assert a == b
        # thread counts outside the grid are never used
        assert all(t in threads for t, _ in a.best.instances)


# ----------------------------------------------------------------------------
# A deliberately wrong solver must fail the checks
# ----------------------------------------------------------------------------


def broken_fat_only(D, T, B):
    """Always one instance with as many threads as possible."""
    col = D[1 : min(T, D.shape[0] - 1) + 1, B]
    ok = np.nonzero(np.isfinite(col))[0]
    if ok.size == 0:
        raise ValueError("no plan")
    t = int(ok[-1]) + 1
    return Solution(Plan(((t, B),), float(D[t, B])), ())


def broken_balanced(D, T, B):
    """Always k = min(T, B) equal instances of T//k threads, balanced split."""
    k = min(T, B)
    t = T // k
    q, r = divmod(B, k)
    inst = tuple(sorted([(t, q + 1)] * r + [(t, q)] * (k - r), reverse=True))
    inst = tuple(x for x in inst if x[1] > 0)
    lat = max(float(D[t, b]) if _usable(D, t, b) else INF for t, b in inst)
    return Solution(Plan(inst, lat), ())


def broken_no_tiebreak(D, T, B):
    """Right latency, but spends every core (ignores the documented tie-break)."""
    sol = solve(D, T, B)
    p = sol.best
    t0, b0 = p.instances[0]
    spare = T - p.total_threads
    if spare and _usable(D, t0 + spare, b0) and D[t0 + spare, b0] <= p.latency_ms:
        inst = tuple(sorted(((t0 + spare, b0),) + p.instances[1:], reverse=True))
        return Solution(Plan(inst, p.latency_ms), ())
    return sol


@pytest.mark.parametrize(
    "solver, should_pass",
    [(solve_best, True), (broken_fat_only, False), (broken_balanced, False), (broken_no_tiebreak, False)],
    ids=["solve", "fat_only", "balanced", "no_tiebreak"],
)
def test_broken_solvers_fail(solver, should_pass):
    failures = 0
    for seed in range(40):
        rng = np.random.default_rng(5000 + seed)
        T = int(rng.integers(2, 6))
        B = int(rng.integers(2, 9))
        D = monotone_table(rng, T, B) if seed % 2 else nonmonotone_table(rng, T, B, levels=4)
        try:
            check_against_brute(solver, D, T, B)
        except (AssertionError, ValueError, pytest.fail.Exception):
            failures += 1
    if should_pass:
        assert failures == 0
    else:
        assert failures > 0, "the brute-force comparison could not tell a broken solver apart"


# ----------------------------------------------------------------------------
# split_batch / split_table
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_split_batch_vs_brute(seed):
    rng = np.random.default_rng(6000 + seed)
    Tr, Bmax = 6, 10
    if seed % 3 == 0:
        D = monotone_table(rng, Tr, Bmax)
    else:
        D = nonmonotone_table(rng, Tr, Bmax, gaps=0.15 * (seed % 2), levels=[None, 3][seed % 2])
    n = int(rng.integers(1, 5))
    threads = [int(x) for x in rng.integers(1, Tr + 1, n)]
    if seed % 4 == 0:
        threads = [threads[0]] * n  # identical instances (doubling path)
    for B in range(0, Bmax + 1):
        ref = brute_split(D, threads, B)
        if ref == INF:
            with pytest.raises(ValueError):
                split_batch(D, threads, B)
            continue
        rows, lat = split_batch(D, threads, B)
        assert len(rows) == len(threads) and sum(rows) == B and min(rows) >= 0
        got = max((float(D[t, b]) for t, b in zip(threads, rows) if b > 0), default=0.0)
        assert lat == got == ref


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.lists(st.one_of(st.integers(1, 5).map(float), st.just(float("nan"))), min_size=32, max_size=32),
    st.integers(0, 8),
)
def test_property_split_batch(threads, cells, B):
    D = np.full((5, 9), INF)
    D[1:, 1:] = np.array(cells).reshape(4, 8)
    ref = brute_split(D, threads, B)
    if ref == INF:
        with pytest.raises(ValueError):
            split_batch(D, threads, B)
        return
    rows, lat = split_batch(D, threads, B)
    assert sum(rows) == B and lat == ref


@pytest.mark.parametrize("seed", range(12))
def test_split_table_consistent_with_split_batch(seed):
    rng = np.random.default_rng(7000 + seed)
    Tr, N = 8, 60
    D = monotone_table(rng, Tr, N) if seed % 2 else nonmonotone_table(rng, Tr, N, levels=[None, 5][seed % 3 == 0])
    n = int(rng.integers(1, 9))
    threads = [int(x) for x in rng.integers(1, Tr + 1, n)]
    if seed % 4 == 0:
        threads = sorted(threads * 2)
    tab = split_table(D, threads, N)
    assert len(tab) == N + 1
    for B in range(N + 1):
        rows, lat = split_batch(D, threads, B)
        assert tab[B] == rows, B
        assert sum(rows) == B


def test_split_balanced_for_monotone_identical():
    t = np.arange(5, dtype=float)[:, None]
    b = np.arange(21, dtype=float)[None, :]
    D = 1 + b / np.maximum(t, 1)
    rows, lat = split_batch(D, [2, 2, 2], 10)
    assert rows == [4, 3, 3] and lat == D[2, 4]
    rows, lat = split_batch(D, [4, 2, 4], 2)  # B < instances: some get 0 rows
    assert sorted(rows) == [0, 1, 1] and rows[1] == 0
    assert split_table(D, [2, 2, 2], 4) == [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [2, 1, 1]]


def test_split_corner_cases():
    D = np.ones((3, 5))
    assert split_batch(D, [1, 2], 0) == ([0, 0], 0.0)
    assert split_batch(D, [], 0) == ([], 0.0)
    with pytest.raises(ValueError):
        split_batch(D, [], 3)
    with pytest.raises(ValueError):
        split_batch(D, [0], 3)
    with pytest.raises(ValueError):
        split_batch(D, [1], -1)
    with pytest.raises(ValueError, match="cannot split"):
        split_batch(D, [7, 9], 2)  # thread counts unknown to the table
    rows, lat = split_batch(D, [7, 1], 3)  # the unknown one just gets 0 rows
    assert rows == [0, 3] and lat == 1.0
    assert split_table(D, [1, 2], 0) == [[0, 0]]
    assert split_table(D, [], 0) == [[]]
    with pytest.raises(ValueError):
        split_table(D, [9], 3)
    with pytest.raises(ValueError, match="covers batches"):
        split_table(D, [1], 10)


def test_split_with_latency_table_extrapolates():
    tab = LatencyTable([1, 2], [1, 2, 4], [[1.0, 2.0, 4.0], [0.6, 1.1, 2.1]])
    rows, lat = split_batch(tab, [1, 2], 12)
    assert sum(rows) == 12
    D = tab.dense(2, 12)
    assert lat == max(D[t, b] for t, b in zip([1, 2], rows) if b)
    assert lat == brute_split(D, [1, 2], 12)
    assert split_table(tab, [1, 2], 12)[12] == rows


def test_split_table_large_shapes_valid():
    rng = np.random.default_rng(99)
    D = nonmonotone_table(rng, 16, 200)
    threads = [int(x) for x in rng.integers(1, 17, 12)] + [3, 3, 3]
    tab = split_table(D, threads, 200)
    for B in (0, 1, 7, 64, 199, 200):
        assert sum(tab[B]) == B
    rows, lat = split_batch(D, threads, 200)
    assert tab[200] == rows


# ----------------------------------------------------------------------------
# LatencyTable
# ----------------------------------------------------------------------------


def make_table():
    threads = [1, 2, 4]
    batches = [1, 2, 4, 8]
    lat = [
        [1.0, 2.0, 4.0, 8.0],
        [0.6, np.nan, 2.2, 4.2],  # gap at b=2
        [np.nan, np.nan, np.nan, np.nan],  # never measured
    ]
    return LatencyTable(threads, batches, lat)


def test_table_exact_at_grid_points():
    tab = make_table()
    for i, t in enumerate(tab.threads):
        for j, b in enumerate(tab.batches):
            v = tab.lat_ms[i, j]
            if not np.isnan(v):
                assert tab.at(t, b) == v


def test_table_linear_between_and_gap_skipping():
    tab = make_table()
    assert tab.at(1, 3) == pytest.approx(3.0)
    assert tab.at(1, 6) == pytest.approx(6.0)
    # gap at (2, 2): interpolate between b=1 (0.6) and b=4 (2.2)
    assert tab.at(2, 2) == pytest.approx(0.6 + (2.2 - 0.6) / 3)
    assert tab.at(2, 3) == pytest.approx(0.6 + 2 * (2.2 - 0.6) / 3)
    assert tab.at(2, 6) == pytest.approx(3.2)


def test_table_extrapolation_and_unusable():
    tab = make_table()
    assert tab.at(1, 16) == pytest.approx(16.0)  # slope 1 from (4,4),(8,8)
    assert tab.at(2, 12) == pytest.approx(4.2 + 0.5 * 4)
    assert tab.at(4, 1) == INF  # no measured point
    assert tab.at(3, 2) == INF  # thread count not in the grid
    assert tab.at(8, 2) == INF  # beyond the table
    assert tab.at(1, 0) == 0.0
    with pytest.raises(ValueError):
        tab.at(1, -1)
    # negative trailing slope is clamped: never cheaper than the last point
    t2 = LatencyTable([1], [1, 2, 4], [[1.0, 3.0, 2.5]])
    assert t2.at(1, 10) == 2.5
    # single measured point: flat to the left, proportional to the right
    t3 = LatencyTable([1], [1, 2, 4], [[np.nan, 2.0, np.nan]])
    assert t3.at(1, 1) == 2.0 and t3.at(1, 2) == 2.0 and t3.at(1, 4) == 4.0
    # leading gap: flat (value of the first measured batch)
    t4 = LatencyTable([1], [1, 2, 4], [[np.nan, 2.0, 3.0]])
    assert t4.at(1, 1) == 2.0


def test_table_dense_matches_at():
    tab = make_table()
    D = tab.dense(6, 20)
    assert D.shape == (7, 21)
    assert np.all(np.isinf(D[0])) and np.all(np.isinf(D[:, 0]))
    for t in range(1, 7):
        for b in range(1, 21):
            assert D[t, b] == tab.at(t, b) or (np.isinf(D[t, b]) and np.isinf(tab.at(t, b)))
    assert tab.dense(1, 0).shape == (2, 1)


def test_table_round_trip():
    tab = make_table()
    d = tab.to_dict()
    s = json.dumps(d)  # JSON-able (gaps are null)
    assert "NaN" not in s
    back = LatencyTable.from_dict(json.loads(s))
    assert back == tab
    assert back.threads == tab.threads and back.batches == tab.batches
    assert np.array_equal(back.lat_ms, tab.lat_ms, equal_nan=True)
    assert np.array_equal(back.dense(4, 10), tab.dense(4, 10))
    with pytest.raises(ValueError):
        LatencyTable.from_dict({"threads": [1]})


def test_table_validation():
    with pytest.raises(ValueError):
        LatencyTable([2, 1], [1], [[1.0], [1.0]])
    with pytest.raises(ValueError):
        LatencyTable([1], [0, 1], [[1.0, 1.0]])
    with pytest.raises(ValueError):
        LatencyTable([1], [1, 2], [[1.0]])
    with pytest.raises(ValueError):
        LatencyTable([1], [1], [[-1.0]])
    with pytest.raises(ValueError):
        LatencyTable([1.5], [1], [[1.0]])
    with pytest.raises(ValueError):
        LatencyTable([], [1], [])
    tab = LatencyTable([1], [1], [[np.inf]])  # inf is a gap
    assert np.isnan(tab.lat_ms[0, 0])
    assert tab.lat_ms.flags.writeable is False


def test_plan_helpers_and_str():
    p = Plan(((2, 8), (1, 4), (1, 4)), 12.34)
    assert p.n_instances == 3
    assert p.total_threads == 4
    assert p.total_batch == 16
    assert p.threads == (2, 1, 1)
    assert p.shape == (2, 1, 1)
    assert str(p) == "2:8,2x1:4"
    assert p.describe() == "2:8,2x1:4 (predicted 12.3 ms)"

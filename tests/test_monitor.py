"""Monitor: histogram windows, shape choice over a mix, hysteresis (pure logic)."""
import numpy as np
import pytest

from packratd.monitor import Monitor, objective
from packratd.solver import LatencyTable

pytestmark = pytest.mark.fast

BATCHES = [1, 2, 3, 4, 6, 8, 12, 16]


def crafted_table():
    # One 2-thread instance wins small batches; two 1-thread instances win large ones.
    l1 = [2 + 0.8 * b for b in BATCHES]
    l2 = [1 + 0.6 * b for b in BATCHES]
    return LatencyTable([1, 2], BATCHES, [l1, l2])


def feed(m, t0, sizes, dt=0.01):
    t = t0
    for s in sizes:
        m.observe(t, s)
        t += dt
    return t


def test_objective_mean_and_percentile():
    tab = crafted_table()
    hist = {1: 9, 16: 1}
    fat = objective(tab, (2,), hist, "mean")
    assert fat == pytest.approx((9 * 1.6 + 1 * 10.6) / 10)
    assert objective(tab, (2,), hist, "p50") == pytest.approx(1.6)
    assert objective(tab, (2,), hist, "p99") == pytest.approx(10.6)
    # split: batch 1 runs on one 1-thread instance, 16 as 8+8
    assert objective(tab, (1, 1), {16: 1}, "mean") == pytest.approx(2 + 0.8 * 8)


def test_recommends_split_for_large_batches_after_confirmations():
    tab = crafted_table()
    m = Monitor(window_s=10, min_batches=20, min_dwell_s=0, min_improvement=0.1, confirmations=2)
    t = feed(m, 100.0, [16] * 50)
    d1 = m.evaluate(t, tab, 2, current=(2,))
    assert not d1.reconfigure and d1.kind == "confirming"
    d2 = m.evaluate(t + 1, tab, 2, current=(2,))
    assert d2.reconfigure and d2.shape == (1, 1)
    assert sorted(d2.plan) == [(1, 8), (1, 8)]
    assert d2.best_ms < d2.current_ms


def test_keeps_fat_for_small_batches_and_switches_back():
    tab = crafted_table()
    m = Monitor(window_s=5, min_batches=20, min_dwell_s=0, confirmations=1)
    t = feed(m, 0.0, [1, 2] * 30)
    assert not m.evaluate(t, tab, 2, current=(2,)).reconfigure
    d = m.evaluate(t, tab, 2, current=(1, 1))
    assert d.reconfigure and d.shape == (2,)


def test_not_enough_batches_and_window_expiry():
    tab = crafted_table()
    m = Monitor(window_s=5, min_batches=20, min_dwell_s=0, confirmations=1)
    feed(m, 0.0, [16] * 30)
    assert m.evaluate(1.0, tab, 2, current=(2,)).reconfigure
    # 10 s later the window is empty: no decision on stale data
    d = m.evaluate(11.0, tab, 2, current=(2,))
    assert not d.reconfigure and d.kind == "few_batches"


def test_dwell_blocks_flapping():
    tab = crafted_table()
    m = Monitor(window_s=100, min_batches=10, min_dwell_s=30, confirmations=1)
    m.note_reconfigured(0.0)
    feed(m, 1.0, [16] * 20)
    d = m.evaluate(5.0, tab, 2, current=(2,))
    assert not d.reconfigure and d.kind == "dwell"
    assert m.evaluate(31.0, tab, 2, current=(2,)).reconfigure


def test_brief_burst_does_not_flip():
    tab = crafted_table()
    m = Monitor(window_s=100, min_batches=10, min_dwell_s=0, confirmations=1)
    t = feed(m, 0.0, [1] * 200)
    t = feed(m, t, [16] * 5)         # a short burst of large batches in a small-batch day
    assert not m.evaluate(t, tab, 2, current=(2,)).reconfigure


def test_small_gain_below_threshold_is_ignored():
    tab = crafted_table()
    m = Monitor(window_s=100, min_batches=10, min_dwell_s=0, confirmations=1, min_improvement=0.5)
    feed(m, 0.0, [16] * 50)
    d = m.evaluate(1.0, tab, 2, current=(2,))
    assert not d.reconfigure and d.kind == "no_gain"


def test_count_window_bounds_memory():
    m = Monitor(window_s=1e9, window_batches=100)
    feed(m, 0.0, list(np.arange(1000) % 7 + 1))
    assert sum(m.histogram(20.0).values()) == 100

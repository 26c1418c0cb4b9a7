"""The daemon's decisions as tables of cases: pure functions of snapshots (no processes, no sockets).

* supervisor.after_exit  -- replace a dead worker after a back-off, or give up on its instance;
* generations.decide     -- which generation to switch to, retire or abandon now;
* monitor decisions      -- the economics of a switch: noise floor, payback, hysteresis;
* profiler.pick_runtime  -- which runtime serves, from the timings of each at a few batch sizes.
"""
import math

import pytest

from packratd.generations import (ABANDON, ACTIVE, DRAINING, FAILED, RETIRE, STARTING, SWITCH, GenView, decide)
from packratd.monitor import Monitor, Score
from packratd.profiler import RUNTIME_TIE, pick_runtime, runtime_points
from packratd.supervisor import MAX_BACKOFF_S, STABLE_S, after_exit

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("failures, booting, lived, max_restarts, want", [
    # (consecutive failures after, give up, back-off)
    (0, False, STABLE_S + 1, 5, (0, False, 0.0)),        # served a long time: a fresh start, no back-off
    (3, False, STABLE_S + 1, 5, (0, False, 0.0)),        # ... even after earlier failures
    (0, False, 1.0, 5, (1, False, 0.5)),                 # died soon after starting: counts
    (0, True, 0.5, 5, (1, False, 0.5)),                  # died while booting: counts
    (1, True, 0.5, 5, (2, False, 1.0)),                  # back-off doubles
    (4, True, 0.5, 5, (5, False, 8.0)),
    (5, True, 0.5, 5, (6, True, 0.0)),                   # more than max_restarts in a row: give up
    (0, True, 0.5, 0, (1, True, 0.0)),                   # max_restarts 0: the first failure gives up
    (9, True, 500.0, 20, (10, False, 256.0)),            # booting failures count however long the boot took
])
def test_after_exit(failures, booting, lived, max_restarts, want):
    r = after_exit(failures, booting, lived, max_restarts)
    n, give_up, delay = want
    assert (r.failures, r.give_up) == (n, give_up)
    assert r.delay_s == min(MAX_BACKOFF_S, delay)


V = GenView


@pytest.mark.parametrize("views, want", [
    ([V(STARTING, 2, 2, number=1)], [(SWITCH, 1)]),                                       # first generation ready
    ([V(STARTING, 2, 1, number=1)], []),                                                  # not every instance ready
    ([V(STARTING, 2, 1, failed=1, number=1)], [(ABANDON, 1)]),                            # an instance failed
    ([V(STARTING, 2, 0, age_s=301, number=1)], [(ABANDON, 1)]),                           # boot timeout
    # blue serving, green ready: switch; blue has a batch in flight: keep it draining
    ([V(ACTIVE, 1, 1, inflight=1, number=1), V(STARTING, 2, 2, number=2)], [(SWITCH, 2)]),
    # ... blue idle: switch and retire it in the same instant
    ([V(ACTIVE, 1, 1, number=1), V(STARTING, 2, 2, number=2)], [(SWITCH, 2), (RETIRE, 1)]),
    ([V(DRAINING, 1, 1, inflight=0, number=1), V(ACTIVE, 2, 2, number=2)], [(RETIRE, 1)]),
    ([V(DRAINING, 1, 1, inflight=2, number=1), V(ACTIVE, 2, 2, number=2)], []),
    ([V(DRAINING, 1, 1, number=1), V(ACTIVE, 2, 1, number=2)], []),                       # green lost one: keep blue
    # two greens ready at once: the newest wins, the older is superseded
    ([V(ACTIVE, 1, 1, inflight=1, number=1), V(STARTING, 1, 1, number=2), V(STARTING, 1, 1, number=3)],
     [(SWITCH, 3), (ABANDON, 2)]),
    # an older green still booting when a newer one switches: superseded
    ([V(ACTIVE, 1, 1, inflight=1, number=1), V(STARTING, 2, 0, number=2), V(STARTING, 1, 1, number=3)],
     [(SWITCH, 3), (ABANDON, 2)]),
    ([V(ACTIVE, 1, 1, number=1), V(STARTING, 1, 1, failed=1, number=2)], [(ABANDON, 2)]),  # blue untouched
    ([V(FAILED, 1, 0, number=1)], []),
    ([], []),
])
def test_decide(views, want):
    got = [(a, n) for a, n, _ in decide(views, boot_timeout_s=300)]
    assert got == want


def _score(cur, best, shape=(1, 1), mode=16, n=100):
    return Score(cur, best, shape, tuple((t, mode // len(shape)) for t in shape), mode, n)


def _monitor(**kw):
    base = dict(window_s=1000, min_batches=10, min_dwell_s=0, min_improvement=0.1, confirmations=1,
                min_gain_ms=0.2, payback_s=300)
    base.update(kw)
    return Monitor(**base)


def _feed(m, n, size=16, latencies=None, t0=0.0, dt=0.1):
    for i in range(n):
        m.observe(t0 + i * dt, size, latencies[i % len(latencies)] if latencies else 10.0)
    return t0 + n * dt


@pytest.mark.parametrize("case, cur, best, lat, cost, kw, kind", [
    ("few batches", 10.0, 5.0, [10.0], (10, 1.0), dict(min_batches=1000), "few_batches"),
    ("no gain", 10.0, 9.5, [10.0], (10, 1.0), {}, "no_gain"),
    # the tiny model: 0.05 ms predicted gain (13%) on a 0.34 ms batch is below the 0.2 ms floor
    ("tiny gain in ms", 0.34, 0.29, [0.34], (10, 1.0), {}, "below_noise"),
    # measured batch latency at the modal size spreads by 4 ms (IQR): a 3 ms gain is noise
    ("below measured noise", 30.0, 27.0, [26.0, 28.0, 32.0, 34.0], (10, 1.0), dict(min_improvement=0.05), "below_noise"),
    # switch costs 100 s at 2x latency; gain 1 ms of 10 -> payback 1000 s > 300 s
    ("does not pay back", 10.0, 8.0, [10.0], (100, 1.0), {}, "no_payback"),
    ("pays back", 10.0, 5.0, [10.0], (10, 1.0), {}, "switch"),
    ("dwell", 10.0, 5.0, [10.0], (10, 1.0), dict(min_dwell_s=1e9), "dwell"),
    ("confirming", 10.0, 5.0, [10.0], (10, 1.0), dict(confirmations=2), "confirming"),
])
def test_monitor_decision(case, cur, best, lat, cost, kw, kind):
    m = _monitor(**kw)
    if kind == "dwell":
        m.note_reconfigured(0.0)
    m.note_switch_cost(*cost)
    t = _feed(m, 100, latencies=lat)
    d = m.decide(t, _score(cur, best, n=100))
    assert d.kind == kind, (case, d.reason)
    assert d.reconfigure is (kind == "switch")
    if kind in ("no_payback", "switch"):
        # payback = switch_s * slowdown * current_ms / gain_ms (the request rate cancels out)
        assert d.payback_s == pytest.approx(cost[0] * cost[1] * cur / (cur - best))
    if kind == "below_noise":
        assert d.noise_ms >= 0.2 and d.gain_ms < d.noise_ms


def test_monitor_switch_needs_the_same_shape_twice_in_a_row():
    m = _monitor(confirmations=2)
    t = _feed(m, 100)
    assert m.decide(t, _score(10.0, 5.0, (1, 1))).kind == "confirming"
    assert m.decide(t, _score(10.0, 5.0, (2,))).kind == "confirming"       # another shape restarts the count
    assert m.decide(t, _score(10.0, 5.0, (2,))).kind == "switch"


def test_noise_needs_enough_samples_at_the_modal_size():
    m = _monitor()
    _feed(m, 5, size=16, latencies=[1.0, 100.0])
    assert m.noise_ms(1.0, 16) is None                                     # 5 samples: not judged
    t = _feed(m, 20, size=16, latencies=[10.0, 12.0], t0=1.0)
    assert m.noise_ms(t, 16) == pytest.approx(2.0)
    assert m.noise_ms(t, 8) is None
    assert not math.isnan(m.rate(t)) and m.rate(t) > 0


@pytest.mark.parametrize("B, want", [(1, [1]), (2, [1, 2]), (8, [1, 8]), (16, [1, 4, 16]), (32, [1, 8, 32]),
                                     (1024, [1, 32, 1024])])
def test_runtime_points(B, want):
    assert runtime_points(B) == want


@pytest.mark.parametrize("case, med, load, want", [
    # the measurements of this repo's models on one 2-core host (ms at B = 1 and 32)
    ("clear winner", {"eager": {1: 43.0, 32: 1105.0}, "inductor": {1: 36.9, 32: 777.0},
                      "onnxruntime": {1: 23.6, 32: 657.0}}, {"eager": 2.3, "inductor": 2.7, "onnxruntime": 0.13},
     "onnxruntime"),
    # BERT: inductor and OpenVINO within 0.5% (noise): the one whose workers load in 0.9 s, not 3 s
    ("near tie, faster boot", {"eager": {1: 83.9, 32: 2077.9}, "inductor": {1: 75.6, 32: 2037.7},
                               "openvino": {1: 76.4, 32: 2035.6}, "onnxruntime": {1: 80.6, 32: 2427.5}},
     {"eager": 2.6, "inductor": 3.0, "openvino": 0.9, "onnxruntime": 1.0}, "openvino"),
    ("past the tie margin the faster wins", {"inductor": {1: 75.0, 32: 2000.0}, "openvino": {1: 80.0, 32: 2100.0}},
     {"inductor": 3.0, "openvino": 0.9}, "inductor"),
    ("winner changes with batch: mean of ratios", {"a": {1: 10.0, 8: 80.0, 32: 400.0}, "b": {1: 12.0, 8: 70.0, 32: 300.0}},
     {"a": 1.0, "b": 1.0}, "b"),
    ("tie, no load times: eager first", {"eager": {1: 10.0}, "inductor": {1: 10.05}}, {"eager": None, "inductor": None},
     "eager"),
    ("one runtime", {"eager": {1: 10.0}}, {"eager": None}, "eager"),
])
def test_pick_runtime(case, med, load, want):
    best, score = pick_runtime(med, load)
    assert best == want, (case, score)
    assert min(score.values()) == pytest.approx(1.0) or len(med) > 1
    assert score[best] <= min(score.values()) * (1 + RUNTIME_TIE)

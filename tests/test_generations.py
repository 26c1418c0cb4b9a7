"""The availability-preserving policy as a table of cases (pure functions, no processes)."""
import pytest

from packratd.generations import (ACTIVE, DRAINING, FAILED, RETIRED, STARTING, GenView, ReconfigQueue,
                                  may_retire, may_switch, should_abandon)

pytestmark = pytest.mark.fast

V = GenView


@pytest.mark.parametrize("green, expect", [
    (V(STARTING, size=2, ready=2), True),
    (V(STARTING, size=2, ready=1), False),            # not every instance READY yet
    (V(STARTING, size=2, ready=0), False),
    (V(STARTING, size=2, ready=2, failed=1), False),  # one failed: never switch to a partial generation
    (V(STARTING, size=0, ready=0), False),            # an empty plan never serves
    (V(ACTIVE, size=2, ready=2), False),              # already switched
    (V(FAILED, size=2, ready=2), False),
    (V(DRAINING, size=2, ready=2), False),
])
def test_may_switch(green, expect):
    assert may_switch(green) is expect


@pytest.mark.parametrize("old, active, expect", [
    (V(DRAINING, 2, 2, inflight=0), V(ACTIVE, 1, 1), True),
    (V(DRAINING, 2, 2, inflight=1), V(ACTIVE, 1, 1), False),    # still computing a batch: keep it
    (V(DRAINING, 2, 2, inflight=0), None, False),               # nothing else serves: keep it
    (V(DRAINING, 2, 2, inflight=0), V(STARTING, 1, 1), False),  # successor not switched yet
    (V(DRAINING, 2, 2, inflight=0), V(ACTIVE, 2, 1), False),    # successor lost an instance: availability first
    (V(DRAINING, 2, 0, inflight=0), V(ACTIVE, 2, 2), True),     # old workers all dead: nothing to wait for
    (V(ACTIVE, 2, 2, inflight=0), V(ACTIVE, 2, 2), True),
    (V(RETIRED, 2, 0), V(ACTIVE, 2, 2), False),                 # already retired
    (V(FAILED, 2, 0), V(ACTIVE, 2, 2), False),
    (V(STARTING, 2, 1), V(ACTIVE, 2, 2), False),                # a starting generation is abandoned, not retired
])
def test_may_retire(old, active, expect):
    assert may_retire(old, active) is expect


@pytest.mark.parametrize("green, timeout, expect_reason", [
    (V(STARTING, 2, 1, age_s=5), 60, None),
    (V(STARTING, 2, 1, failed=1, age_s=5), 60, "failed to start"),
    (V(STARTING, 2, 1, age_s=61), 60, "READY after"),
    (V(STARTING, 2, 2, age_s=61), 60, None),                  # all ready: switch, not abandon
    (V(ACTIVE, 2, 0, failed=2, age_s=100), 60, None),         # only starting generations are abandoned
])
def test_should_abandon(green, timeout, expect_reason):
    why = should_abandon(green, timeout)
    if expect_reason is None:
        assert why is None
    else:
        assert why is not None and expect_reason in why


def test_reconfig_queue_coalesces_and_waits():
    q = ReconfigQueue()
    assert q.request({"reason": "a"}) is False
    assert q.request({"reason": "b"}) is True          # replaces a
    assert q.take(busy=True) is None                   # one in progress: wait
    assert q.take(busy=False) == {"reason": "b"}
    assert q.take(busy=False) is None
    assert q.coalesced == 1

"""Work-conserving batching (issue 10): a lone request goes at once; under load, batches still form.

With the default server.max_delay_ms = 0 a request is dispatched as soon as the instances are idle;
requests that arrive while they are busy form the next batch.  max_delay_ms > 0 is the opt-in that
holds a lone request for company.  The reply's trace (docs/protocol.md, `trace`) says when the
request arrived and when its batch started.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import zmq

from packratd import protocol as P
from tests.test_reliability import SLOW, _close, slow_model, slow_pool  # noqa: F401

pytestmark = pytest.mark.slow


def _queued_s(endpoint: str, n: int = 20) -> list[float]:
    """Arrival -> batch start of n lone requests, one at a time (from the reply's trace)."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    out = []
    for i in range(n):
        s.send_multipart(P.request_frames(f"t{i}", [np.ones((1, 64), np.float32)], trace=True))
        assert s.poll(30000)
        head = json.loads(s.recv_multipart()[0])
        assert head["status"] == "ok", head
        out.append(head["trace"]["batch_start"] - head["trace"]["arrival"])
    s.close()
    return out


def test_a_lone_request_is_not_held_for_company(daemon, tiny_model):
    now = daemon(tiny_model, plan="1x1:8")                                     # the default: max_delay_ms = 0
    wait = daemon(tiny_model, plan="1x1:8", extra=["--set", "server.max_delay_ms=250"])
    assert now.control()["max_delay_ms"] == 0.0
    held = sorted(_queued_s(wait.endpoint, 5))
    lone = sorted(_queued_s(now.endpoint, 20))
    assert held[0] >= 0.249                       # the opt-in really holds a lone request (the daemon's own bound)
    assert lone[len(lone) // 2] < held[0] / 10    # the default does not: it is dispatched on arrival
    assert now.stop() == 0 and wait.stop() == 0


def test_batches_form_from_what_queued_while_the_instance_was_busy(daemon, slow_model, slow_pool):
    d = daemon(slow_model, plan="1x2:16", extra=SLOW)
    x, want = slow_pool[0]
    errors = []

    def client(k):
        from packratd.client import Client
        c = Client(d.endpoint, timeout=120)
        try:
            for i in range(4):
                rows = x[2 * k:2 * k + 2]
                (y,) = c.infer(rows)
                if not _close(y, want[2 * k:2 * k + 2]):
                    errors.append(f"client {k}: wrong answer")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            c.close()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    hist = {int(k): v for k, v in d.control()["batch_histogram"].items()}
    assert sum(hist.values()) < 24                          # 24 requests of 2 rows did not run one by one
    assert max(hist) > 2, hist                              # batches of several requests formed while it was busy
    assert d.stop() == 0

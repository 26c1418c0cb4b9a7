"""The dispatcher alone, over real ZeroMQ sockets, with the worker's side played by the test.

A real worker cannot be made to misbehave on cue (disconnect between two sends, answer with the
wrong rows, send garbage), so the test plays it on a real DEALER socket speaking the real worker
codec (packratd.messages).  Everything else -- the sockets, the dispatcher, the client -- is real.
"""
import threading
import time

import numpy as np
import pytest
import zmq

from packratd import config as config_mod
from packratd import messages as M
from packratd import protocol as P
from packratd.dispatcher import READY, SERVING, Dispatcher, WorkerHandle
from packratd.worker import HB_SUFFIX

pytestmark = pytest.mark.fast

SPEC = [{"name": "x", "dtype": "float32", "shape": [None, 4]}]
OUT = [{"dtype": "float32", "shape": [None, 2]}]


class Rig:
    def __init__(self, tmp_path, **sets):
        self.ctx = zmq.Context()
        over = {"model.path": "m.pt2", "server.runtime_dir": str(tmp_path)}
        over.update(sets)
        self.cfg = config_mod.load(None, over)
        self.d = Dispatcher(self.ctx, self.cfg, [f"ipc://{tmp_path}/c.sock"], f"ipc://{tmp_path}/w.sock")
        self.d.bind_frontend()
        self.d.set_state(SERVING, "serving")
        self.d.active_generation = 1
        self.tmp = tmp_path

    def worker(self, name: str, index: int = 0):
        w = self.ctx.socket(zmq.DEALER)
        w.setsockopt(zmq.IDENTITY, name.encode())
        w.setsockopt(zmq.LINGER, 0)
        w.connect(f"ipc://{self.tmp}/w.sock")
        h = WorkerHandle(name.encode(), 1, index, 1, (0,), 4, digest="d0", hb_limit=1000.0)
        self.d.add_worker(h)
        w.send_multipart(M.ready({"spec": SPEC, "outputs": OUT, "boot_s": 0.1}))
        self.until(lambda: h.state == READY)
        return w, h

    def client(self):
        c = self.ctx.socket(zmq.DEALER)
        c.setsockopt(zmq.LINGER, 0)
        c.connect(f"ipc://{self.tmp}/c.sock")
        return c

    def turn(self):
        self.d.on_backend()
        self.d.on_frontend()
        self.d.tick(time.monotonic())

    def until(self, cond, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.turn()
            if cond():
                return
            time.sleep(0.002)
        raise AssertionError("condition not reached")

    def close(self):
        self.d.close()
        self.ctx.destroy(linger=0)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def _recv_work(w, timeout=5.0):
    assert w.poll(int(timeout * 1000)), "no WORK"
    msg = M.decode(w.recv_multipart(copy=False))
    assert msg.kind == M.WORK
    return msg


def test_send_to_a_vanished_worker_does_not_spin_and_the_slice_waits(rig):
    """Once: a failed send put the slice back while the worker still looked idle: an endless loop."""
    w, h = rig.worker("g1.i0.r0")
    w.close()                                             # gone, but no one has reaped it
    time.sleep(0.2)                                       # let the ROUTER see the disconnect
    c = rig.client()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    c.send_multipart(P.request_frames("r1", [x]))
    done = threading.Event()

    def turns():
        for _ in range(50):
            rig.turn()
        done.set()
    t = threading.Thread(target=turns, daemon=True)
    t.start()
    t.join(10)
    assert done.is_set(), "the dispatcher did not return: it spins on the failed send"
    assert h.state == "lost" and ("unreachable", h, "cannot send work to it") in rig.d.events
    assert len(rig.d.orphans) == 1 and rig.d.tasks == {}
    w2, _ = rig.worker("g1.i0.r1")                        # the replacement takes the waiting slice
    msg = _recv_work(w2)
    (got,) = M.work_inputs(msg)
    np.testing.assert_array_equal(got, x)
    w2.send_multipart(M.result(msg.head["task"], 1.0, [got[:, :2] * 2]))
    rig.until(lambda: c.poll(0))
    rid, (y,), _ = P.parse_reply(c.recv_multipart())
    assert rid == "r1"
    np.testing.assert_array_equal(y, x[:, :2] * 2)


@pytest.mark.parametrize("case, outs", [
    ("rows", lambda x: [np.zeros((1, 2), np.float32)]),                 # one row for a slice of two
    ("dtype", lambda x: [np.zeros((2, 2), np.float64)]),
    ("row shape", lambda x: [np.zeros((2, 3), np.float32)]),
    ("count", lambda x: [np.zeros((2, 2), np.float32)] * 2),
    ("scalar", lambda x: [np.float32(1.0).reshape(())]),
])
def test_results_not_matching_the_output_spec_fail_the_batch(rig, case, outs):
    w, h = rig.worker("g1.i0.r0")
    c = rig.client()
    c.send_multipart(P.request_frames("r1", [np.ones((2, 4), np.float32)]))
    rig.until(lambda: w.poll(0))
    msg = _recv_work(w)
    w.send_multipart(M.result(msg.head["task"], 1.0, outs(None)))
    rig.until(lambda: c.poll(0))
    with pytest.raises(P.ReplyError) as e:
        P.parse_reply(c.recv_multipart())
    assert e.value.code == P.MODEL_ERROR and e.value.id == "r1"
    assert rig.d.stats.result_mismatches == 1 and rig.d.stats.requests == 0


@pytest.mark.parametrize("frames", [
    [b"WAT"], [b"RESULT"], [b"RESULT", b"{not json"], [b"RESULT", b"[]"], [b"RESULT", b'{"task": "x"}'],
    [b"READY", b'{"spec": 3}'], [b"HB", b"extra"], [b"RESULT", b'{"task": 99, "tensors": [{"dtype": "object", "shape": [1]}]}', b"x"],
])
def test_garbage_from_a_worker_is_ignored(rig, frames):
    w, h = rig.worker("g1.i0.r0")
    w.send_multipart(frames)
    for _ in range(20):
        rig.turn()
    c = rig.client()
    c.send_multipart(P.request_frames("ok", [np.ones((1, 4), np.float32)]))
    rig.until(lambda: w.poll(0))
    msg = _recv_work(w)
    w.send_multipart(M.result(msg.head["task"], 1.0, [np.ones((1, 2), np.float32)]))
    rig.until(lambda: c.poll(0))
    assert P.parse_reply(c.recv_multipart())[0] == "ok"


def test_heartbeats_use_the_worker_socket_of_their_own(rig):
    w, h = rig.worker("g1.i0.r0")
    hb = rig.ctx.socket(zmq.DEALER)
    hb.setsockopt(zmq.IDENTITY, b"g1.i0.r0" + HB_SUFFIX)
    hb.connect(f"ipc://{rig.tmp}/w.sock")
    h.last_seen = 0.0
    hb.send_multipart(M.hb())
    rig.until(lambda: h.last_seen > 0)

    def beat():
        rig.d.next_hb = 0.0        # a heartbeat every turn (ROUTER can route to a new peer a moment after it hears it)
        return hb.poll(10)
    rig.until(beat)
    assert M.decode(hb.recv_multipart()).kind == M.HB                       # the dispatcher beats back on it
    assert not w.poll(100)                                                   # and never on the work socket

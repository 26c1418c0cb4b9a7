"""The control socket and the planner process, each on its own with real sockets and processes.

A malformed control request (several frames, not JSON, not an object) gets an error reply and the
socket keeps answering; a command whose work runs in the planner process answers when it is done
while other requests are answered meanwhile; a planner job past its time bound is stopped and the
next job runs in a fresh process.
"""
import json
import time

import pytest
import zmq

from packratd.control import ControlClient, ControlError, ControlServer, Deferred
from packratd.offload import Offloader


def _wait(fn, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def offloader():
    o = Offloader("packratd-test-planner", allowed=("packratd.", "tests."))
    yield o
    o.close()


class Server:
    """A ControlServer served by a thread-free loop the test drives (as the daemon's loop does)."""

    def __init__(self, tmp_path, handlers, offloader):
        self.offloader = offloader
        self.ctx = zmq.Context()
        self.endpoint = f"ipc://{tmp_path}/control.sock"
        self.srv = ControlServer(self.ctx, self.endpoint, handlers)

    def turn(self):
        if self.srv.sock.poll(10):
            self.srv.on_readable()
        self.offloader.poll(time.monotonic())
        self.srv.poll()

    def close(self):
        self.srv.close()
        self.ctx.destroy(linger=0)


@pytest.fixture
def server(tmp_path, offloader):
    def slow(seconds: float):
        return Deferred(offloader.submit("tests.offload_jobs:nap", seconds, timeout_s=30, what="slow"),
                        lambda r: {"slept": r})

    def boom():
        raise RuntimeError("handler bug")

    def typo(x: int):
        return {"y": len(x)}           # a TypeError inside the handler is an error, not "bad arguments"

    s = Server(tmp_path, {"echo": lambda value=None: {"value": value}, "slow": slow, "boom": boom, "typo": typo}, offloader)
    yield s
    s.close()


def _dealer(s):
    d = s.ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(s.endpoint)
    return d


def _ask(s, sock, frames, timeout=10.0):
    sock.send_multipart(frames)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.turn()
        if sock.poll(0):
            return json.loads(sock.recv_multipart()[-1])
    raise AssertionError("no reply")


@pytest.mark.parametrize("frames, error", [
    ([b'{"cmd":"echo"}', b"x"], "expected one frame"),       # a REQ sending two frames: once killed the daemon
    ([b"not json"], "bad control request"),
    ([b"[1,2]"], "JSON object"),
    ([b'{"cmd":"nope"}'], "unknown command"),
    ([b'{"cmd":"echo","bogus":1}'], "bad arguments"),
    ([b'{"cmd":"boom"}'], "handler bug"),
    ([b'{"cmd":"typo","x":3}'], "TypeError"),
])
def test_malformed_requests_get_an_error_and_the_socket_keeps_answering(server, frames, error):
    d = _dealer(server)
    bad = _ask(server, d, [b""] + frames)                      # as a REQ would send it (empty delimiter)
    assert bad["ok"] is False and error in bad["error"]
    good = _ask(server, d, [b"", b'{"cmd":"echo","value":7}'])
    assert good == {"ok": True, "value": 7}
    d.close()


def test_a_real_req_client_after_a_multipart_request(server):
    req = server.ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(server.endpoint)
    req.send_multipart([b'{"cmd":"echo"}', b"second frame"])
    _wait(lambda: (server.turn(), req.poll(0))[1], what="the error reply")
    assert json.loads(req.recv())["ok"] is False
    req.close()
    import threading
    out = {}
    t = threading.Thread(target=lambda: out.update(r=ControlClient(server.endpoint, timeout=10).call("echo", value="hi")))
    t.start()
    _wait(lambda: (server.turn(), not t.is_alive())[1], what="ControlClient")
    assert out["r"]["value"] == "hi"
    with pytest.raises(ControlError, match="unknown command"):
        t = threading.Thread(target=lambda: out.update(e=_call_err(server.endpoint)))
        t.start()
        _wait(lambda: (server.turn(), not t.is_alive())[1], what="ControlClient error")
        raise out["e"]


def _call_err(endpoint):
    try:
        ControlClient(endpoint, timeout=10).call("nope")
    except ControlError as e:
        return e
    return AssertionError("no error")


def test_deferred_reply_does_not_hold_up_other_requests(server):
    slow, fast = _dealer(server), _dealer(server)
    slow.send_multipart([b'{"cmd":"slow","seconds":1.0}'])
    t0 = time.monotonic()
    got_fast = _ask(server, fast, [b'{"cmd":"echo","value":1}'])
    assert got_fast["value"] == 1 and time.monotonic() - t0 < 1.0        # answered while the slow one works
    assert not slow.poll(0)
    _wait(lambda: (server.turn(), slow.poll(0))[1], what="the deferred reply")
    assert json.loads(slow.recv_multipart()[-1]) == {"ok": True, "slept": 1.0}
    slow.close()
    fast.close()


def test_planner_job_result_error_and_time_bound(offloader):
    def finish(job):
        _wait(lambda: (offloader.poll(time.monotonic()), job.done)[1], timeout=60, what=job.what)
        return job
    ok = finish(offloader.submit("tests.offload_jobs:nap", 0.0, timeout_s=30, what="ok"))
    assert ok.error is None and ok.result == 0.0
    pid = offloader.proc.pid
    bad = finish(offloader.submit("tests.offload_jobs:nap", -1.0, timeout_s=30, what="bad"))
    assert bad.result is None and "ValueError" in bad.error
    assert offloader.proc.pid == pid                                          # an exception does not cost the process
    late = finish(offloader.submit("tests.offload_jobs:nap", 30.0, timeout_s=0.5, what="late"))
    assert "longer than" in late.error and offloader.restarts == 1
    again = finish(offloader.submit("tests.offload_jobs:nap", 0.0, timeout_s=30, what="again"))
    assert again.error is None and offloader.proc.pid != pid                 # a fresh process took over
    alien = finish(offloader.submit("os.path:getsize", "/", timeout_s=30, what="alien"))
    assert "only packratd" in alien.error

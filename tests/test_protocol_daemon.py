"""Every malformed request against the real daemon, over raw ZeroMQ (DEALER, and once REQ), without
the client library: exactly what docs/protocol.md promises a client written in another language.
Every malformed message gets one error reply with a stable code, and the daemon keeps serving correct
answers.  The cases and helpers are tests/test_protocol.py's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zmq

from packratd import protocol as P
from tests.conftest import DaemonProc, load_module
from tests.test_protocol import (CASES, DEL, ID_KNOWN, TINY_MODEL_CASES, TINY_SPEC, TWO_CASES, WIRE_CASES,  # noqa: F401
                                 _reference, check_error, dealer, decode_reply, good_infer, hdr, ping_of_size, roundtrip,
                                 sent_id, tens, tiny_inputs, two_inputs)

# ---------------------------------------------------------------------------------------------
# 1b. Against the real daemon, raw ZeroMQ
# ---------------------------------------------------------------------------------------------

def _start(tmp_path_factory, model, name, extra=()):
    d = DaemonProc(tmp_path_factory.mktemp(name), model, "2x1:4", extra=list(extra))
    try:
        d.wait_serving()
    except BaseException:
        d.stop()
        raise
    return d


@pytest.fixture(scope="module")
def tiny_daemon(tmp_path_factory, tiny_model):
    """One tiny_mlp daemon (plan 2x1:4) for all the cases: each case proves it still serves afterwards."""
    d = _start(tmp_path_factory, tiny_model, "proto_tiny")
    yield d
    assert d.proc.poll() is None, f"daemon died:\n{d.logs()}"
    assert d.stop() == 0


@pytest.fixture(scope="module")
def two_daemon(tmp_path_factory, two_input_model):
    d = _start(tmp_path_factory, two_input_model, "proto_two")
    yield d
    assert d.proc.poll() is None, f"daemon died:\n{d.logs()}"
    assert d.stop() == 0


@pytest.fixture(scope="module")
def tiny_module(tiny_model):
    torch.set_num_threads(1)
    return load_module(tiny_model)


@pytest.fixture(scope="module")
def two_module(two_input_model):
    return load_module(two_input_model)


@pytest.fixture
def tiny_sock(tiny_daemon):
    s = dealer(tiny_daemon.endpoint)
    yield s
    s.close(linger=0)


@pytest.mark.parametrize("name,frames,code", WIRE_CASES + TINY_MODEL_CASES,
                         ids=[c[0] for c in WIRE_CASES + TINY_MODEL_CASES])
def test_daemon_rejects_then_serves(tiny_daemon, tiny_sock, tiny_module, name, frames, code):
    check_error(roundtrip(tiny_sock, frames), code, sent_id(frames), name in ID_KNOWN)
    good_infer(tiny_sock, tiny_module, tiny_inputs(len(name)))
    assert tiny_daemon.proc.poll() is None


@pytest.mark.parametrize("name,frames,code", TWO_CASES, ids=[c[0] for c in TWO_CASES])
def test_two_input_daemon_rejects_then_serves(two_daemon, two_module, name, frames, code):
    s = dealer(two_daemon.endpoint)
    try:
        check_error(roundtrip(s, frames), code, sent_id(frames), name in ID_KNOWN)
        good_infer(s, two_module, two_inputs(len(name), n=5))
    finally:
        s.close(linger=0)


def test_ping_spec_and_good_requests(tiny_daemon, tiny_sock, tiny_module):
    head, bufs = decode_reply(roundtrip(tiny_sock, [hdr(op="ping", tensors=DEL, id="p1")]))
    assert head == {"v": 1, "id": "p1", "status": "ok", "tensors": []} and bufs == []
    head, bufs = decode_reply(roundtrip(tiny_sock, [json.dumps({"v": 1, "op": "ping"}).encode()]))
    assert head["status"] == "ok" and head["id"] == "" and bufs == []                # id defaults to ""
    head, bufs = decode_reply(roundtrip(tiny_sock, [hdr(op="spec", tensors=DEL, id="s1")]))
    assert head["status"] == "ok" and head["id"] == "s1" and bufs == []
    assert head["inputs"] == TINY_SPEC
    assert head["outputs"] == [{"dtype": "float32", "shape": [None, 10]}]
    assert head["max_batch_size"] == 32
    # A 64 KiB header (exactly the limit) is fine; so are unknown fields, a long id and a generous timeout.
    head, _ = decode_reply(roundtrip(tiny_sock, [ping_of_size(P.MAX_HEADER_BYTES)]))
    assert head["status"] == "ok" and head["id"] == "big"
    for n in (1, 7, 32):          # 32 == server.max_batch_size is still accepted
        good_infer(tiny_sock, tiny_module, tiny_inputs(n, n), rid="r" * P.MAX_ID_CHARS)
    x = tiny_inputs(5, 5)[0]
    frames = roundtrip(tiny_sock, [hdr(id="t", timeout_ms=60_000, extra={"a": [1]}, tensors=tens(("float32", [5, 64]))), x.tobytes()])
    head, (buf,) = decode_reply(frames)
    assert head["status"] == "ok" and head["id"] == "t"
    np.testing.assert_allclose(np.frombuffer(buf, np.float32).reshape(5, 10), _reference(tiny_module, x)[0], rtol=1e-4, atol=1e-5)


def test_nan_and_inf_are_valid_inputs(tiny_sock, tiny_module):
    x = tiny_inputs(3, 6)[0]
    x[0, 0] = np.nan
    x[1, :] = np.inf
    x[2, 5] = -np.inf
    x[3, :] = np.finfo(np.float32).max
    (y,) = good_infer(tiny_sock, tiny_module, [x])
    assert np.isnan(y[0]).all() and np.isfinite(y[4:]).all()


def test_deadline_sooner_than_batching_delay_is_not_held(daemon, tiny_model, tiny_module):
    """A lone request is held up to server.max_delay_ms for batch mates, but never past its own deadline."""
    d = daemon(tiny_model, plan="2x1:4", extra=["--set", "server.max_delay_ms=5000"])
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(d.endpoint)
    try:
        x = tiny_inputs(1, 1)[0]
        head, (buf,) = decode_reply(roundtrip(s, [hdr(id="soon", timeout_ms=2500, tensors=tens(("float32", [1, 64]))), x.tobytes()]))
        assert head["status"] == "ok" and head["id"] == "soon", head
        np.testing.assert_allclose(np.frombuffer(buf, np.float32).reshape(1, 10), _reference(tiny_module, x)[0], rtol=1e-4, atol=1e-5)
    finally:
        s.close()


def test_dealer_with_empty_delimiter_is_answered_like_req(tiny_sock, tiny_module):
    """A DEALER may emulate REQ: a leading empty frame is an envelope delimiter and is echoed back."""
    x = tiny_inputs(4, 2)[0]
    frames = roundtrip(tiny_sock, [b"", hdr(id="emu"), x.tobytes()])
    assert frames[0] == b""
    head, (buf,) = decode_reply(frames[1:])
    assert head["status"] == "ok" and head["id"] == "emu"
    np.testing.assert_allclose(np.frombuffer(buf, np.float32).reshape(2, 10), _reference(tiny_module, x)[0], rtol=1e-4, atol=1e-5)
    # Hence a DEALER message whose only frame is empty reads as an empty REQ message.
    frames = roundtrip(tiny_sock, [b""])
    assert frames[0] == b""
    check_error(frames[1:], P.BAD_HEADER, "", id_known=False)
    good_infer(tiny_sock, tiny_module, [x])


def test_req_socket(tiny_daemon, tiny_module):
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(tiny_daemon.endpoint)
    try:
        for name in ("non_json", "version_2", "dtype_complex64", "buffer_one_byte_short",
                     "dtype_float64_for_float32", "rows_over_max_batch"):
            _, frames, code = CASES[name]
            check_error(roundtrip(s, frames), code, sent_id(frames), name in ID_KNOWN)
            good_infer(s, tiny_module, tiny_inputs(len(name), 4))
        head, _ = decode_reply(roundtrip(s, [hdr(op="spec", tensors=DEL)]))
        assert head["inputs"] == TINY_SPEC
    finally:
        s.close(linger=0)


def test_many_requests_in_flight_on_one_dealer(tiny_sock, tiny_module):
    """Replies are matched by id, not order: pipeline good and bad requests on one socket."""
    xs = {}
    for i in range(40):
        rid = f"m{i}"
        if i % 3 == 0:
            tiny_sock.send_multipart([hdr(id=rid, tensors=tens(("float64", [1, 64]))), b"\0" * 512])
        else:
            xs[rid] = tiny_inputs(i, 1 + i % 5)[0]
            tiny_sock.send_multipart([hdr(id=rid, tensors=tens(("float32", list(xs[rid].shape)))), xs[rid].tobytes()])
    seen = set()
    for _ in range(40):
        assert tiny_sock.poll(30_000)
        head, bufs = decode_reply(tiny_sock.recv_multipart())
        assert head["id"] not in seen
        seen.add(head["id"])
        if head["id"] in xs:
            assert head["status"] == "ok", head
            x = xs[head["id"]]
            np.testing.assert_allclose(np.frombuffer(bufs[0], np.float32).reshape(len(x), 10),
                                       _reference(tiny_module, x)[0], rtol=1e-4, atol=1e-5)
        else:
            assert head["code"] == P.MODEL_MISMATCH
    assert len(seen) == 40


def test_parse_error_reply_echoes_request_id(tiny_sock):
    frames = [hdr(id="mine", tensors=tens(("float32", [0, 64]))), b""]    # batch dim 0: BAD_TENSOR
    head, _ = decode_reply(roundtrip(tiny_sock, frames))
    assert head["code"] == P.BAD_TENSOR
    assert head["id"] == "mine"


def test_max_message_bytes(daemon, tiny_model, tiny_module):
    d = daemon(tiny_model, plan="2x1:4", extra=["--set", "server.max_message_bytes=100000"])
    a = dealer(d.endpoint)
    b = dealer(d.endpoint)
    try:
        good_infer(a, tiny_module, tiny_inputs(1))
        # One frame of exactly the limit passes ZeroMQ and is judged by the daemon ([25000] is no row shape of x).
        check_error(roundtrip(b, [hdr(id="eq", tensors=tens(("float32", [25000]))), b"\0" * 100_000]), P.MODEL_MISMATCH, "eq")
        # Every frame under the limit but more than the limit in all: TOO_LARGE from the daemon.
        frames = [hdr(id="sum", tensors=tens(("float32", [200, 64]), ("float32", [200, 64]))), b"\0" * 51_200, b"\0" * 51_200]
        check_error(roundtrip(b, frames), P.TOO_LARGE, "sum")
        # One frame over the limit: libzmq drops the message and disconnects the peer; no reply ever comes.
        a.send_multipart([hdr(id="big", tensors=tens(("uint8", [100_001]))), b"\0" * 100_001])
        assert not a.poll(1500), "an over-limit message must not be answered"
        assert d.proc.poll() is None, d.logs()
        c = dealer(d.endpoint)
        try:
            good_infer(c, tiny_module, tiny_inputs(2, 9))
            head, _ = decode_reply(roundtrip(c, [hdr(op="ping", tensors=DEL, id="alive")]))
            assert head["status"] == "ok"
        finally:
            c.close(linger=0)
        good_infer(b, tiny_module, tiny_inputs(3))          # other peers were never affected
        assert d.control()["requests"] >= 3
    finally:
        a.close(linger=0)
        b.close(linger=0)
    assert d.stop() == 0


def test_docs_minimal_client(tiny_daemon, tiny_module):
    """The ~20-line client in docs/protocol.md section 11 works as written."""
    import os
    import re
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")).read()
    m = re.search(r"<!-- client-example[^\n]*\n```python\n(.*?)```", text, re.S)
    assert m, "client example block missing from docs/protocol.md"
    ns: dict = {}
    exec(compile(m.group(1), "docs/protocol.md", "exec"), ns)
    x = tiny_inputs(11, 4)[0]
    (y,) = ns["infer"](tiny_daemon.endpoint, x)
    np.testing.assert_allclose(y, _reference(tiny_module, x)[0], rtol=1e-4, atol=1e-5)
    (y,) = ns["infer"](tiny_daemon.endpoint, x.astype(">f4"))       # big-endian input is converted
    np.testing.assert_allclose(y, _reference(tiny_module, x)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="MODEL_MISMATCH"):
        ns["infer"](tiny_daemon.endpoint, x.astype(np.float64))
    with pytest.raises(RuntimeError, match="BAD_TENSOR"):          # an early error, id ""
        ns["infer"](tiny_daemon.endpoint, x[:0])
    with pytest.raises(RuntimeError, match="TOO_LARGE"):
        ns["infer"](tiny_daemon.endpoint, np.zeros((33, 64), np.float32))

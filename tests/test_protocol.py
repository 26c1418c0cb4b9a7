"""The wire protocol, packratd.protocol on its own (pure; tests/test_protocol_daemon.py sends the same
cases to the real daemon).  The case tables and raw-ZeroMQ helpers here are shared with it."""
from __future__ import annotations

import json
import os
import math
import uuid

import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from packratd import protocol as P

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

pytestmark = pytest.mark.fast

DEL = object()   # "remove this key" in hdr()


def hdr(base: dict | None = None, **kw) -> bytes:
    """A request header: a good one-tensor infer header for tiny_mlp, with fields replaced."""
    h = {"v": 1, "id": "req-1", "op": "infer", "tensors": [{"dtype": "float32", "shape": [2, 64]}]}
    if base is not None:
        h = dict(base)
    for k, v in kw.items():
        if v is DEL:
            h.pop(k, None)
        else:
            h[k] = v
    return json.dumps(h, separators=(",", ":")).encode()


def tens(*specs) -> list[dict]:
    return [{"dtype": d, "shape": list(s)} for d, s in specs]


X2 = np.arange(2 * 64, dtype=np.float32).reshape(2, 64) / 100
B512 = X2.tobytes()          # the buffer of a [2, 64] float32 tensor


def ping_of_size(n: int) -> bytes:
    """A valid ping header of exactly n bytes (padded with an ignored field)."""
    base = hdr({"v": 1, "id": "big", "op": "ping", "pad": ""})
    h = hdr({"v": 1, "id": "big", "op": "ping", "pad": "x" * (n - len(base))})
    assert len(h) == n
    return h


# (name, frames, expected code, the daemon knows the request id when it answers)
# Wire-level errors: parse_request itself rejects them.
WIRE_CASES = [
    ("non_json", [b"this is not json"], P.BAD_HEADER),
    ("truncated_json", [hdr()[:-5]], P.BAD_HEADER),
    ("blank_header", [b" "], P.BAD_HEADER),
    ("non_utf8", [b"\xff\xfe\x00{garbage"], P.BAD_HEADER),
    ("non_utf8_inside_string", [b'{"v":1,"id":"\xff\xfe","op":"ping"}'], P.BAD_HEADER),
    ("json_array", [b"[1,2,3]"], P.BAD_HEADER),
    ("json_string", [b'"infer"'], P.BAD_HEADER),
    ("json_null", [b"null"], P.BAD_HEADER),
    ("json_number", [b"1"], P.BAD_HEADER),
    ("deeply_nested_json", [b"[" * 30000 + b"]" * 30000], P.BAD_HEADER),
    ("huge_json_integer", [b'{"v":1,"op":"ping","n":' + b"9" * 5000 + b"}"], P.BAD_HEADER),
    ("header_over_64k", [ping_of_size(70_000)], P.BAD_HEADER),
    ("header_64k_plus_1", [ping_of_size(P.MAX_HEADER_BYTES + 1)], P.BAD_HEADER),
    ("version_missing", [hdr(v=DEL), B512], P.BAD_VERSION),
    ("version_2", [hdr(v=2), B512], P.BAD_VERSION),
    ("version_true", [hdr(v=True), B512], P.BAD_VERSION),
    ("version_string", [hdr(v="1"), B512], P.BAD_VERSION),
    ("version_0", [hdr(v=0), B512], P.BAD_VERSION),
    ("version_null", [hdr(v=None), B512], P.BAD_VERSION),
    ("op_unknown", [hdr(op="train"), B512], P.UNKNOWN_OP),
    ("op_missing", [hdr(op=DEL), B512], P.UNKNOWN_OP),
    ("op_wrong_case", [hdr(op="INFER"), B512], P.UNKNOWN_OP),
    ("op_not_string", [hdr(op=7), B512], P.UNKNOWN_OP),
    ("op_list", [hdr(op=["infer"]), B512], P.UNKNOWN_OP),
    ("id_int", [hdr(id=5), B512], P.BAD_HEADER),
    ("id_null", [hdr(id=None), B512], P.BAD_HEADER),
    ("id_list", [hdr(id=["a"]), B512], P.BAD_HEADER),
    ("id_too_long", [hdr(id="x" * (P.MAX_ID_CHARS + 1)), B512], P.BAD_HEADER),
    ("tensors_missing", [hdr(tensors=DEL), B512], P.BAD_HEADER),
    ("tensors_object", [hdr(tensors={"dtype": "float32", "shape": [2, 64]}), B512], P.BAD_HEADER),
    ("tensors_string", [hdr(tensors="float32"), B512], P.BAD_HEADER),
    ("tensors_null", [hdr(tensors=None), B512], P.BAD_HEADER),
    ("tensors_empty", [hdr(tensors=[])], P.BAD_HEADER),
    ("tensors_over_64", [hdr(tensors=tens(*[("float32", [1])] * 65))] + [b"\0" * 4] * 65, P.BAD_HEADER),
    ("tensor_not_object", [hdr(tensors=[5]), B512], P.BAD_HEADER),
    ("more_buffers_than_described", [hdr(), B512, B512], P.BAD_HEADER),
    ("fewer_buffers_than_described", [hdr()], P.BAD_HEADER),
    ("fewer_buffers_two_described", [hdr(tensors=tens(("float32", [2, 64]), ("float32", [2, 64]))), B512], P.BAD_HEADER),
    ("dtype_object", [hdr(tensors=tens(("object", [2, 64]))), B512], P.BAD_TENSOR),
    ("dtype_complex64", [hdr(tensors=tens(("complex64", [2, 32]))), B512], P.BAD_TENSOR),
    ("dtype_unicode", [hdr(tensors=tens(("<U8", [2, 16]))), B512], P.BAD_TENSOR),
    ("dtype_float128", [hdr(tensors=tens(("float128", [2, 32]))), B512], P.BAD_TENSOR),
    ("dtype_big_endian", [hdr(tensors=tens((">f4", [2, 64]))), B512], P.BAD_TENSOR),
    ("dtype_typestr", [hdr(tensors=tens(("<f4", [2, 64]))), B512], P.BAD_TENSOR),
    ("dtype_alias_float", [hdr(tensors=tens(("float", [2, 64]))), B512], P.BAD_TENSOR),
    ("dtype_missing", [hdr(tensors=[{"shape": [2, 64]}]), B512], P.BAD_TENSOR),
    ("dtype_int", [hdr(tensors=[{"dtype": 11, "shape": [2, 64]}]), B512], P.BAD_TENSOR),
    ("shape_missing", [hdr(tensors=[{"dtype": "float32"}]), B512], P.BAD_TENSOR),
    ("shape_not_list", [hdr(tensors=[{"dtype": "float32", "shape": 128}]), B512], P.BAD_TENSOR),
    ("shape_empty", [hdr(tensors=tens(("float32", []))), b"\0" * 4], P.BAD_TENSOR),
    ("shape_negative_dim", [hdr(tensors=tens(("float32", [-2, -64]))), B512], P.BAD_TENSOR),
    ("shape_negative_tail", [hdr(tensors=tens(("float32", [2, -64]))), B512], P.BAD_TENSOR),
    ("shape_float_dim", [hdr(tensors=tens(("float32", [2, 64.0]))), B512], P.BAD_TENSOR),
    ("shape_string_dim", [hdr(tensors=tens(("float32", [2, "64"]))), B512], P.BAD_TENSOR),
    ("shape_null_dim", [hdr(tensors=tens(("float32", [None, 64]))), B512], P.BAD_TENSOR),
    # [true, 64] would be 256 bytes if true counted as 1: the buffer matches, only the type is wrong.
    ("shape_bool_dim", [hdr(tensors=tens(("float32", [True, 64]))), B512[:256]], P.BAD_TENSOR),
    # 17 dims whose product is right for the buffer: only the dimension count is wrong.
    ("shape_17_dims", [hdr(tensors=tens(("float32", [2, 64] + [1] * 15))), B512], P.BAD_TENSOR),
    ("shape_product_overflows_int64", [hdr(tensors=tens(("float32", [2**31, 2**31, 2**31]))), B512], P.BAD_TENSOR),
    ("shape_product_overflows_int64_16_dims", [hdr(tensors=tens(("float64", [2**31] * 16))), B512], P.BAD_TENSOR),
    ("shape_dim_over_2_31", [hdr(tensors=tens(("float32", [2**31 + 1, 64]))), B512], P.BAD_TENSOR),
    ("shape_dim_2_63", [hdr(tensors=tens(("float32", [2, 2**63]))), B512], P.BAD_TENSOR),
    ("shape_dim_2_64", [hdr(tensors=tens(("float32", [2, 2**64 + 64]))), B512], P.BAD_TENSOR),
    ("buffer_one_byte_short", [hdr(), B512[:-1]], P.BAD_TENSOR),
    ("buffer_one_byte_long", [hdr(), B512 + b"\0"], P.BAD_TENSOR),
    ("buffer_empty", [hdr(), b""], P.BAD_TENSOR),
    ("buffer_of_other_tensor", [hdr(tensors=tens(("float32", [2, 64]), ("float32", [1, 64]))), B512[:256], B512], P.BAD_TENSOR),
    ("batch_dim_zero", [hdr(tensors=tens(("float32", [0, 64]))), b""], P.BAD_TENSOR),
    ("timeout_zero", [hdr(timeout_ms=0), B512], P.BAD_HEADER),
    ("timeout_negative", [hdr(timeout_ms=-5), B512], P.BAD_HEADER),
    ("timeout_string", [hdr(timeout_ms="100"), B512], P.BAD_HEADER),
    ("timeout_bool", [hdr(timeout_ms=True), B512], P.BAD_HEADER),
    ("timeout_list", [hdr(timeout_ms=[100]), B512], P.BAD_HEADER),
    ("timeout_nan", [hdr(timeout_ms=float("nan")), B512], P.BAD_HEADER),            # Python writes NaN
    ("timeout_infinity", [hdr(timeout_ms=float("inf")), B512], P.BAD_HEADER),       # ... and Infinity
    ("timeout_1e400", [hdr()[:-1] + b',"timeout_ms":1e400}', B512], P.BAD_HEADER),   # parses to inf
    ("timeout_huge_integer", [hdr(timeout_ms=10**400), B512], P.BAD_HEADER),
    ("ping_with_buffer", [hdr(op="ping", tensors=DEL), b"x"], P.BAD_HEADER),
    ("spec_with_buffer", [hdr(op="spec", tensors=DEL), b"x"], P.BAD_HEADER),
]

TINY_SPEC = [{"name": "x", "dtype": "float32", "shape": [None, 64]}]
TWO_SPEC = [{"name": "x", "dtype": "float32", "shape": [None, 16]}, {"name": "ids", "dtype": "int64", "shape": [None, 8]}]

# Model-level errors for tiny_mlp (x float32 [B, 64], server.max_batch_size 32): the header is
# well formed, so the reply carries the request's id.
TINY_MODEL_CASES = [
    ("dtype_float64_for_float32", [hdr(tensors=tens(("float64", [2, 64]))), X2.astype(np.float64).tobytes()], P.MODEL_MISMATCH),
    ("dtype_float16_for_float32", [hdr(tensors=tens(("float16", [2, 64]))), X2.astype(np.float16).tobytes()], P.MODEL_MISMATCH),
    ("dtype_int32_for_float32", [hdr(tensors=tens(("int32", [2, 64]))), B512], P.MODEL_MISMATCH),
    ("row_shape_63", [hdr(tensors=tens(("float32", [2, 63]))), B512[:504]], P.MODEL_MISMATCH),
    ("row_shape_extra_dim", [hdr(tensors=tens(("float32", [2, 64, 1]))), B512], P.MODEL_MISMATCH),
    ("row_shape_transposed", [hdr(tensors=tens(("float32", [64, 2]))), B512], P.MODEL_MISMATCH),
    ("row_shape_flat", [hdr(tensors=tens(("float32", [128]))), B512], P.MODEL_MISMATCH),
    ("two_tensors_for_one_input", [hdr(tensors=tens(("float32", [2, 64]), ("float32", [2, 64]))), B512, B512], P.MODEL_MISMATCH),
    ("rows_over_max_batch", [hdr(tensors=tens(("float32", [33, 64]))), b"\0" * (33 * 256)], P.TOO_LARGE),
    ("rows_far_over_max_batch", [hdr(tensors=tens(("float32", [1000, 64]))), b"\0" * (1000 * 256)], P.TOO_LARGE),
]

XA = np.linspace(-1, 1, 2 * 16, dtype=np.float32).reshape(2, 16)
IDS = np.arange(16, dtype=np.int64).reshape(2, 8)


def two_hdr(*specs, **kw) -> bytes:
    return hdr({"v": 1, "id": "req-2", "op": "infer", "tensors": tens(*specs)}, **kw)


# tiny_two_input: x float32 [B, 16], ids int64 [B, 8] (ids must be < 100).
TWO_CASES = [
    ("one_tensor_for_two_inputs", [two_hdr(("float32", [2, 16])), XA.tobytes()], P.MODEL_MISMATCH),
    ("three_tensors_for_two_inputs", [two_hdr(("float32", [2, 16]), ("int64", [2, 8]), ("int64", [2, 8])),
                                      XA.tobytes(), IDS.tobytes(), IDS.tobytes()], P.MODEL_MISMATCH),
    ("inputs_swapped", [two_hdr(("int64", [2, 8]), ("float32", [2, 16])), IDS.tobytes(), XA.tobytes()], P.MODEL_MISMATCH),
    ("ids_int32", [two_hdr(("float32", [2, 16]), ("int32", [2, 8])), XA.tobytes(), IDS.astype(np.int32).tobytes()], P.MODEL_MISMATCH),
    ("inconsistent_batch_dims", [two_hdr(("float32", [2, 16]), ("int64", [3, 8])), XA.tobytes(),
                                 np.zeros((3, 8), np.int64).tobytes()], P.BAD_TENSOR),
    ("inconsistent_batch_dims_second_empty", [two_hdr(("float32", [2, 16]), ("int64", [0, 8])), XA.tobytes(), b""], P.BAD_TENSOR),
    ("ids_out_of_range", [two_hdr(("float32", [2, 16]), ("int64", [2, 8])), XA.tobytes(), (IDS + 100).tobytes()], P.MODEL_ERROR),
    ("ids_negative", [two_hdr(("float32", [2, 16]), ("int64", [2, 8])), XA.tobytes(), (-IDS - 1).tobytes()], P.MODEL_ERROR),
]

CASES = {c[0]: c for c in WIRE_CASES + TINY_MODEL_CASES + TWO_CASES}
assert len(CASES) == len(WIRE_CASES) + len(TINY_MODEL_CASES) + len(TWO_CASES), "duplicate case names"
# The cases the dispatcher rejects after parse_request returned, i.e. once it knows the request's id.
ID_KNOWN = {c[0] for c in TINY_MODEL_CASES + TWO_CASES if c[2] != P.BAD_TENSOR}


def _reference(module, *arrays):
    with torch.inference_mode():
        out = module(*[torch.from_numpy(a) for a in arrays])
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.numpy() for o in out]


def dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def roundtrip(sock: zmq.Socket, frames: list, timeout_s: float = 30.0) -> list[bytes]:
    sock.send_multipart(frames)
    if not sock.poll(int(timeout_s * 1000)):
        raise AssertionError(f"no reply within {timeout_s}s")
    return sock.recv_multipart()


def decode_reply(frames: list[bytes]) -> tuple[dict, list[bytes]]:
    head = json.loads(frames[0].decode("utf-8"))
    assert isinstance(head, dict)
    assert head["v"] == P.VERSION
    assert head["status"] in ("ok", "error")
    assert isinstance(head["id"], str)
    return head, frames[1:]


def check_error(frames: list[bytes], code: str, sent_id: str | None, id_known: bool = True) -> dict:
    head, bufs = decode_reply(frames)
    assert head["status"] == "error", head
    assert head["code"] == code, head
    assert head["code"] in P.ERROR_CODES
    assert isinstance(head["message"], str) and head["message"]
    assert bufs == [], "an error reply has no buffer frames"
    if id_known:
        assert head["id"] == sent_id, head
    else:
        # A header with no readable id: the error carries id "".
        assert head["id"] in ("", sent_id), head
    return head


def good_infer(sock: zmq.Socket, module, arrays: list[np.ndarray], rid: str | None = None) -> list[np.ndarray]:
    """Send a well-formed infer by hand and check the answer against the model run in-process."""
    rid = rid or uuid.uuid4().hex
    head = {"v": 1, "id": rid, "op": "infer",
            "tensors": [{"dtype": a.dtype.name, "shape": list(a.shape)} for a in arrays]}
    frames = roundtrip(sock, [json.dumps(head).encode()] + [np.ascontiguousarray(a).tobytes() for a in arrays])
    reply, bufs = decode_reply(frames)
    assert reply["status"] == "ok", reply
    assert reply["id"] == rid
    want = _reference(module, *arrays)
    assert len(reply["tensors"]) == len(bufs) == len(want)
    outs = []
    for meta, buf, w in zip(reply["tensors"], bufs, want):
        assert meta["dtype"] in P.DTYPES
        y = np.frombuffer(buf, dtype=np.dtype(meta["dtype"]).newbyteorder("<")).reshape(meta["shape"])
        assert y.shape == w.shape and y.dtype == w.dtype
        np.testing.assert_allclose(y, w, rtol=1e-4, atol=1e-5)
        outs.append(y)
    return outs


def tiny_inputs(seed: int, n: int = 3):
    return [np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)]


def two_inputs(seed: int, n: int = 3):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 16)).astype(np.float32), rng.integers(0, 100, (n, 8)).astype(np.int64)]


def sent_id(frames: list) -> str | None:
    try:
        h = json.loads(bytes(frames[0]))
        return h.get("id", "") if isinstance(h, dict) else None
    except (ValueError, RecursionError):
        return None


# ---------------------------------------------------------------------------------------------
# 1a. Unit tests: packratd.protocol alone
# ---------------------------------------------------------------------------------------------

def test_parse_good_infer_does_not_copy_buffers():
    buf = bytearray(B512)
    req = P.parse_request([hdr(timeout_ms=250), buf], max_bytes=10_000)
    assert req.id == "req-1" and req.op == "infer" and req.timeout_ms == 250.0
    assert req.tensors == [P.TensorMeta("float32", (2, 64))]
    assert req.tensors[0].nbytes == 512
    assert req.buffers[0].obj is buf           # a view of the frame, not a copy
    np.testing.assert_array_equal(np.frombuffer(req.buffers[0], np.float32).reshape(2, 64), X2)


@pytest.mark.parametrize("op", ["ping", "spec"])
def test_parse_ping_and_spec(op):
    req = P.parse_request([hdr(op=op, tensors=DEL)])
    assert (req.op, req.id, req.tensors, req.buffers, req.timeout_ms) == (op, "req-1", [], [], None)
    # "tensors" is ignored on a non-infer op; unknown keys are ignored everywhere.
    assert P.parse_request([hdr(op=op, future_field={"x": 1})]).op == op


def test_parse_optional_and_boundary_fields():
    assert P.parse_request([hdr(id=DEL), B512]).id == ""                          # id is optional
    assert P.parse_request([hdr(id="é" * P.MAX_ID_CHARS), B512]).id == "é" * P.MAX_ID_CHARS   # characters, not bytes
    assert P.parse_request([hdr(timeout_ms=None), B512]).timeout_ms is None        # null == absent
    assert P.parse_request([hdr(timeout_ms=0.001), B512]).timeout_ms == 0.001
    assert P.parse_request([hdr(timeout_ms=10**300), B512]).timeout_ms == 1e300
    assert isinstance(P.parse_request([hdr(timeout_ms=10**300), B512]).timeout_ms, float)
    assert P.parse_request([ping_of_size(P.MAX_HEADER_BYTES)]).op == "ping"      # exactly 64 KiB is fine
    assert P.parse_request([hdr(tensors=tens(("float32", [1] * P.MAX_DIMS))), b"\0" * 4]).tensors[0].shape == (1,) * 16
    metas = P.parse_request([hdr(tensors=tens(*[("uint8", [1])] * P.MAX_TENSORS))] + [b"\0"] * 64).tensors
    assert len(metas) == P.MAX_TENSORS
    # A dimension of exactly 2^31 is allowed (the product is checked against the buffer, in Python ints).
    with pytest.raises(P.ProtocolError) as e:
        P.parse_request([hdr(tensors=tens(("uint8", [2**31]))), b"\0"])
    assert e.value.code == P.BAD_TENSOR and "needs 2147483648 bytes" in e.value.message
    # A non-batch dimension of 0 is legal on the wire (whether the model takes it is the dispatcher's business).
    assert P.parse_request([hdr(tensors=tens(("float32", [3, 0]))), b""]).tensors[0].shape == (3, 0)


@pytest.mark.parametrize("name,frames,code", WIRE_CASES + [c for c in TWO_CASES if c[2] == P.BAD_TENSOR],
                         ids=[c[0] for c in WIRE_CASES + [c for c in TWO_CASES if c[2] == P.BAD_TENSOR]])
def test_parse_rejects(name, frames, code):
    with pytest.raises(P.ProtocolError) as e:
        P.parse_request(frames, max_bytes=1 << 28)
    assert e.value.code == code, e.value


def test_parse_rejects_empty_message_and_too_many_bytes():
    with pytest.raises(P.ProtocolError) as e:
        P.parse_request([])
    assert e.value.code == P.BAD_HEADER
    frames = [hdr(tensors=tens(("float32", [2, 64]), ("float32", [2, 64]))), B512, B512]
    assert len(P.parse_request(frames, max_bytes=1024).buffers) == 2           # 1024 is not more than 1024
    with pytest.raises(P.ProtocolError) as e:
        P.parse_request(frames, max_bytes=1023)
    assert e.value.code == P.TOO_LARGE


def test_check_against_spec():
    P.check_against_spec([P.TensorMeta("float32", (5, 64))], TINY_SPEC)
    P.check_against_spec([P.TensorMeta("float32", (1, 16)), P.TensorMeta("int64", (1, 8))], TWO_SPEC)
    bad = [
        ([], TINY_SPEC),
        ([P.TensorMeta("float32", (5, 64))] * 2, TINY_SPEC),
        ([P.TensorMeta("float64", (5, 64))], TINY_SPEC),
        ([P.TensorMeta("float32", (5, 63))], TINY_SPEC),
        ([P.TensorMeta("float32", (5, 64, 1))], TINY_SPEC),
        ([P.TensorMeta("float32", (320,))], TINY_SPEC),
        ([P.TensorMeta("float32", (1, 16))], TWO_SPEC),
        ([P.TensorMeta("int64", (1, 8)), P.TensorMeta("float32", (1, 16))], TWO_SPEC),
        ([P.TensorMeta("float32", (1, 16)), P.TensorMeta("int32", (1, 8))], TWO_SPEC),
    ]
    for metas, spec in bad:
        with pytest.raises(P.ProtocolError) as e:
            P.check_against_spec(metas, spec)
        assert e.value.code == P.MODEL_MISMATCH, (metas, spec)


@pytest.mark.parametrize("name,frames,code", [c for c in TINY_MODEL_CASES if c[2] == P.MODEL_MISMATCH],
                         ids=[c[0] for c in TINY_MODEL_CASES if c[2] == P.MODEL_MISMATCH])
def test_model_cases_pass_the_wire_check_then_fail_the_spec(name, frames, code):
    req = P.parse_request(frames)
    with pytest.raises(P.ProtocolError) as e:
        P.check_against_spec(req.tensors, TINY_SPEC)
    assert e.value.code == code


def _roundtrip_arrays(arrays: list[np.ndarray]) -> None:
    frames = P.request_frames("rt", arrays)
    wire = [bytes(f) for f in frames]                                  # what actually crosses the wire
    req = P.parse_request(wire)
    assert [m.to_json() for m in req.tensors] == [{"dtype": a.dtype.name, "shape": list(a.shape)} for a in arrays]
    for a, meta, buf in zip(arrays, req.tensors, req.buffers):
        got = np.frombuffer(buf, dtype=P.DTYPES[meta.dtype]).reshape(meta.shape)
        assert got.dtype == a.dtype
        assert got.tobytes() == np.ascontiguousarray(a).tobytes()       # bit-exact, NaN payloads included
        assert bytes(buf) == a.astype(a.dtype.newbyteorder("<")).tobytes()   # little-endian on the wire
    # The daemon's reply path: ok_header + the same buffers, parsed by the client.
    reply = [P.ok_header("rt", req.tensors)] + [bytes(b) for b in req.buffers]
    rid, outs, head = P.parse_reply(reply)
    assert rid == "rt" and head["status"] == "ok" and head["v"] == P.VERSION
    for a, o in zip(arrays, outs):
        assert o.dtype == a.dtype and o.shape == a.shape and o.tobytes() == np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("dtype", list(P.DTYPES))
def test_request_reply_roundtrip_every_dtype(dtype):
    rng = np.random.default_rng(7)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        a = rng.integers(0, 2, (3, 5)).astype(bool)
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        a = rng.integers(info.min, info.max, (3, 5), endpoint=True, dtype=dt)
    else:
        a = (rng.standard_normal((3, 5)) * 100).astype(dt)
        a[0, :3] = [np.nan, np.inf, -np.inf]
        a[1, 0] = -0.0
    _roundtrip_arrays([a])
    _roundtrip_arrays([a.T])                                  # non-contiguous: made C-contiguous
    _roundtrip_arrays([a[:, :0]])                             # zero-size tail
    _roundtrip_arrays([a, a[:, :2].copy(), a.reshape(3, 5, 1)])


def test_request_frames_refuses_unsendable_dtypes():
    for a in (np.zeros(3, ">f4"), np.zeros(3, np.complex64), np.zeros(3, "U4"), np.zeros(3, object),
              np.zeros(3, np.uint32), np.zeros(3, np.float128) if hasattr(np, "float128") else np.zeros(3, "V4")):
        with pytest.raises(P.ProtocolError) as e:
            P.request_frames("x", [a])
        assert e.value.code == P.BAD_TENSOR, a.dtype


def test_headers():
    ok = json.loads(P.ok_header("abc", [P.TensorMeta("float32", (2, 10))]))
    assert ok == {"v": 1, "id": "abc", "status": "ok", "tensors": [{"dtype": "float32", "shape": [2, 10]}]}
    err = json.loads(P.error_header("abc", P.TOO_LARGE, "split it"))
    assert err == {"v": 1, "id": "abc", "status": "error", "code": "TOO_LARGE", "message": "split it"}
    with pytest.raises(P.ReplyError) as e:
        P.parse_reply([P.error_header("abc", P.TIMEOUT, "late")])
    assert (e.value.id, e.value.code, e.value.message) == ("abc", "TIMEOUT", "late")
    # Headers are compact ASCII JSON; odd ids survive.
    weird = 'ü"\\\n\u2028'
    assert json.loads(P.error_header(weird, P.BAD_HEADER, "m"))["id"] == weird
    assert P.encode_header({"a": [1, 2]}) == b'{"a":[1,2]}'
    assert len(set(P.ERROR_CODES)) == len(P.ERROR_CODES) == 12
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")).read()
    assert [c for c in P.ERROR_CODES if f"`{c}`" not in doc] == []       # every code is documented


def test_parse_reply_rejects_garbage_as_protocol_error():
    for frames in ([b"\xff"], [b"nope"], [b"[]"], [b"7"]):
        with pytest.raises(P.ProtocolError) as e:
            P.parse_reply(frames)
        assert e.value.code == P.INTERNAL


# Property tests: parse_request never raises anything but ProtocolError, whatever arrives.
_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["infer", "ping", "spec", "float32", "int64", "bool", "object", "<U8"]),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
    max_leaves=20)


@st.composite
def _headers(draw):
    h = {"v": draw(st.sampled_from([1, 1, 1, 2, True, "1", None, 1.0])),
         "op": draw(st.sampled_from(["infer", "infer", "ping", "spec", "x", None]))}
    if draw(st.booleans()):
        h["id"] = draw(st.text(max_size=140) | _json)
    if draw(st.booleans()):
        h["timeout_ms"] = draw(_json | st.floats() | st.integers(min_value=-5, max_value=10**400))
    n = draw(st.integers(0, 3))
    tensors = []
    for _ in range(n):
        t = {"dtype": draw(st.sampled_from(list(P.DTYPES) + ["object", "float128", 3])),
             "shape": draw(st.lists(st.integers(-2, 5) | st.sampled_from([2**31, 2**31 + 1, 2**63, True, 1.5]),
                                    max_size=18) | _json)}
        tensors.append(t if draw(st.integers(0, 9)) else draw(_json))
    if draw(st.integers(0, 5)):
        h["tensors"] = tensors
    for k, v in draw(st.dictionaries(st.sampled_from(["v", "op", "id", "tensors", "timeout_ms", "zz"]), _json, max_size=2)).items():
        h[k] = v
    return h


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(h=_headers(), bufs=st.lists(st.binary(max_size=40), max_size=4), max_bytes=st.none() | st.integers(0, 64))
def test_parse_request_only_raises_protocol_errors(h, bufs, max_bytes):
    try:
        head = json.dumps(h).encode()
    except (ValueError, OverflowError):
        return
    try:
        req = P.parse_request([head] + bufs, max_bytes=max_bytes)
    except P.ProtocolError as e:
        assert e.code in P.ERROR_CODES
        return
    # Whatever it accepted is internally consistent.
    assert req.op in P.OPS and isinstance(req.id, str)
    assert req.timeout_ms is None or (isinstance(req.timeout_ms, float) and 0 < req.timeout_ms < math.inf)
    assert len(req.tensors) == len(req.buffers)
    for m, b in zip(req.tensors, req.buffers):
        assert m.nbytes == memoryview(b).nbytes and m.shape[0] >= 1
        assert len({t.shape[0] for t in req.tensors}) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.binary(max_size=16), max_size=3))
def test_parse_request_on_random_bytes(head, bufs):
    try:
        P.parse_request([head] + bufs)
    except P.ProtocolError as e:
        assert e.code in P.ERROR_CODES


@st.composite
def _batches(draw):
    """1 to 3 arrays of any wire dtype sharing a batch dim >= 1, any tail (zero-size included)."""
    rows = draw(st.integers(1, 4))
    return [draw(hnp.arrays(st.sampled_from(list(P.DTYPES.values())),
                            st.lists(st.integers(0, 4), max_size=3).map(lambda t: (rows, *t))))
            for _ in range(draw(st.integers(1, 3)))]


@settings(max_examples=150, deadline=None)
@given(_batches())
def test_roundtrip_property(arrays):
    _roundtrip_arrays(arrays)

"""packratd wire protocol: multipart ZeroMQ messages, a small JSON header, raw tensor buffers.

A client message is ``[header, buf_0, ..., buf_{n-1}]`` (a REQ socket adds its own empty
delimiter frame in front; the daemon answers with the same envelope).  The header is a UTF-8
JSON object of at most :data:`MAX_HEADER_BYTES`; each buffer is one C-contiguous little-endian
tensor whose dtype and shape the header gives.  Nothing on the wire is ever unpickled.
See docs/protocol.md for the full specification.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_ID_CHARS = 128
MAX_DIMS = 16
MAX_TENSORS = 64

# Stable error codes (docs/protocol.md lists what each means).
BAD_HEADER = "BAD_HEADER"          # not JSON / not an object / missing or ill-typed field / too big
BAD_VERSION = "BAD_VERSION"        # header "v" is not a version this daemon speaks
UNKNOWN_OP = "UNKNOWN_OP"
BAD_TENSOR = "BAD_TENSOR"          # dtype unknown, shape invalid, buffer size does not match dtype and shape
MODEL_MISMATCH = "MODEL_MISMATCH"  # tensor count, dtype or per-row shape differs from the model's inputs
TOO_LARGE = "TOO_LARGE"            # more rows than server.max_batch_size
OVERLOADED = "OVERLOADED"          # queue full
TIMEOUT = "TIMEOUT"                # the request's deadline passed before it could run
DRAINING = "DRAINING"              # the daemon is shutting down
MODEL_ERROR = "MODEL_ERROR"        # the model raised on this request's data (e.g. an id out of range)
UNAVAILABLE = "UNAVAILABLE"        # no generation can serve: still starting, or failed (see health)
INTERNAL = "INTERNAL"

ERROR_CODES = (BAD_HEADER, BAD_VERSION, UNKNOWN_OP, BAD_TENSOR, MODEL_MISMATCH, TOO_LARGE,
               OVERLOADED, TIMEOUT, DRAINING, MODEL_ERROR, UNAVAILABLE, INTERNAL)
RETRYABLE = frozenset({OVERLOADED, DRAINING, UNAVAILABLE})

OPS = ("infer", "ping", "spec", "health")
MAX_FRAMES = 1 + MAX_TENSORS       # header + one buffer per tensor

# The dtypes that may cross the wire, by their numpy names.  Object, void, string and
# big-endian dtypes never do.
DTYPES = {name: np.dtype(name) for name in (
    "bool", "int8", "uint8", "int16", "int32", "int64", "float16", "float32", "float64")}


class ProtocolError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = ""        # the request's id, when the header got far enough to carry one


@dataclass(frozen=True)
class TensorMeta:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}


def encode_header(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def tensor_meta(arr: np.ndarray) -> TensorMeta:
    name = arr.dtype.name
    if name not in DTYPES or arr.dtype.byteorder == ">":
        raise ProtocolError(BAD_TENSOR, f"dtype {arr.dtype} cannot be sent (allowed: {', '.join(DTYPES)})")
    return TensorMeta(name, tuple(int(d) for d in arr.shape))


def parse_tensor_meta(obj, index: int) -> TensorMeta:
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_HEADER, f"tensors[{index}] is not an object")
    dtype = obj.get("dtype")
    shape = obj.get("shape")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(BAD_TENSOR, f"tensors[{index}].dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_DIMS:
        raise ProtocolError(BAD_TENSOR, f"tensors[{index}].shape must be a list of 1 to {MAX_DIMS} dimensions")
    for d in shape:
        # bool is an int subclass in Python; JSON true must not pass as 1.
        if not isinstance(d, int) or isinstance(d, bool) or d < 0 or d > 2**31:
            raise ProtocolError(BAD_TENSOR, f"tensors[{index}].shape {shape!r}: dimensions must be integers in 0..2^31")
    return TensorMeta(dtype, tuple(shape))


@dataclass
class Request:
    """A parsed client message.  ``buffers`` are the raw frames' memoryviews (not copied)."""
    id: str
    op: str
    tensors: list[TensorMeta]
    buffers: list
    timeout_ms: float | None = None
    trace: bool = False                # ask for per-hop timestamps in the reply (tools/trace_request.py)


def parse_request(frames: list, max_bytes: int | None = None) -> Request:
    """Validate a client message (header frame + buffer frames).  Raises ProtocolError.

    ``frames`` holds objects with the buffer protocol (zmq.Frame.buffer, bytes, memoryview).
    Checks only what the wire format itself requires; model-specific checks live in the
    dispatcher (:func:`check_against_spec`).
    """
    if not frames:
        raise ProtocolError(BAD_HEADER, "empty message")
    head = memoryview(frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(BAD_HEADER, f"header is {head.nbytes} bytes, more than {MAX_HEADER_BYTES}")
    try:
        obj = json.loads(bytes(head).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(BAD_HEADER, f"header is not UTF-8 JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_HEADER, "header must be a JSON object")
    rid = obj.get("id", "")
    try:
        return _parse_fields(obj, frames, max_bytes)
    except ProtocolError as e:
        # Echo the request's id on every error we can attribute, so the client can match it.
        e.id = rid if isinstance(rid, str) and len(rid) <= MAX_ID_CHARS else ""
        raise


def _parse_fields(obj: dict, frames: list, max_bytes: int | None) -> Request:
    if len(frames) > MAX_FRAMES:     # before looking at any buffer
        raise ProtocolError(BAD_HEADER, f"message has {len(frames)} frames; at most {MAX_FRAMES} (a header and "
                            f"{MAX_TENSORS} tensors)")
    v = obj.get("v")
    if v != VERSION or isinstance(v, bool):
        raise ProtocolError(BAD_VERSION, f"protocol version {v!r} is not supported (this daemon speaks {VERSION})")
    rid = obj.get("id", "")
    if not isinstance(rid, str) or len(rid) > MAX_ID_CHARS:
        raise ProtocolError(BAD_HEADER, f"id must be a string of at most {MAX_ID_CHARS} characters")
    op = obj.get("op")
    if op not in OPS:
        raise ProtocolError(UNKNOWN_OP, f"op {op!r} is not one of {', '.join(OPS)}")
    timeout_ms = obj.get("timeout_ms")
    if timeout_ms is not None:
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)):
            raise ProtocolError(BAD_HEADER, "timeout_ms must be a positive number")
        try:
            # JSON integers are unbounded: float() (not math.isfinite, which raised OverflowError and
            # surfaced as INTERNAL) rejects those beyond a double, and the dispatcher only ever sees a float.
            timeout_ms = float(timeout_ms)
        except OverflowError:
            raise ProtocolError(BAD_HEADER, "timeout_ms must be a positive number") from None
        if not math.isfinite(timeout_ms) or timeout_ms <= 0:
            raise ProtocolError(BAD_HEADER, "timeout_ms must be a positive number")
    trace = obj.get("trace", False)
    if not isinstance(trace, bool):
        raise ProtocolError(BAD_HEADER, "trace must be true or false")
    if op != "infer":
        if len(frames) != 1:
            raise ProtocolError(BAD_HEADER, f"op {op} takes no buffers, got {len(frames) - 1}")
        return Request(rid, op, [], [], timeout_ms)
    tensors = obj.get("tensors")
    if not isinstance(tensors, list) or not 1 <= len(tensors) <= MAX_TENSORS:
        raise ProtocolError(BAD_HEADER, f"tensors must be a list of 1 to {MAX_TENSORS} tensor descriptions")
    metas = [parse_tensor_meta(t, i) for i, t in enumerate(tensors)]
    if len(frames) - 1 != len(metas):
        raise ProtocolError(BAD_HEADER, f"header describes {len(metas)} tensors but {len(frames) - 1} buffers follow")
    buffers = []
    total = 0
    for i, (meta, fr) in enumerate(zip(metas, frames[1:])):
        mv = memoryview(fr)
        if mv.nbytes != meta.nbytes:
            raise ProtocolError(BAD_TENSOR, f"tensors[{i}]: {meta.dtype}{list(meta.shape)} needs {meta.nbytes} bytes, buffer has {mv.nbytes}")
        total += mv.nbytes
        buffers.append(mv)
    if max_bytes is not None and total > max_bytes:
        raise ProtocolError(TOO_LARGE, f"request carries {total} bytes, more than {max_bytes}")
    rows = {m.shape[0] for m in metas}
    if len(rows) != 1:
        raise ProtocolError(BAD_TENSOR, f"all tensors must have the same batch size (dim 0), got {sorted(rows)}")
    if metas[0].shape[0] < 1:
        raise ProtocolError(BAD_TENSOR, "batch dimension must be at least 1")
    return Request(rid, op, metas, buffers, timeout_ms, trace)


def check_against_spec(metas: list[TensorMeta], spec: list[dict]) -> None:
    """Check tensor count, dtypes and per-row shapes against the model's input spec."""
    if len(metas) != len(spec):
        names = ", ".join(s.get("name", "?") for s in spec)
        raise ProtocolError(MODEL_MISMATCH, f"model takes {len(spec)} inputs ({names}), request has {len(metas)}")
    for i, (m, s) in enumerate(zip(metas, spec)):
        want_tail = tuple(s["shape"][1:])
        if m.dtype != s["dtype"]:
            raise ProtocolError(MODEL_MISMATCH, f"input {i} ({s.get('name', '?')}): dtype {m.dtype}, model wants {s['dtype']}")
        if m.shape[1:] != want_tail:
            raise ProtocolError(MODEL_MISMATCH, f"input {i} ({s.get('name', '?')}): shape {list(m.shape)}, model wants [batch, {', '.join(map(str, want_tail))}]")


def ok_header(rid: str, metas: list[TensorMeta]) -> bytes:
    return encode_header({"v": VERSION, "id": rid, "status": "ok", "tensors": [m.to_json() for m in metas]})


def error_header(rid: str, code: str, message: str) -> bytes:
    return encode_header({"v": VERSION, "id": rid, "status": "error", "code": code, "message": message})


def request_frames(rid: str, arrays: list[np.ndarray], op: str = "infer", timeout_ms: float | None = None,
                   trace: bool = False) -> list:
    """Client side: build [header, buffers...] for arrays (made C-contiguous; no copy when they already are)."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    metas = [tensor_meta(a) for a in arrays]
    head = {"v": VERSION, "id": rid, "op": op}
    if op == "infer":
        head["tensors"] = [m.to_json() for m in metas]
    if timeout_ms is not None:
        head["timeout_ms"] = timeout_ms
    if trace:
        head["trace"] = True
    return [encode_header(head)] + [memoryview(a).cast("B") if a.size else b"" for a in arrays]


def parse_reply(frames: list):
    """Client side: returns (id, arrays) or raises ProtocolError(code, message) for an error reply."""
    try:
        obj = json.loads(bytes(frames[0]).decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(INTERNAL, f"daemon sent an unreadable header: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(INTERNAL, "daemon sent a header that is not a JSON object")
    rid = obj.get("id", "")
    if obj.get("status") != "ok":
        raise ReplyError(rid, obj.get("code", INTERNAL), obj.get("message", ""))
    arrays = []
    for meta, fr in zip(obj.get("tensors", []), frames[1:]):
        arrays.append(np.frombuffer(fr, dtype=DTYPES[meta["dtype"]]).reshape(meta["shape"]))
    return rid, arrays, obj


class ReplyError(ProtocolError):
    """An error reply from the daemon: .code (stable) and .message (human)."""

    def __init__(self, rid: str, code: str, message: str):
        super().__init__(code, message)
        self.id = rid

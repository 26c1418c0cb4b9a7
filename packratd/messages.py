"""Messages between the dispatcher (or the profiler) and workers: one encoder and one decoder for every kind.

Every message is multipart: ``[KIND, header JSON, buffers...]`` (HB has no header).  On the daemon's
ROUTER sockets the worker's identity frame comes first and is not part of the message.

worker -> daemon
  READY    {pid, spec, outputs, boot_s, threads, cpus, runtime, digest}  the instance is loaded and warm
  HB                                                                     heartbeat (both directions)
  RESULT   {task, ms, tensors: [{dtype, shape}], trace?} buffers...      a slice's outputs
  ERROR    {task, message}                                               the model raised on a slice
  BOOTFAIL {message}                                                     the worker cannot serve; it exits
daemon -> worker
  WORK     {task, inputs: [{dtype, tail, rows: [n, ...]}], trace?} segments...   rows of a batch, one segment
                                                                         per (input, request) in order
  HB

``decode`` never raises anything but :class:`MessageError`, whatever the frames hold, so a confused
or hostile peer on a worker socket cannot take the dispatcher down.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from . import protocol as P

READY, HB, RESULT, ERROR, BOOTFAIL, WORK = "READY", "HB", "RESULT", "ERROR", "BOOTFAIL", "WORK"
_WITH_HEAD = {READY, RESULT, ERROR, BOOTFAIL, WORK}
KINDS = _WITH_HEAD | {HB}
_KIND_BYTES = {k: k.encode() for k in KINDS}
_BYTES_KIND = {v: k for k, v in _KIND_BYTES.items()}
MAX_HEAD_BYTES = 1 << 20


class MessageError(ValueError):
    """A worker message that does not follow this module's format."""


@dataclass
class Message:
    kind: str
    head: dict = field(default_factory=dict)
    buffers: list = field(default_factory=list)     # memoryviews (zero-copy views of the frames)


def _as_bytes(f) -> bytes:
    return f.bytes if hasattr(f, "bytes") else bytes(f)


def _as_buffer(f) -> memoryview:
    return memoryview(f.buffer if hasattr(f, "buffer") else f)


# ---- encoding ------------------------------------------------------------------------------------
def encode(kind: str, head: dict | None = None, buffers=()) -> list:
    if kind not in KINDS:
        raise ValueError(f"unknown worker message kind {kind!r}")
    frames = [_KIND_BYTES[kind]]
    if kind in _WITH_HEAD:
        frames.append(json.dumps(head or {}, separators=(",", ":")).encode())
    frames.extend(buffers)
    return frames


def hb() -> list:
    return [_KIND_BYTES[HB]]


def ready(info: dict) -> list:
    return encode(READY, info)


def bootfail(message: str) -> list:
    return encode(BOOTFAIL, {"message": message[:2000]})


def error(task: int, message: str) -> list:
    return encode(ERROR, {"task": task, "message": message[:1000]})


def _tensor_buffer(a: np.ndarray):
    return memoryview(a).cast("B") if a.size else b""


def result(task: int, ms: float, outputs: list[np.ndarray], trace: dict | None = None) -> list:
    head = {"task": task, "ms": ms, "tensors": [{"dtype": o.dtype.name, "shape": list(o.shape)} for o in outputs]}
    if trace is not None:
        head["trace"] = trace
    return encode(RESULT, head, [_tensor_buffer(o) for o in outputs])


def work(task: int, inputs: list[dict], segments: list, trace: dict | None = None) -> list:
    """``inputs[i] = {"dtype", "tail", "rows": [n per segment]}``; segments in input-major order."""
    head = {"task": task, "inputs": inputs}
    if trace is not None:
        head["trace"] = trace
    return encode(WORK, head, segments)


def work_for_arrays(task: int, arrays: list[np.ndarray]) -> list:
    """A WORK message carrying whole arrays (one segment per input): the profiler's slices."""
    inputs = [{"dtype": a.dtype.name, "tail": list(a.shape[1:]), "rows": [int(a.shape[0])]} for a in arrays]
    return work(task, inputs, [_tensor_buffer(np.ascontiguousarray(a)) for a in arrays])


# ---- decoding ------------------------------------------------------------------------------------
def decode(frames: list) -> Message:
    """Frames (bytes, memoryviews or zmq.Frame) without the routing identity -> Message."""
    if not frames:
        raise MessageError("empty worker message")
    kind = _BYTES_KIND.get(_as_bytes(frames[0]))
    if kind is None:
        raise MessageError(f"unknown worker message kind {_as_bytes(frames[0])[:32]!r}")
    if kind not in _WITH_HEAD:
        if len(frames) != 1:
            raise MessageError(f"{kind} takes no further frames, got {len(frames) - 1}")
        return Message(kind)
    if len(frames) < 2:
        raise MessageError(f"{kind} without its header frame")
    raw = _as_bytes(frames[1])
    if len(raw) > MAX_HEAD_BYTES:
        raise MessageError(f"{kind} header of {len(raw)} bytes")
    try:
        head = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MessageError(f"{kind} header is not JSON: {str(e)[:100]}") from None
    if not isinstance(head, dict):
        raise MessageError(f"{kind} header is not a JSON object")
    if kind in (RESULT, ERROR, WORK) and (not isinstance(head.get("task"), int) or isinstance(head.get("task"), bool)):
        raise MessageError(f"{kind} header without an integer task")
    return Message(kind, head, [_as_buffer(f) for f in frames[2:]])


def _check_shape(shape, what: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > P.MAX_DIMS or \
            any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise MessageError(f"{what}: bad shape {shape!r}")
    return tuple(shape)


def _dtype(name, what: str) -> np.dtype:
    dt = P.DTYPES.get(name) if isinstance(name, str) else None
    if dt is None:
        raise MessageError(f"{what}: dtype {name!r} cannot cross the wire (allowed: {', '.join(P.DTYPES)})")
    return dt


def result_tensors(msg: Message) -> list[np.ndarray]:
    """The RESULT's outputs as zero-copy arrays; MessageError when the header and buffers disagree."""
    metas = msg.head.get("tensors")
    if not isinstance(metas, list) or len(metas) != len(msg.buffers):
        raise MessageError(f"RESULT describes {len(metas) if isinstance(metas, list) else '?'} tensors "
                           f"but carries {len(msg.buffers)} buffers")
    out = []
    for i, (m, buf) in enumerate(zip(metas, msg.buffers)):
        if not isinstance(m, dict):
            raise MessageError(f"RESULT tensor {i}: not an object")
        dt = _dtype(m.get("dtype"), f"RESULT tensor {i}")
        shape = _check_shape(m.get("shape"), f"RESULT tensor {i}")
        if len(shape) == 0:
            raise MessageError(f"RESULT tensor {i} is a scalar; outputs need the batch on dim 0")
        need = math.prod(shape) * dt.itemsize
        if buf.nbytes != need:
            raise MessageError(f"RESULT tensor {i}: {m.get('dtype')}{list(shape)} needs {need} bytes, buffer has {buf.nbytes}")
        out.append(np.frombuffer(buf, dtype=dt).reshape(shape) if need else np.empty(shape, dtype=dt))
    return out


def work_inputs(msg: Message) -> list[np.ndarray]:
    """The WORK's inputs, one array per model input (segments concatenated; zero-copy for one segment)."""
    inputs = msg.head.get("inputs")
    if not isinstance(inputs, list):
        raise MessageError("WORK without an inputs list")
    arrays, k = [], 0
    for i, inp in enumerate(inputs):
        if not isinstance(inp, dict) or not isinstance(inp.get("rows"), list):
            raise MessageError(f"WORK input {i}: bad description")
        dt = _dtype(inp.get("dtype"), f"WORK input {i}")
        tail = _check_shape(inp.get("tail"), f"WORK input {i}")
        parts = []
        for rows in inp["rows"]:
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0 or k >= len(msg.buffers):
                raise MessageError(f"WORK input {i}: bad rows {rows!r} or missing segment")
            buf = msg.buffers[k]
            k += 1
            need = rows * math.prod(tail) * dt.itemsize
            if buf.nbytes != need:
                raise MessageError(f"WORK input {i}: segment of {buf.nbytes} bytes for {rows} rows of {list(tail)}")
            parts.append(np.frombuffer(buf, dtype=dt).reshape((rows, *tail)) if need else np.empty((rows, *tail), dt))
        if not parts:
            raise MessageError(f"WORK input {i}: no segments")
        arrays.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
    if k != len(msg.buffers):
        raise MessageError(f"WORK carries {len(msg.buffers)} segments, its header describes {k}")
    return arrays

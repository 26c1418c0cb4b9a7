"""OIP tensors and errors, independent of REST or gRPC.

Datatypes, the model's metadata (from the daemon's ``spec`` op), the checks that make every message
the gateway sends to packratd wire-valid (docs/protocol.md section 3, rows 1-16, so the daemon never
answers the gateway with an un-attributable early error), and the mapping of packratd's error codes to
HTTP statuses and gRPC codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import protocol as P

# OIP datatype <-> packratd (numpy) dtype name.  Nothing else crosses the gateway.
OIP_TO_NUMPY = {"BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT16": "int16", "INT32": "int32",
                "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64"}
NUMPY_TO_OIP = {v: k for k, v in OIP_TO_NUMPY.items()}
# OIP datatypes packratd's wire cannot carry (docs/protocol.md section 4).
UNSUPPORTED = {"UINT16", "UINT32", "UINT64", "BF16", "BYTES"}

MODEL_VERSION = "1"          # packratd serves one model, one version
PLATFORM = "pytorch_torch_export"


# ---- errors ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    http: int
    grpc: str                # a grpc.StatusCode member name (grpc is imported by the gRPC side only)


INVALID = Kind(400, "INVALID_ARGUMENT")
NOT_FOUND = Kind(404, "NOT_FOUND")
TOO_BIG = Kind(413, "RESOURCE_EXHAUSTED")
UNAVAILABLE = Kind(503, "UNAVAILABLE")
DEADLINE = Kind(504, "DEADLINE_EXCEEDED")
INTERNAL = Kind(500, "INTERNAL")

# packratd error code -> what an OIP client gets (docs/protocol.md, "Open Inference Protocol").
DAEMON_CODES = {
    P.BAD_HEADER: INVALID, P.BAD_TENSOR: INVALID, P.MODEL_MISMATCH: INVALID, P.TOO_LARGE: INVALID,
    # The daemon re-runs every request of a failed batch alone, so MODEL_ERROR always blames the data of
    # the request that gets it: a client error (a 5xx would invite proxies to retry it, in vain).
    P.MODEL_ERROR: INVALID,
    P.OVERLOADED: UNAVAILABLE, P.DRAINING: UNAVAILABLE, "UNAVAILABLE": UNAVAILABLE,
    P.TIMEOUT: DEADLINE,
    P.BAD_VERSION: INTERNAL, P.UNKNOWN_OP: INTERNAL, P.INTERNAL: INTERNAL,
}
RETRYABLE = frozenset({P.OVERLOADED, P.DRAINING, "UNAVAILABLE"})


class OipError(Exception):
    """An error answer: ``kind`` gives the HTTP status and gRPC code; ``code`` is packratd's error code when the
    daemon (or the gateway on its behalf) produced it."""

    def __init__(self, kind: Kind, message: str, code: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code

    @classmethod
    def from_daemon(cls, code: str, message: str) -> "OipError":
        return cls(DAEMON_CODES.get(code, INTERNAL), f"{code}: {message}", code)


def invalid(message: str) -> OipError:
    return OipError(INVALID, message)


# ---- the model ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                   # numpy name
    shape: tuple                 # per-row shape (after the batch dimension)

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": NUMPY_TO_OIP.get(self.dtype, self.dtype.upper()),
                "shape": [-1, *self.shape]}


@dataclass(frozen=True)
class ModelSpec:
    inputs: tuple
    outputs: tuple
    max_batch_size: int

    @classmethod
    def from_reply(cls, head: dict) -> "ModelSpec | None":
        """From the daemon's ``spec`` reply; None while it has no model loaded (not serving yet)."""
        ins, outs = head.get("inputs"), head.get("outputs")
        if not ins or outs is None:
            return None
        inputs = tuple(TensorSpec(str(s.get("name") or f"input_{i}"), s["dtype"], tuple(s["shape"][1:]))
                       for i, s in enumerate(ins))
        # packratd's outputs are the flattened leaves of the model's return value: they have no names.
        outputs = tuple(TensorSpec(f"output_{i}", s["dtype"], tuple(s["shape"][1:])) for i, s in enumerate(outs))
        return cls(inputs, outputs, int(head.get("max_batch_size") or 0))

    def output_index(self, name: str) -> int:
        for i, o in enumerate(self.outputs):
            if o.name == name:
                return i
        raise invalid(f"unknown output {name!r} (the model's outputs: {', '.join(o.name for o in self.outputs)})")


def model_metadata(name: str, spec: ModelSpec) -> dict:
    return {"name": name, "versions": [MODEL_VERSION], "platform": PLATFORM,
            "inputs": [t.metadata() for t in spec.inputs], "outputs": [t.metadata() for t in spec.outputs]}


# ---- input tensors -------------------------------------------------------------------------------------
def numpy_dtype(datatype, what: str) -> np.dtype:
    if not isinstance(datatype, str):
        raise invalid(f"{what}: datatype must be a string such as \"FP32\"")
    name = OIP_TO_NUMPY.get(datatype)
    if name is None:
        if datatype == "BYTES":
            raise invalid(f"{what}: datatype BYTES (strings) is not supported: packratd serves numeric tensors "
                          f"({', '.join(OIP_TO_NUMPY)})")
        why = "packratd's wire does not carry it" if datatype in UNSUPPORTED else "unknown datatype"
        raise invalid(f"{what}: datatype {datatype!r} is not supported ({why}); use one of {', '.join(OIP_TO_NUMPY)}")
    return np.dtype(name)


def check_shape(shape, what: str) -> tuple:
    """A list of 1..16 integers in 0..2^31 (packratd's wire limits); dim 0 is the batch."""
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise invalid(f"{what}: shape must be a list of integers")
    if not 1 <= len(shape) <= P.MAX_DIMS:
        raise invalid(f"{what}: shape {list(shape)} must have 1 to {P.MAX_DIMS} dimensions (dimension 0 is the batch)")
    if any(d < 0 or d > 2**31 for d in shape):
        raise invalid(f"{what}: shape {list(shape)}: every dimension must be in 0..2^31")
    if shape[0] < 1:
        raise invalid(f"{what}: shape {list(shape)}: the batch dimension (0) must be at least 1")
    return tuple(int(d) for d in shape)


def nbytes(dtype: np.dtype, shape: tuple) -> int:
    return math.prod(shape) * dtype.itemsize        # exact (Python ints): no overflow for any shape


def array_from_values(values, dtype: np.dtype, shape: tuple, what: str) -> np.ndarray:
    """Typed values (a JSON list, flat or nested, or a protobuf repeated field) -> array of dtype and shape.

    Refuses what would need a lossy conversion: floats or booleans for integer types, numbers for BOOL,
    integers out of the type's range, strings, ragged nesting."""
    n = math.prod(shape)
    try:
        a = np.asarray(values)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise invalid(f"{what}: data is not a rectangular array of numbers") from None
    if a.size != n:
        raise invalid(f"{what}: {a.size} values for shape {list(shape)}, which holds {n}")
    if n == 0:
        return np.zeros(shape, dtype)
    k = a.dtype.kind
    if dtype.kind == "b":
        ok, want = k == "b", "true/false"
    elif dtype.kind in "iu":
        ok, want = k in "iu", "integers"
    else:
        ok, want = k in "iuf", "numbers"
    if not ok:
        raise invalid(f"{what}: {NUMPY_TO_OIP[dtype.name]} data must be {want}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if int(a.min()) < info.min or int(a.max()) > info.max:
            raise invalid(f"{what}: a value is out of range for {NUMPY_TO_OIP[dtype.name]} ({info.min}..{info.max})")
    return np.ascontiguousarray(a.astype(dtype, copy=False).reshape(shape))


@dataclass
class Input:
    """One input of a request, ready for packratd's wire: dtype, shape and a buffer of exactly nbytes."""
    name: str
    dtype: np.dtype
    shape: tuple
    buffer: object                # bytes, memoryview or a C-contiguous ndarray

    def meta(self) -> dict:
        return {"dtype": self.dtype.name, "shape": list(self.shape)}


def order_inputs(inputs: list, spec: ModelSpec, max_bytes: int) -> list:
    """The request's inputs in the model's order, checked so the daemon's wire check (rows 1-16) passes."""
    by_name = {}
    for t in inputs:
        if t.name in by_name:
            raise invalid(f"input {t.name!r} is given twice")
        by_name[t.name] = t
    want = [s.name for s in spec.inputs]
    unknown = [n for n in by_name if n not in want]
    if unknown:
        raise invalid(f"unknown input {unknown[0]!r} (the model's inputs: {', '.join(want)})")
    missing = [n for n in want if n not in by_name]
    if missing:
        raise invalid(f"missing input {missing[0]!r} (the model's inputs: {', '.join(want)})")
    ordered = [by_name[n] for n in want]
    rows = {t.shape[0] for t in ordered}
    if len(rows) != 1:
        raise invalid(f"all inputs must have the same batch size (dimension 0), got {sorted(rows)}")
    total = sum(nbytes(t.dtype, t.shape) for t in ordered)
    if total > max_bytes:
        raise OipError(INVALID, f"{P.TOO_LARGE}: the inputs hold {total} bytes, more than server.max_message_bytes "
                                f"({max_bytes}); split the rows into several requests", P.TOO_LARGE)
    return ordered


def output_array(meta: dict, buf) -> np.ndarray:
    return np.frombuffer(buf, dtype=P.DTYPES[meta["dtype"]]).reshape(meta["shape"])

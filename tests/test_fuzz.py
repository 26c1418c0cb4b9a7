"""Fuzz the real daemon's client socket while a well-behaved client checks every answer it gets.

Thousands of seeded, mostly malformed messages go out from several DEALER sockets: random frame
counts, truncated / oversized / random-byte headers, random JSON mutations of a good header,
mismatched dtype / shape / buffer, wrong tensor counts, REQ-style envelopes, too many rows, data the
model raises on, and valid requests full of NaN / Inf (which must be answered exactly like the
model in-process answers them).  Meanwhile another thread sends good requests through the client
library; every answer must be right.  At the end: every answerable message got exactly one reply,
every error reply carries a code from protocol.ERROR_CODES (and never INTERNAL), the few messages
ZeroMQ drops for exceeding server.max_message_bytes got none, the daemon is alive and serving, and
its RSS did not grow.

PACKRATD_FUZZ_SECONDS / PACKRATD_FUZZ_MESSAGES / PACKRATD_FUZZ_SEED tune a run (defaults: 20 s or
60000 messages per model, seed 1234).
"""
from __future__ import annotations

import collections
import copy
import json
import os
import random
import threading
import time

import numpy as np
import psutil
import pytest
import torch
import zmq

from packratd import protocol as P
from packratd.client import Client
from tests.conftest import load_module

SECONDS = float(os.environ.get("PACKRATD_FUZZ_SECONDS", "20"))
MAX_MESSAGES = int(os.environ.get("PACKRATD_FUZZ_MESSAGES", "60000"))
SEED = int(os.environ.get("PACKRATD_FUZZ_SEED", "1234"))
MAX_MESSAGE_BYTES = 200_000      # the fuzzed daemon's server.max_message_bytes
N_SOCKETS = 4
WINDOW = 16                      # unanswered messages per fuzz socket (keeps the queue far from OVERLOADED)
MAX_BATCH = 32

MODELS = {
    # name: (fixture, input spec as (dtype, row shape))
    "tiny_mlp": ("tiny_model", [("float32", (64,))]),
    "tiny_two_input": ("two_input_model", [("float32", (16,)), ("int64", (8,))]),
}

SPECIAL = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40, -1e-40, 3e4, -3e4], np.float32)
JSON_VALUES = [None, True, False, 0, 1, -1, 2, 32, 33, 2**31, 2**31 + 1, 2**63, 2**64, 10**30, -(2**63),
               1.5, 0.0, -0.0, float("nan"), float("inf"), "", "x", "float32", "int64", "infer", "ping", "spec",
               "object", "<U8", "complex64", [], {}, [1], [2, 64], [[1]], {"dtype": "float32"}, "x" * 300]
KEYS = ["v", "id", "op", "tensors", "timeout_ms"]


def _reference(module, arrays):
    with torch.inference_mode():
        out = module(*[torch.from_numpy(a) for a in arrays])
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.numpy() for o in out]


# ---- how far apart two correct float32 answers may be -----------------------------------------------
#
# The daemon computes a row inside a batch of other requests' rows, split across instances; the
# reference computes it in-process on the request alone.  Every dot product is then summed in another
# order (GEMM kernels block and vectorise the sum differently for each batch size and thread count,
# with or without FMA), so the two answers differ by rounding.  How much follows from the arithmetic:
#
# * One dot product plus bias, n = K + 1 float32 terms summed in ANY order, is off the exact value by
#       err = sum_k delta_k * (partial sum_k),   |delta_k| <= u = 2**-24,  |partial sum_k| <= sum_i |a_i b_i|
#   (to first order; Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 3.1).
#   The worst case is |err| <= gamma_n * sum|a_i b_i| with gamma_n = n*u/(1 - n*u) ~ K * eps: the
#   "c * K * eps * sum|a_i b_i|" bound.  It scales with the magnitudes of the terms (not with |y|,
#   which cancellation can make small, and not with a fixed atol) and holds for every order.
# * Through a network it compounds: an error e_h on a layer's inputs reaches its outputs as W e_h,
#   bounded in the worst case by |W| e_h, and |W|'s row sums are ~8 for these layers.  For tiny_mlp
#   the worst-case bound comes out ~3% of the outputs -- true, never exceeded, and 7000 times what the
#   answers actually differ by (measured: tests below), loose enough to pass a worker that computes
#   in bfloat16.  So the check uses the probabilistic form of the same analysis (Higham & Mary, "A New
#   Approach to Probabilistic Rounding Error Analysis", SIAM J. Sci. Comput. 41(5), 2019): the
#   delta_k are independent, mean zero, |delta_k| <= u.  The error of an output is then, to first
#   order, a sum of independent bounded terms (each rounding of each dot product, carried forward by
#   the weights), and Hoeffding's inequality gives
#       P(|err| >= lambda * s) <= 2 exp(-lambda**2 / 2),   s**2 = sum of (bound of each term)**2,
#   with s propagated per layer as   s_y**2 = W**2 @ s_h**2 + n * (u * (|W| |h| + |b|))**2
#   (the first term: earlier errors, independent across inputs; the second: this layer's n roundings).
# * ReLU and tanh are 1-Lipschitz and pass s on (tanh at most 2, its range, plus its own 1-ulp
#   rounding, 2u).  The embedding lookup is exact; a mean of L rows is a sum of L terms.
# * A non-finite input makes every output it reaches non-finite (inf*w = inf, 0*inf = nan,
#   +inf + -inf = nan in every order), so such outputs are compared as NaN/Inf patterns and need no
#   bound: non-finite entries count 0 in the propagation; relu(-inf) = 0 and tanh(+-inf) = +-1 are
#   exact.  Nothing here overflows float32 (inputs are at most 3e4).
#
# Two answers carry independent roundings: |daemon - reference| <= LAMBDA * sqrt(2) * s.  LAMBDA = 8:
# at most 2.5e-14 per element to fail by chance, under 1e-7 for a whole run's ~1e6 checked elements.
# Measured across batchings and thread counts the answers came to at most ~0.35 s apart (tiny_two_input;
# 0.08 s for tiny_mlp), so the margin to LAMBDA is more than 20x; the bound is still ~1e-4 of the
# outputs, so a wrong row, a wrong element or bfloat16 arithmetic fails it
# (test_output_check_catches_wrong_answers).  ErrorBound runs the model's own layers in float64 (the
# "exact" value, itself off by ~1e-16 relative), and every check also asserts that the float32
# reference is within LAMBDA * s of it, so the mirror cannot drift from the model unnoticed.

U = 2.0 ** -24
LAMBDA = 8.0


def _linear(v, s, w, b):
    fin = np.isfinite(v)
    mag, s = np.where(fin, np.abs(v), 0.0), np.where(fin, s, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        y = v @ w.T + b
    terms = mag @ np.abs(w).T + np.abs(b)                      # sum |a_i b_i| of each dot product, bias included
    return y, np.sqrt((s ** 2) @ (w ** 2).T + (w.shape[1] + 1) * (U * terms) ** 2)


def _relu(v, s):
    return np.maximum(v, 0.0), np.where(np.isfinite(v), s, 0.0)


def _tanh(v, s):
    return np.tanh(v), np.sqrt(np.where(np.isfinite(v), np.minimum(s, 2.0), 0.0) ** 2 + (2 * U) ** 2)


class ErrorBound:
    """The model's layers in float64 (tools/models.py: TinyMLP, TinyTwoInput, with the exported
    program's own weights) and, per output element, the Hoeffding parameter s of one float32 answer's
    rounding error (see above): [(exact value, s)] per output."""

    def __init__(self, model_name: str, module):
        self.name = model_name
        self.p = {k: v.detach().double().numpy() for k, v in module.state_dict().items()}

    def __call__(self, arrays) -> list[tuple[np.ndarray, np.ndarray]]:
        p = self.p
        if self.name == "tiny_mlp":            # Linear(64,256) ReLU Linear(256,256) ReLU Linear(256,10)
            v = arrays[0].astype(np.float64)
            s = np.zeros_like(v)
            v, s = _relu(*_linear(v, s, p["net.0.weight"], p["net.0.bias"]))
            v, s = _relu(*_linear(v, s, p["net.2.weight"], p["net.2.bias"]))
            return [_linear(v, s, p["net.4.weight"], p["net.4.bias"])]
        if self.name == "tiny_two_input":      # mean(emb(ids)) ++ tanh(fx(x)) -> head -> score
            x, ids = arrays[0].astype(np.float64), arrays[1]
            rows = p["emb.weight"][ids]                                   # [B, L, 16], exact
            ev = rows.mean(axis=1)
            es = np.sqrt(ids.shape[1] + 1) * U * np.abs(rows).mean(axis=1)
            hv, hs = _tanh(*_linear(x, np.zeros_like(x), p["fx.weight"], p["fx.bias"]))
            v, s = np.concatenate([hv, ev], axis=1), np.concatenate([hs, es], axis=1)
            out = _linear(v, s, p["head.weight"], p["head.bias"])
            sv, ss = _linear(*out, p["score.weight"], p["score.bias"])
            return [out, (sv[:, 0], ss[:, 0])]
        raise KeyError(f"no error bound for model {self.name!r}: add its layers to ErrorBound")


class Reference:
    """The model in-process, and the check of an answer against it within the bound above."""

    def __init__(self, model_name: str, module):
        self.module = module
        self.bound = ErrorBound(model_name, module)
        self.worst = 0.0          # the largest |got - want| / (sqrt(2) s) seen, to compare with LAMBDA

    def check(self, got: list[np.ndarray], arrays, what: str) -> None:
        want = _reference(self.module, arrays)
        _check_outputs(got, want, self.bound(arrays), what)
        for g, w, (_, sd) in zip(got, want, self.bound(arrays)):
            fin = np.isfinite(w)
            if fin.any():
                ratio = np.abs(g[fin].astype(np.float64) - w[fin]) / (np.sqrt(2) * sd[fin])
                self.worst = max(self.worst, float(ratio.max()))


def _check_outputs(got: list[np.ndarray], want: list[np.ndarray], bounds, what: str) -> None:
    assert len(got) == len(want) == len(bounds), what
    for i, (g, w, (exact, sd)) in enumerate(zip(got, want, bounds)):
        assert g.shape == w.shape == exact.shape and g.dtype == w.dtype, (what, g.shape, w.shape, exact.shape)
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        # NaN where the model gives NaN, the same infinities
        assert np.array_equal(np.isnan(g64), np.isnan(w64)), f"{what}: output {i}: NaN pattern differs"
        inf = np.isinf(w64)
        assert np.array_equal(g64[inf], w64[inf]), f"{what}: output {i}: infinities differ"
        fin = np.isfinite(w64)
        # the float32 reference near the float64 pass (the mirror is the model), then the two answers near each other
        off = fin & ~(np.abs(w64 - exact) <= LAMBDA * sd)
        assert not off.any(), (f"{what}: output {i}: the in-process model is off the float64 pass by more than its "
                               f"error bound at {np.argwhere(off)[:3].tolist()}: ErrorBound no longer mirrors the model")
        tol = LAMBDA * np.sqrt(2) * sd
        bad = fin & ~(np.abs(g64 - w64) <= tol)
        if bad.any():
            j = tuple(int(k) for k in np.argwhere(bad)[0])
            raise AssertionError(f"{what}: output {i}: {int(bad.sum())} element(s) beyond the float32 rounding bound; "
                                 f"first at {list(j)}: got {g64[j]:.9g}, want {w64[j]:.9g}, |diff| {abs(g64[j] - w64[j]):.3g} "
                                 f"> bound {tol[j]:.3g}")


class Generator:
    """Seeded message factory.  Each message: (frames, kind, info); kind is
    valid (must be answered ok, correctly), valid_or_timeout, bad (must be an error), maybe, drop."""

    def __init__(self, spec, seed: int):
        self.spec = spec
        self.r = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.n = 0

    def rid(self) -> str:
        self.n += 1
        return f"f{self.n}"

    def arrays(self, rows: int, special: bool = False) -> list[np.ndarray]:
        out = []
        for dtype, tail in self.spec:
            if dtype == "int64":
                out.append(self.np.integers(0, 100, (rows, *tail)).astype(np.int64))
            else:
                a = self.np.standard_normal((rows, *tail)).astype(np.float32)
                if special:
                    mask = self.np.random(a.shape) < self.r.choice([0.0, 0.01, 0.1, 0.5])
                    a[mask] = self.np.choice(SPECIAL, int(mask.sum()))
                    if self.r.random() < 0.2:
                        a[self.r.randrange(rows)] = self.r.choice([np.nan, np.inf, -np.inf])   # a whole row
                out.append(a)
        return out

    @staticmethod
    def header(rid, arrays, **extra) -> dict:
        h = {"v": 1, "id": rid, "op": "infer",
             "tensors": [{"dtype": a.dtype.name, "shape": list(a.shape)} for a in arrays]}
        h.update(extra)
        return h

    @staticmethod
    def enc(h) -> bytes:
        return json.dumps(h, separators=(",", ":")).encode()

    def good(self, special=True):
        rows = self.r.randint(1, 8)
        arrays = self.arrays(rows, special)
        rid = self.rid()
        return rid, arrays, self.header(rid, arrays)

    # ---- message kinds ------------------------------------------------------------------
    def valid_special(self):
        rid, arrays, h = self.good()
        kind = "valid"
        if self.r.random() < 0.15:
            h["timeout_ms"] = self.r.choice([60_000, 1e9, 10**12])
        elif self.r.random() < 0.05:
            h["timeout_ms"] = self.r.choice([0.001, 1, 5])
            kind = "valid_or_timeout"
        if self.r.random() < 0.1:
            h["future"] = {"x": [1, 2]}               # unknown keys are ignored
        return [self.enc(h)] + [a.tobytes() for a in arrays], kind, (rid, arrays)

    def random_frames(self):
        rid, arrays, h = self.good(False)
        sizes = [a.nbytes for a in arrays]
        bufs = []
        for _ in range(self.r.choice([0, 0, 1, 2, 3, 5, 8])):
            s = self.r.choice(sizes) + self.r.choice([0, 0, -1, 1, -8, 8, 100]) if self.r.random() < 0.7 else self.r.randrange(0, 4000)
            bufs.append(self.np.bytes(max(0, s)))
        return [self.enc(h)] + bufs, "maybe", rid

    def truncated(self):
        rid, arrays, h = self.good(False)
        head = self.enc(h)
        return [head[:self.r.randrange(0, len(head))]] + [a.tobytes() for a in arrays], "bad", rid

    def oversized_header(self):
        rid, arrays, h = self.good(False)
        h["pad"] = "p" * (P.MAX_HEADER_BYTES + self.r.randrange(0, 8000))
        return [self.enc(h)] + [a.tobytes() for a in arrays], "bad", rid

    def random_bytes(self):
        head = self.np.bytes(self.r.randrange(0, 300))
        if self.r.random() < 0.3:
            head = b"{" + head
        return [head] + [self.np.bytes(self.r.randrange(0, 64)) for _ in range(self.r.randrange(0, 3))], "bad", None

    def deep_json(self):
        k = self.r.randrange(900, 32000)
        return [self.r.choice([b"[", b'{"a":']) * k], "bad", None

    def _paths(self, node, prefix=()):
        """Every place in the (possibly already mutated) header a value can be replaced or removed."""
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, list):
            items = list(enumerate(node))
        else:
            return []
        paths = []
        for k, v in items:
            paths.append(prefix + (k,))
            paths += self._paths(v, prefix + (k,))
        return paths

    def json_mutation(self):
        rid, arrays, h = self.good(False)
        bufs = [a.tobytes() for a in arrays]
        for _ in range(self.r.randint(1, 3)):
            op = self.r.random()
            if op < 0.15:
                h[self.r.choice(KEYS + ["extra"])] = copy.deepcopy(self.r.choice(JSON_VALUES))
                continue
            paths = self._paths(h)
            if not paths:
                break
            path = self.r.choice(paths)
            parent = h
            for p in path[:-1]:
                parent = parent[p]
            if op < 0.35:
                if isinstance(parent, dict):
                    del parent[path[-1]]
                else:
                    parent.pop(path[-1])
            elif op < 0.45 and isinstance(parent, list):
                parent.insert(path[-1], copy.deepcopy(self.r.choice(JSON_VALUES)))
            else:
                parent[path[-1]] = copy.deepcopy(self.r.choice(JSON_VALUES))
        return [self.enc(h)] + bufs, "maybe", rid

    def dtype_shape_buffer(self):
        rid, arrays, h = self.good(False)
        bufs = [a.tobytes() for a in arrays]
        i = self.r.randrange(len(arrays))
        t = h["tensors"][i]
        c = self.r.randrange(8)
        if c == 0:
            t["dtype"] = self.r.choice([d for d in P.DTYPES if d != t["dtype"]])
        elif c == 1:
            j = self.r.randrange(len(t["shape"]))
            t["shape"][j] += self.r.choice([-1, 1, 5])
        elif c == 2:
            bufs[i] = bufs[i][:max(0, len(bufs[i]) - self.r.randint(1, 16))]
        elif c == 3:
            bufs[i] = bufs[i] + self.np.bytes(self.r.randint(1, 16))
        elif c == 4:
            t["shape"] = self.r.choice([[2**31, 2**31, 2**31], [0] + t["shape"][1:], [-1] + t["shape"][1:],
                                        t["shape"] + [1] * 16, [], [t["shape"][0], True] + t["shape"][2:]])
        elif c == 5:      # same bytes, reinterpreted: another dtype of the same item size, or the rows regrouped
            items = {1: ["int8", "uint8", "bool"], 2: ["int16", "float16"], 4: ["int32", "float32"], 8: ["int64", "float64"]}
            t["dtype"] = self.r.choice(items[np.dtype(t["dtype"]).itemsize])
            if self.r.random() < 0.5:
                t["shape"] = [int(np.prod(t["shape"]))]
        elif c == 6:
            t["dtype"] = self.r.choice(["object", "complex64", "<U8", "float128", ">f4", "uint32", "bfloat16", "f4"])
        else:              # another row count in one input only
            t["shape"][0] = t["shape"][0] + 1
            bufs[i] = bufs[i] + b"\0" * (len(bufs[i]) // (t["shape"][0] - 1))
        return [self.enc(h)] + bufs, "maybe", rid

    def tensor_count(self):
        rid, arrays, _ = self.good(False)
        if self.r.random() < 0.5 and len(arrays) > 0:
            arrays = arrays + [self.r.choice(arrays)] * self.r.randint(1, 3)
        else:
            arrays = arrays[:-1] if len(arrays) > 1 else arrays + arrays
        return [self.enc(self.header(rid, arrays))] + [a.tobytes() for a in arrays], "bad", rid

    def too_many_rows(self):
        rid = self.rid()
        arrays = self.arrays(self.r.randint(MAX_BATCH + 1, 3 * MAX_BATCH))
        return [self.enc(self.header(rid, arrays))] + [a.tobytes() for a in arrays], "bad", rid

    def model_error(self):
        if len(self.spec) < 2:       # tiny_mlp cannot fail on data: send a NaN request instead
            return self.valid_special()
        rid, arrays, _ = self.good(False)
        arrays[1][self.r.randrange(len(arrays[1]))] = self.r.choice([100, 10**6, -1])
        return [self.enc(self.header(rid, arrays))] + [a.tobytes() for a in arrays], "bad", rid

    def parse_too_large(self):
        """Every frame under server.max_message_bytes, the buffers together over it."""
        rid = self.rid()
        n = MAX_MESSAGE_BYTES // 2 // 4 + 1
        arrays = [np.zeros(n, np.float32), np.zeros(n, np.float32)]
        return [self.enc(self.header(rid, arrays))] + [a.tobytes() for a in arrays], "bad", rid

    def ping_or_spec(self):
        rid = self.rid()
        h = {"v": 1, "id": rid, "op": self.r.choice(["ping", "spec"])}
        if self.r.random() < 0.3:
            return [self.enc(h), b"x"], "bad", rid
        return [self.enc(h)], "ok", rid

    def oversize_frame(self):
        rid = self.rid()
        n = MAX_MESSAGE_BYTES + self.r.randint(1, 50_000)
        return [self.enc(self.header(rid, [np.zeros(n, np.uint8)])), bytes(n)], "drop", rid

    KINDS = [("valid_special", 22), ("random_frames", 10), ("truncated", 8), ("oversized_header", 2),
             ("random_bytes", 8), ("deep_json", 1), ("json_mutation", 22), ("dtype_shape_buffer", 14),
             ("tensor_count", 5), ("too_many_rows", 2), ("model_error", 2), ("parse_too_large", 0.3),
             ("ping_or_spec", 3)]

    def next(self):
        names, weights = zip(*self.KINDS)
        name = self.r.choices(names, weights)[0]
        frames, kind, info = getattr(self, name)()
        if self.r.random() < 0.05:
            frames = [b""] + frames         # a DEALER speaking REQ: the reply comes back behind b""
        return name, frames, kind, info


class GoodClient(threading.Thread):
    def __init__(self, endpoint, ref: Reference, spec, seed):
        super().__init__(daemon=True)
        self.client = Client(endpoint, timeout=60)
        self.ref, self.spec = ref, spec
        self.gen = Generator(spec, seed)
        self.stop = threading.Event()
        self.done = 0
        self.error: BaseException | None = None

    def run(self):
        try:
            while not self.stop.is_set():
                arrays = self.gen.arrays(self.gen.r.randint(1, 8), special=self.gen.r.random() < 0.3)
                got = self.client.infer(*arrays)
                self.ref.check(got, arrays, f"good request {self.done}")
                self.done += 1
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            self.error = e
        finally:
            self.client.close()


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _model_inputs(model_name: str, rows: int, seed: int, special: bool) -> list[np.ndarray]:
    return Generator(MODELS[model_name][1], seed).arrays(rows, special)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(MODELS))
def test_rounding_bound_holds_across_batchings(request, model_name):
    """The same rows computed as one batch, one by one and in odd chunks, with 1 and 2 threads (other
    GEMM blockings and summation orders) stay within the bound; and the bound is not loose."""
    module = load_module(request.getfixturevalue(MODELS[model_name][0]))
    ref = Reference(model_name, module)
    before = torch.get_num_threads()
    try:
        for seed, special in ((1, False), (2, True), (3, True)):
            arrays = _model_inputs(model_name, 32, seed, special)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for chunk in (1, 3, 7, 32):
                    parts = [_reference(module, [a[i:i + chunk] for a in arrays]) for i in range(0, 32, chunk)]
                    got = [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
                    ref.check(got, arrays, f"{model_name} seed {seed} threads {threads} chunk {chunk}")
    finally:
        torch.set_num_threads(before)
    # relative to the outputs, the bound stays small: about 1e-6..1e-4 of the magnitudes, not a blanket atol
    arrays = _model_inputs(model_name, 32, 4, False)
    for w, (_, sd) in zip(_reference(module, arrays), ref.bound(arrays)):
        assert float(np.median(LAMBDA * np.sqrt(2) * sd / np.maximum(np.abs(w), 1e-3))) < 1e-3, model_name
    assert ref.worst < LAMBDA / 4, ref.worst


@pytest.mark.parametrize("model_name", list(MODELS))
def test_output_check_catches_wrong_answers(request, model_name):
    module = load_module(request.getfixturevalue(MODELS[model_name][0]))
    ref = Reference(model_name, module)
    arrays = _model_inputs(model_name, 6, 5, False)
    want = _reference(module, arrays)
    bounds = ref.bound(arrays)
    ref.check([w.copy() for w in want], arrays, "itself")
    # another request's row in place of this one's
    swapped = [w.copy() for w in want]
    swapped[0][[1, 2]] = swapped[0][[2, 1]]
    with pytest.raises(AssertionError, match="beyond the float32 rounding bound"):
        ref.check(swapped, arrays, "swapped rows")
    # one element off by three times its bound fails; by half its bound passes (the bound decides)
    e = LAMBDA * np.sqrt(2) * bounds[0][1]
    for factor, fails in ((3.0, True), (0.5, False)):
        off = [w.copy() for w in want]
        off[0][3, 0] += np.float32(factor * e[3, 0])
        if fails:
            with pytest.raises(AssertionError, match=r"first at \[3, 0\]"):
                ref.check(off, arrays, f"perturbed x{factor}")
        else:
            ref.check(off, arrays, f"perturbed x{factor}")
    # the same model in bfloat16 arithmetic (weights and inputs rounded to bfloat16, float32 accumulation:
    # what oneDNN's fpmath_mode=bf16 does; a worker with that setting would answer like this)
    bf16 = load_module(request.getfixturevalue(MODELS[model_name][0]))
    with torch.no_grad():
        for t in bf16.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).float())
    rounded = [torch.from_numpy(a).to(torch.bfloat16).float().numpy() if a.dtype == np.float32 else a for a in arrays]
    with pytest.raises(AssertionError, match="beyond the float32 rounding bound"):
        ref.check(_reference(bf16, rounded), arrays, "bfloat16")
    # a NaN or an infinity the model does not give
    for bad in (np.nan, np.inf):
        wrong = [w.copy() for w in want]
        wrong[-1][0] = bad
        with pytest.raises(AssertionError):
            ref.check(wrong, arrays, f"{bad} where the model is finite")


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fuzz_daemon(request, daemon, model_name):
    fixture, spec = MODELS[model_name]
    model_path = request.getfixturevalue(fixture)
    torch.set_num_threads(1)
    module = load_module(model_path)
    ref = Reference(model_name, module)
    d = daemon(model_path, plan="2x1:4", extra=["--set", f"server.max_message_bytes={MAX_MESSAGE_BYTES}"])
    ctx = zmq.Context.instance()

    def sock():
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(d.endpoint)
        return s

    socks = [sock() for _ in range(N_SOCKETS)]
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    sent = {s: 0 for s in socks}
    got = {s: 0 for s in socks}
    expect = {}                   # id -> (kind, info) for messages whose reply we can recognise by id
    tried = collections.Counter()
    codes = collections.Counter()
    outcomes = collections.Counter()
    dropped = []                  # (socket, frames) sent over the size limit: no reply may come
    checked_valid = 0

    def handle(s, frames):
        nonlocal checked_valid
        got[s] += 1
        while frames and frames[0] == b"":
            frames = frames[1:]
        assert frames, "empty reply"
        head = json.loads(frames[0].decode("utf-8"))
        assert isinstance(head, dict) and head.get("v") == P.VERSION and isinstance(head.get("id"), str), head
        kind, info = expect.pop(head["id"], (None, None)) if head["id"] else (None, None)
        if head["status"] == "error":
            assert len(frames) == 1, head
            assert head["code"] in P.ERROR_CODES and isinstance(head["message"], str), head
            codes[head["code"]] += 1
            outcomes[f"{kind}:error"] += 1
            assert kind not in ("valid", "ok"), f"a valid message got an error: {head}"
            assert kind != "valid_or_timeout" or head["code"] == P.TIMEOUT, head
            return
        assert head["status"] == "ok", head
        outcomes[f"{kind}:ok"] += 1
        assert kind != "bad", f"a malformed message was answered ok: {head}"
        if kind in ("valid", "valid_or_timeout"):
            rid, arrays = info
            outs = [np.frombuffer(b, dtype=P.DTYPES[m["dtype"]]).reshape(m["shape"]) for m, b in zip(head["tensors"], frames[1:])]
            ref.check(outs, arrays, f"fuzz request {rid}")
            checked_valid += 1

    def drain(timeout_ms):
        n = 0
        for s, _ in poller.poll(timeout_ms):
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                handle(s, frames)
                n += 1
        return n

    good = GoodClient(d.endpoint, Reference(model_name, module), spec, SEED + 1)
    gen = Generator(spec, SEED)
    good.start()
    t0 = time.monotonic()
    rss_warm = _rss(d.proc.pid)     # replaced by the value after the first 1000 messages
    last_reply = time.monotonic()
    total = 0
    try:
        while total < MAX_MESSAGES and time.monotonic() - t0 < SECONDS and good.error is None:
            if total == 1000:
                rss_warm = _rss(d.proc.pid)
            if total % 2000 == 1999:
                # Now and then a frame over server.max_message_bytes, from its own socket: libzmq drops the
                # message and disconnects that peer, so nothing else may travel on that socket.
                name, (frames, kind, info) = "oversize_frame", gen.oversize_frame()
                s = sock()
                s.send_multipart(frames)
                dropped.append(s)
                tried[name] += 1
                total += 1
                continue
            free = [s for s in socks if sent[s] - got[s] < WINDOW]
            if not free:
                if drain(100):
                    last_reply = time.monotonic()
                assert time.monotonic() - last_reply < 30, f"no reply for 30 s: sent {sent}, got {got}\n{d.logs()[-3000:]}"
                continue
            name, frames, kind, info = gen.next()
            s = free[total % len(free)]
            if kind in ("valid", "valid_or_timeout"):
                expect[info[0]] = (kind, info)
            elif info is not None:
                expect[info] = (kind, None)
            s.send_multipart(frames, copy=False)
            sent[s] += 1
            tried[name] += 1
            total += 1
            if drain(0):
                last_reply = time.monotonic()
        fuzz_s = time.monotonic() - t0
        # Every answerable message gets exactly one reply.
        deadline = time.monotonic() + 30
        while any(got[s] < sent[s] for s in socks) and time.monotonic() < deadline:
            drain(100)
        assert got == sent, f"unanswered messages: sent {sent}, got {got}"
        assert not drain(300), "more replies than messages"
        for s in dropped:
            assert not s.poll(0), "a message over server.max_message_bytes was answered"
    finally:
        good.stop.set()
        good.join(60)
        for s in socks + dropped:
            s.close(linger=0)
    if good.error is not None:
        raise good.error
    assert not good.is_alive()

    # Still alive, still serving correctly, memory flat.
    assert d.proc.poll() is None, d.logs()[-3000:]
    c = Client(d.endpoint, timeout=30)
    try:
        arrays = gen.arrays(5)
        ref.check(c.infer(*arrays), arrays, "after the fuzz")
    finally:
        c.close()
    rss_end = _rss(d.proc.pid)
    st = d.control()
    msg = (f"fuzz[{model_name}]: {total} messages tried in {fuzz_s:.1f}s ({total / fuzz_s:.0f}/s) from {N_SOCKETS} DEALER "
           f"sockets + {len(dropped)} over-size (dropped, unanswered); {sum(got.values())} replies; {checked_valid} valid "
           f"NaN/Inf requests checked; {good.done} good-client requests correct; error codes {dict(codes)}; "
           f"kinds {dict(tried)}; outcomes {dict(outcomes)}; daemon RSS {rss_warm / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB; "
           f"daemon stats requests={st['requests']}; answers at most {ref.worst:.2g} s apart (bound {LAMBDA:g} s)")
    print(msg)
    assert total >= 1000 and good.done >= 20 and checked_valid >= 100, msg
    assert codes[P.INTERNAL] == 0, f"INTERNAL errors: something a client sent raised inside the daemon\n{d.logs()[-5000:]}"
    assert codes[P.OVERLOADED] == 0, msg
    assert rss_end - rss_warm < 200 * 2**20, msg
    assert "Traceback" not in d.logs(), d.logs()[-5000:]
    assert d.stop() == 0

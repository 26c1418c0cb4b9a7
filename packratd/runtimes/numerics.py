"""When a runtime's outputs count as equal to eager PyTorch's.

The test
--------
For each output tensor, with ``ref`` eager's output and ``out`` the runtime's:

* same number of outputs, same shapes, same dtypes;
* integer and boolean outputs are equal exactly;
* floating outputs: NaN exactly where eager has NaN, +Inf where eager has +Inf, -Inf where eager
  has -Inf (special values propagate like eager), and on the entries finite in both

      max |out - ref|  <=  bound = RTOL * scale + ATOL,    scale = max |ref| over finite entries

  with ``RTOL = 2e-4`` and ``ATOL = 1e-6`` for float32 (float64 outputs use ``RTOL = 1e-10``,
  float16/bfloat16 ``RTOL = 1e-2``).

Why that bound (float32, unit roundoff u = 2^-24 ~ 6.0e-8)
--------------------------------------------------------------
The runtimes compute the same function in the same precision (OpenVINO is held to f32: its default
on AMX / AVX512_BF16 CPUs is bf16).  They differ from eager only in the order of the additions
inside reductions (GEMM/conv blocking, fused epilogues, vectorised reductions of other widths) and
in the approximations of exp/tanh/erf/erfinv.

* One reduction.  A length-K dot product summed in any order has error at most gamma_K * sum|x_i y_i|,
  gamma_K ~ K u (Higham, Accuracy and Stability of Numerical Algorithms, 3.1).  Rounding errors
  behave as independent zero-mean variables in practice, which gives the probabilistic bound
  lambda * sqrt(K) * u (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019) with lambda = 3 for
  better than 99% confidence.  Two implementations each carry such an error: their difference is
  at most 2 * 3 * sqrt(K) * u.  The largest K here is 4608 (3x3x512 convolution): 2.4e-5.
* Depth.  Reductions are chained: ResNet-50 has 54 in sequence, BERT-base and GPT-2 12 blocks of
  6 (D <= 72).  Residual connections and normalisation keep the per-layer gain about 1, so the
  per-layer errors add as a random walk: sqrt(72) ~ 8.5, i.e. 2.4e-5 * 8.5 ~ 2.0e-4 of the scale
  of the activations, which the last layer maps to the output scale.
* Transcendentals: vectorised exp/tanh/erf are within a few ulp; the worst seen was OpenVINO's
  erfinv at 2.2e-5 relative (a lgamma/erfinv probe model), well inside.

So RTOL = 2e-4 relative to the output scale (max |ref|), for every model: generous for small
models, a 3-sigma estimate for the largest served here.  Measured max |diff| / scale on the full
ResNet-50, BERT-base and GPT-2-small (inductor, OpenVINO, ONNX Runtime, batches 1 and 2): at most
1.2e-6 (OpenVINO, BERT), i.e. ~170x inside the bound.  ATOL = 1e-6 only matters for outputs whose
scale is ~0.  The bound is still 20x tighter than reduced precision: one bfloat16 rounding alone is
2^-8 ~ 3.9e-3 relative, so a runtime that silently computes in bf16 or fp16 fails it, as it should.
"""
from __future__ import annotations

import numpy as np

RTOL = {"float32": 2e-4, "float64": 1e-10, "float16": 1e-2, "bfloat16": 1e-2}
ATOL = {"float32": 1e-6, "float64": 1e-12, "float16": 1e-3, "bfloat16": 1e-3}


def _one(out: np.ndarray, ref: np.ndarray) -> tuple[bool, float, float, str]:
    if out.shape != ref.shape:
        return False, float("inf"), 0.0, f"shape {out.shape} != {ref.shape}"
    if out.dtype != ref.dtype:
        return False, float("inf"), 0.0, f"dtype {out.dtype} != {ref.dtype}"
    if ref.dtype.kind not in "fc":
        ok = bool(np.array_equal(out, ref))
        return ok, 0.0 if ok else float("inf"), 0.0, "" if ok else "integer outputs differ"
    o, r = out.astype(np.float64), ref.astype(np.float64)
    rtol = RTOL.get(ref.dtype.name, RTOL["float32"])
    atol = ATOL.get(ref.dtype.name, ATOL["float32"])
    for what, fo, fr in (("NaN", np.isnan(o), np.isnan(r)),
                         ("+Inf", np.isposinf(o), np.isposinf(r)),
                         ("-Inf", np.isneginf(o), np.isneginf(r))):
        if not np.array_equal(fo, fr):
            n = int(np.count_nonzero(fo != fr))
            return False, float("inf"), 0.0, f"{what} at {n} positions that differ from eager"
    fin = np.isfinite(r)
    if not fin.any():
        return True, 0.0, atol, ""
    scale = float(np.max(np.abs(r[fin])))
    err = float(np.max(np.abs(o[fin] - r[fin])))
    bound = rtol * scale + atol
    return err <= bound, err, bound, "" if err <= bound else f"max |diff| {err:.3g} > bound {bound:.3g}"


def compare(outputs, reference) -> tuple[bool, float, float]:
    """(ok, max_abs_err, bound) of the worst output (the one with the largest err/bound)."""
    ok, err, bound, _ = explain(outputs, reference)
    return ok, err, bound


def explain(outputs, reference) -> tuple[bool, float, float, str]:
    """Like compare, plus a one-line reason when not ok."""
    outputs, reference = list(outputs), list(reference)
    if len(outputs) != len(reference):
        return False, float("inf"), 0.0, f"{len(outputs)} outputs, eager has {len(reference)}"
    worst = (True, 0.0, 0.0, "")
    worst_ratio = -1.0
    for i, (o, r) in enumerate(zip(outputs, reference)):
        ok, err, bound, why = _one(np.asarray(o), np.asarray(r))
        if not ok:
            return False, err, bound, f"output {i}: {why}"
        ratio = err / bound if bound > 0 else 0.0
        if ratio > worst_ratio:
            worst, worst_ratio = (ok, err, bound, ""), ratio
    return worst

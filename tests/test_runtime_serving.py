"""Runtimes end to end: the daemon prepares, chooses and serves them (issue 9).

tests/test_runtimes.py checks the runtime layer itself (every runtime, every tools/ model, in
worker-like processes); here real daemons serve through it: their answers equal the in-process
eager model within packratd.runtimes.compare's documented bound (RTOL 2e-4 of the output scale,
NaN/Inf exactly where eager has them), the choice and the reasons for skipping show in status,
and a restart reuses the compiled artifacts and the choice.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from packratd import profiler, runtimes
from packratd.client import Client
from tests.conftest import DaemonProc, load_module

pytestmark = pytest.mark.slow

AVAILABLE = [n for n in runtimes.NAMES if n != "eager" and runtimes.unavailable_reason(n) is None]


def _eager(module, *arrays):
    with torch.inference_mode():
        out = module(*[torch.from_numpy(a) for a in arrays])
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def _inputs(rng, n):
    x = rng.standard_normal((n, 16)).astype(np.float32)
    ids = rng.integers(0, 100, size=(n, 8)).astype(np.int64)
    return x, ids


@pytest.mark.parametrize("runtime", AVAILABLE)
def test_each_runtime_serves_the_two_input_model_like_eager(tmp_path, two_input_model, runtime):
    d = DaemonProc(tmp_path / "d", two_input_model, plan="1x1:8", runtime=runtime)
    try:
        d.wait_serving(timeout=600)
        st = d.control()
        info = st["runtimes"][runtime]
        assert st["runtime"] == runtime and info["available"] and info["chosen"], st["runtimes"]
        assert {w["runtime"] for w in st["workers"]} == {runtime}
        module = load_module(two_input_model)
        c = Client(d.endpoint, timeout=60)
        rng = np.random.default_rng(7)
        for n in (1, 3, 8):
            x, ids = _inputs(rng, n)
            got = c.infer(x, ids)
            ok, err, bound = runtimes.compare(got, _eager(module, x, ids))
            assert ok, (runtime, n, err, bound)
        # NaN and Inf rows come out where eager puts them (strict: the runtime was checked for it when built)
        x, ids = _inputs(rng, 4)
        x[1, 3], x[2, 0], x[3, 5] = np.nan, np.inf, -np.inf
        got = c.infer(x, ids)
        ok, err, bound = runtimes.compare(got, _eager(module, x, ids))
        assert ok, (runtime, "specials", err, bound)
        c.close()
    finally:
        assert d.stop() == 0


@pytest.mark.skipif(not AVAILABLE, reason="only eager is installed here (pip install 'packratd[onnxruntime,openvino]')")
def test_auto_measures_chooses_and_a_restart_reuses_everything(tmp_path, tiny_model):
    """workers.runtime = auto on a ReLU network: every installed runtime is prepared; OpenVINO is refused
    under the default specials=strict (its CPU plugin turns Relu(NaN) into 0) with the reason in status;
    the others are timed and the fastest serves; a restart on the same state dir compiles nothing and
    reuses the choice."""
    state = tmp_path / "state"
    d = DaemonProc(tmp_path / "a", tiny_model, runtime="auto", extra=["--state-dir", str(state)])
    try:
        d.wait_serving(timeout=900)
        st = d.control()
        info = st["runtimes"]
        chosen = [n for n, i in info.items() if i.get("chosen")]
        assert chosen == [st["runtime"]] and {w["runtime"] for w in st["workers"]} == {st["runtime"]}
        assert set(info) == set(runtimes.NAMES)
        timed = [n for n, i in info.items() if i.get("available")]
        if len(timed) > 1:
            points = {str(b) for b in profiler.runtime_points(32)}                  # 1, 8 and the planned 32
            assert all(set(info[n]["ms"]) == points for n in timed), info
            # the choice: the best score, or within the tie margin of it the fastest to load
            top = min(info[n]["score"] for n in timed)
            tied = [n for n in timed if info[n]["score"] <= top * (1 + profiler.RUNTIME_TIE)]
            chosen_rt = st["runtime"]
            assert chosen_rt in tied, info
            assert all(info[chosen_rt]["load_s"] <= info[n]["load_s"] + 0.002 for n in tied), info
        if "openvino" in AVAILABLE:
            assert info["openvino"]["available"] is False and "NaN" in info["openvino"]["reason"], info["openvino"]
        module = load_module(tiny_model)
        c = Client(d.endpoint, timeout=60)
        x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
        ok, err, bound = runtimes.compare(c.infer(x), _eager(module, x))
        assert ok, (st["runtime"], err, bound)
        c.close()
    finally:
        assert d.stop() == 0
    d2 = DaemonProc(tmp_path / "b", tiny_model, runtime="auto", extra=["--state-dir", str(state)])
    try:
        d2.wait_serving(timeout=300)
        st2 = d2.control()
        assert st2["runtime"] == st["runtime"]
        assert all(i.get("cached") for i in st2["runtimes"].values() if i.get("available")), st2["runtimes"]
        assert st2["profile"]["key"] == st["profile"]["key"]
        if len(timed) > 1:
            assert st2["runtimes"][st["runtime"]]["ms"] == st["runtimes"][st["runtime"]]["ms"]   # the cached choice
    finally:
        assert d2.stop() == 0

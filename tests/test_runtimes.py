"""packratd.runtimes: every runtime this environment installs gives eager's answers.

Each runtime runs in a process of its own (``python -m packratd.runtimes runner``, set up like a
worker: pinned, worker thread environment), as in packratd: OpenVINO's thread pool and torch's
OpenMP pool must not share a process.  Eager references are computed here, in-process, from the
same .pt2.  Artifacts are built by ``python -m packratd.runtimes prepare`` (the daemon's path),
once per session into a session cache.

The tools/ models (ResNet-50, BERT-base, GPT-2-small) are tested as reduced-depth variants built
from the same classes (ResNet layers (1,1,1,1), BERT and GPT-2 with 2 blocks, seq_len 32): the
same operators and layer shapes, but building the full-depth models on inductor, OpenVINO and
ONNX Runtime took 271 s on 2 cores (inductor alone 21 s ResNet-50, 54 s BERT, 74 s GPT-2) and
the whole suite must stay within budget.  The full models are checked against eager by prepare()
itself whenever packratd builds them, and by tools/bench_runtimes.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from packratd import runtimes as R  # noqa: E402
from packratd.runtimes import cache as C  # noqa: E402
from packratd.runtimes.numerics import compare, explain  # noqa: E402

INSTALLED = [n for n in R.NAMES if R.unavailable_reason(n) is None]
BUILT = [n for n in INSTALLED if n != "eager"]          # runtimes that convert or compile
ALL_BUILT = [n for n in R.NAMES if n != "eager"]
CPUS = sorted(os.sched_getaffinity(0))
THREADS = min(2, len(CPUS))


# PACKRATD_TEST_RUNTIMES=eager,onnxruntime limits the runtimes tested (default: every one installed);
# inductor's C++ compiles are most of this file's time.
_ONLY = [n for n in os.environ.get("PACKRATD_TEST_RUNTIMES", "").split(",") if n]


def _need(runtime):
    if _ONLY and runtime not in _ONLY:
        pytest.skip(f"PACKRATD_TEST_RUNTIMES={','.join(_ONLY)}")
    reason = R.unavailable_reason(runtime)
    if reason:
        pytest.skip(reason)


def _env():
    from packratd.worker import allocator_env
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.update(allocator_env("glibc-tuned"))     # the workers' default allocator
    return env


def prepare_cli(runtime, model, cache_dir, threads=THREADS, extra=(), timeout=600):
    """The daemon's way to build: a child process; returns (exit code, the one JSON line)."""
    p = subprocess.run([sys.executable, "-m", "packratd.runtimes", "prepare", "--runtime", runtime,
                        "--model", str(model), "--cache-dir", str(cache_dir), "--threads", str(threads),
                        "--cpus", ",".join(map(str, CPUS[:threads])), *extra],
                       capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got {p.stdout!r}; stderr tail: {p.stderr[-2000:]}"
    return p.returncode, json.loads(lines[0])


class Runner:
    """One runtime in its own process (worker-like), driven over JSON lines."""

    def __init__(self, runtime, model, artifact, tmp, threads=THREADS, cpus=None, pin=True):
        cpus = cpus or CPUS[:threads]
        cmd = [sys.executable, "-m", "packratd.runtimes", "runner", "--runtime", runtime, "--model", str(model),
               "--threads", str(threads), "--cpus", ",".join(map(str, cpus)), "--pin-threads", str(int(pin))]
        if artifact:
            cmd += ["--artifact", artifact]
        self.tmp = tmp
        self.n = 0
        self.err = open(os.path.join(tmp, f"runner-{runtime}-{os.getpid()}-{time.monotonic_ns()}.log"), "w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     text=True, env=_env(), cwd=ROOT)
        self.hello = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            self.err.seek(0)
            raise RuntimeError(f"runner exited with {self.proc.wait()}: {self.err.read()[-3000:]}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"runner: {msg['error']}")
        return msg

    def call(self, **req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, arrays):
        self.n += 1
        fin = os.path.join(self.tmp, f"in{self.n}.npz")
        fout = os.path.join(self.tmp, f"out{self.n}.npz")
        np.savez(fin, *arrays)
        r = self.call(op="run_npz", inputs=fin, out=fout)
        assert r["contiguous"], "outputs must be C-contiguous"
        with np.load(fout, allow_pickle=False) as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.err.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

SMALL_SEQ = 32


def _reduced(name):
    """tools/ architectures with fewer blocks (same classes, same operators)."""
    from tools import models as M
    with M._seeded(M.DEFAULT_SEED):
        if name == "resnet50":
            return M._finish(M.ResNet((1, 1, 1, 1), 1000))
        if name == "bert":
            return M._finish(M.BertEncoder(n_layers=2, seq_len=SMALL_SEQ))
        if name == "gpt2":
            return M._finish(M.GPT2(n_layers=2, seq_len=SMALL_SEQ))
    raise KeyError(name)


@pytest.fixture(scope="session")
def big_models_dir(tmp_path_factory):
    from tools.export_model import export_program, save_atomic
    d = tmp_path_factory.mktemp("rt-models")
    for name in ("resnet50", "bert", "gpt2"):
        ep, _ = export_program(name, seq_len=SMALL_SEQ if name != "resnet50" else None, max_batch=64,
                               model=_reduced(name))
        save_atomic(ep, str(d / f"{name}.pt2"))
    return d


@pytest.fixture(scope="session")
def rt_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("rt-cache")


_PREPARED: dict = {}
# Runtimes whose accepted artifact (specials=strict, the default) must have NaN/Inf exactly where
# eager has them.  OpenVINO's CPU plugin computes Relu(NaN) = 0 (openvinotoolkit/openvino#35649),
# so packratd refuses it for models where that shows (the test checks the refusal is right);
# inductor's frozen build has the same oneDNN post-op, so prepare falls back to its unfrozen variant.
NAN_LIKE_EAGER = {"eager", "inductor", "onnxruntime"}


def prepared(runtime, model, cache_dir):
    """prepare once per (runtime, model) per session, through the CLI, as the daemon does (strict).
    Returns (result, refused_for_specials); a refused runtime's artifact is then taken with
    --specials ignore (a cache hit: the verdict, not the artifact, differs)."""
    k = (runtime, str(model))
    if k not in _PREPARED:
        rc, res = prepare_cli(runtime, model, cache_dir)
        refused = rc == 2 and "does not propagate NaN/Inf like eager" in res.get("reason", "")
        if refused:
            assert runtime not in NAN_LIKE_EAGER, res
            rc, res = prepare_cli(runtime, model, cache_dir, extra=("--specials", "ignore"))
            assert res["cached"] is True and res["verified"]["specials"]["ok"] is False, res
        assert rc == 0 and res["ok"], res
        assert res["options"] in [dict(o) for o in R.variants(runtime)]
        if res["options"] != dict(R.variants(runtime)[0]):
            assert "does not propagate NaN/Inf like eager" in res["note"], res
        _PREPARED[k] = (res, refused)
    return _PREPARED[k]


def eager_outputs(model, arrays):
    import torch
    from packratd import model as model_mod
    mod = _EAGER.get(str(model))
    if mod is None:
        mod = _EAGER[str(model)] = torch.export.load(str(model)).module()
    return model_mod.run(mod, arrays)


_EAGER: dict = {}


def spec_of(model):
    import torch
    from packratd import model as model_mod
    return model_mod.input_spec(torch.export.load(str(model)))


# ---------------------------------------------------------------------------------------------
# availability, and eager without the extras
# ---------------------------------------------------------------------------------------------

def test_unavailable_reason_imports_nothing_heavy():
    code = ("import sys, json; from packratd import runtimes as R; a = R.available(); "
            "print(json.dumps({'a': a, 'u': R.unavailable_reason('tensorrt'), "
            "'heavy': [m for m in ('torch', 'openvino', 'onnxruntime', 'onnx') if m in sys.modules]}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                                    check=True, cwd=ROOT).stdout)
    assert out["heavy"] == []
    assert set(out["a"]) == set(R.NAMES) and out["a"]["eager"] is None
    assert "unknown runtime 'tensorrt'" in out["u"]


def test_old_or_missing_extras_give_a_reason_and_eager_still_works(tmp_path, tiny_model):
    """A site without openvino/onnxruntime (and one with a too-old openvino): eager prepares, loads
    and runs; the others say why not.  Real interpreter with a site dir that lacks the extras."""
    import sysconfig
    site = sysconfig.get_paths()["purelib"]
    fake = tmp_path / "site"
    fake.mkdir()
    hide = ("openvino", "onnxruntime", "onnx", "onnxscript", "onnx_ir")
    for n in os.listdir(site):
        base = n.split("-")[0].split(".")[0].lower()
        if base in hide or n.endswith(".pth"):
            continue
        os.symlink(os.path.join(site, n), fake / n)
    # an "openvino" that is too old: a module plus its metadata
    (fake / "openvino").mkdir()
    (fake / "openvino" / "__init__.py").write_text("")
    (fake / "openvino-2023.0.0.dist-info").mkdir()
    (fake / "openvino-2023.0.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: openvino\nVersion: 2023.0.0\n")
    code = ("import json, sys, numpy as np; from packratd import runtimes as R\n"
            f"p = R.prepare('eager', {tiny_model!r}, {str(tmp_path / 'c')!r}, 1)\n"
            f"s = R.load('eager', {tiny_model!r}, p.artifact, 1)\n"
            "y = s.run([np.ones((2, 64), np.float32)])\n"
            "print(json.dumps({'a': R.available(), 'shape': list(y[0].shape), 'onnx': 'onnxruntime' in sys.modules}))\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([ROOT, str(fake)])
    p = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["shape"] == [2, 10] and not out["onnx"]
    assert "onnxruntime needs the Python package onnxruntime, which is not installed" in out["a"]["onnxruntime"]
    assert "packratd[onnxruntime]" in out["a"]["onnxruntime"]
    assert "openvino needs openvino>=" in out["a"]["openvino"] and "found 2023.0.0" in out["a"]["openvino"]
    assert out["a"]["eager"] is None


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------

def test_compare_rules():
    r = np.array([[1.0, -2.0, np.nan, np.inf]], np.float32)
    ok, err, bound = compare([r.copy()], [r])
    assert ok and err == 0.0 and bound == pytest.approx(R.numerics.RTOL["float32"] * 2.0 + R.numerics.ATOL["float32"])
    # within / beyond the bound, relative to the output scale (2.0 here)
    small = r.copy(); small[0, 0] += 0.5 * bound
    big = r.copy(); big[0, 0] += 2 * bound
    assert compare([small], [r])[0] and not compare([big], [r])[0]
    # special values must be where eager has them
    for bad in (np.array([[1.0, -2.0, 0.0, np.inf]], np.float32), np.array([[1.0, -2.0, np.nan, -np.inf]], np.float32),
                np.array([[np.nan, -2.0, np.nan, np.inf]], np.float32)):
        ok, err, _, why = explain([bad], [r])
        assert not ok and err == float("inf") and ("NaN" in why or "Inf" in why)
    # dtype, shape and count must match; integers exactly
    assert not compare([r.astype(np.float64)], [r])[0]
    assert not compare([r[:, :2]], [r])[0]
    assert not compare([r, r], [r])[0]
    i = np.array([1, 2, 3])
    assert compare([i.copy()], [i])[0] and not compare([i + np.array([0, 0, 1])], [i])[0]
    # a bf16-sized error (2^-8 relative) is rejected
    x = np.linspace(-3, 3, 101, dtype=np.float32)
    assert not compare([x * (1 + 2.0 ** -8)], [x])[0]


# ---------------------------------------------------------------------------------------------
# every installed runtime x every model: eager's answers, NaN/Inf like eager
# ---------------------------------------------------------------------------------------------

def _check_model(runtime, model, cache_dir, tmp_path, batches, threads=THREADS, cpus=None, idle=False):
    cpus = cpus or CPUS[:threads]
    res, refused = prepared(runtime, model, cache_dir) if runtime != "eager" else ({"artifact": None}, False)
    if runtime != "eager":
        v = res["verified"]
        assert v and v["max_abs_err"] <= v["bound"], res
    spec = spec_of(model)
    with Runner(runtime, model, res["artifact"], str(tmp_path), threads=threads, cpus=cpus) as r:
        assert r.hello["runtime"] == runtime
        assert r.hello["input_spec"] == spec
        _check_settings(runtime, r, threads, cpus)
        from packratd.model import example_inputs
        for b in batches:
            x = example_inputs(spec, b, seed=b)
            got, want = r.run(x), eager_outputs(model, x)
            ok, err, bound, why = explain(got, want)
            assert ok, f"{runtime} batch {b}: {why}"
            assert [g.dtype for g in got] == [w.dtype for w in want]
            assert all(g.shape[0] == b for g in got)
        _check_threads(runtime, r, threads, cpus)
        if idle:
            _check_idle(r)
        x = R.with_specials(example_inputs(spec, 5, seed=7))
        if x is None:                       # integer inputs only (token ids): nothing to poison
            assert res.get("verified") is None or res["verified"]["specials"] is None
            return
        got, want = r.run(x), eager_outputs(model, x)
        assert any(np.isnan(w).any() for w in want), "the NaN row must reach eager's output (else nothing is tested)"
        ok, err, bound, why = explain(got, want)
        if runtime in NAN_LIKE_EAGER:
            assert ok, f"{runtime} with NaN/Inf inputs: {why}"
        # packratd's strict verdict is right: refused exactly when NaN/Inf come out unlike eager
        assert refused == (not ok), (refused, why)
        # the rows without special values are unaffected by their neighbours
        assert explain([g[:1] for g in got], [w[:1] for w in want])[0]
        assert explain([g[4:] for g in got], [w[4:] for w in want])[0]


def _check_settings(runtime, r, threads, cpus):
    s = r.hello["settings"]
    if runtime in ("openvino", "onnxruntime"):
        assert r.hello["torch_imported"] is False, "this runtime's worker must not load torch's OpenMP pool"
    if runtime == "openvino":
        assert s == {"INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1", "ENABLE_CPU_PINNING": "True",
                     "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if runtime in ("eager", "inductor"):
        assert s == {"torch_threads": threads, "interop_threads": 1}


def _check_threads(runtime, r, threads, cpus):
    """After real calls: no thread of the process may run outside the instance's CPUs, and ONNX
    Runtime's pool threads (threads - 1) are pinned one per CPU."""
    ths = r.call(op="os_threads")["threads"]
    assert all(set(t["cpus"]) <= set(cpus) for t in ths), (cpus, ths)
    if runtime == "onnxruntime" and threads > 1:
        for c in cpus[1:threads]:
            assert sum(t["cpus"] == [c] for t in ths) >= 1, (c, ths)


def _check_idle(r):
    """After calls, the runtime's threads must go to sleep: CPU burnt (process CPU time, all threads)
    in the 2 s after a call and in 50 ms gaps between calls (what a spinning pool steals from whoever
    runs next on these cores).  Eager's bounded libgomp spin (GOMP_SPINCOUNT) costs ~3 ms a gap."""
    r.call(op="batch", batch=256)
    res = r.call(op="idle_cpu", seconds=2.0, gaps=10, gap_s=0.05)
    assert res["idle_cpu_s"] / res["seconds"] < 0.05, res
    assert res["gap_cpu_s"] / res["gap_s"] < 0.3, res


@pytest.mark.parametrize("runtime", R.NAMES)
def test_tiny_mlp_matches_eager(runtime, tiny_model, rt_cache, tmp_path):
    """2 threads on the first two CPUs; also: the idle worker burns no core."""
    _need(runtime)
    _check_model(runtime, tiny_model, rt_cache, tmp_path, batches=(1, 3, 17), idle=True)


@pytest.mark.parametrize("runtime", R.NAMES)
def test_two_input_model_matches_eager(runtime, two_input_model, rt_cache, tmp_path):
    """Two inputs (one int64), two outputs; a 1-thread instance on the last CPU (nothing may leave it)."""
    _need(runtime)
    _check_model(runtime, two_input_model, rt_cache, tmp_path, batches=(1, 3, 17), threads=1, cpus=CPUS[-1:])


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ALL_BUILT)
@pytest.mark.parametrize("which", ["resnet50", "bert", "gpt2"])
def test_tools_models_match_eager(runtime, which, big_models_dir, rt_cache, tmp_path):
    _need(runtime)
    _check_model(runtime, big_models_dir / f"{which}.pt2", rt_cache, tmp_path, batches=(1, 3))


# ---------------------------------------------------------------------------------------------
# models a runtime cannot take
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def lgamma_model(tmp_path_factory):
    """lgamma has no ONNX function in torch.onnx and no OpenVINO conversion rule (torch 2.13,
    OpenVINO 2026.4); inductor and eager run it."""
    import torch

    class Lgamma(torch.nn.Module):
        def forward(self, x):
            return torch.lgamma(x.abs() + 1.0)

    d = tmp_path_factory.mktemp("rt-unsupported")
    ep = torch.export.export(Lgamma().eval(), (torch.randn(2, 16),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    path = d / "lgamma.pt2"
    torch.export.save(ep, str(path))
    return path


@pytest.mark.parametrize("runtime,telling", [("openvino", "No conversion rule found for operations: aten.lgamma"),
                                             ("onnxruntime", "No ONNX function found for <OpOverload(op='prims.lgamma'")])
def test_unsupported_operator_is_a_clear_unavailable(runtime, telling, lgamma_model, tmp_path):
    _need(runtime)
    rc, res = prepare_cli(runtime, lgamma_model, tmp_path / "c")
    assert rc == 2 and res["ok"] is False and res["unavailable"] is True
    assert res["reason"].startswith(f"{runtime} cannot convert this model: ") and telling in res["reason"]
    assert "\n" not in res["reason"] and "\x1b" not in res["reason"] and len(res["reason"]) <= 400
    # nothing half-built is left in the cache, and the verdict is remembered under the same key
    names = os.listdir(tmp_path / "c")
    assert [n for n in names if not n.endswith(".unavailable.json")] == []
    with pytest.raises(R.RuntimeUnavailable, match="remembered"):
        R.prepare(runtime, str(lgamma_model), str(tmp_path / "c"), THREADS)
    rc, res = prepare_cli(runtime, lgamma_model, tmp_path / "c", extra=("--retry",))
    assert rc == 2 and telling in res["reason"]


def test_model_packratd_cannot_serve_is_unavailable(tmp_path):
    """A program with a scalar input: no batch dimension, so no runtime can serve it."""
    import torch

    class Scalar(torch.nn.Module):
        def forward(self, x, s):
            return x * s

    ep = torch.export.export(Scalar(), (torch.randn(2, 3), torch.tensor(2.0)),
                             dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=8)}, "s": None})
    torch.export.save(ep, str(tmp_path / "s.pt2"))
    runtime = BUILT[0] if BUILT else pytest.skip("no runtime to build")
    rc, res = prepare_cli(runtime, tmp_path / "s.pt2", tmp_path / "c")
    assert rc == 2 and "packratd cannot serve this model" in res["reason"] and "scalar" in res["reason"]


def test_prepare_cli_errors_are_json(tmp_path):
    rc, res = prepare_cli("eager", tmp_path / "missing.pt2", tmp_path / "c")
    assert rc == 1 and res["ok"] is False and "FileNotFoundError" in res["error"]
    rc, res = prepare_cli("tensorrt", tmp_path / "missing.pt2", tmp_path / "c")
    assert rc == 2 and "unknown runtime" in res["reason"]


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------

IGNORE = ("--specials", "ignore")     # the cache does not care about the NaN verdict (tested above)


@pytest.mark.parametrize("runtime", ALL_BUILT)
def test_cache_hit_corruption_and_threads(runtime, tiny_model, rt_cache, tmp_path):
    """The session's artifact, copied to a private cache: a hit; a 1-thread instance uses the same
    artifact; a flipped byte is caught by its sha256 and (ONNX Runtime, OpenVINO: cheap to rebuild)
    rebuilt; truncation and a missing manifest are caught."""
    import shutil
    _need(runtime)
    first, _ = prepared(runtime, tiny_model, rt_cache)
    cache = tmp_path / "c"
    cache.mkdir()
    entry = str(cache / os.path.basename(first["artifact"]))
    shutil.copytree(first["artifact"], entry)
    hit = R.prepare(runtime, tiny_model, str(cache), THREADS, specials="ignore", options=first["options"])
    assert hit.cached and hit.artifact == entry and hit.key == first["key"] and hit.rebuilt_reason is None
    assert hit.seconds < first["build_seconds"]    # a lookup (sha256 of the files), no conversion
    assert hit.build_seconds == pytest.approx(first["build_seconds"]) and hit.verified == first["verified"]
    # the key does not depend on the thread count for any runtime (see each backend's THREADS_IN_KEY):
    # an instance with 1 thread uses the same artifact
    assert R.backend(runtime).THREADS_IN_KEY is False
    opts = first["options"]
    assert R.cache_key(runtime, tiny_model, 1, opts)[0] == R.cache_key(runtime, tiny_model, 4, opts)[0] == first["key"]
    with Runner(runtime, tiny_model, hit.artifact, str(tmp_path), threads=1, cpus=CPUS[-1:]) as r:
        x = [np.random.default_rng(0).standard_normal((9, 64)).astype(np.float32)]
        assert compare(r.run(x), eager_outputs(tiny_model, x))[0]
        _check_threads(runtime, r, 1, CPUS[-1:])
    # a flipped byte in the largest file (same size)
    man = json.loads(open(os.path.join(entry, C.MANIFEST)).read())
    victim = max(man["files"], key=lambda f: man["files"][f]["bytes"])
    fp = os.path.join(entry, victim)
    with open(fp, "r+b") as f:
        f.seek(man["files"][victim]["bytes"] // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(C.BadEntry, match="sha256"):
        C.read_entry(entry, hit.key)
    if runtime != "inductor":       # same code path for all; an inductor rebuild costs a compile
        rc, again = prepare_cli(runtime, tiny_model, cache, extra=IGNORE)
        assert rc == 0 and again["cached"] is False and "sha256" in again["rebuilt_reason"]
        assert C.read_entry(again["artifact"], again["key"])["key"] == again["key"]
        with Runner(runtime, tiny_model, again["artifact"], str(tmp_path)) as r:
            x = [np.ones((2, 64), np.float32)]
            assert compare(r.run(x), eager_outputs(tiny_model, x))[0]
    # truncation and a missing manifest are caught too
    with open(fp, "r+b") as f:
        f.truncate(10)
    with pytest.raises(C.BadEntry, match="bytes"):
        C.read_entry(entry, hit.key, verify_hashes=False)
    os.unlink(os.path.join(entry, C.MANIFEST))
    with pytest.raises(C.BadEntry, match="manifest missing"):
        C.read_entry(entry, hit.key)


def test_half_written_entry_is_never_used_and_is_cleaned(tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # a build that died half-way: its temp dir carries its (dead) pid; a final-named dir without a manifest
    stale = cache / f".tmp-openvino-abc-{dead.pid}-xyz"
    stale.mkdir()
    (stale / "model.xml").write_text("<half")
    alive = cache / f".tmp-openvino-abc-{os.getpid()}-xyz"
    alive.mkdir()
    C.clean_stale(str(cache))
    assert not stale.exists() and alive.exists()
    half = cache / "openvino-abc"
    half.mkdir()
    (half / "model.xml").write_text("<half")
    with pytest.raises(C.BadEntry, match="manifest missing"):
        C.read_entry(str(half), "abc")
    # publishing replaces it atomically
    with C.EntryBuilder(str(cache), "openvino", "abc") as b:
        (open(os.path.join(b.dir, "model.xml"), "w")).write("<full/>")
        man = b.publish({"x": 1})
    assert C.read_entry(str(half), "abc")["x"] == 1 and man["files"]["model.xml"]["bytes"] == 7
    assert sorted(os.listdir(cache)) == [alive.name, "openvino-abc"]


def test_key_covers_model_cpu_and_runtime_versions(tmp_path, tiny_model, two_input_model):
    for runtime in R.NAMES:
        k1, ident = R.cache_key(runtime, tiny_model, 2)
        assert k1 != R.cache_key(runtime, two_input_model, 2)[0]
        assert {"model_sha256", "torch", "cpu_model", "cpu_flags_sha256", "versions", "options"} <= set(ident)
        changed = dict(ident, cpu_flags_sha256="0" * 16)
        assert C.make_key(changed) != k1
        vs = R.variants(runtime)
        assert len({R.cache_key(runtime, tiny_model, 2, v)[0] for v in vs}) == len(vs)
    keys = {R.cache_key(n, tiny_model, 2)[0] for n in R.NAMES}
    assert len(keys) == len(R.NAMES)
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor : 0\nflags : sse avx2 fma\n")
    assert C.cpu_flags(str(fake)) == "avx2 fma sse"

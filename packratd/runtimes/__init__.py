"""Runtimes a packratd worker can run a model on, all from the same torch.export ``.pt2``.

===========  =====================================================  ==============================
name         what runs                                              artifact (built once, cached)
===========  =====================================================  ==============================
eager        ``torch.export.load(path).module()`` (PyTorch)         none
inductor     AOTInductor: ``aoti_compile_and_package``              ``model.aoti.pt2`` (a .so)
openvino     OpenVINO CPU plugin, ``convert_model(program)``        IR: ``model.xml`` + ``.bin``
onnxruntime  ONNX Runtime CPU EP, ``torch.onnx.export(dynamo=True)`` ``model.onnx`` + ``.data``
===========  =====================================================  ==============================

Every artifact keeps the program's dynamic batch dimension and is checked against eager when it is
built, NaN/Inf handling included (``specials``: see :func:`prepare`).  OpenVINO and ONNX Runtime are
optional extras (``pip install 'packratd[openvino]'``, ``'packratd[onnxruntime]'``);
:func:`unavailable_reason` says why a runtime cannot be used here without importing it.

Use::

    p = prepare("openvino", model, cache_dir, threads)   # build or find in the cache; checks the
                                                         # result against eager; RuntimeUnavailable
    s = load("openvino", model, p.artifact, threads, cpus)   # in the worker: no compiling
    outs = s.run(arrays)                                 # list[np.ndarray] -> list[np.ndarray]

One runtime per process: OpenVINO's TBB pool and torch's OpenMP pool in one process fought
(eager ResNet-50 B=1 took 2 s instead of 0.1 s).  :func:`load` never imports torch for openvino
and onnxruntime (the input spec comes from the cache manifest), and :func:`prepare`, which needs
torch to read the program, runs in a child process of its own:
``python -m packratd.runtimes prepare --runtime X --model M --cache-dir D --threads N [--cpus 0,1]``
prints one JSON line (see ``__main__``).

Thread settings, given the instance's ``threads`` and ``cpus`` (the worker has already pinned the
process to ``cpus`` and set the OpenMP environment before any of this is imported):
eager/inductor ``torch.set_num_threads(threads)`` + one inter-op thread; openvino
INFERENCE_NUM_THREADS / NUM_STREAMS=1 / ENABLE_CPU_PINNING; onnxruntime intra_op_num_threads,
inter_op 1, sequential, spinning off, pool threads pinned.  Numerics: :mod:`.numerics`.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import time
from dataclasses import asdict, dataclass, field

from . import cache as _cache

# numpy (and its OpenBLAS pool) must not load before a worker or `python -m packratd.runtimes` has
# pinned itself and set OPENBLAS_NUM_THREADS: this package imports nothing heavy at module level.


def compare(outputs, reference):
    """(ok, max_abs_err, bound): see :mod:`.numerics`."""
    from .numerics import compare as _compare
    return _compare(outputs, reference)


def explain(outputs, reference):
    """Like compare, plus a one-line reason when not ok: see :mod:`.numerics`."""
    from .numerics import explain as _explain
    return _explain(outputs, reference)

NAMES = ("eager", "inductor", "openvino", "onnxruntime")
VERIFY_BATCHES = (1, 2)       # batch sizes prepare() checks against eager (1: the 0/1-specialised case)
_MAX_REASON = 400


class RuntimeUnavailable(Exception):
    """This runtime cannot run this model here; ``reason`` is one line that says why."""

    def __init__(self, reason: str):
        self.reason = _first_line(reason)
        super().__init__(self.reason)


def _first_line(text, limit: int = _MAX_REASON) -> str:
    lines = [l.strip() for l in _ANSI.sub("", str(text)).strip().splitlines() if l.strip()]
    s = lines[0] if lines else ""
    return s if len(s) <= limit else s[: limit - 3] + "..."


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The line that names what failed, in the converters' long reports (first match wins).
_TELLING = (re.compile(r"No conversion rule found for operations?: .*"),            # OpenVINO
            re.compile(r"No ONNX function found for <OpOverload\(op='[^']+', overload='[^']+'\)>"),  # torch.onnx
            re.compile(r"Could not find an implementation for .*"),                  # ONNX Runtime
            re.compile(r"Unsupported .*operator.*"))


def one_line(text, limit: int = _MAX_REASON) -> str:
    """One line for logs and status: the telling line of a converter's report, else the first line."""
    text = _ANSI.sub("", str(text))
    for pat in _TELLING:
        m = pat.search(text)
        if m:
            text = m.group(0)
            break
    return _first_line(text, limit)


def describe_error(e: BaseException) -> str:
    """``Type: telling line`` of an exception, looking through its causes for the telling line."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for x in chain:
        msg = _ANSI.sub("", str(x))
        if any(p.search(msg) for p in _TELLING):
            return f"{type(x).__name__}: {one_line(msg)}"
    return f"{type(chain[0]).__name__}: {one_line(chain[0])}"


@dataclass
class Prepared:
    runtime: str
    artifact: str | None          # the cache entry directory (None for eager)
    seconds: float                # spent in this call (lookup, or build + check)
    cached: bool                  # found intact in the cache
    key: str
    build_seconds: float | None = None     # compile/convert time when the entry was built
    verified: dict | None = None           # {"batches", "max_abs_err", "bound"} of the check against eager
    rebuilt_reason: str | None = None      # why an existing entry was thrown away
    ident: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)   # the backend variant this artifact was built with
    note: str | None = None                # why a later variant was chosen over the first

    def to_dict(self) -> dict:
        return asdict(self)


def backend(name: str):
    if name not in NAMES:
        raise ValueError(f"unknown runtime {name!r}; known: {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def _vtuple(v: str) -> tuple:
    out = []
    for part in v.replace("+", ".").split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def unavailable_reason(name: str) -> str | None:
    """None if runtime ``name`` can be used here, else one line saying why not (no heavy imports)."""
    if name not in NAMES:
        return f"unknown runtime {name!r}; known: {', '.join(NAMES)}"
    b = backend(name)
    extra = f" (pip install 'packratd[{name}]')" if name in ("openvino", "onnxruntime") else ""
    for dist, mod, minv in b.REQUIRES:
        if importlib.util.find_spec(mod) is None:
            return f"{name} needs the Python package {dist}, which is not installed{extra}"
        try:
            v = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return f"{name} needs the Python package {dist}; the module is there but not its metadata{extra}"
        if _vtuple(v) < _vtuple(minv):
            return f"{name} needs {dist}>={minv}, found {v}{extra}"
    return b.extra_reason() if hasattr(b, "extra_reason") else None


def available() -> dict[str, str | None]:
    return {n: unavailable_reason(n) for n in NAMES}


def variants(name: str) -> tuple[dict, ...]:
    """The backend's build options, fastest first (inductor: with freezing, then without)."""
    b = backend(name)
    return tuple(getattr(b, "VARIANTS", (b.OPTIONS,)))


def cache_key(name: str, model_path: str, threads: int, options: dict | None = None) -> tuple[str, dict]:
    """(key, what it covers) of runtime ``name``'s artifact for this model on this host (first variant
    unless ``options`` says which)."""
    b = backend(name)
    ident = {"format": _cache.CACHE_FORMAT, "runtime": name, "model_sha256": _cache.file_digest(model_path),
             "torch": importlib.metadata.version("torch"), "versions": b.versions(),
             "options": variants(name)[0] if options is None else options,
             **_cache.cpu_identity()}
    if b.THREADS_IN_KEY:
        ident["threads"] = int(threads)
    return _cache.make_key(ident), ident


def _failure_path(cache_dir: str, name: str, key: str) -> str:
    return os.path.join(cache_dir, f"{name}-{key}.unavailable.json")


SPECIALS = ("strict", "ignore")


def prepare(name: str, model_path: str, cache_dir: str, threads: int, verify: bool = True,
            remember_failure: bool = True, specials: str = "strict", options: dict | None = None) -> Prepared:
    """Build runtime ``name``'s artifact for ``model_path`` (or find it intact in ``cache_dir``).

    A new artifact is loaded once and run at VERIFY_BATCHES against eager on packratd's warm-up
    inputs; it is published only if it matches (see :mod:`.numerics`).  It is also run on a batch
    whose float inputs hold a NaN, a +Inf and a -Inf (one row each); ``verified["specials"]`` says
    whether the outputs have NaN/Inf exactly where eager has them.  With ``specials="strict"`` a
    runtime that differs there is refused (OpenVINO's CPU plugin computes Relu(NaN) = 0, so a NaN
    input row of a ReLU network comes out finite: openvinotoolkit/openvino#35649); with
    ``"ignore"`` it is served anyway.  A backend with several variants (inductor: with freezing,
    then without, since freezing hands ReLU to oneDNN, which has the same Relu(NaN) = 0) is tried
    variant by variant until one passes; ``Prepared.options`` and ``.note`` say which and why.
    ``options`` builds exactly that variant (one of :func:`variants`).

    Raises RuntimeUnavailable when the runtime is missing, cannot convert the model, cannot run it
    or gets other answers; with ``remember_failure`` a conversion/run failure is cached under the
    same key, so a restart does not convert again (delete the ``.unavailable.json`` file to retry)."""
    if specials not in SPECIALS:
        raise ValueError(f"specials must be one of {SPECIALS}, not {specials!r}")
    t0 = time.monotonic()
    vs = variants(name) if name in NAMES else ({},)
    if options is not None:
        if options not in vs:
            raise ValueError(f"{name} has no variant {options}; it has {list(vs)}")
        vs = (options,)
    first_why = None
    for i, opts in enumerate(vs):
        p = _prepare(name, model_path, cache_dir, threads, verify, remember_failure, opts)
        sp = (p.verified or {}).get("specials")
        if specials == "ignore" or not sp or sp["ok"]:
            p.seconds = time.monotonic() - t0
            if first_why:
                p.note = f"built with {_diff(vs[0], opts)}: the first variant does not propagate NaN/Inf like eager ({first_why})"
            return p
        first_why = first_why or sp["why"]
    raise RuntimeUnavailable(f"{name} does not propagate NaN/Inf like eager ({first_why}); "
                             "refused under specials=strict")


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}={b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)) or "the same options"


def _prepare(name, model_path, cache_dir, threads, verify, remember_failure, options) -> Prepared:
    t0 = time.monotonic()
    reason = unavailable_reason(name)
    if reason:
        raise RuntimeUnavailable(reason)
    model_path = os.path.abspath(model_path)
    key, ident = cache_key(name, model_path, threads, options)
    b = backend(name)
    if not b.NEEDS_BUILD:
        return Prepared(name, None, time.monotonic() - t0, False, key, ident=ident, options=options)
    cache_dir = os.path.abspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    _cache.clean_stale(cache_dir)
    fail = _failure_path(cache_dir, name, key)
    if remember_failure and os.path.exists(fail):
        try:
            import json
            with open(fail) as f:
                rec = json.load(f)
            if rec.get("key") == key:
                raise RuntimeUnavailable(f"{rec['reason']} (remembered from {time.strftime('%Y-%m-%d %H:%M', time.localtime(rec.get('time', 0)))}; "
                                         f"delete {fail} to try again)")
        except (OSError, ValueError, KeyError, TypeError):
            pass
    path = _cache.entry_dir(cache_dir, name, key)
    rebuilt = None
    try:
        man = _cache.read_entry(path, key)
        return Prepared(name, path, time.monotonic() - t0, True, key, build_seconds=man.get("build_seconds"),
                        verified=man.get("verified"), ident=ident, options=options)
    except FileNotFoundError:
        pass
    except _cache.BadEntry as e:
        rebuilt = str(e)
        _cache.discard(path)
    try:
        man = _build(name, b, model_path, cache_dir, key, ident, threads, verify, options)
    except RuntimeUnavailable as e:
        if remember_failure:
            import json
            _cache_write_json(fail, {"key": key, "reason": e.reason, "time": time.time(), "ident": ident})
        raise
    return Prepared(name, path, time.monotonic() - t0, False, key, build_seconds=man.get("build_seconds"),
                    verified=man.get("verified"), rebuilt_reason=rebuilt, ident=ident, options=options)


def _cache_write_json(path: str, obj: dict) -> None:
    import json
    from ..store import write_atomic
    write_atomic(path, json.dumps(obj).encode())


def _build(name, b, model_path, cache_dir, key, ident, threads, verify, options) -> dict:
    import torch
    from .. import model as model_mod
    from .eager import set_torch_threads
    set_torch_threads(threads)
    ep = torch.export.load(model_path)
    try:
        spec = model_mod.input_spec(ep)
    except ValueError as e:
        raise RuntimeUnavailable(f"packratd cannot serve this model: {e}") from None
    inputs, reference, special, special_ref = [], [], None, None
    if verify:
        module = ep.module()
        for i, bs in enumerate(VERIFY_BATCHES):
            x = model_mod.example_inputs(spec, bs, seed=100 + i)
            inputs.append(x)
            reference.append(model_mod.run(module, x))
        special = with_specials(model_mod.example_inputs(spec, 4, seed=99))
        if special is not None:
            special_ref = model_mod.run(module, special)
        del module
    with _cache.EntryBuilder(cache_dir, name, key) as eb:
        t0 = time.monotonic()
        try:
            extra = b.build(ep, eb.dir, spec, options) or {}
        except Exception as e:  # noqa: BLE001 - any converter failure means: this runtime cannot take the model
            raise RuntimeUnavailable(f"{name} cannot convert this model: {describe_error(e)}") from None
        build_s = time.monotonic() - t0
        fields = dict(extra, ident=ident, input_spec=spec, build_seconds=build_s,
                      model={"path": model_path, "bytes": os.path.getsize(model_path)})
        if verify:
            try:
                sess = b.Session(model_path, eb.dir, fields, threads, None, False)
                got = [sess.run(x) for x in inputs]
                got_special = sess.run(special) if special is not None else None
            except Exception as e:  # noqa: BLE001
                raise RuntimeUnavailable(f"{name} cannot run this model: {describe_error(e)}") from None
            worst = (-1.0, 0.0, 0.0)
            for bs, g, r in zip(VERIFY_BATCHES, got, reference):
                ok, err, bound, why = explain(g, r)
                if not ok:
                    raise RuntimeUnavailable(f"{name} answers differ from eager at batch {bs}: {why}")
                worst = max(worst, (err / bound if bound else 0.0, err, bound))
            fields["verified"] = {"batches": list(VERIFY_BATCHES), "max_abs_err": worst[1], "bound": worst[2],
                                  "specials": None}
            if special is not None:
                ok, _, _, why = explain(got_special, special_ref)
                fields["verified"]["specials"] = {"ok": ok, "why": why}
            del sess
        return eb.publish(fields)


def with_specials(arrays):
    """A copy of a batch of >= 4 rows whose float inputs get a NaN in row 1, +Inf in row 2 and -Inf in
    row 3 (one element each); None when the model has no float input."""
    import numpy as np
    out, any_float = [], False
    for a in arrays:
        a = np.array(a, copy=True)
        if a.dtype.kind == "f" and a.shape[0] >= 4 and a[0].size >= 3:
            flat = a.reshape(a.shape[0], -1)
            flat[1, 0], flat[2, 1], flat[3, 2] = np.nan, np.inf, -np.inf
            any_float = True
        out.append(a)
    return out if any_float else None


def match_inputs(runtime_inputs: list[list[str]], spec: list[dict], what: str) -> list[tuple[str, int]]:
    """Pair a converted model's inputs (each a list of its names, in the runtime's order) with the
    program's inputs: by name, else by position when the counts agree.  [(name, spec index)]."""
    names = {s["name"]: i for i, s in enumerate(spec)}
    out = []
    for j, ns in enumerate(runtime_inputs):
        k = next((names[n] for n in ns if n in names), None)
        if k is None:
            if len(runtime_inputs) != len(spec):
                raise ValueError(f"{what} input {ns} matches no program input ({', '.join(names)})")
            k = j
        out.append((ns[0] if ns else str(j), k))
    return out


def load(name: str, model_path: str, artifact: str | None, threads: int, cpus=None, pin: bool = True):
    """A session of runtime ``name`` on ``prepare``'s artifact: ``.run(arrays)``, ``.input_spec``,
    ``.runtime``.  Never compiles.  ``cpus`` are the instance's CPUs (the caller has pinned the
    process to them); ``pin`` pins the runtime's own threads inside them."""
    reason = unavailable_reason(name)
    if reason:
        raise RuntimeUnavailable(reason)
    b = backend(name)
    man = None
    if b.NEEDS_BUILD:
        if not artifact:
            raise ValueError(f"runtime {name} needs the artifact that prepare() returned")
        base = os.path.basename(os.path.normpath(artifact))
        if not base.startswith(name + "-"):
            raise ValueError(f"{artifact} is not a {name} cache entry")
        man = _cache.read_entry(artifact, base[len(name) + 1:], verify_hashes=False)
        size = man.get("model", {}).get("bytes")
        if size is not None and os.path.getsize(model_path) != size:
            raise ValueError(f"{artifact} was built for another model file ({size} bytes, {model_path} has "
                             f"{os.path.getsize(model_path)})")
    return b.Session(os.path.abspath(model_path), artifact, man, int(threads), list(cpus) if cpus else None, bool(pin))

"""Profiler and autotuner: measure L[t][b], cache it, solve, and check the best plans concurrently.

Every measurement runs in real worker processes started by :func:`packratd.worker.spawn`, the
same code path serving uses (pinning, thread environment, allocator, warm-up); the time recorded
is the worker's own compute time for the slice, so IPC does not blur the table.

The table is cached under ``<state_dir>/profiles/<key>.json``; the key hashes the model file's
digest, the host's topology fingerprint and CPU model, the torch version and the worker settings
that change latency (allocator, per-thread pinning, SMT use) and the grid.  Files are written
atomically (temp file + rename), and a file that does not parse or does not match its key is
ignored and re-measured.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from . import messages as M
from . import planner
from . import runtimes as runtimes_mod
from . import worker as worker_mod
from .model import example_inputs
from .placement import InstanceSpec, PlacementError, place
from .plan import Plan
from .procutil import stop_processes
from .security import remove_ipc
from .solver import LatencyTable
from .store import file_digest, write_atomic  # noqa: F401  (write_atomic: re-exported for callers and tests)

log = logging.getLogger("packratd.profiler")

PROFILE_FORMAT = 1
_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


class Cancelled(Exception):
    pass


class ProfileError(Exception):
    pass


def batch_grid(max_batch: int) -> list[int]:
    """Batch sizes to measure: 1, 2, 3, 4, then about x1.5 apart, and max_batch itself."""
    g = [b for b in _GRID if b < max_batch]
    b = _GRID[-1]
    while b * 1.5 < max_batch:
        b = int(b * 1.5)
        g.append(b)
    return sorted(set(g + [max_batch]))


def thread_grid(max_threads: int) -> list[int]:
    """Thread counts to measure: every count up to 16, then every 2nd to 32, every 4th beyond."""
    g = set(range(1, min(max_threads, 16) + 1))
    g |= set(range(18, min(max_threads, 32) + 1, 2))
    g |= set(range(36, max_threads + 1, 4))
    g.add(max_threads)
    return sorted(g)


def max_instance_threads(cfg, topo) -> int:
    n = cfg["profile.max_threads"]
    node_max = max(len(cs) for cs in topo.cores_by_node().values())
    if cfg["workers.use_smt"]:
        node_max *= max(1, topo.smt)
    return min(n, node_max) if n else node_max


def cache_key(cfg, topo, model_path: str, runtime: str = "eager", artifact_key: str = "") -> tuple[str, dict]:
    ident = {
        "format": PROFILE_FORMAT,
        "model_sha256": file_digest(model_path),
        "runtime": runtime,
        "artifact": artifact_key,
        "topology": topo.shape_fingerprint(),
        "cpu_model": topo.cpu_model,
        "torch": importlib.metadata.version("torch"),
        "allocator": cfg["workers.allocator"],
        "pin_threads": cfg["workers.pin_threads"],
        "use_smt": cfg["workers.use_smt"],
        "threads": thread_grid(max_instance_threads(cfg, topo)),
        "batches": batch_grid(cfg["server.max_batch_size"]),
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    return key, ident


def profile_dir(cfg) -> str:
    return os.path.join(cfg["server.state_dir"], "profiles")


def load_cached(cfg, key: str, ident: dict | None = None) -> dict | None:
    path = os.path.join(profile_dir(cfg), f"{key}.json")
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read())
        if not isinstance(rec, dict) or rec.get("key") != key or rec.get("format") != PROFILE_FORMAT:
            raise ValueError("key or format does not match")
        if ident is not None and (rec.get("threads") != ident["threads"] or rec.get("batches") != ident["batches"]):
            raise ValueError("its grid is not the one this key stands for")
        if not isinstance(rec.get("created"), (int, float)):
            raise ValueError("no creation time")
        LatencyTable(rec["threads"], rec["batches"], rec["lat_ms"])   # validates shape and values
        return rec
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable profile %s (%s); measuring again", path, e)
        return None


def table_of(rec: dict) -> LatencyTable:
    return LatencyTable(rec["threads"], rec["batches"], np.array(rec["lat_ms"], dtype=float))


class Driver:
    """Starts pinned workers on a private socket and times slices on them.

    The socket is bound while the process umask is 0077 (the daemon sets it at start), so only
    packratd's own user can connect; answers are taken only from the workers this driver started."""

    def __init__(self, ctx: zmq.Context, cfg, endpoint: str, model_path: str, cancel: threading.Event,
                 digest: str = "", runtime: str = "eager", artifact: str = ""):
        self.cfg = cfg
        self.model_path = model_path
        self.digest = digest
        self.runtime = runtime
        self.artifact = artifact
        self.cancel = cancel
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.endpoint = endpoint
        self.procs: dict[bytes, object] = {}
        self.spec = None
        self.inputs: dict[int, list] = {}
        self.next_hb = 0.0
        self.seq = 0
        self.load_s: dict[bytes, float | None] = {}   # per worker, from its READY
        self.task = 0

    def _hb(self):
        now = time.monotonic()
        if now >= self.next_hb:
            for ident in self.procs:
                try:
                    self.sock.send_multipart([ident + worker_mod.HB_SUFFIX] + M.hb(), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            self.next_hb = now + self.cfg["workers.heartbeat_interval_s"]

    def _recv(self, timeout: float) -> tuple[bytes, M.Message]:
        """Next message from one of our workers (identity, Message) within timeout, keeping heartbeats flowing."""
        deadline = time.monotonic() + timeout
        while True:
            if self.cancel.is_set():
                raise Cancelled()
            self._hb()
            for ident, p in self.procs.items():
                if p.poll() is not None:
                    raise ProfileError(f"profiling worker {ident.decode()} exited with status {p.returncode}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProfileError(f"no answer from profiling workers within {timeout:.0f}s")
            if self.sock.poll(int(min(left, 0.2) * 1000)):
                frames = self.sock.recv_multipart(copy=False)
                ident = frames[0].bytes
                if ident not in self.procs:
                    continue                      # heartbeats (<ident>!hb) and strangers
                try:
                    msg = M.decode(frames[1:])
                except M.MessageError as e:
                    log.warning("profiling worker %s sent a malformed message: %s", ident.decode(), e)
                    continue
                if msg.kind != M.HB:
                    return ident, msg

    def start(self, placements, warmup: dict | None = None, runtime: str | None = None,
              artifact: str | None = None) -> list[bytes]:
        idents = []
        for pl in placements:
            self.seq += 1
            ident = f"prof.{self.seq}".encode()
            sizes = tuple((warmup or {}).get(pl.index, (pl.spec.batch,)))
            spec = worker_mod.LaunchSpec(self.endpoint, ident.decode(), self.model_path, pl.spec.threads, tuple(pl.cpus),
                                         sizes, self.digest, runtime or self.runtime,
                                         self.artifact if artifact is None else artifact)
            try:
                self.procs[ident] = worker_mod.spawn(self.cfg, spec)
            except worker_mod.LaunchError as e:
                raise ProfileError(str(e)) from None
            idents.append(ident)
        waiting = set(idents)
        while waiting:
            ident, msg = self._recv(self.cfg["workers.boot_timeout_s"])
            if msg.kind == M.READY:
                self.spec = msg.head.get("spec")
                self.load_s[ident] = msg.head.get("load_s")
                waiting.discard(ident)
            elif msg.kind == M.BOOTFAIL:
                raise ProfileError(f"worker failed to boot: {msg.head.get('message')}")
        return idents

    def _arrays(self, b: int) -> list:
        if b not in self.inputs:
            self.inputs[b] = example_inputs(self.spec, b)
        return self.inputs[b]

    def run(self, work: list[tuple[bytes, int]], timeout: float = 600.0) -> dict[bytes, float]:
        """Send each worker its slice at once; returns the worker-reported compute ms per worker."""
        pending = {}
        for ident, b in work:
            if b <= 0:
                continue
            self.task += 1
            self.sock.send_multipart([ident] + M.work_for_arrays(self.task, self._arrays(b)), copy=False)
            pending[self.task] = ident
        out = {}
        while pending:
            ident, msg = self._recv(timeout)
            task = msg.head.get("task")
            if msg.kind in (M.RESULT, M.ERROR) and pending.get(task) == ident:
                if msg.kind == M.ERROR:
                    raise ProfileError(f"the model failed while profiling: {msg.head.get('message')}")
                out[pending.pop(task)] = float(msg.head["ms"])
        return out

    def stop(self) -> None:
        stop_processes(list(self.procs.values()), self.cfg["workers.stop_grace_s"], what="profiling worker")
        self.procs.clear()

    def close(self) -> None:
        self.stop()
        self.sock.close(linger=0)
        remove_ipc(self.endpoint)


def measure(fn, cfg) -> tuple[float, float, float, int]:
    """Repeat fn() (returns ms) until the median is stable or a cap: (median, p10, p90, n)."""
    lo_n, hi_n = cfg["profile.min_reps"], cfg["profile.max_reps"]
    spread, budget = cfg["profile.rel_spread"], cfg["profile.point_budget_s"]
    xs = []
    t0 = time.monotonic()
    while len(xs) < hi_n:
        xs.append(fn())
        if len(xs) >= lo_n:
            q1, q3 = np.percentile(xs, [25, 75])
            med = statistics.median(xs)
            if (q3 - q1) <= spread * med or time.monotonic() - t0 > budget:
                break
    a = np.array(xs)
    return float(np.median(a)), float(np.percentile(a, 10)), float(np.percentile(a, 90)), len(xs)


@dataclass
class Progress:
    state: str = "idle"          # idle | cached | profiling | checking | done | failed
    done: int = 0
    total: int = 0
    started: float = 0.0
    eta_s: float | None = None
    message: str = ""
    candidates: int | None = None     # while checking: plans to measure, and how many are measured
    checked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict:
        with self.lock:
            return {"state": self.state, "done": self.done, "total": self.total, "eta_s": self.eta_s,
                    "candidates": self.candidates, "checked": self.checked,
                    "elapsed_s": (time.monotonic() - self.started) if self.started else None,
                    "progress": f"{self.done}/{self.total} points" + (f", about {self.eta_s:.0f}s left" if self.eta_s else "")
                    if self.state == "profiling" else self.message}


def run_profile(cfg, topo, model_path: str, driver: Driver, progress: Progress, runtime: str = "eager",
                artifact_key: str = "") -> dict:
    key, ident = cache_key(cfg, topo, model_path, runtime, artifact_key)
    threads, batches = ident["threads"], ident["batches"]
    lat = np.full((len(threads), len(batches)), np.nan)
    p10 = np.full_like(lat, np.nan)
    p90 = np.full_like(lat, np.nan)
    reps = np.zeros_like(lat, dtype=int)
    weights = {(t, b): b / t ** 0.7 + 0.5 for t in threads for b in batches}
    total_w = sum(weights.values())
    done_w = 0.0
    with progress.lock:
        progress.state, progress.done, progress.total = "profiling", 0, len(threads) * len(batches)
        progress.started = time.monotonic()
    t_start = time.monotonic()
    for i, t in enumerate(threads):
        try:
            (pl,) = place([InstanceSpec(t, 1)], topo, use_smt=cfg["workers.use_smt"])
        except PlacementError as e:
            log.warning("profile: skipping %d threads: %s", t, e)
            continue
        (ident_w,) = driver.start([pl], {0: (1,)})
        for j, b in enumerate(batches):
            driver.run([(ident_w, b)])             # first run at a new size: oneDNN builds its primitives
            med, lo, hi, n = measure(lambda: driver.run([(ident_w, b)])[ident_w], cfg)
            lat[i, j], p10[i, j], p90[i, j], reps[i, j] = med, lo, hi, n
            done_w += weights[(t, b)]
            elapsed = time.monotonic() - t_start
            with progress.lock:
                progress.done += 1
                progress.eta_s = elapsed * (total_w - done_w) / done_w if done_w else None
            log.debug("profile t=%d b=%d: %.2f ms (p10 %.2f, p90 %.2f, n=%d)", t, b, med, lo, hi, n)
        driver.stop()
        log.info("profile: %d/%d thread counts done, %s", i + 1, len(threads),
                 f"about {progress.eta_s:.0f}s left" if progress.eta_s else "finishing")
    return {"format": PROFILE_FORMAT, "key": key, "ident": ident, "created": time.time(),
            "wall_s": time.monotonic() - t_start, "threads": threads, "batches": batches,
            "lat_ms": lat.tolist(), "p10_ms": p10.tolist(), "p90_ms": p90.tolist(), "reps": reps.tolist()}


def check_candidates(cfg, topo, plans: list[Plan], driver: Driver, progress: Progress) -> list[tuple[Plan, float]]:
    """Run each candidate plan's instances concurrently, as they would serve; measured batch latency (ms)."""
    out = []
    with progress.lock:
        progress.state, progress.message = "checking", f"measuring {len(plans)} candidate plan(s) concurrently"
        progress.candidates, progress.checked = len(plans), 0
    for plan in plans:
        pls = place(plan.instances, topo, use_smt=cfg["workers.use_smt"])
        idents = driver.start(pls)
        work = [(ident, pl.spec.batch) for ident, pl in zip(idents, pls)]
        driver.run(work)   # warm at these sizes, all together
        med, _, _, _ = measure(lambda: max(driver.run(work).values()), cfg)
        driver.stop()
        out.append((plan, med))
        with progress.lock:
            progress.checked += 1
        log.info("interference check: %s measured %.1f ms (predicted %.1f ms)", plan, med, plan.latency_ms)
    return out


@dataclass
class AutotuneResult:
    plan: Plan
    predicted_ms: float | None
    measured_ms: float | None
    table: LatencyTable | None
    profile: dict | None
    batch_size: int
    candidates: list = field(default_factory=list)     # [(plan str, predicted, measured)]
    runtime: "RuntimeChoice | None" = None


# ---- runtimes ---------------------------------------------------------------------------------
@dataclass
class RuntimeChoice:
    name: str
    artifact: str                    # "" for eager
    key: str                         # the artifact's cache key ("" for eager)
    info: dict                       # per runtime: available / reason / prepare and build seconds / ms per point
    cached: bool = False             # the choice itself came from the cache


def runtime_cache_dir(cfg) -> str:
    return os.path.join(cfg["server.state_dir"], "runtimes")


def prepare_runtime(cfg, name: str, model_path: str, threads: int, cpus, cancel: threading.Event) -> dict:
    """Build (or find in the cache) runtime ``name``'s artifact in a child process set up like a worker on
    ``cpus`` (python -m packratd.runtimes prepare): the daemon never imports torch or a runtime itself,
    and the converter's threads stay on the cores it was given.  Returns the child's JSON answer."""
    if name == "eager":
        return {"ok": True, "runtime": "eager", "artifact": None, "key": "", "seconds": 0.0, "cached": True}
    cpus = list(cpus)
    cmd = [sys.executable, "-m", "packratd.runtimes", "prepare", "--runtime", name, "--model", model_path,
           "--cache-dir", runtime_cache_dir(cfg), "--threads", str(threads), "--cpus", ",".join(map(str, cpus)),
           "--specials", cfg["workers.runtime_specials"]]
    try:
        env = worker_mod.worker_env(os.environ, threads, cpus, cfg["workers.allocator"], cfg["workers.pin_threads"])
    except FileNotFoundError as e:
        return {"ok": False, "runtime": name, "error": str(e)}
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    tmp = os.path.join(cfg["server.state_dir"], "tmp")         # compilers' scratch (inductor's headers): not /tmp
    os.makedirs(tmp, exist_ok=True)
    env["TMPDIR"] = tmp
    t0 = time.monotonic()
    try:
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, close_fds=True)
    except OSError as e:
        return {"ok": False, "runtime": name, "error": f"cannot start the prepare process: {e}"}
    out = b""
    while True:
        try:
            out, _ = p.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if cancel.is_set() or time.monotonic() - t0 > cfg["autotune.prepare_timeout_s"]:
                p.kill()
                p.communicate()
                if cancel.is_set():
                    raise Cancelled() from None
                return {"ok": False, "runtime": name, "unavailable": True,
                        "reason": f"preparing took longer than autotune.prepare_timeout_s ({cfg['autotune.prepare_timeout_s']:.0f}s)"}
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"ok": False, "runtime": name, "error": f"the prepare process exited with {p.returncode} and no answer"}


def _choice_key(cfg, topo, model_path: str, prepared: dict, threads: int, points: list[int]) -> str:
    ident = {"format": PROFILE_FORMAT, "model_sha256": file_digest(model_path), "topology": topo.shape_fingerprint(),
             "torch": importlib.metadata.version("torch"), "allocator": cfg["workers.allocator"],
             "pin_threads": cfg["workers.pin_threads"], "threads": threads, "points": points,
             "runtimes": {n: r.get("key", "") for n, r in sorted(prepared.items())}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


RUNTIME_TIE = 0.02   # runtimes whose score is within 2% of the best are a tie: timing noise on shared cores


def runtime_points(batch_size: int) -> list[int]:
    """The batch sizes at which runtimes are timed against each other: 1, the size being planned for and,
    from 16 up, one in between (2**ceil(log2(B)/2): 8 for 32), since the winner can change with the batch."""
    B = max(1, int(batch_size))
    pts = {1, B}
    if B >= 16:
        pts.add(2 ** math.ceil(math.log2(B) / 2))
    return sorted(pts)


def pick_runtime(med: dict[str, dict[int, float]], load_s: dict[str, float | None]) -> tuple[str, dict[str, float]]:
    """The runtime with the lowest score: mean over the timed batch sizes of its latency relative to the
    fastest there.  Runtimes within RUNTIME_TIE of the best score are a tie, broken by the fastest model load
    (a worker's boot, which every restart and every switch of generations pays), then eager first."""
    points = sorted({b for d in med.values() for b in d})
    score = {n: float(np.mean([med[n][b] / min(med[m][b] for m in med) for b in points])) for n in med}
    top = min(score.values())
    tied = [n for n in score if score[n] <= top * (1.0 + RUNTIME_TIE)]
    best = min(tied, key=lambda n: (load_s.get(n) if load_s.get(n) is not None else float("inf"), n != "eager", score[n]))
    return best, score


def select_runtime(cfg, topo, model_path: str, batch_size: int, driver: Driver, progress: Progress,
                   cancel: threading.Event, refresh: bool = False) -> RuntimeChoice:
    """The runtime the workers will use: ``workers.runtime``, or with ``auto`` the fastest by measurement.

    Every available runtime is prepared (built once, cached, checked against eager: packratd.runtimes);
    one that cannot take the model is skipped with one log line and its reason in the status.  With
    several left, each is timed in a real worker (one process per runtime, the instance's threads and
    cores) at the batch sizes of runtime_points, in two passes in opposite order; pick_runtime chooses.
    The choice is cached."""
    wanted = cfg["workers.runtime"]
    names = list(runtimes_mod.NAMES) if wanted == "auto" else [wanted]
    T = max_instance_threads(cfg, topo)
    (pl,) = place([InstanceSpec(T, 1)], topo, use_smt=cfg["workers.use_smt"])
    info: dict[str, dict] = {}
    prepared: dict[str, dict] = {}
    for name in names:
        reason = runtimes_mod.unavailable_reason(name)
        if reason is None:
            with progress.lock:
                progress.state, progress.message = "runtimes", f"preparing runtime {name}"
            r = prepare_runtime(cfg, name, model_path, T, pl.cpus, cancel)
            if r.get("ok"):
                prepared[name] = r
                info[name] = {"available": True, "prepare_s": round(r.get("seconds") or 0.0, 3), "cached": r.get("cached"),
                              "build_s": r.get("build_seconds"), "note": r.get("note")}
                continue
            reason = r.get("reason") or r.get("error") or "unknown"
        info[name] = {"available": False, "reason": reason}
        log.warning("runtime %s skipped: %s", name, reason)
    if wanted != "auto" and wanted not in prepared:
        log.error("workers.runtime = %s cannot serve this model (%s); serving on eager", wanted, info[wanted]["reason"])
        prepared["eager"] = prepare_runtime(cfg, "eager", model_path, T, pl.cpus, cancel)
        info["eager"] = {"available": True, "fallback": True}
    if not prepared:
        raise ProfileError("no runtime can serve this model: " + "; ".join(f"{n}: {i['reason']}" for n, i in info.items()))
    points = runtime_points(batch_size)
    ck = os.path.join(profile_dir(cfg), f"runtime-{_choice_key(cfg, topo, model_path, prepared, T, points)}.json")
    cached = None
    if not refresh and len(prepared) > 1:
        try:
            with open(ck) as f:
                cached = json.load(f)
            if cached.get("runtime") not in prepared:
                cached = None
        except (OSError, ValueError):
            cached = None
    if cached is not None:
        best = cached["runtime"]
        for n, ms in cached.get("ms", {}).items():
            if n in info:
                info[n]["ms"] = ms
    elif len(prepared) == 1:
        best = next(iter(prepared))
    else:
        ms = {n: {b: [] for b in points} for n in prepared}
        load: dict[str, list] = {n: [] for n in prepared}
        order = list(prepared)
        for k, pass_order in enumerate((order, order[::-1])):
            for n in pass_order:
                with progress.lock:
                    progress.state, progress.message = "runtimes", f"timing runtime {n} (pass {k + 1} of 2)"
                (ident_w,) = driver.start([pl], {0: tuple(points)}, runtime=n, artifact=prepared[n].get("artifact") or "")
                if driver.load_s.get(ident_w) is not None:
                    load[n].append(float(driver.load_s[ident_w]))
                for b in points:
                    driver.run([(ident_w, b)])
                    ms[n][b].append(measure(lambda: driver.run([(ident_w, b)])[ident_w], cfg)[0])
                driver.stop()
        med = {n: {b: float(np.mean(v)) for b, v in d.items()} for n, d in ms.items()}
        load_s = {n: (min(v) if v else None) for n, v in load.items()}
        best, score = pick_runtime(med, load_s)
        for n in med:
            info[n]["ms"] = {str(b): round(v, 3) for b, v in med[n].items()}
            info[n]["score"] = round(score[n], 4)
            if load_s[n] is not None:
                info[n]["load_s"] = round(load_s[n], 3)
        write_atomic(ck, json.dumps({"runtime": best, "ms": {n: info[n]["ms"] for n in med}, "created": time.time()}).encode())
    info[best]["chosen"] = True
    r = prepared[best]
    log.info("runtime %s chosen%s: %s", best, " (cached choice)" if cached else "",
             ", ".join(f"{n} {i.get('ms') or i.get('reason')}" for n, i in info.items()))
    return RuntimeChoice(best, r.get("artifact") or "", r.get("key") or "", info, cached is not None)


def choose(cfg, topo, table: LatencyTable, batch_size: int, driver: Driver | None, progress: Progress) -> tuple:
    """Solve for batch_size; measure the best few candidates concurrently if configured; pick the measured best."""
    c = planner.choose(table, topo, batch_size, cfg["workers.use_smt"], cfg["autotune.candidates"],
                       cfg["autotune.split_margin"])
    if driver is None or not cfg["autotune.interference_check"] or len(c.candidates) == 1:
        return c.best, None, [(str(p), p.latency_ms, None) for p in c.candidates]
    measured = check_candidates(cfg, topo, list(c.candidates), driver, progress)
    best, best_ms = planner.prefer_fat(measured, c.fat, cfg["autotune.split_margin"])
    return best, best_ms, [(str(p), p.latency_ms, m) for p, m in measured]


def autotune(cfg, topo, ctx, runtime_dir: str, progress: Progress, cancel: threading.Event,
             refresh: bool = False, batch_size: int | None = None, model_path: str | None = None,
             digest: str = "", fixed_plan: Plan | None = None) -> AutotuneResult:
    """Choose the runtime, then (without ``fixed_plan``) profile L[t][b] on it and choose the plan."""
    model_path = model_path or cfg["model.path"]
    B = batch_size or cfg["autotune.batch_size"] or cfg["server.max_batch_size"]
    driver = Driver(ctx, cfg, "ipc://" + os.path.join(runtime_dir, "profiler.sock"), model_path, cancel, digest)
    try:
        rc = select_runtime(cfg, topo, model_path, B, driver, progress, cancel, refresh)
        driver.runtime, driver.artifact = rc.name, rc.artifact
        if fixed_plan is not None:
            with progress.lock:
                progress.state, progress.message = "done", f"runtime {rc.name}"
            return AutotuneResult(fixed_plan, None, None, None, None, B, [], rc)
        key, ident = cache_key(cfg, topo, model_path, rc.name, rc.key)
        rec = None if refresh else load_cached(cfg, key, ident)
        if rec is None:
            log.info("profiling %s on %s: no cached profile for this model, host and torch (key %s)",
                     os.path.basename(cfg["model.path"]), rc.name, key)
            rec = run_profile(cfg, topo, model_path, driver, progress, rc.name, rc.key)
            write_atomic(os.path.join(profile_dir(cfg), f"{key}.json"), json.dumps(rec).encode())
            log.info("profile done in %.0fs, cached as %s", rec["wall_s"], key)
        else:
            with progress.lock:
                progress.state, progress.message = "cached", f"cached profile {key}"
            log.info("using cached profile %s (%.0fs old)", key, time.time() - rec["created"])
        table = table_of(rec)
        plan, measured, cands = choose(cfg, topo, table, B, driver, progress)
    finally:
        driver.close()
    with progress.lock:
        progress.state, progress.message = "done", f"plan {plan} on {rc.name}"
    return AutotuneResult(plan, plan.latency_ms, measured, table, rec, B, cands, rc)


class Tuner(threading.Thread):
    """Runs :func:`autotune` off the main loop; the loop reads ``progress`` and, once the thread has
    ended, ``result`` or ``error``.  Cancel with ``cancel.set()``."""

    def __init__(self, cfg, topo, ctx, runtime_dir: str, reason: str, refresh: bool = False,
                 batch_size: int | None = None, model_path: str | None = None, digest: str = "",
                 fixed_plan: Plan | None = None):
        super().__init__(name="packratd-autotune", daemon=True)
        self.cfg, self.topo, self.ctx, self.runtime_dir = cfg, topo, ctx, runtime_dir
        self.reason = reason
        self.refresh = refresh
        self.batch_size = batch_size
        self.model_path, self.digest = model_path, digest
        self.fixed_plan = fixed_plan
        self.progress = Progress()
        self.cancel = threading.Event()
        self.result: AutotuneResult | None = None
        self.error: str | None = None

    def run(self):
        try:
            self.result = autotune(self.cfg, self.topo, self.ctx, self.runtime_dir, self.progress, self.cancel,
                                   refresh=self.refresh, batch_size=self.batch_size, model_path=self.model_path,
                                   digest=self.digest, fixed_plan=self.fixed_plan)
        except Cancelled:
            self.error = "cancelled"
        except Exception as e:  # noqa: BLE001 - reported by the main loop
            log.exception("autotune failed")
            self.error = f"{type(e).__name__}: {e}"
            with self.progress.lock:
                self.progress.state, self.progress.message = "failed", self.error

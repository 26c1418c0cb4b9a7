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
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from . import messages as M
from . import planner
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


def cache_key(cfg, topo, model_path: str) -> tuple[str, dict]:
    ident = {
        "format": PROFILE_FORMAT,
        "model_sha256": file_digest(model_path),
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

    def start(self, placements, warmup: dict | None = None) -> list[bytes]:
        idents = []
        for pl in placements:
            self.seq += 1
            ident = f"prof.{self.seq}".encode()
            sizes = tuple((warmup or {}).get(pl.index, (pl.spec.batch,)))
            spec = worker_mod.LaunchSpec(self.endpoint, ident.decode(), self.model_path, pl.spec.threads, tuple(pl.cpus),
                                         sizes, self.digest, self.runtime, self.artifact)
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


def run_profile(cfg, topo, model_path: str, driver: Driver, progress: Progress) -> dict:
    key, ident = cache_key(cfg, topo, model_path)
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
    predicted_ms: float
    measured_ms: float | None
    table: LatencyTable
    profile: dict
    batch_size: int
    candidates: list = field(default_factory=list)     # [(plan str, predicted, measured)]


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
             digest: str = "") -> AutotuneResult:
    model_path = model_path or cfg["model.path"]
    key, ident = cache_key(cfg, topo, model_path)
    rec = None if refresh else load_cached(cfg, key, ident)
    driver = Driver(ctx, cfg, "ipc://" + os.path.join(runtime_dir, "profiler.sock"), model_path, cancel, digest)
    try:
        if rec is None:
            log.info("profiling %s: no cached profile for this model, host and torch (key %s)",
                     os.path.basename(cfg["model.path"]), key)
            rec = run_profile(cfg, topo, model_path, driver, progress)
            write_atomic(os.path.join(profile_dir(cfg), f"{key}.json"), json.dumps(rec).encode())
            log.info("profile done in %.0fs, cached as %s", rec["wall_s"], key)
        else:
            with progress.lock:
                progress.state, progress.message = "cached", f"cached profile {key}"
            log.info("using cached profile %s (%.0fs old)", key, time.time() - rec["created"])
        table = table_of(rec)
        B = batch_size or cfg["autotune.batch_size"] or cfg["server.max_batch_size"]
        plan, measured, cands = choose(cfg, topo, table, B, driver, progress)
    finally:
        driver.close()
    with progress.lock:
        progress.state, progress.message = "done", f"plan {plan}"
    return AutotuneResult(plan, plan.latency_ms, measured, table, rec, B, cands)


class Tuner(threading.Thread):
    """Runs :func:`autotune` off the main loop; the loop reads ``progress`` and, once the thread has
    ended, ``result`` or ``error``.  Cancel with ``cancel.set()``."""

    def __init__(self, cfg, topo, ctx, runtime_dir: str, reason: str, refresh: bool = False,
                 batch_size: int | None = None, model_path: str | None = None, digest: str = ""):
        super().__init__(name="packratd-autotune", daemon=True)
        self.cfg, self.topo, self.ctx, self.runtime_dir = cfg, topo, ctx, runtime_dir
        self.reason = reason
        self.refresh = refresh
        self.batch_size = batch_size
        self.model_path, self.digest = model_path, digest
        self.progress = Progress()
        self.cancel = threading.Event()
        self.result: AutotuneResult | None = None
        self.error: str | None = None

    def run(self):
        try:
            self.result = autotune(self.cfg, self.topo, self.ctx, self.runtime_dir, self.progress, self.cancel,
                                   refresh=self.refresh, batch_size=self.batch_size, model_path=self.model_path,
                                   digest=self.digest)
        except Cancelled:
            self.error = "cancelled"
        except Exception as e:  # noqa: BLE001 - reported by the main loop
            log.exception("autotune failed")
            self.error = f"{type(e).__name__}: {e}"
            with self.progress.lock:
                self.progress.state, self.progress.message = "failed", self.error

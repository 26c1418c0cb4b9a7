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
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from . import worker as worker_mod
from .model import example_inputs
from .placement import InstanceSpec, PlacementError, place
from .security import remove_ipc
from .solver import LatencyTable, Plan, solve

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


_digests: dict = {}


def file_digest(path: str) -> str:
    st = os.stat(path)
    k = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if k not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _digests[k] = h.hexdigest()
    return _digests[k]


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
        "topology": topo.fingerprint(),
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


def write_atomic(path: str, data: bytes) -> None:
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_cached(cfg, key: str) -> dict | None:
    path = os.path.join(profile_dir(cfg), f"{key}.json")
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read())
        if rec.get("key") != key or rec.get("format") != PROFILE_FORMAT:
            raise ValueError("key or format does not match")
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
    """Starts pinned workers on a private socket and times slices on them."""

    def __init__(self, ctx: zmq.Context, cfg, endpoint: str, model_path: str, cancel: threading.Event):
        self.cfg = cfg
        self.model_path = model_path
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
                    self.sock.send_multipart([ident, b"HB"], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            self.next_hb = now + self.cfg["workers.heartbeat_interval_s"]

    def _recv(self, timeout: float):
        """Next non-heartbeat message (identity, kind, frames) within timeout, keeping heartbeats flowing."""
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
                frames = self.sock.recv_multipart()
                if frames[1] != b"HB":
                    return frames[0], frames[1], frames[2:]

    def start(self, placements, warmup_batch: dict | None = None) -> list[bytes]:
        idents = []
        for pl in placements:
            self.seq += 1
            ident = f"prof.{self.seq}".encode()
            wb = (warmup_batch or {}).get(pl.index, pl.spec.batch)
            self.procs[ident] = worker_mod.spawn(self.cfg, self.endpoint, ident.decode(), pl.spec.threads, pl.cpus, wb,
                                                 self.model_path)
            idents.append(ident)
        waiting = set(idents)
        while waiting:
            ident, kind, rest = self._recv(self.cfg["workers.boot_timeout_s"])
            if kind == b"READY":
                info = json.loads(rest[0])
                self.spec = info["spec"]
                waiting.discard(ident)
            elif kind == b"BOOTFAIL":
                raise ProfileError(f"worker failed to boot: {json.loads(rest[0]).get('message')}")
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
            arrays = self._arrays(b)
            head = {"task": self.task, "inputs": [{"dtype": s["dtype"], "tail": s["shape"][1:], "rows": [b]}
                                                  for s in self.spec]}
            self.sock.send_multipart([ident, b"WORK", json.dumps(head).encode()] +
                                     [memoryview(a).cast("B") for a in arrays], copy=False)
            pending[self.task] = ident
        out = {}
        while pending:
            ident, kind, rest = self._recv(timeout)
            if kind in (b"RESULT", b"ERROR"):
                head = json.loads(rest[0])
                if head.get("task") in pending:
                    if kind == b"ERROR":
                        raise ProfileError(f"the model failed while profiling: {head.get('message')}")
                    out[pending.pop(head["task"])] = float(head["ms"])
        return out

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=self.cfg["workers.stop_grace_s"])
            except Exception:  # noqa: BLE001
                p.kill()
                p.wait()
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
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict:
        with self.lock:
            return {"state": self.state, "done": self.done, "total": self.total, "eta_s": self.eta_s,
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
        (ident_w,) = driver.start([pl], {0: 1})
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


def plan_specs(plan: Plan) -> list[InstanceSpec]:
    return [InstanceSpec(t, b) for t, b in plan.instances]


def check_candidates(cfg, topo, plans: list[Plan], driver: Driver, progress: Progress) -> list[tuple[Plan, float]]:
    """Run each candidate plan's instances concurrently, as they would serve; measured batch latency (ms)."""
    out = []
    with progress.lock:
        progress.state, progress.message = "checking", f"measuring {len(plans)} candidate plan(s) concurrently"
    for plan in plans:
        pls = place(plan_specs(plan), topo, use_smt=cfg["workers.use_smt"])
        idents = driver.start(pls)
        work = [(ident, pl.spec.batch) for ident, pl in zip(idents, pls)]
        driver.run(work)   # warm at these sizes, all together
        med, _, _, _ = measure(lambda: max(driver.run(work).values()), cfg)
        driver.stop()
        out.append((plan, med))
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


def placeable(cfg, topo, plans) -> list[Plan]:
    ok = []
    for p in plans:
        try:
            place(plan_specs(p), topo, use_smt=cfg["workers.use_smt"])
            ok.append(p)
        except PlacementError:
            continue
    return ok


def prefer_fat(scored: list[tuple[Plan, float]], fat: Plan | None, margin: float) -> tuple[Plan, float]:
    """The lowest-latency (plan, ms), except that the single fat instance is kept unless another plan
    beats it by more than ``margin``: co-location interference and gathering slices from several
    workers cost something no isolated profile shows, so a near tie goes to one instance."""
    best = min(scored, key=lambda pm: pm[1])
    if fat is None or best[0].shape == fat.shape:
        return best
    fat_entry = next((pm for pm in scored if pm[0].shape == fat.shape), None)
    if fat_entry is not None and best[1] > fat_entry[1] * (1 - margin):
        return fat_entry
    return best


def candidate_plans(cfg, topo, sol) -> list[Plan]:
    """The solver's best plans that fit the NUMA layout, best first, the fat instance always among them."""
    plans = placeable(cfg, topo, [sol.best, *sol.runners_up])
    n = max(1, cfg["autotune.candidates"])
    fat = [p for p in plans if sol.fat is not None and p.shape == sol.fat.shape]
    rest = [p for p in plans if p not in fat]
    return (rest[:n - 1] + fat + rest[n - 1:])[:n] if fat and n > 1 else plans[:n]


def choose(cfg, topo, table: LatencyTable, batch_size: int, driver: Driver | None, progress: Progress) -> tuple:
    """Solve for batch_size; measure the best few candidates concurrently if configured; pick the measured best."""
    T = topo.n_cores * (max(1, topo.smt) if cfg["workers.use_smt"] else 1)
    sol = solve(table, T, batch_size, top_k=max(cfg["autotune.candidates"], 2))
    plans = candidate_plans(cfg, topo, sol)
    if not plans:
        raise ProfileError(f"no plan for batch {batch_size} fits the cores' NUMA layout")
    margin = cfg["autotune.split_margin"]
    if driver is None or not cfg["autotune.interference_check"] or len(plans) == 1:
        best, _ = prefer_fat([(p, p.latency_ms) for p in plans], sol.fat, margin)
        return best, None, [(str(p), p.latency_ms, None) for p in plans]
    measured = check_candidates(cfg, topo, plans, driver, progress)
    best, best_ms = prefer_fat(measured, sol.fat, margin)
    return best, best_ms, [(str(p), p.latency_ms, m) for p, m in measured]


def autotune(cfg, topo, ctx, runtime_dir: str, progress: Progress, cancel: threading.Event,
             refresh: bool = False, batch_size: int | None = None) -> AutotuneResult:
    model_path = cfg["model.path"]
    key, _ = cache_key(cfg, topo, model_path)
    rec = None if refresh else load_cached(cfg, key)
    driver = Driver(ctx, cfg, "ipc://" + os.path.join(runtime_dir, "profiler.sock"), model_path, cancel)
    try:
        if rec is None:
            log.info("profiling %s: no cached profile for this model, host and torch (key %s)",
                     os.path.basename(model_path), key)
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

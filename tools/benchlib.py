#!/usr/bin/env python3
"""Shared helpers for packratd benchmarks (tools/bench_*.py).

What is here:

* ``worker_like_env`` / ``fat_cpus`` -- the exact environment and CPUs a packratd worker gets, so a
  baseline measured outside packratd runs with the same allocator, OpenMP and pinning settings.
* ``InProcRunner`` -- the model in a subprocess started with that environment, pinned like a worker
  (``sched_setaffinity`` before torch is imported, ``set_num_threads``, ``set_num_interop_threads(1)``,
  ``inference_mode`` via ``packratd.model.run``).  It times each call itself, so the number is the
  pure in-process latency.  Talks JSON lines over a pipe; run as ``python tools/benchlib.py runner``.
* ``BenchDaemon`` -- a real ``packratd`` process (like tests/conftest.py's ``DaemonProc``): start,
  wait until it serves, control/status, stop (checking no worker is left behind).
* ``interleave`` -- round-robin single calls over several variants (one at a time, rotating the
  order every round) under a time budget with min/max repetitions; ``summarize`` for median/p10/p90.
* ``IpcEcho`` -- a ZeroMQ echo peer in a subprocess, to price moving N bytes over an ipc socket.
* ``make_inputs``, ``ensure_model``, ``env_info``, ``replace_md_section``.

The driver process (the benchmark itself) never imports torch: it only talks to subprocesses, so
it stays small and mostly asleep while the variants run.

libgomp note: torch's CPU wheel ships GNU OpenMP (torch/lib/libgomp.so.1), for which KMP_BLOCKTIME
means nothing.  packratd's workers set GOMP_SPINCOUNT=300000 (a short spin, then sleep); the base
environment here sets the same value so every process in a benchmark, daemon or baseline, idles alike.
"""
from __future__ import annotations

import atexit
import json
import os
import platform
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if __name__ == "__main__" and sys.argv[1:2] == ["runner"] and "--cpus" in sys.argv:
    # The runner pins itself before anything with a thread pool (numpy's OpenBLAS, torch) loads,
    # as packratd.worker does.
    os.sched_setaffinity(0, [int(c) for c in sys.argv[sys.argv.index("--cpus") + 1].split(",")])

import numpy as np  # noqa: E402

# libgomp's own default spin count when OMP_WAIT_POLICY is not ACTIVE (~0.1-1 ms of spinning):
# enough to bridge the gaps between parallel regions inside one forward pass, and the threads
# sleep soon after a call ends.
DEFAULT_GOMP_SPINCOUNT = "300000"

_LIVE: list = []     # subprocesses to kill if the benchmark dies


def _cleanup_live():
    for p in list(_LIVE):
        try:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        except Exception:  # noqa: BLE001
            pass


atexit.register(_cleanup_live)


# ---------------------------------------------------------------------------------------------
# configuration shared with packratd
# ---------------------------------------------------------------------------------------------

def config_default(key: str):
    from packratd.config import OPTIONS
    for o in OPTIONS:
        if o.key == key:
            return o.default
    raise KeyError(key)


def daemon_defaults() -> dict:
    """The worker settings a daemon uses unless told otherwise."""
    return {"allocator": config_default("workers.allocator"), "pin_threads": config_default("workers.pin_threads")}


def topology():
    from packratd.topology import read_topology
    return read_topology()


def plan_cpus(plan: str, topo=None) -> list[list[int]]:
    """The CPUs packratd would give each instance of ``plan`` (same placement code as the daemon)."""
    from packratd.placement import parse_plan, place
    topo = topo or topology()
    return [list(p.cpus) for p in place(parse_plan(plan), topo, use_smt=config_default("workers.use_smt"))]


def fat_cpus(topo=None) -> list[int]:
    """CPUs of one instance that uses every usable core, as the daemon places it."""
    topo = topo or topology()
    return plan_cpus(f"1x{topo.n_cores}:1", topo)[0]


def base_env(gomp_spincount: str | None = DEFAULT_GOMP_SPINCOUNT, extra: dict | None = None) -> dict:
    """The environment a benchmark starts daemons and runners from (PYTHONPATH = the checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("GOMP_SPINCOUNT", None)
    if gomp_spincount is not None:
        env["GOMP_SPINCOUNT"] = str(gomp_spincount)
    env.update(extra or {})
    return env


def worker_like_env(threads: int, cpus: Sequence[int], allocator: str | None = None, pin_threads: bool | None = None,
                    base: dict | None = None) -> dict:
    """Exactly what packratd.daemon.spawn gives a worker with these threads and CPUs."""
    from packratd.worker import worker_env
    d = daemon_defaults()
    allocator = d["allocator"] if allocator is None else allocator
    pin_threads = d["pin_threads"] if pin_threads is None else pin_threads
    return worker_env(base if base is not None else base_env(), threads, list(cpus), allocator, pin_threads)


def relevant_env(env: dict) -> dict:
    keys = ("OMP_", "KMP_", "MKL_", "OPENBLAS_", "MALLOC_", "LD_PRELOAD", "GOMP_")
    return {k: v for k, v in sorted(env.items()) if k.startswith(keys)}


# ---------------------------------------------------------------------------------------------
# models and inputs
# ---------------------------------------------------------------------------------------------

def ensure_model(name: str, models_dir: str | None = None, log=print) -> str:
    """Path of models/<name>.pt2, exported with tools/export_model.py (in a subprocess) if missing."""
    d = models_dir or os.path.join(ROOT, "models")
    path = os.path.join(d, f"{name}.pt2")
    if not os.path.isfile(path):
        os.makedirs(d, exist_ok=True)
        log(f"exporting {name} to {path} ...")
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_model.py"), name, path],
                       check=True, env=base_env(None))
    return path


def make_inputs(spec: list[dict], batch: int, seed: int = 0) -> list[np.ndarray]:
    """Bench inputs from a packratd input spec: the same inputs packratd warms up and profiles with."""
    from packratd.model import example_inputs
    return example_inputs(spec, batch, seed)


def checksum(arrays) -> float:
    return float(sum(np.asarray(a, dtype=np.float64).sum() for a in arrays))


# ---------------------------------------------------------------------------------------------
# the in-process runner (a subprocess with a worker's environment)
# ---------------------------------------------------------------------------------------------

class InProcRunner:
    """One model instance in a subprocess started with ``env`` and pinned to ``cpus``.

    ``run(n)`` runs the prepared batch n times and returns the per-call milliseconds the
    subprocess measured around ``packratd.model.run`` (torch.from_numpy, the module under
    inference_mode, outputs to numpy)."""

    def __init__(self, model: str, threads: int, cpus: Sequence[int], env: dict, name: str = "runner",
                 log_path: str | None = None):
        self.model = model
        self.threads = threads
        self.cpus = list(cpus)
        self.env = env
        self.name = name
        cmd = [sys.executable, os.path.abspath(__file__), "runner", "--model", os.path.abspath(model),
               "--threads", str(threads), "--cpus", ",".join(map(str, self.cpus))]
        self._log = open(log_path, "w") if log_path else None
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log if self._log else None, cwd=ROOT, text=True, bufsize=1)
        _LIVE.append(self.proc)
        self.hello: dict | None = None

    def _rpc(self, obj: dict, timeout: float = 600.0) -> dict:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def _read(self, timeout: float) -> dict:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"{self.name}: no answer within {timeout:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: runner exited with {self.proc.wait()}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.name}: {msg['error']}")
        return msg

    def wait_ready(self, timeout: float = 300.0) -> dict:
        if self.hello is None:
            self.hello = self._read(timeout)
        return self.hello

    def prepare(self, batch: int, seed: int = 0) -> None:
        self._rpc({"op": "prepare", "batch": batch, "seed": seed})

    def run(self, n: int = 1) -> dict:
        """{"ms": [...], "minflt": [...], "checksum": float} for n calls on the prepared batch."""
        return self._rpc({"op": "run", "n": n})

    def call_ms(self) -> float:
        return self.run(1)["ms"][0]

    def idle_cpu(self, seconds: float = 1.0) -> float:
        """Fraction of a core this process burns while it waits for work (OpenMP spinning)."""
        import psutil
        p = psutil.Process(self.proc.pid)
        t0 = sum(p.cpu_times()[:2])
        time.sleep(seconds)
        return (sum(p.cpu_times()[:2]) - t0) / seconds

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
        if self.proc in _LIVE:
            _LIVE.remove(self.proc)
        if self._log:
            self._log.close()


def runner_main(argv=None) -> int:
    """The subprocess side of InProcRunner: set up exactly like packratd.worker.main, then serve."""
    import argparse
    p = argparse.ArgumentParser(prog="benchlib runner")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--cpus", required=True)
    p.add_argument("--pin-threads", type=int, default=1)
    a = p.parse_args(argv)
    # Our replies go to a private copy of stdout; anything else printing to fd 1 lands on stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    cpus = [int(c) for c in a.cpus.split(",")]
    # Same order as packratd.worker.main: pin, thread env, then import torch.
    os.sched_setaffinity(0, cpus)
    from packratd.worker import thread_env
    os.environ.update(thread_env(a.threads, cpus, bool(a.pin_threads)))
    if os.environ.get("BENCH_OLD_OMP_ENV") == "1":
        # the environment workers had before GOMP_SPINCOUNT was set (bench_serving's spin check)
        os.environ.pop("GOMP_SPINCOUNT", None)
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    import resource
    import torch
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    from packratd import model as model_mod
    t0 = time.monotonic()
    module, spec = model_mod.load(a.model)
    for i in range(2):    # the worker's boot warm-up (batch 1)
        model_mod.run(module, model_mod.example_inputs(spec, 1, seed=i))
    reply({"ready": True, "pid": os.getpid(), "spec": spec, "boot_s": time.monotonic() - t0,
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "interop_threads": torch.get_num_interop_threads(), "cpus": sorted(os.sched_getaffinity(0)),
           "env": relevant_env(dict(os.environ)), "parallel_info": torch.__config__.parallel_info()})
    arrays = None
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "quit":
                break
            if op == "prepare":
                arrays = make_inputs(spec, int(cmd["batch"]), int(cmd.get("seed", 0)))
                reply({"ok": True})
            elif op == "run":
                ms, flt, cs = [], [], 0.0
                for _ in range(int(cmd.get("n", 1))):
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t1 = time.perf_counter()
                    outs = model_mod.run(module, arrays)
                    ms.append((time.perf_counter() - t1) * 1000)
                    flt.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                    cs = checksum(outs)
                reply({"ms": ms, "minflt": flt, "checksum": cs})
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception as e:  # noqa: BLE001
            reply({"error": f"{type(e).__name__}: {e}"})
    return 0


# ---------------------------------------------------------------------------------------------
# a real packratd daemon
# ---------------------------------------------------------------------------------------------

def health(endpoint: str, timeout: float = 5.0) -> dict | None:
    """The daemon's health op, or None: no socket yet, or no answer in time."""
    from packratd.client import probe_health
    return probe_health(endpoint, timeout)


class BenchDaemon:
    """A packratd process with a short runtime dir under /tmp (ipc paths are limited to ~100 chars)."""

    def __init__(self, model: str, plan: str | None = None, sets: dict | None = None, env: dict | None = None,
                 name: str = "daemon", keep_dir: bool = False, state_dir: str | None = None):
        """``state_dir``: share one (profile and runtime-artifact caches) between daemons of one benchmark."""
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="prb-", dir="/tmp")
        self.keep_dir = keep_dir
        self.runtime_dir = os.path.join(self.dir, "run")
        self.state_dir = state_dir or os.path.join(self.dir, "state")
        self.endpoint = f"ipc://{self.runtime_dir}/packratd.sock"
        self.log_path = os.path.join(self.dir, "daemon.log")
        self.plan = plan
        cmd = [sys.executable, "-m", "packratd.daemon", "--model", os.path.abspath(model),
               "--runtime-dir", self.runtime_dir, "--state-dir", self.state_dir]
        if plan:
            cmd += ["--plan", plan]
        for k, v in (sets or {}).items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            cmd += ["--set", f"{k}={v}"]
        self.cmd = cmd
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env if env is not None else base_env(), cwd=ROOT)
        _LIVE.append(self.proc)
        self._client = None

    def logs(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def wait_serving(self, timeout: float = 300.0) -> "BenchDaemon":
        """Until the daemon's health op says ready (the client socket answers ping from start-up on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: daemon exited with {self.proc.returncode}:\n{self.logs()}")
            h = health(self.endpoint, 2.0)
            if h is not None and h.get("ready"):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: not serving after {timeout:.0f}s:\n{self.logs()}")

    @property
    def client(self):
        if self._client is None:
            from packratd.client import Client
            self._client = Client(self.endpoint, timeout=600)
        return self._client

    def control(self, cmd: str = "status", **args) -> dict:
        from packratd.control import ControlClient, control_endpoint
        return ControlClient(control_endpoint(self.runtime_dir), timeout=30).call(cmd, **args)

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.control()["workers"]]

    def stop(self, timeout: float = 60.0) -> int:
        import psutil
        if self._client is not None:
            self._client.close()
            self._client = None
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        _, alive = psutil.wait_procs(kids, timeout=15)
        for p in alive:
            p.kill()
        if self.proc in _LIVE:
            _LIVE.remove(self.proc)
        self._log.close()
        if alive:
            print(f"warning: {self.name} left workers behind after stop: {[p.pid for p in alive]}", file=sys.stderr)
        if not self.keep_dir:
            import shutil
            shutil.rmtree(self.dir, ignore_errors=True)
        return rc


def timed_infer(daemon: BenchDaemon, inputs: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """Client round trip in ms (client library call, end to end) and the outputs."""
    c = daemon.client
    t0 = time.perf_counter()
    outs = c.infer(*inputs)
    return (time.perf_counter() - t0) * 1000, outs


def ping_ms(daemon: BenchDaemon, n: int = 50) -> list[float]:
    c = daemon.client
    c.ping()
    return [c.ping() * 1000 for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# a ZeroMQ ipc echo peer: what moving N bytes one hop costs
# ---------------------------------------------------------------------------------------------

class IpcEcho:
    """A subprocess with a ROUTER on an ipc socket that answers every message with a tiny ack
    (or, with reply_bytes, a payload of that size).  Mirrors the client -> daemon hop."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="prb-echo-", dir="/tmp")
        self.endpoint = f"ipc://{self.dir}/echo.sock"
        code = ("import sys, zmq\n"
                "ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])\n"
                "print('up', flush=True)\n"
                "while True:\n"
                "    f = s.recv_multipart(copy=False)\n"
                "    n = int(f[1].bytes)\n"
                "    s.send_multipart([f[0].bytes, b'ok'] + ([bytearray(n)] if n else []), copy=False)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, self.endpoint], stdout=subprocess.PIPE, text=True)
        _LIVE.append(self.proc)
        self.proc.stdout.readline()
        import zmq
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)

    def rtt_ms(self, send_bytes: int, reply_bytes: int = 0, n: int = 20) -> list[float]:
        payload = np.ones(max(send_bytes, 0), dtype=np.uint8)
        frames = [str(reply_bytes).encode()] + ([memoryview(payload)] if send_bytes else [])
        self.sock.send_multipart(frames, copy=False)
        self.sock.recv_multipart()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.sock.send_multipart(frames, copy=False)
            self.sock.recv_multipart(copy=False)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    def stop(self):
        self.sock.close(linger=0)
        self.proc.kill()
        self.proc.wait()
        if self.proc in _LIVE:
            _LIVE.remove(self.proc)
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# timing loops and statistics
# ---------------------------------------------------------------------------------------------

def summarize(ms: Sequence[float]) -> dict:
    a = np.asarray(ms, dtype=float)
    if a.size == 0:
        return {"median_ms": None, "p10_ms": None, "p90_ms": None, "n": 0}
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90)), "n": int(a.size),
            "min_ms": float(a.min()), "max_ms": float(a.max())}


def interleave(variants: dict[str, Callable[[], float]], budget_s: float = 60.0, min_reps: int = 5,
               max_reps: int = 30, reps: int | None = None, warmup: int = 2,
               on_round: Callable[[int, dict], None] | None = None) -> dict:
    """Run single calls of each variant round-robin, one at a time, rotating the order every round
    (a b c, b c a, c a b, ...) so no variant always follows the same neighbour.

    Each callable runs one call and returns its latency in ms.  First ``warmup`` calls of each
    variant (interleaved too) are kept apart as ``warmup_ms``.  Then rounds run until ``reps``
    (when given) or until ``max_reps``, or ``min_reps`` once ``budget_s`` has passed.
    Returns {name: {"ms": [...], "warmup_ms": [...]}} plus "rounds" -> list of per-round dicts."""
    names = list(variants)
    res = {n: {"ms": [], "warmup_ms": []} for n in names}
    for i in range(warmup):
        for n in names[i % len(names):] + names[:i % len(names)]:
            res[n]["warmup_ms"].append(variants[n]())
    rounds = []
    t0 = time.monotonic()
    k = 0
    while True:
        if reps is not None:
            if k >= reps:
                break
        elif k >= max_reps or (k >= min_reps and time.monotonic() - t0 >= budget_s):
            break
        order = names[k % len(names):] + names[:k % len(names)]
        r = {}
        for n in order:
            r[n] = variants[n]()
            res[n]["ms"].append(r[n])
        rounds.append(r)
        if on_round:
            on_round(k, r)
        k += 1
    res["rounds"] = rounds
    res["elapsed_s"] = time.monotonic() - t0
    return res


def cpu_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return float(sum(v) - idle), float(sum(v))


def cpu_busy_since(t0: tuple[float, float]) -> float:
    """Average number of busy CPUs on the whole machine since ``t0 = cpu_busy()``: with one variant
    running at a time, anything well above the variant's own threads is someone else's load."""
    b1, t1 = cpu_busy()
    n = os.cpu_count() or 1
    return (b1 - t0[0]) / max(1.0, t1 - t0[1]) * n


def paired_ratios(rounds: list[dict], num: str, den: str) -> list[float]:
    return [r[num] / r[den] for r in rounds if num in r and den in r and r[den] > 0]


# ---------------------------------------------------------------------------------------------
# environment and report helpers
# ---------------------------------------------------------------------------------------------

def env_info(runner_hello: dict | None = None) -> dict:
    from packratd.topology import read_cpu_model
    info = {"cpu_model": read_cpu_model(), "usable_cpus": sorted(os.sched_getaffinity(0)),
            "python": platform.python_version(), "kernel": platform.release(),
            "loadavg_at_start": list(os.getloadavg())}
    try:
        topo = topology()
        info["topology"] = topo.describe().replace("\n", "; ")
        info["cores"] = topo.n_cores
    except Exception as e:  # noqa: BLE001
        info["topology"] = f"unreadable: {e}"
    if runner_hello:
        info["torch"] = runner_hello.get("torch")
        pi = runner_hello.get("parallel_info", "")
        m = re.search(r"MKL-DNN v([\d.]+)", pi)
        info["onednn"] = m.group(1) if m else None
        info["openmp"] = "GNU libgomp (torch wheel)" if "OpenMP" in pi else None
    return info


def replace_md_section(path: str, heading: str, body: str, title: str = "# packratd benchmarks") -> None:
    """Put ``heading`` + ``body`` into the markdown file, replacing that section if present
    (up to the next heading of the same level)."""
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if not text.strip():
        text = title + "\n"
    level = heading.split(" ", 1)[0]
    section = heading + "\n\n" + body.strip() + "\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == heading), None)
    if start is None:
        if not text.endswith("\n"):
            text += "\n"
        text += "\n" + section
    else:
        end = len(lines)
        for j in range(start + 1, len(lines)):
            l = lines[j]
            if l.startswith("#") and l.split(" ", 1)[0] in {level[:k] for k in range(1, len(level) + 1)}:
                end = j
                break
        text = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    with open(path, "w") as f:
        f.write(text)


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def median(xs):
    return statistics.median(xs) if xs else None


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "runner":
        sys.exit(runner_main(sys.argv[2:]))
    print(__doc__)

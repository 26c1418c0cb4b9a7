"""A packratd worker: one model instance, pinned to its cores, serving slices of batches.

Started by the daemon as ``python -m packratd.worker ...``.  Before torch is imported it pins
itself to its CPUs and sets the thread environment; then it sets torch's thread counts, loads
the model, warms it up, and only then reports READY.

Two threads: an I/O thread owns the DEALER socket (heartbeats both ways, even while the model
runs, and exits the process when the dispatcher goes silent); the main thread runs the model.
They talk over an inproc PAIR, passing frames without copying.

Worker <-> dispatcher messages (multipart; the DEALER identity addresses the worker):
  worker -> READY {pid, spec, outputs, boot_s, threads, cpus}   | HB | RESULT {task, tensors, ms} bufs... |
            ERROR {task, message} | BOOTFAIL {message}
  dispatcher -> WORK {task, inputs: [{dtype, tail, rows: [...]}]} segments... | HB
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import json
import os
import signal
import sys
import threading
import time

EXIT_BOOT_FAILED = 3      # the model could not be loaded or warmed up: do not respawn in a loop
EXIT_ORPHANED = 4         # the dispatcher stopped answering heartbeats
ORPHAN_MIN_S = 30.0
GOMP_SPINCOUNT = "300000"

_ALLOCATOR_LIBS = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
}
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_allocator(name: str) -> str:
    for lib in _ALLOCATOR_LIBS[name]:
        for d in _LIB_DIRS:
            hits = glob.glob(os.path.join(d, lib))
            if hits:
                return hits[0]
    pkg = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}[name]
    raise FileNotFoundError(f"allocator {name} not found (looked for {', '.join(_ALLOCATOR_LIBS[name])}); "
                            f"install Debian's {pkg} or set workers.allocator = \"glibc-tuned\"")


def allocator_env(allocator: str) -> dict[str, str]:
    """Environment that selects the workers' memory allocator (must be set before the process starts)."""
    if allocator == "glibc":
        return {}
    if allocator == "glibc-tuned":
        # Keep large tensors on the heap instead of mmap/munmap per iteration (page-fault churn),
        # and never give the heap back between batches.
        return {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_TOP_PAD_": str(1 << 26)}
    return {"LD_PRELOAD": find_allocator(allocator)}


def thread_env(threads: int, cpus: list[int], pin_threads: bool) -> dict[str, str]:
    """OpenMP/MKL settings for an instance with `threads` threads on `cpus`."""
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "KMP_BLOCKTIME": "1",          # Intel OpenMP, if a model brings it
        # torch's wheel uses GNU libgomp: OMP_WAIT_POLICY=ACTIVE would spin idle threads ~3e10 times
        # (a whole core burnt for minutes after every batch, stealing from co-located generations).
        # A short spin bridges the gaps between parallel regions inside one forward pass.
        "GOMP_SPINCOUNT": GOMP_SPINCOUNT,
    }
    if pin_threads:
        env["OMP_PROC_BIND"] = "close"
        env["OMP_PLACES"] = ",".join("{%d}" % c for c in cpus[:threads])
    else:
        env.pop("OMP_PROC_BIND", None)
    return env


def worker_env(base: dict, threads: int, cpus: list[int], allocator: str, pin_threads: bool) -> dict[str, str]:
    env = dict(base)
    # Workers never talk to systemd: the main process alone sends READY/WATCHDOG.
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_PLACES", "LD_PRELOAD", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        env.pop(k, None)
    env.update(allocator_env(allocator))
    env.update(thread_env(threads, cpus, pin_threads))
    return env


def spawn(cfg, endpoint: str, identity: str, threads: int, cpus, warmup_batch: int, model_path: str | None = None):
    """Start one worker process exactly as serving needs it (used by the daemon and the profiler)."""
    import subprocess
    cpus = list(cpus)
    cmd = [sys.executable, "-m", "packratd.worker",
           "--endpoint", endpoint, "--identity", identity,
           "--model", os.path.abspath(model_path or cfg["model.path"]), "--threads", str(threads),
           "--cpus", ",".join(map(str, cpus)), "--pin-threads", str(int(cfg["workers.pin_threads"])),
           "--warmup", str(cfg["workers.warmup_batches"]), "--warmup-batch", str(warmup_batch),
           "--hb-interval", str(cfg["workers.heartbeat_interval_s"]),
           "--hb-liveness", str(cfg["workers.heartbeat_liveness"])]
    env = worker_env(os.environ, threads, cpus, cfg["workers.allocator"], cfg["workers.pin_threads"])
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, close_fds=True)


def set_parent_death_signal(sig=signal.SIGKILL) -> None:
    """Die with the daemon even if it is SIGKILLed (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)
    except OSError:
        pass


class IOThread(threading.Thread):
    """Owns the DEALER socket: forwards work in, results out, heartbeats both ways."""

    def __init__(self, ctx, endpoint: str, identity: bytes, hb_interval: float, hb_liveness: int):
        super().__init__(name="packratd-worker-io", daemon=True)
        import zmq
        self.zmq = zmq
        self.ctx = ctx
        self.endpoint = endpoint
        self.identity = identity
        self.hb_interval = hb_interval
        self.hb_liveness = hb_liveness
        self.pair_ready = threading.Event()

    def run(self):
        zmq = self.zmq
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, self.identity)
        dealer.setsockopt(zmq.LINGER, 2000)
        dealer.connect(self.endpoint)
        pair = self.ctx.socket(zmq.PAIR)
        pair.bind("inproc://compute")
        self.pair_ready.set()
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(pair, zmq.POLLIN)
        last_seen = time.monotonic()
        next_hb = 0.0
        while True:
            now = time.monotonic()
            if now >= next_hb:
                dealer.send(b"HB")
                next_hb = now + self.hb_interval
            events = dict(poller.poll(max(1, int((next_hb - now) * 1000))))
            if dealer in events:
                while True:
                    try:
                        frames = dealer.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    last_seen = time.monotonic()
                    kind = frames[0].bytes
                    if kind == b"WORK":
                        pair.send_multipart(frames, copy=False)
                    elif kind == b"STOP":
                        os._exit(0)
            if pair in events:
                while True:
                    try:
                        frames = pair.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    dealer.send_multipart(frames, copy=False)
                    if frames[0].bytes == b"BOOTFAIL":
                        time.sleep(0.2)     # let the message leave before the process exits
                        os._exit(EXIT_BOOT_FAILED)
            # The daemon's death is caught by PR_SET_PDEATHSIG; this catches a daemon that is alive but
            # wedged, so it is lenient: a loaded host must not make healthy workers quit.
            limit = max(ORPHAN_MIN_S, 4 * self.hb_interval * self.hb_liveness)
            if time.monotonic() - last_seen > limit:
                sys.stderr.write(f"packratd-worker {self.identity.decode()}: dispatcher silent for "
                                 f"{limit:.1f}s, exiting\n")
                os._exit(EXIT_ORPHANED)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="packratd-worker")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--cpus", required=True, help="comma-separated CPU list")
    p.add_argument("--pin-threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--warmup-batch", type=int, default=1)
    p.add_argument("--hb-interval", type=float, default=1.0)
    p.add_argument("--hb-liveness", type=int, default=5)
    args = p.parse_args(argv)

    set_parent_death_signal()
    cpus = [int(c) for c in args.cpus.split(",")]
    # Fault injection for the reliability tests only: a worker on these CPUs dies while booting.
    crash_on = os.environ.get("PACKRATD_TEST_CRASH_AT_BOOT_ON_CPUS")
    if crash_on and set(cpus) & {int(c) for c in crash_on.split(",")}:
        sys.stderr.write(f"packratd-worker {args.identity}: injected boot crash (PACKRATD_TEST_CRASH_AT_BOOT_ON_CPUS)\n")
        os._exit(86)
    # Pin and set the thread environment BEFORE torch (and its OpenMP runtime) is loaded.
    os.sched_setaffinity(0, cpus)
    os.environ.update(thread_env(args.threads, cpus, bool(args.pin_threads)))

    import zmq
    ctx = zmq.Context()
    io = IOThread(ctx, args.endpoint, args.identity.encode(), args.hb_interval, args.hb_liveness)
    io.start()
    io.pair_ready.wait()
    pair = ctx.socket(zmq.PAIR)
    pair.connect("inproc://compute")

    t0 = time.monotonic()
    try:
        import numpy as np
        import torch
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
        from . import model as model_mod
        module, spec = model_mod.load(args.model)
        outputs = []
        for b in sorted({1, max(1, args.warmup_batch)}):
            for i in range(max(1, args.warmup)):
                outputs = model_mod.run(module, model_mod.example_inputs(spec, b, seed=i))
        out_spec = model_mod.output_spec(outputs)
    except BaseException as e:  # noqa: BLE001 - any boot failure is reported, then we exit with our own code
        msg = f"{type(e).__name__}: {e}"
        sys.stderr.write(f"packratd-worker {args.identity}: boot failed: {msg}\n")
        pair.send_multipart([b"BOOTFAIL", json.dumps({"message": msg[:2000]}).encode()])
        time.sleep(5)
        return EXIT_BOOT_FAILED
    ready = {"pid": os.getpid(), "spec": spec, "outputs": out_spec, "boot_s": time.monotonic() - t0,
             "threads": torch.get_num_threads(), "cpus": cpus}
    pair.send_multipart([b"READY", json.dumps(ready).encode()])

    dtypes = {}
    while True:
        frames = pair.recv_multipart(copy=False)
        head = json.loads(frames[1].bytes)
        task = head["task"]
        try:
            t1 = time.perf_counter()
            arrays = []
            k = 2
            for inp in head["inputs"]:
                dt = dtypes.get(inp["dtype"]) or dtypes.setdefault(inp["dtype"], np.dtype(inp["dtype"]))
                tail = tuple(inp["tail"])
                parts = []
                for rows in inp["rows"]:
                    parts.append(np.frombuffer(frames[k].buffer, dtype=dt).reshape((rows, *tail)))
                    k += 1
                arrays.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
            outs = model_mod.run(module, arrays)
            ms = (time.perf_counter() - t1) * 1000
            reply = {"task": task, "ms": ms,
                     "tensors": [{"dtype": o.dtype.name, "shape": list(o.shape)} for o in outs]}
            pair.send_multipart([b"RESULT", json.dumps(reply).encode()] + [memoryview(o).cast("B") if o.size else b"" for o in outs],
                                copy=False)
        except Exception as e:  # noqa: BLE001 - the model raised on this data: report, keep serving
            pair.send_multipart([b"ERROR", json.dumps({"task": task, "message": f"{type(e).__name__}: {str(e)[:1000]}"}).encode()])


if __name__ == "__main__":
    sys.exit(main())

"""A packratd worker: one model instance, pinned to its cores, serving slices of batches.

Started by the daemon as ``python -m packratd.worker ...``.  Before torch is imported it pins
itself to its CPUs and sets the thread environment; then it sets torch's thread counts, loads
the model, warms it up, and only then reports READY.

The main thread owns the work socket (a DEALER whose identity is the worker's name): it receives a
slice, runs the model and sends the result itself, with no hand-off between threads on the
serving path.  A heartbeat thread owns a second DEALER (identity ``<name>!hb``) and heartbeats both
ways even while the model runs; it exits the process when the dispatcher goes silent.  The
messages are packratd.messages'.

Before it says READY the worker checks that the model file is the generation's (its SHA-256),
loads it, warms it up at the batch sizes this instance will see, and checks the outputs: every one
must be batched on dim 0 and have a dtype the wire carries.  Otherwise it sends BOOTFAIL with the
reason and exits with EXIT_BOOT_FAILED.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import threading
import time
from dataclasses import dataclass

from .procutil import set_parent_death_signal

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


def zygote_env(base: dict, allocator: str) -> dict[str, str]:
    """The fork server's environment: the workers' allocator and OpenMP spin settings (read once, when the
    libraries load, so they must be right before the fork), one thread everywhere (no pool may exist when
    it forks: each child sets its own thread count), and the package on the path."""
    env = worker_env(base, 1, [], allocator, False)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def worker_env(base: dict, threads: int, cpus: list[int], allocator: str, pin_threads: bool) -> dict[str, str]:
    env = dict(base)
    # Workers never talk to systemd: the main process alone sends READY/WATCHDOG.
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_PLACES", "LD_PRELOAD", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        env.pop(k, None)
    env.update(allocator_env(allocator))
    env.update(thread_env(threads, cpus, pin_threads))
    return env


class LaunchError(Exception):
    """A worker process could not be started (missing allocator, EMFILE/ENOMEM from fork/exec, ...)."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything one worker process needs to know, and nothing it could get wrong by itself."""
    endpoint: str
    identity: str
    model_path: str                 # the generation's copy of the model (store.snapshot_model)
    threads: int
    cpus: tuple[int, ...]
    warmup_sizes: tuple[int, ...] = (1,)
    model_digest: str = ""          # the generation's model digest; the worker refuses any other file
    runtime: str = "eager"
    artifact: str = ""              # the runtime's prepared artifact (compiled / converted model), if any


def command(cfg, spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start this worker exactly as serving (and profiling) need it."""
    cpus = list(spec.cpus)
    cmd = [sys.executable, "-m", "packratd.worker",
           "--endpoint", spec.endpoint, "--identity", spec.identity,
           "--model", os.path.abspath(spec.model_path), "--model-digest", spec.model_digest,
           "--runtime", spec.runtime, "--artifact", spec.artifact,
           "--threads", str(spec.threads), "--cpus", ",".join(map(str, cpus)),
           "--pin-threads", str(int(cfg["workers.pin_threads"])),
           "--warmup", str(cfg["workers.warmup_batches"]),
           "--warmup-sizes", ",".join(str(b) for b in sorted(set(spec.warmup_sizes) | {1})),
           "--warmup-nice", str(cfg["workers.warmup_nice"]),
           "--hb-interval", str(cfg["workers.heartbeat_interval_s"]),
           "--hb-liveness", str(cfg["workers.heartbeat_liveness"])]
    try:
        env = worker_env(os.environ, spec.threads, cpus, cfg["workers.allocator"], cfg["workers.pin_threads"])
    except FileNotFoundError as e:
        raise LaunchError(str(e)) from None
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return cmd, env


def spawn(cfg, spec: LaunchSpec):
    """Start one worker process (subprocess.Popen).  Raises LaunchError when it cannot be started."""
    import subprocess
    cmd, env = command(cfg, spec)
    try:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, close_fds=True)
    except OSError as e:
        raise LaunchError(f"cannot start a worker process: {e}") from None


# ---- inside the worker process ---------------------------------------------------------------------
class Heartbeat(threading.Thread):
    """Heartbeats both ways on a socket of its own (identity ``<worker>!hb``), so they keep flowing
    while the model runs and the work socket stays on the main thread (no hand-off between threads
    on the serving path).  Exits the process when the dispatcher has been silent too long."""

    def __init__(self, ctx, endpoint: str, identity: bytes, interval: float, liveness: int):
        super().__init__(name="packratd-worker-hb", daemon=True)
        self.ctx, self.endpoint, self.identity = ctx, endpoint, identity
        self.interval, self.liveness = interval, liveness

    def run(self):
        import zmq
        from . import messages as M
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, self.identity + HB_SUFFIX)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        last_seen = time.monotonic()
        # The daemon's death is caught by PR_SET_PDEATHSIG; this catches a daemon that is alive but
        # wedged, so it is lenient: a loaded host must not make healthy workers quit.
        limit = max(ORPHAN_MIN_S, 4 * self.interval * self.liveness)
        hb = M.hb()
        while True:
            try:
                s.send_multipart(hb, zmq.NOBLOCK)
            except zmq.Again:
                pass
            deadline = time.monotonic() + self.interval
            while (left := deadline - time.monotonic()) > 0:
                if s.poll(max(1, int(left * 1000))):
                    while s.poll(0):
                        s.recv_multipart()
                        last_seen = time.monotonic()
            if time.monotonic() - last_seen > limit:
                sys.stderr.write(f"packratd-worker {self.identity.decode()}: dispatcher silent for {limit:.1f}s, exiting\n")
                os._exit(EXIT_ORPHANED)


HB_SUFFIX = b"!hb"


class BootError(Exception):
    """The worker cannot serve this model here; the message says why (sent as BOOTFAIL)."""


def check_outputs(outputs: list, rows: int) -> list[dict]:
    """Outputs must cross the wire and be batched on dim 0; returns the output spec."""
    from . import protocol as P
    spec = []
    for i, o in enumerate(outputs):
        if o.dtype.name not in P.DTYPES:
            raise BootError(f"model output {i} has dtype {o.dtype}, which cannot be sent to clients "
                            f"(allowed: {', '.join(P.DTYPES)}); cast it in the model before exporting")
        if o.ndim == 0:
            raise BootError(f"model output {i} is a scalar; packratd needs every output batched on dim 0")
        if o.shape[0] != rows:
            raise BootError(f"model output {i} has {o.shape[0]} rows on dim 0 for a batch of {rows}; packratd needs "
                            "every output batched on dim 0 (one row per input row)")
        spec.append({"dtype": o.dtype.name, "shape": [None] + list(o.shape[1:])})
    return spec


def _can_restore_priority() -> bool:
    import resource
    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20


def _lower_priority(nice: int) -> bool:
    """Warm up at a lower CPU priority (the serving generation shares these cores), if it can be undone."""
    if nice <= 0 or not _can_restore_priority():
        return False
    os.setpriority(os.PRIO_PROCESS, 0, nice)        # this thread; the pools the warm-up creates inherit it
    return True


def _restore_priority() -> None:
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
        except OSError:
            pass


def boot(args, preloaded=None) -> tuple:
    """Load and warm up the model on the generation's runtime; returns (runner, READY info).

    ``preloaded``: the model a fork server loaded once (packratd.zygote.Preloaded); used when it is the
    same runtime, file and digest (the zygote checked the digest when it loaded the file)."""
    from . import model as model_mod, runtimes, store
    t0 = time.monotonic()
    cpus = [int(c) for c in args.cpus.split(",")]
    forked = preloaded is not None
    if forked and preloaded.session is not None and preloaded.matches(args.runtime, args.model, args.model_digest):
        sess = preloaded.take(args.threads)
    else:
        if args.model_digest:
            got = store.file_digest(args.model)
            if got != args.model_digest:
                raise BootError(f"model file {args.model} has digest {got[:16]}..., the generation serves "
                                f"{args.model_digest[:16]}...: refusing to serve another model")
        try:
            sess = runtimes.load(args.runtime, args.model, args.artifact or None, args.threads, cpus,
                                 pin=bool(args.pin_threads))
        except runtimes.RuntimeUnavailable as e:
            raise BootError(f"runtime {args.runtime}: {e.reason}") from None
    spec, runner = sess.input_spec, sess.run
    t_load = time.monotonic() - t0
    niced = _lower_priority(args.warmup_nice)
    out_spec = None
    # Warm up at the sizes this instance will see (its shares of the plan); a batch of 2 or more
    # also shows whether every output really is batched on dim 0.
    sizes = sorted({max(1, int(b)) for b in args.warmup_sizes.split(",")} | {2})
    for b in sizes:
        for i in range(max(1, args.warmup)):
            outs = runner(model_mod.example_inputs(spec, b, seed=i))
            this = check_outputs(outs, b)
            if out_spec is None:
                out_spec = this
            elif this != out_spec:
                raise BootError(f"model outputs change with the batch size: {out_spec} at one size, {this} at {b} rows")
    if niced:
        _restore_priority()
    info = {"pid": os.getpid(), "spec": spec, "outputs": out_spec, "boot_s": time.monotonic() - t0, "load_s": t_load,
            "threads": args.threads, "cpus": cpus, "runtime": sess.runtime, "digest": args.model_digest,
            "warmup_sizes": sizes, "forked": forked}
    return runner, info


def serve(sock, runner) -> None:
    """Answer WORK until the process is stopped: one slice at a time, on this (the main) thread."""
    import zmq
    from . import messages as M
    while True:
        frames = sock.recv_multipart(copy=False)
        t_recv = time.monotonic()
        try:
            msg = M.decode(frames)
        except M.MessageError:
            continue
        if msg.kind != M.WORK:
            continue
        task = msg.head["task"]
        try:
            arrays = M.work_inputs(msg)
            t1 = time.perf_counter()
            t_start = time.monotonic()
            outs = runner(arrays)
            t_end = time.monotonic()
            ms = (time.perf_counter() - t1) * 1000
            trace = {"recv": t_recv, "start": t_start, "end": t_end, "send": time.monotonic()} if "trace" in msg.head else None
            reply = M.result(task, ms, outs, trace)
        except Exception as e:  # noqa: BLE001 - the model raised on this data (or a bad message): report, keep serving
            reply = M.error(task, f"{type(e).__name__}: {str(e)[:1000]}")
        try:
            sock.send_multipart(reply, copy=False)
        except zmq.ZMQError as e:
            sys.stderr.write(f"packratd-worker: cannot send a result: {e}\n")


def main(argv=None, preloaded=None) -> int:
    p = argparse.ArgumentParser(prog="packratd-worker")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--model-digest", default="")
    p.add_argument("--runtime", default="eager")
    p.add_argument("--artifact", default="")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--cpus", required=True, help="comma-separated CPU list")
    p.add_argument("--pin-threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--warmup-sizes", default="1")
    p.add_argument("--warmup-nice", type=int, default=0)
    p.add_argument("--hb-interval", type=float, default=1.0)
    p.add_argument("--hb-liveness", type=int, default=5)
    args = p.parse_args(argv)

    set_parent_death_signal()
    cpus = [int(c) for c in args.cpus.split(",")]
    # Pin and set the thread environment BEFORE torch (and its OpenMP runtime) is loaded.
    os.sched_setaffinity(0, cpus)
    os.environ.update(thread_env(args.threads, cpus, bool(args.pin_threads)))

    import zmq
    from . import messages as M
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, args.identity.encode())
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(args.endpoint)
    Heartbeat(ctx, args.endpoint, args.identity.encode(), args.hb_interval, args.hb_liveness).start()
    try:
        runner, info = boot(args, preloaded)
    except BaseException as e:  # noqa: BLE001 - any boot failure is reported, then we exit with our own code
        msg = str(e) if isinstance(e, BootError) else f"{type(e).__name__}: {e}"
        sys.stderr.write(f"packratd-worker {args.identity}: boot failed: {msg}\n")
        sock.send_multipart(M.bootfail(msg))
        sock.close(linger=2000)      # let BOOTFAIL leave before the process exits
        return EXIT_BOOT_FAILED
    sock.send_multipart(M.ready(info))
    serve(sock, runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())

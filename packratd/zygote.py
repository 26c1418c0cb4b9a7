"""Fork server: workers that boot in a fraction of a second.

A zygote process per (model digest, runtime, artifact) imports what a worker needs and, for eager and
inductor, torch and the model itself, loaded once with one intra-op thread and no parallel region
ever run (importing onnxruntime or openvino starts a thread, so their workers import them after the
fork).  The daemon asks it for a worker; it forks, and the child pins itself, sets its thread
counts and runs the ordinary worker code (packratd.worker) on the model already in memory: no
interpreter start, no torch import, no model load -- only the warm-up at the sizes the instance
will see.  The weights are shared copy-on-write.

OpenMP and oneDNN thread pools do not survive a fork (libgomp hangs in a child whose parent had a
team), so the zygote checks before every fork that it is still one thread (``/proc/self/task``) and
refuses otherwise; numpy's OpenBLAS pool is kept at one thread by its environment.  The per-thread
OpenMP pinning of a spawned worker (OMP_PLACES, read once when libgomp loads) cannot be changed in
a forked child: its threads are pinned to the instance's cores as a set instead.

Protocol (SOCK_SEQPACKET socketpair, one JSON object per message):
  zygote -> daemon  {"ready": true, "threads": 1, "preload_s": s} | {"ready": false, "error": "..."}
  daemon -> zygote  {"spawn": id, "argv": [worker arguments]}
  zygote -> daemon  {"spawned": id, "pid": pid} | {"spawned": id, "error": "..."} | {"exit": pid, "code": c}
The zygote dies with the daemon (PR_SET_PDEATHSIG) and its workers die with it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from .procutil import set_parent_death_signal, signal_quietly

log = logging.getLogger("packratd.zygote")

MAX_MSG = 1 << 20
# What a zygote may hold before forking: the model itself (eager, inductor).  Importing onnxruntime or
# openvino already starts a thread (measured: one each), so for them the zygote holds only what every
# worker imports (numpy, ZeroMQ, packratd) and the child imports the runtime and loads the model itself.
PRELOAD = {"eager": "session", "inductor": "session", "openvino": "base", "onnxruntime": "base"}


def _threads_now() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


# ---- the zygote process ----------------------------------------------------------------------------
def _send(sock, obj) -> None:
    sock.send(json.dumps(obj).encode())


def _child(sock, argv: list[str], preloaded) -> None:
    """In the forked child: become the worker argv describes."""
    code = 1
    try:
        sock.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            import setproctitle
            setproctitle.setproctitle(" ".join([sys.executable, "-m", "packratd.worker"] + argv + ["(forked)"]))
        except ImportError:
            pass
        from . import worker
        code = worker.main(argv, preloaded=preloaded)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001
        import traceback
        traceback.print_exc()
    finally:
        os._exit(code if isinstance(code, int) else 1)


def serve(fd: int, model: str, digest: str, runtime: str, artifact: str) -> int:
    set_parent_death_signal()
    sock = socket.socket(fileno=fd)
    t0 = time.monotonic()
    preloaded = None
    try:
        if PRELOAD.get(runtime) == "session":
            from . import runtimes, store
            if digest and store.file_digest(model) != digest:
                raise RuntimeError(f"model file {model} does not have the generation's digest")
            preloaded = Preloaded(runtime, model, digest,
                                  runtimes.load(runtime, model, artifact or None, 1, None, pin=False))
        else:
            preloaded = Preloaded(runtime, model, digest, None)     # the child loads the model itself
            import numpy  # noqa: F401  (what every worker imports anyway)
            import zmq  # noqa: F401
            from . import messages, model, runtimes  # noqa: F401
        n = _threads_now()
        if n != 1:
            raise RuntimeError(f"the zygote has {n} threads after loading {runtime}; forking it is not safe")
    except Exception as e:  # noqa: BLE001 - reported; the daemon spawns workers the slow way
        _send(sock, {"ready": False, "error": f"{type(e).__name__}: {e}"[:1000]})
        return 3
    _send(sock, {"ready": True, "threads": 1, "preload_s": time.monotonic() - t0})
    children: set[int] = set()
    while True:
        try:
            ready = sock.recv(MAX_MSG) if _readable(sock, 0.1) else None
        except OSError:
            ready = b""
        if ready == b"":
            break                                   # the daemon closed the channel: stop
        if ready:
            try:
                req = json.loads(ready)
                rid, argv = req["spawn"], list(map(str, req["argv"]))
            except (ValueError, KeyError, TypeError):
                continue
            n = _threads_now()
            if n != 1:
                _send(sock, {"spawned": rid, "error": f"zygote has {n} threads: refusing to fork"})
                continue
            try:
                pid = os.fork()
            except OSError as e:
                _send(sock, {"spawned": rid, "error": f"fork failed: {e}"})
                continue
            if pid == 0:
                _child(sock, argv, preloaded)
            children.add(pid)
            _send(sock, {"spawned": rid, "pid": pid})
        for pid in list(children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                children.discard(pid)
                _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})
    for pid in children:
        signal_quietly_pid(pid, signal.SIGKILL)
    return 0


def signal_quietly_pid(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _readable(sock, timeout: float) -> bool:
    import select
    r, _, _ = select.select([sock], [], [], timeout)
    return bool(r)


class Preloaded:
    """The model loaded once in the zygote; a forked worker sets its own thread count and runs it."""

    def __init__(self, runtime: str, model_path: str, digest: str, session):
        self.runtime, self.model_path, self.digest, self.session = runtime, model_path, digest, session

    def matches(self, runtime: str, model_path: str, digest: str) -> bool:
        return (runtime, os.path.abspath(model_path), digest) == (self.runtime, os.path.abspath(self.model_path), self.digest)

    def take(self, threads: int):
        from .runtimes.eager import set_torch_threads
        set_torch_threads(threads)
        return self.session


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="packratd-zygote")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--digest", default="")
    p.add_argument("--runtime", default="eager")
    p.add_argument("--artifact", default="")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return serve(a.fd, a.model, a.digest, a.runtime, a.artifact)


# ---- the daemon's side -----------------------------------------------------------------------------
class ForkedProc:
    """A worker forked by a zygote, with the part of subprocess.Popen's interface the supervisor uses.
    Its exit status comes from the zygote (its parent)."""

    def __init__(self, server: "ForkServer", pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self):
        if self.returncode is None:
            self.server.pump()
        return self.returncode

    def send_signal(self, sig) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode


class ForkServer:
    """One zygote: start it (without waiting), fork workers from it once it is ready."""

    def __init__(self, cfg, model_path: str, digest: str, runtime: str, artifact: str):
        self.cfg, self.model_path, self.digest, self.runtime, self.artifact = cfg, model_path, digest, runtime, artifact
        self.proc = None
        self.sock = None
        self.state = "new"            # new | starting | ready | failed | stopped
        self.error: str | None = None
        self.preload_s: float | None = None
        self.children: dict[int, ForkedProc] = {}
        self.next_id = 1
        self.forks = 0

    @property
    def key(self) -> tuple:
        return (self.digest, self.runtime, self.artifact)

    def start(self) -> None:
        from . import worker as worker_mod
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-m", "packratd.zygote", "--fd", str(child.fileno()), "--model", self.model_path,
               "--digest", self.digest, "--runtime", self.runtime, "--artifact", self.artifact]
        try:
            env = worker_mod.zygote_env(os.environ, self.cfg["workers.allocator"])
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, pass_fds=[child.fileno()])
        except (OSError, FileNotFoundError) as e:
            self.state, self.error = "failed", f"cannot start the fork server: {e}"
            parent.close()
            return
        finally:
            child.close()
        parent.setblocking(False)
        self.sock, self.state = parent, "starting"

    def _recv(self) -> dict | None:
        try:
            raw = self.sock.recv(MAX_MSG)
        except BlockingIOError:
            return None
        except OSError:
            raw = b""
        if raw == b"":
            self._died("the fork server exited")
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {}

    def _died(self, why: str) -> None:
        if self.state not in ("failed", "stopped"):
            log.warning("%s (runtime %s); workers it forked are gone with it, new ones are spawned", why, self.runtime)
            self.state, self.error = "failed", why
        for p in self.children.values():
            if p.returncode is None:
                p.returncode = -signal.SIGKILL
        self.children.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def pump(self) -> None:
        """Read what the zygote said (readiness, exits); never blocks."""
        while self.sock is not None:
            msg = self._recv()
            if msg is None:
                return
            self._handle(msg)

    def _handle(self, msg: dict) -> None:
        if "ready" in msg:
            if msg["ready"]:
                self.state, self.preload_s = "ready", msg.get("preload_s")
                log.info("fork server for %s ready (loaded in %.1fs)", self.runtime, self.preload_s or 0)
            else:
                self.error = str(msg.get("error"))
                log.warning("fork server for %s cannot fork workers: %s; spawning them instead", self.runtime, self.error)
                self.stop()
                self.state = "failed"
        elif "exit" in msg:
            p = self.children.pop(msg["exit"], None)
            if p is not None:
                p.returncode = msg.get("code", 1)

    def fork(self, argv: list[str], timeout: float = 5.0) -> ForkedProc | None:
        """A forked worker, or None (not ready, or the fork failed: the caller spawns one instead)."""
        self.pump()
        if self.state != "ready":
            return None
        rid = self.next_id
        self.next_id += 1
        try:
            self.sock.send(json.dumps({"spawn": rid, "argv": argv}).encode())
        except OSError as e:
            self._died(f"the fork server is gone ({e})")
            return None
        deadline = time.monotonic() + timeout
        import select
        while time.monotonic() < deadline and self.sock is not None:
            select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            msg = self._recv()
            if msg is None:
                continue
            if msg.get("spawned") == rid:
                if "pid" not in msg:
                    log.warning("fork server: %s", msg.get("error"))
                    return None
                p = ForkedProc(self, int(msg["pid"]))
                self.children[p.pid] = p
                self.forks += 1
                return p
            self._handle(msg)
        return None

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None and self.proc.poll() is None:
            signal_quietly(self.proc, signal.SIGTERM)
        self.state = "stopped"

    def reap(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                signal_quietly(self.proc, signal.SIGKILL)
                self.proc.wait()

    def status(self) -> dict:
        return {"runtime": self.runtime, "digest": self.digest[:16], "state": self.state, "error": self.error,
                "pid": self.proc.pid if self.proc else None, "preload_s": self.preload_s, "forks": self.forks}


if __name__ == "__main__":
    sys.exit(main())

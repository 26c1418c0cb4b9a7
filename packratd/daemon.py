"""packratd: the daemon process.

One main loop does all the work: it polls the client and worker sockets, the control socket and
a self-pipe that the signal handlers write to (they only enqueue the signal), then dispatches
``handle_<signal>``, reaps and respawns workers, and forms batches.  Workers are child processes
grouped in numbered generations; each is pinned to its own physical cores.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import zmq

from . import __version__, config as config_mod, notify
from .control import ControlServer, control_endpoint
from .dispatcher import BOOTING, READY, STOPPING, Dispatcher, WorkerHandle, proportional_split
from .placement import InstanceSpec, PlacementError, format_plan, parse_plan, place
from .topology import TopologyError, read_topology
from .worker import EXIT_BOOT_FAILED, worker_env

log = logging.getLogger("packratd")

EXIT_OK = 0
EXIT_CONFIG = 2          # bad config / plan / topology: nothing to retry
EXIT_BOOT = 3            # the first generation could not start (bad model?)

SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGHUP: "hup", signal.SIGCHLD: "chld"}


class StartupError(Exception):
    def __init__(self, message: str, code: int = EXIT_CONFIG):
        super().__init__(message)
        self.code = code


class Daemon:
    def __init__(self, cfg: config_mod.Config, topology=None):
        self.cfg = cfg
        self.topology = topology
        self.signals: collections.deque[int] = collections.deque()
        self.ctx = zmq.Context()
        self.dispatcher: Dispatcher | None = None
        self.generation = 0
        self.plan: list[InstanceSpec] = []
        self.placements = []
        self.slots: dict[tuple[int, int], dict] = {}   # (generation, index) -> restart bookkeeping
        self.stopping = False
        self.stop_deadline = None
        self.force = False
        self.serving = False
        self.exit_code = EXIT_OK
        self.started = time.monotonic()
        self.control = None

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if not os.path.isfile(cfg["model.path"]):
            raise StartupError(f"model file {cfg['model.path']!r} does not exist")
        if self.topology is None:
            try:
                self.topology = read_topology()
            except TopologyError as e:
                raise StartupError(f"cannot read CPU topology: {e}") from None
        for w in self.topology.warnings:
            log.warning("topology: %s", w)
        log.info("topology: %s", self.topology.describe().replace("\n", "; "))
        rd = cfg["server.runtime_dir"]
        os.makedirs(rd, mode=0o770, exist_ok=True)
        os.makedirs(cfg["server.state_dir"], mode=0o750, exist_ok=True)
        for ep in [cfg.worker_endpoint, cfg.listen]:
            if ep.startswith("ipc://") and len(ep) - 6 > 100:
                raise StartupError(f"ipc socket path {ep[6:]!r} is longer than the 100 characters Unix sockets allow; "
                                   "use a shorter server.runtime_dir")
        self.plan = self.choose_plan()
        try:
            self.placements = place(self.plan, self.topology, use_smt=cfg["workers.use_smt"])
        except PlacementError as e:
            raise StartupError(f"plan {format_plan(self.plan)!r} cannot be placed: {e}") from None
        self.dispatcher = Dispatcher(self.ctx, cfg, [cfg.listen], cfg.worker_endpoint, splitter=proportional_split)
        self.control = ControlServer(self.ctx, control_endpoint(rd), self)

    def choose_plan(self) -> list[InstanceSpec]:
        text = self.cfg["workers.plan"]
        if text:
            return parse_plan(text)
        # Without profiling (a later stage), one instance per usable core is the safe default.
        n = self.topology.n_cores
        share = max(1, self.cfg["server.max_batch_size"] // n)
        return [InstanceSpec(1, share) for _ in range(n)]

    # ---- workers -------------------------------------------------------------------------
    def spawn(self, generation: int, index: int) -> WorkerHandle:
        pl = self.placements[index]
        key = (generation, index)
        slot = self.slots.setdefault(key, {"restarts": 0, "failures": 0, "next_try": 0.0})
        ident = f"g{generation}.i{index}.r{slot['restarts']}".encode()
        cfg = self.cfg
        cpus = list(pl.cpus)
        cmd = [sys.executable, "-m", "packratd.worker",
               "--endpoint", cfg.worker_endpoint, "--identity", ident.decode(),
               "--model", os.path.abspath(cfg["model.path"]), "--threads", str(pl.spec.threads),
               "--cpus", ",".join(map(str, cpus)), "--pin-threads", str(int(cfg["workers.pin_threads"])),
               "--warmup", str(cfg["workers.warmup_batches"]), "--warmup-batch", str(pl.spec.batch),
               "--hb-interval", str(cfg["workers.heartbeat_interval_s"]),
               "--hb-liveness", str(cfg["workers.heartbeat_liveness"])]
        env = worker_env(os.environ, pl.spec.threads, cpus, cfg["workers.allocator"], cfg["workers.pin_threads"])
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] +
                                            ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, close_fds=True)
        h = WorkerHandle(ident, generation, index, pl.spec.threads, tuple(cpus), pl.spec.batch, proc=proc)
        self.dispatcher.add_worker(h)
        log.info("worker %s started: pid %d, %d thread(s) on cpus %s", h.name, proc.pid, h.threads,
                 ",".join(map(str, cpus)))
        return h

    def start_generation(self) -> None:
        self.generation += 1
        for i in range(len(self.placements)):
            self.spawn(self.generation, i)

    def reap(self, now: float) -> None:
        for h in list(self.dispatcher.workers.values()) + list(self._exiting):
            rc = h.proc.poll()
            if rc is None:
                continue
            self._exiting.discard(h)
            if h.identity not in self.dispatcher.workers:
                continue   # retired on purpose
            was = h.state
            self.dispatcher.remove_worker(h, f"exit {rc}")
            if self.stopping:
                continue
            self.dispatcher.stats.worker_deaths += 1
            slot = self.slots[(h.generation, h.index)]
            if was == BOOTING:
                slot["failures"] += 1
                why = h.boot_error or f"exit status {rc}"
                if not self.serving:
                    raise StartupError(f"worker {h.name} failed to boot: {why}", EXIT_BOOT)
                log.error("worker %s failed to boot: %s", h.name, why)
            else:
                slot["failures"] = 0 if now - h.spawned_at > 60 else slot["failures"] + 1
                log.error("worker %s (pid %d) exited unexpectedly with status %s; replacing it on cpus %s",
                          h.name, h.proc.pid, rc, ",".join(map(str, h.cpus)))
            if slot["failures"] > self.cfg["workers.max_restarts"]:
                log.error("instance %d of generation %d failed %d times in a row; not restarting it",
                          h.index, h.generation, slot["failures"])
                continue
            slot["restarts"] += 1
            slot["next_try"] = now + min(30.0, 0.5 * (2 ** max(0, slot["failures"] - 1))) if slot["failures"] else now
            self._respawn.append((h.generation, h.index))

    def respawn_due(self, now: float) -> None:
        for gi in list(self._respawn):
            if self.slots[gi]["next_try"] <= now and gi[0] == self.generation and not self.stopping:
                self._respawn.remove(gi)
                self.spawn(*gi)

    def kill(self, h: WorkerHandle, sig=signal.SIGTERM) -> None:
        try:
            h.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def handle_events(self, now: float) -> None:
        d = self.dispatcher
        while d.events:
            kind, h, detail = d.events.pop(0)
            if kind == "ready":
                self.slots[(h.generation, h.index)]["failures"] = 0 if self.serving else 0
                log.info("worker %s ready in %.1fs (pid %d, %d threads, cpus %s)", h.name, detail.get("boot_s", 0),
                         detail.get("pid", 0), detail.get("threads", 0), detail.get("cpus"))
            elif kind == "bootfail":
                log.error("worker %s reports boot failure: %s", h.name, detail)
                self.kill(h, signal.SIGKILL)
            elif kind == "silent":
                log.error("worker %s is not answering (%s); killing it", h.name, detail)
                self.kill(h, signal.SIGKILL)
        for h in d.workers.values():
            if h.state == BOOTING and now - h.spawned_at > self.cfg["workers.boot_timeout_s"]:
                h.boot_error = f"not READY after {self.cfg['workers.boot_timeout_s']:.0f}s"
                log.error("worker %s %s; killing it", h.name, h.boot_error)
                self.kill(h, signal.SIGKILL)
                h.spawned_at = now   # do not kill it twice

    # ---- signals -------------------------------------------------------------------------
    def _on_signal(self, signum, frame):   # only enqueue; the main loop does the work
        self.signals.append(signum)

    def handle_term(self) -> None:
        if self.stopping:
            log.warning("second stop signal: exiting now")
            self.force = True
            return
        log.info("stopping: draining %d queued and %d in-flight batch(es)", len(self.dispatcher.queue),
                 len(self.dispatcher.batches))
        notify.notify("STOPPING=1")
        self.stopping = True
        self.dispatcher.draining = True
        self.stop_deadline = time.monotonic() + self.cfg["workers.stop_grace_s"] + 30.0

    handle_int = handle_term

    def handle_hup(self) -> None:
        log.info("SIGHUP: reload is not supported yet; ignoring")

    def handle_chld(self) -> None:
        pass   # reaping happens every loop iteration

    # ---- main loop -----------------------------------------------------------------------
    def run(self) -> int:
        self._exiting: set = set()
        self._respawn: list = []
        rfd, wfd = socket.socketpair()
        rfd.setblocking(False)
        wfd.setblocking(False)
        signal.set_wakeup_fd(wfd.fileno(), warn_on_full_buffer=False)
        for s in SIGNALS:
            signal.signal(s, self._on_signal)
        try:
            self.setup()
            self.start_generation()
            return self.loop(rfd)
        except StartupError as e:
            log.error("%s", e)
            return e.code
        finally:
            self.shutdown_workers()
            if self.dispatcher is not None:
                self.dispatcher.close()
            if self.control is not None:
                self.control.close()
            self.ctx.term()
            for ep in (self.cfg.listen, self.cfg.worker_endpoint):
                if ep.startswith("ipc://"):
                    try:
                        os.unlink(ep[6:])
                    except OSError:
                        pass
            signal.set_wakeup_fd(-1)

    def loop(self, rfd) -> int:
        d = self.dispatcher
        poller = zmq.Poller()
        poller.register(d.backend, zmq.POLLIN)
        poller.register(rfd.fileno(), zmq.POLLIN)
        poller.register(self.control.sock, zmq.POLLIN)
        timeout = 0.05
        while True:
            events = dict(poller.poll(max(0, int(timeout * 1000))))
            now = time.monotonic()
            if rfd.fileno() in events:
                try:
                    rfd.recv(4096)
                except BlockingIOError:
                    pass
            while self.signals:
                getattr(self, "handle_" + SIGNALS[self.signals.popleft()])()
            if d.frontend is not None and d.frontend in events:
                d.on_frontend()
            if d.backend in events:
                d.on_backend()
            if self.control.sock in events:
                self.control.on_readable()
            self.handle_events(now)
            self.reap(now)
            self.respawn_due(now)
            if not self.serving and not self.stopping:
                gen_ready = d.ready_workers(self.generation)
                if len(gen_ready) == len(self.placements):
                    d.active_generation = self.generation
                    d.bind_frontend()
                    poller.register(d.frontend, zmq.POLLIN)
                    self.serving = True
                    log.info("serving %s on %s: plan %s (generation %d, %d instance(s))",
                             os.path.basename(self.cfg["model.path"]), self.cfg.listen, format_plan(self.plan),
                             self.generation, len(self.placements))
                    notify.notify("READY=1\nSTATUS=serving plan " + format_plan(self.plan))
            timeout = d.tick(now)
            if self.stopping:
                if self.force:
                    d.fail_all("DRAINING", "packratd was stopped before this request could finish")
                    return EXIT_OK
                if d.idle():
                    log.info("drained; stopping workers")
                    return EXIT_OK
                if now > self.stop_deadline:
                    log.warning("drain grace expired; failing what is left")
                    d.fail_all("DRAINING", "packratd stopped before this request could finish")
                    return EXIT_OK
                timeout = min(timeout, 0.05)
            timeout = min(timeout, 0.2)

    # ---- control commands (packratctl) -------------------------------------------------------
    def cmd_status(self) -> dict:
        d = self.dispatcher
        now = time.monotonic()
        st = d.stats
        workers = [{"name": w.name, "generation": w.generation, "index": w.index, "state": w.state,
                    "pid": w.proc.pid, "threads": w.threads, "cpus": list(w.cpus), "share": w.share,
                    "torch_threads": w.info.get("threads"), "busy_s": round(w.busy_s, 3), "tasks": w.tasks_done}
                   for w in sorted(d.workers.values(), key=lambda w: (w.generation, w.index))]
        return {
            "version": __version__, "pid": os.getpid(), "uptime_s": now - self.started,
            "state": "stopping" if self.stopping else ("serving" if self.serving else "starting"),
            "model": self.cfg["model.path"], "listen": self.cfg.listen,
            "topology": self.topology.to_dict() if self.topology else None,
            "plan": format_plan(self.plan), "generation": self.generation,
            "active_generation": d.active_generation, "workers": workers,
            "queue_rows": d.queued_rows, "inflight_batches": len(d.batches),
            "requests": st.requests, "rows": st.rows, "batches": st.batches, "errors": dict(st.errors),
            "worker_deaths": st.worker_deaths, "slices_resent": st.slices_resent,
            "latency_ms": st.percentiles(), "spec": d.spec, "max_batch_size": d.max_batch,
        }

    def shutdown_workers(self) -> None:
        """SIGTERM every worker, wait up to stop_grace_s, then SIGKILL what is left."""
        if self.dispatcher is None:
            return
        hs = list(self.dispatcher.workers.values()) + list(getattr(self, "_exiting", ()))
        for h in hs:
            h.state = STOPPING
            if h.proc.poll() is None:
                self.kill(h, signal.SIGKILL if self.force else signal.SIGTERM)
        deadline = time.monotonic() + self.cfg["workers.stop_grace_s"]
        for h in hs:
            try:
                h.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in %.0fs; SIGKILL", h.name, self.cfg["workers.stop_grace_s"])
                h.proc.kill()
                h.proc.wait()


def setup_logging(level: str) -> None:
    handler = None
    if os.environ.get("JOURNAL_STREAM") and os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler
            handler = JournalHandler(SYSLOG_IDENTIFIER="packratd")
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s packratd[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="packratd", description="Serve a PyTorch model on CPU at the lowest latency the host allows.")
    p.add_argument("-c", "--config", help="TOML config file (default: none, built-in defaults)")
    p.add_argument("--model", help="override model.path")
    p.add_argument("--plan", help='override workers.plan, e.g. "2x1:4"')
    p.add_argument("--listen", help="override server.listen")
    p.add_argument("--runtime-dir", help="override server.runtime_dir")
    p.add_argument("--state-dir", help="override server.state_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any option, e.g. server.max_batch_size=64")
    p.add_argument("--dump-config", action="store_true", help="print the config file with every option and its default, and exit")
    p.add_argument("--version", action="version", version=f"packratd {__version__}")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dump_config:
        sys.stdout.write(config_mod.dump_defaults())
        return 0
    overrides = {}
    for key, val in (("model.path", args.model), ("workers.plan", args.plan), ("server.listen", args.listen),
                     ("server.runtime_dir", args.runtime_dir), ("server.state_dir", args.state_dir)):
        if val is not None:
            overrides[key] = val
    for kv in args.set:
        if "=" not in kv:
            print(f"packratd: --set {kv!r}: expected KEY=VALUE", file=sys.stderr)
            return EXIT_CONFIG
        k, v = kv.split("=", 1)
        overrides[k.strip()] = v.strip()
    try:
        cfg = config_mod.load(args.config, overrides)
    except config_mod.ConfigError as e:
        print(f"packratd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg["log.level"])
    return Daemon(cfg).run()


if __name__ == "__main__":
    sys.exit(main())

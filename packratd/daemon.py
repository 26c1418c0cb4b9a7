"""packratd: the daemon process -- one main loop over small parts.

Parts (each its own module, collaborators passed in):

* dispatcher  -- client and worker sockets, batching, per-batch split, answers;
* supervisor  -- every instance a Slot: spawn, heartbeat deaths, reaping, back-off, stop deadlines;
* rollout     -- generations: start, switch, retire, abandon (policy in generations.decide);
* planner     -- profile in use, cores in service, the solver in a child process (offload);
* profiler    -- the autotune thread (profile, solve, interference check);
* monitor     -- batch sizes seen; whether another shape would pay;
* commands    -- the control handlers (packratctl), served by control.ControlServer;
* metrics, notify -- Prometheus and systemd.

The loop (:meth:`Daemon.loop`) runs a few named steps each turn; signal handlers only enqueue.
Every step is guarded: an exception in one is logged and counted (``loop_errors`` in status) and
the loop goes on, so nothing a client, a worker or an operator does takes the daemon down.  When no
instance can serve and nothing is on its way, the daemon says so (state ``failed``: status,
metrics, sd_notify STATUS, not ready) and answers requests with UNAVAILABLE instead of queueing
them; an operator's reconfigure or reload brings it back.
"""
from __future__ import annotations

import collections
import fcntl
import logging
import os
import signal
import socket
import sys
import time

import zmq

from . import config as config_mod, notify, oip, profiler, security, store
from . import worker as worker_mod
from .commands import Commands
from .control import ControlServer, control_endpoint
from .dispatcher import FAILED as D_FAILED, SERVING as D_SERVING, Dispatcher
from .generations import ReconfigQueue
from .metrics import Metrics
from .monitor import Monitor
from .offload import Offloader
from .placement import PlacementError
from .plan import Plan
from .planner import Planner
from .rollout import Rollout
from .sidecar import Sidecar
from .supervisor import Supervisor
from .topology import TopologyError, read_topology
from .zygote import ForkServer

log = logging.getLogger("packratd")

EXIT_OK = 0
EXIT_CONFIG = 2          # bad config / plan / topology: nothing to retry
EXIT_BOOT = worker_mod.EXIT_BOOT_FAILED   # 3: the first generation could not start (bad model?)

SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGHUP: "hup", signal.SIGCHLD: "chld"}
# Options that need a restart to change (they name sockets and directories already in use).
RESTART_ONLY = ("server.listen", "server.runtime_dir", "server.state_dir", "server.max_message_bytes",
                "server.socket_group", "server.admin_group", "server.client_hwm", "server.curve",
                "server.curve_keys_dir", "server.curve_clients_dir", "metrics.port", "metrics.address")

BOOKKEEPING_S = 0.005       # the loop's non-serving steps run at least this often

# What the daemon as a whole is doing (status["state"], the metrics' packratd_state, health).
STARTING, PROFILING, CHECKING, SERVING, FAILED, STOPPING = "starting", "profiling", "checking", "serving", "failed", "stopping"
STATES = (STARTING, PROFILING, CHECKING, SERVING, FAILED, STOPPING)


class StartupError(Exception):
    def __init__(self, message: str, code: int = EXIT_CONFIG):
        super().__init__(message)
        self.code = code


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every client connection costs an fd, and libzmq's ipc
    listener aborts the process on EMFILE (libzmq 4.3.5, ipc_listener.cpp accept) instead of refusing."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20), hard))
        except (ValueError, OSError):
            pass


def make_monitor(cfg) -> Monitor:
    c = cfg
    return Monitor(window_s=c["monitor.window_s"], window_batches=c["monitor.window_batches"],
                   min_batches=c["monitor.min_batches"], min_dwell_s=c["monitor.min_dwell_s"],
                   min_improvement=c["monitor.min_improvement"], confirmations=c["monitor.confirmations"],
                   objective=c["monitor.objective"], min_gain_ms=c["monitor.min_gain_ms"], payback_s=c["monitor.payback_s"])


class Daemon:
    def __init__(self, cfg: config_mod.Config, topology=None, config_path: str | None = None, overrides: dict | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides or {}
        self.topology = topology
        self.signals: collections.deque[int] = collections.deque()
        self.ctx = zmq.Context()
        self.metrics = Metrics()
        self.offload = Offloader()
        self.monitor = make_monitor(cfg)
        self.reconfig = ReconfigQueue()
        self.dispatcher: Dispatcher | None = None
        self.supervisor: Supervisor | None = None
        self.rollout: Rollout | None = None
        self.planner: Planner | None = None
        self.control: ControlServer | None = None
        self.commands = Commands(self)
        self.tuner: profiler.Tuner | None = None
        self.solving = None                    # offload.Job of a reconfiguration being solved
        self.scoring = None                    # offload.Job of a monitor evaluation
        self.autotune_info: dict = {}
        self.model_path = ""                   # the content-addressed copy workers load
        self.digest = ""
        self.runtime = "eager"                 # what runs the model in new generations, and its artifact
        self.artifact = ""
        self.runtimes_info: dict = {}          # per runtime: available, reason, prepare/build time, timings
        self.failed_reason: str | None = None
        self.failed_instances: collections.deque = collections.deque(maxlen=50)
        self.stopping = False
        self.stop_deadline = None
        self.force = False
        self.serving = False                   # a generation has served since start
        self.started = time.monotonic()
        self.watchdog = notify.watchdog_interval()
        self.next = collections.defaultdict(float)   # step -> next monotonic time it is due
        self.loop_errors: collections.Counter = collections.Counter()
        self._last_error_log: dict[str, float] = {}
        self.last_turn = time.monotonic()
        self.auth = None                       # CURVE ZAP handler (tcp:// listen only)
        self.lock_fd = None
        self._wake = 0.1
        self._wake_at = 0.0                    # when the dispatcher next needs a tick (a batching delay, a deadline)
        self.gateway = Sidecar("OIP gateway", None)
        self.zygotes: dict[tuple, ForkServer] = {}   # (digest, runtime, artifact) -> fork server
        self.poller = zmq.Poller()

    # ---- state ---------------------------------------------------------------------------
    @property
    def state(self) -> str:
        if self.stopping:
            return STOPPING
        if self.failed_reason is not None:
            return FAILED
        if self.rollout is not None and self.rollout.active is not None:
            return SERVING
        if self.tuner is not None:
            return CHECKING if self.tuner.progress.state == "checking" else PROFILING
        return STARTING

    def health(self) -> dict:
        st = self.state
        return {"live": time.monotonic() - self.last_turn < 5.0, "ready": st == SERVING and not self.stopping, "state": st}

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        os.umask(0o077)        # every file and socket is created private; the client socket is then opened to its group
        raise_fd_limit()
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
        group = cfg["server.socket_group"] or None
        admin = cfg["server.admin_group"] or None
        try:
            security.prepare_runtime_dir(rd, group, traverse_others=bool(admin and admin != group))
        except (security.SecurityError, OSError) as e:
            raise StartupError(f"server.runtime_dir: {e}") from None
        self._lock(rd)
        try:
            os.makedirs(cfg["server.state_dir"], mode=0o750, exist_ok=True)
            self.model_path, self.digest = store.snapshot_model(cfg["model.path"], cfg["server.state_dir"])
        except OSError as e:
            raise StartupError(f"cannot keep a copy of the model in {cfg['server.state_dir']}: {e}") from None
        for ep in [cfg.worker_endpoint, cfg.listen, control_endpoint(rd)]:
            if ep.startswith("ipc://") and len(ep) - 6 > 100:
                raise StartupError(f"ipc socket path {ep[6:]!r} is longer than the 100 characters Unix sockets allow; "
                                   "use a shorter server.runtime_dir")
        curve_secret = self._curve()
        try:
            self.gateway.argv = oip.gateway_argv(cfg)
        except ValueError as e:
            raise StartupError(f"oip: {e}") from None
        # The gateway reaches the dispatcher over an owner-only ipc socket; with an ipc server.listen it is that one.
        private = [oip.local_endpoint(cfg)] if self.gateway.argv and not cfg.listen.startswith("ipc://") else []
        try:
            self.metrics.start(cfg["metrics.address"], cfg["metrics.port"])
        except OSError as e:
            raise StartupError(f"metrics: cannot listen on {cfg['metrics.address']}:{cfg['metrics.port']}: {e}") from None
        try:
            d = self.dispatcher = Dispatcher(self.ctx, cfg, [cfg.listen], cfg.worker_endpoint,
                                             observers=[self, self.metrics], curve_secret_file=curve_secret,
                                             socket_group=group, health=self.health, private_listeners=private)
            d.bind_frontend()
            self.control = ControlServer(self.ctx, control_endpoint(rd), self.commands.handlers())
            security.secure_ipc(control_endpoint(rd), admin, mode=0o660 if admin else 0o600)
        except (security.SecurityError, zmq.ZMQError) as e:
            raise StartupError(str(e)) from None
        self.supervisor = Supervisor(cfg, d, cfg.worker_endpoint, launcher=self.launch)
        self.rollout = Rollout(cfg, d, self.supervisor, self)
        self.planner = Planner(cfg, self.topology, self.offload)
        for s in (d.backend, *d.frontends, self.control.sock):
            self.poller.register(s, zmq.POLLIN)

    def _lock(self, runtime_dir: str) -> None:
        """One daemon per runtime dir: a second one would steal the sockets (ipc bind replaces the file)."""
        path = os.path.join(runtime_dir, "packratd.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StartupError(f"another packratd is running with server.runtime_dir {runtime_dir} "
                               f"(it holds {path}); stop it first or use another runtime dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd = fd

    def _curve(self) -> str | None:
        cfg = self.cfg
        if not cfg.listen.startswith("tcp://"):
            return None
        if not cfg["server.curve"]:
            log.warning("listening on %s without CURVE (server.curve = false): anyone who reaches it can use the model",
                        cfg.listen)
            return None
        try:
            _, secret = security.load_or_create_server_keys(
                cfg["server.curve_keys_dir"] or os.path.join(cfg["server.state_dir"], "curve"))
            self.auth = security.start_authenticator(self.ctx, cfg["server.curve_clients_dir"])
        except (security.SecurityError, OSError) as e:
            raise StartupError(f"CURVE for {cfg.listen}: {e}") from None
        return secret

    def begin(self) -> None:
        if self.cfg["workers.plan"]:
            plan = Plan.parse(self.cfg["workers.plan"])
            if self.cfg["workers.runtime"] == "eager":
                self.load_profile_quietly()
                self.start_generation(plan, "workers.plan from the config")
            else:                                  # the runtime is still to be prepared (and chosen, with auto)
                self.start_tuner("startup: workers.plan from the config; choosing the runtime", fixed_plan=plan)
        else:
            self.start_tuner("startup: no plan configured")

    def load_profile_quietly(self) -> None:
        """With a configured plan, use a cached profile (if any) for the per-batch split; never profile."""
        try:
            key, ident = profiler.cache_key(self.cfg, self.topology, self.model_path, self.runtime,
                                            self.runtimes_info.get(self.runtime, {}).get("key", ""))
            rec = profiler.load_cached(self.cfg, key, ident)
        except (OSError, ValueError):
            rec = None
        if rec is not None:
            self.planner.set_profile(rec, profiler.table_of(rec))
            log.info("using cached profile %s for per-batch splits", key)

    # ---- autotuning ----------------------------------------------------------------------
    def start_tuner(self, reason: str, refresh: bool = False, batch_size: int | None = None,
                    fixed_plan: Plan | None = None) -> None:
        self.tuner = profiler.Tuner(self.cfg, self.planner.topo(), self.ctx, self.cfg["server.runtime_dir"], reason,
                                    refresh, batch_size, self.model_path, self.digest, fixed_plan)
        log.info("autotune: %s", reason)
        notify.notify("STATUS=profiling the model")
        self.tuner.start()

    def check_tuner(self, now: float) -> None:
        t = self.tuner
        if t is None or t.is_alive():
            return
        self.tuner = None
        if t.error is not None:
            self.rollout.note(t.reason, error=f"autotune failed: {t.error}")
            if self.rollout.active is None and not self.serving and not self.stopping:
                raise StartupError(f"autotune failed: {t.error}", EXIT_BOOT)
            log.error("autotune failed (%s); keeping what serves", t.error)
            return
        r = t.result
        if r.runtime is not None:
            self.runtime, self.artifact = r.runtime.name, r.runtime.artifact
            self.runtimes_info = {n: dict(i, key=r.runtime.key if n == r.runtime.name else i.get("key", ""))
                                  for n, i in r.runtime.info.items()}
        if r.table is not None:
            self.planner.set_profile(r.profile, r.table)
            self.autotune_info = {"batch_size": r.batch_size, "candidates": r.candidates, "predicted_ms": r.predicted_ms,
                                  "measured_ms": r.measured_ms, "profile_wall_s": r.profile.get("wall_s")}
            log.info("autotune chose %s on %s for batch %d: predicted %.1f ms%s", r.plan, self.runtime, r.batch_size,
                     r.predicted_ms, f", measured {r.measured_ms:.1f} ms" if r.measured_ms is not None else "")
        else:
            self.load_profile_quietly()
        if self.stopping:
            return
        a = self.rollout.active
        if a is not None and a.plan.same_instances(r.plan) and a.digest == self.digest and a.runtime == self.runtime:
            self.rollout.note(t.reason, result="plan unchanged")
            if self.dispatcher is not None:
                self.dispatcher.splitter = self.planner.splitter()     # the new profile splits better
            return
        self.start_generation(r.plan, t.reason, r.predicted_ms, r.measured_ms)

    # ---- workers ---------------------------------------------------------------------------
    def launch(self, cfg, spec: worker_mod.LaunchSpec):
        """Start one worker: forked from the model's fork server when it is ready, else a new process."""
        z = self.zygotes.get((spec.model_digest, spec.runtime, spec.artifact))
        if cfg["workers.fork_server"] and z is not None:
            argv, _ = worker_mod.command(cfg, spec)
            p = z.fork(argv[3:])                  # the arguments after "python -m packratd.worker"
            if p is not None:
                return p
        return worker_mod.spawn(cfg, spec)

    def ensure_fork_server(self) -> None:
        """A fork server for the model and runtime new generations use (started in the background)."""
        if not self.cfg["workers.fork_server"]:
            return
        key = (self.digest, self.runtime, self.artifact)
        z = self.zygotes.get(key)
        if z is None or z.state == "stopped":
            z = self.zygotes[key] = ForkServer(self.cfg, self.model_path, self.digest, self.runtime, self.artifact)
            z.start()

    def prune_fork_servers(self) -> None:
        live = {(g.digest, g.runtime, g.artifact) for g in self.rollout.live()} | {(self.digest, self.runtime, self.artifact)}
        for key in [k for k in self.zygotes if k not in live]:
            z = self.zygotes.pop(key)
            z.stop()
            z.reap()

    # ---- generations ---------------------------------------------------------------------
    def start_generation(self, plan: Plan, reason: str, predicted: float | None = None, measured: float | None = None):
        now = time.monotonic()
        self.ensure_fork_server()
        observed = [b for b, _ in sorted(self.monitor.histogram(now).items(), key=lambda kv: -kv[1])]
        if predicted is None:
            predicted = self.planner.predict(plan, plan.total_batch)
        try:
            return self.rollout.start(plan, self.planner.topo(), self.model_path, self.digest, reason, now,
                                      runtime=self.runtime, artifact=self.artifact,
                                      predicted_ms=predicted, measured_ms=measured,
                                      warmup_sizes=self.planner.warmup_sizes(plan, observed))
        except PlacementError as e:
            if self.rollout.active is None and not self.serving:
                raise StartupError(f"plan {plan} cannot be placed: {e}") from None
            log.error("reconfiguration refused: plan %s cannot be placed: %s", plan, e)
            self.rollout.note(reason, error=f"cannot place {plan}: {e}")
            return None

    # listener of the rollout
    def on_switch(self, g, old, now: float) -> None:
        d = self.dispatcher
        d.splitter = self.planner.splitter()
        self.monitor.note_reconfigured(now)
        if old is not None:
            self.metrics.on_reconfiguration(now - g.created)
        self.failed_reason = None
        d.set_state(D_SERVING, "serving")
        if not self.serving:
            self.serving = True
            log.info("serving %s on %s: plan %s (generation %d, %d instance(s)); try: %s -m packratd.client %s",
                     os.path.basename(self.cfg["model.path"]), self.cfg.listen, g.plan_text, g.number, g.size,
                     os.path.basename(sys.executable), self.cfg.listen)
            notify.notify("READY=1\n" + self.status_line())
        else:
            notify.notify(self.status_line())

    def on_abandon(self, g, why: str, now: float) -> None:
        if self.rollout.active is None and not self.serving and not self.stopping:
            raise StartupError(f"generation {g.number} failed to start: {why}", EXIT_BOOT)
        self.rollout.note(g.reason, error=f"generation {g.number} abandoned: {why}")

    def on_gone(self, g, now: float) -> None:
        succ = self.rollout.active
        if succ is not None and succ.number > g.number and succ.active_at is not None and g.state == "retired":
            self.monitor.note_switch_cost(now - succ.created, self._switch_slowdown(succ.created, now))
        keep = self.rollout.digests_in_use() | {self.digest}
        store.prune_models(self.cfg["server.state_dir"], keep)
        self.prune_fork_servers()

    def _switch_slowdown(self, t0: float, t1: float) -> float:
        """Batch latency during [t0, t1] relative to the 30 s before it, minus 1 (0: no slowdown)."""
        before = [lat for t, _, lat in self.monitor.samples if t0 - 30 <= t < t0 and lat == lat]
        during = [lat for t, _, lat in self.monitor.samples if t0 <= t <= t1 and lat == lat]
        if len(before) < 5 or len(during) < 5:
            return self.monitor.cost.slowdown
        import statistics
        return max(0.0, statistics.median(during) / max(1e-9, statistics.median(before)) - 1.0)

    # ---- faults ----------------------------------------------------------------------------
    def handle_supervisor_events(self, now: float) -> None:
        sup = self.supervisor
        for ev in [e for e in sup.events if e[0] == "instance_failed"]:
            sup.events.remove(ev)
            self.instance_failed(ev[1], ev[2])

    def instance_failed(self, slot, why: str) -> None:
        """Stop restarting an instance that keeps failing; re-plan over the cores that remain."""
        self.planner.take_out_of_service(slot.cpus)
        msg = (f"instance {slot.index} of generation {slot.generation} failed {slot.failures} times in a row ({why}); "
               f"cpus {','.join(map(str, slot.cpus))} taken out of service, re-planning over the remaining cores")
        log.error("%s", msg)
        self.rollout.note("instance failed", error=msg)
        self.failed_instances.append({"generation": slot.generation, "index": slot.index, "cpus": list(slot.cpus), "why": why})
        if not self.planner.topo().cores:
            self.enter_failed("every core was taken out of service after its instance failed repeatedly; "
                              "fix the cause, then `packratctl reconfigure` or reload")
            return
        g = self.rollout.gens.get(slot.generation)
        if self.planner.table is not None and not self.cfg["workers.plan"]:
            self.request_reconfigure({"reason": "re-plan after instance failure", "force": True})
        elif g is not None:
            keep = [p for i, p in enumerate(g.plan.instances)
                    if (g.number, i) in self.supervisor.slots and self.supervisor.slots[(g.number, i)].state != "failed"]
            plan = Plan(tuple(keep)) if keep else g.plan
            self.request_reconfigure({"plan": str(plan), "reason": "re-plan after instance failure", "force": True})

    def enter_failed(self, reason: str) -> None:
        if self.failed_reason is None:
            log.error("no instance can serve: %s", reason)
        self.failed_reason = reason
        self.rollout.retire_active_for_replan(time.monotonic())
        self.dispatcher.set_state(D_FAILED, f"packratd cannot serve: {reason}")
        notify.notify(f"STATUS=failed: {reason}"[:400])

    def check_outage(self, now: float) -> None:
        """No silent outage: if nothing serves and nothing is on its way, say so."""
        if not self.serving or self.stopping or self.failed_reason is not None:
            return
        a = self.rollout.active
        if a is not None and self.supervisor.serving_capacity(a.number) > 0:
            return
        if self.busy_reconfiguring() or self.reconfig.pending is not None:
            return
        self.enter_failed("every instance of the serving generation failed and no re-plan could start")

    # ---- observers (called by the dispatcher) ------------------------------------------------
    def on_batch(self, rows: int, latency_s: float, generation: int) -> None:
        self.monitor.observe(time.monotonic(), rows, latency_s * 1000.0)

    def on_request(self, latency_s: float) -> None:
        pass

    def on_error(self, code: str) -> None:
        pass

    # ---- reconfiguration -----------------------------------------------------------------
    def busy_reconfiguring(self) -> bool:
        return self.tuner is not None or self.solving is not None or self.rollout.busy()

    def request_reconfigure(self, req: dict) -> bool:
        coalesced = self.reconfig.request(req)
        log.info("reconfiguration requested (%s)%s", req.get("reason"), "; coalesced with a pending one" if coalesced else "")
        return coalesced

    def run_pending_reconfig(self, now: float) -> None:
        if not (self.serving or self.failed_reason) or self.stopping:
            return
        req = self.reconfig.take(self.busy_reconfiguring())
        if req is None:
            return
        reason = req.get("reason", "requested")
        try:
            if req.get("plan"):
                return self._reconfigure_to(Plan.parse(req["plan"]), req, now)
            if req.get("refresh_profile") or (self.planner.table is None and not self.cfg["workers.plan"] and req.get("reload")):
                return self.start_tuner(reason, refresh=bool(req.get("refresh_profile")), batch_size=req.get("batch_size"))
            if self.cfg["workers.plan"] and not req.get("batch_size") and not req.get("shape_plan"):
                if req.get("reload") and req.get("force") and self.cfg["workers.runtime"] != "eager":
                    # a new model (or runtime setting): its runtime artifact must be prepared first, off the loop
                    return self.start_tuner(reason, fixed_plan=Plan.parse(self.cfg["workers.plan"]))
                return self._reconfigure_to(Plan.parse(self.cfg["workers.plan"]), req, now)
            if req.get("shape_plan"):
                return self._reconfigure_to(Plan(tuple(map(tuple, req["shape_plan"])), req.get("predicted_ms")), req, now)
            B = req.get("batch_size") or self.cfg["autotune.batch_size"] or self.cfg["server.max_batch_size"]
            job = self.solving = self.planner.choose(B, what=f"solving for batch {B} ({reason})")
        except ValueError as e:
            log.error("reconfiguration (%s) refused: %s", reason, e)
            self.rollout.note(reason, error=str(e))
            return

        def solved(j):
            self.solving = None
            if j.error is not None:
                log.error("reconfiguration (%s) refused: %s", reason, j.error)
                self.rollout.note(reason, error=j.error)
                return
            self._reconfigure_to(j.result.best, req, time.monotonic())
        job.on_done(solved)

    def _reconfigure_to(self, plan: Plan, req: dict, now: float) -> None:
        reason = req.get("reason", "requested")
        if self.stopping:
            return
        a = self.rollout.active
        if (a is not None and a.plan.same_instances(plan) and a.digest == self.digest and a.runtime == self.runtime
                and not req.get("force")):
            log.info("reconfiguration (%s): plan %s is already serving", reason, plan)
            self.rollout.note(reason, result=f"plan {plan} already serving")
            self.monitor.note_reconfigured(now)
            return
        self.start_generation(plan, reason, plan.latency_ms)

    def check_monitor(self, now: float) -> None:
        if self.scoring is not None or now < self.next["monitor"]:
            return
        self.next["monitor"] = now + self.cfg["monitor.interval_s"]
        a = self.rollout.active
        if (not self.cfg["monitor.enabled"] or self.cfg["workers.plan"] or self.planner.table is None or a is None
                or self.busy_reconfiguring() or self.reconfig.pending is not None):
            return
        hist = self.monitor.histogram(now)
        if sum(hist.values()) < self.monitor.min_batches:
            self.monitor.decide(now, None, sum(hist.values()))
            return
        boot = self.supervisor.boot_times(a.number)
        if boot and not self.monitor.cost.measured:
            self.monitor.cost.switch_s = max(boot)       # prior: a switch lasts about as long as a worker boots
        current = a.plan.threads

        def scored(j):
            self.scoring = None
            if j.error is not None:
                log.warning("monitor evaluation failed: %s", j.error)
                return
            d = self.monitor.decide(time.monotonic(), j.result)
            if not d.reconfigure:
                return
            plan = Plan(tuple(d.plan), d.best_ms)
            if not self.planner.placeable_on_cores(plan):
                log.info("monitor: recommended %s does not fit the NUMA layout; ignoring", plan)
                return
            self.request_reconfigure({"shape_plan": [list(i) for i in plan.instances], "predicted_ms": d.best_ms,
                                      "reason": "monitor: " + d.reason})
        self.scoring = self.planner.score(current, hist, self.monitor.kind).on_done(scored)

    # ---- signals -------------------------------------------------------------------------
    def _on_signal(self, signum, frame):   # only enqueue; the main loop does the work
        self.signals.append(signum)

    def handle_term(self) -> None:
        if self.stopping:
            log.warning("second stop signal: exiting now")
            self.force = True
            return
        self.begin_stop("signal")

    handle_int = handle_term

    def begin_stop(self, why: str) -> None:
        log.info("stopping (%s): draining %d queued request(s) and %d in-flight batch(es)", why,
                 len(self.dispatcher.queue), len(self.dispatcher.batches))
        notify.notify("STOPPING=1\nSTATUS=draining")
        self.stopping = True
        self.dispatcher.draining = True
        self.gateway.stop()          # it answers what it holds (DRAINING from here on) and exits
        self.stop_deadline = time.monotonic() + self.cfg["workers.stop_grace_s"]
        if self.tuner is not None:
            self.tuner.cancel.set()

    def handle_hup(self) -> None:
        self.reload("SIGHUP")

    def handle_chld(self) -> None:
        pass   # reaping happens every loop turn

    def reload(self, why: str) -> dict:
        # RELOADING=1/READY=1 only once serving: a READY=1 during start-up would tell systemd we serve.
        if self.serving:
            notify.notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
        try:
            new, model = self._load_new_config()
        except (config_mod.ConfigError, OSError, security.SecurityError, worker_mod.LaunchError) as e:
            log.error("%s: config not reloaded, keeping the running one: %s", why, e)
            if self.serving:
                notify.notify("READY=1")
            return {"reloaded": False, "error": str(e)}
        kept = [k for k in RESTART_ONLY if new[k] != self.cfg[k]]
        if kept:
            log.warning("%s: %s change only on restart; keeping the running values", why, ", ".join(kept))
            new = new.replace(**{k: self.cfg[k] for k in kept})
        model_changed = model[1] != self.digest or any(new[k] != self.cfg[k] for k in ("workers.runtime",
                                                                                       "workers.runtime_specials"))
        gw = oip.gateway_argv(new)
        if gw and not self.gateway.argv and not self.cfg.listen.startswith("ipc://"):
            log.warning("%s: the OIP gateway can be turned on with a tcp:// server.listen only at a restart", why)
            gw = None
        self.gateway.reconfigure(gw)
        if self.auth is not None:          # pick up added / removed client keys
            self.auth.configure_curve(domain="*", location=new["server.curve_clients_dir"])
        self.cfg = new
        for part in (self.supervisor, self.rollout, self.planner):
            part.cfg = new
        self.dispatcher.configure(new)
        self.monitor = make_monitor(new)
        back = self.planner.restore_cores()
        if back:
            log.info("%s: cpus %s back in service", why, ",".join(map(str, back)))
        if model_changed:
            log.info("%s: the model or its runtime changed (digest %s... -> %s..., runtime %s)", why, self.digest[:12],
                     model[1][:12], new["workers.runtime"])
            self.model_path, self.digest = model
            if new["workers.runtime"] == "eager":
                self.runtime, self.artifact = "eager", ""
            self.planner.set_profile(None, None)
            if self.cfg["workers.plan"]:
                self.load_profile_quietly()
        log.info("%s: config reloaded from %s; re-solving", why, self.config_path or "<defaults>")
        self.request_reconfigure({"reason": why + ": config reloaded", "reload": True,
                                  "force": model_changed or bool(back)})
        if self.serving:
            notify.notify("READY=1\n" + self.status_line())
        return {"reloaded": True, "restart_only_kept": kept, "model_changed": model_changed}

    def _load_new_config(self):
        """Everything a reload needs, checked before anything changes: the config, the allocator, the CURVE
        clients dir, and a copy of the (possibly rewritten) model file."""
        new = config_mod.load(self.config_path, self.overrides)
        try:
            oip.gateway_argv(new)
        except ValueError as e:
            raise config_mod.ConfigError(f"oip: {e}") from None
        if new["workers.allocator"] in ("jemalloc", "tcmalloc"):
            try:
                worker_mod.find_allocator(new["workers.allocator"])
            except FileNotFoundError as e:
                raise worker_mod.LaunchError(str(e)) from None
        if self.auth is not None and not os.path.isdir(new["server.curve_clients_dir"]):
            raise security.SecurityError(f"server.curve_clients_dir {new['server.curve_clients_dir']!r} does not exist")
        if not os.path.isfile(new["model.path"]):
            raise OSError(f"model file {new['model.path']!r} does not exist")
        model = store.snapshot_model(new["model.path"], self.cfg["server.state_dir"])
        return new, model

    # ---- main loop -----------------------------------------------------------------------
    def run(self) -> int:
        rfd, wfd = socket.socketpair()
        rfd.setblocking(False)
        wfd.setblocking(False)
        signal.set_wakeup_fd(wfd.fileno(), warn_on_full_buffer=False)
        for s in SIGNALS:
            signal.signal(s, self._on_signal)
        try:
            self.setup()
            self.begin()
            return self.loop(rfd)
        except StartupError as e:
            log.error("%s", e)
            return e.code
        finally:
            self.shutdown()
            signal.set_wakeup_fd(-1)
            rfd.close()
            wfd.close()

    def _guard(self, name: str, fn, *args) -> None:
        """Run one loop step; a failure is logged (rate-limited) and counted, never fatal."""
        try:
            fn(*args)
        except StartupError:
            raise
        except Exception:  # noqa: BLE001 - the loop must go on
            self.loop_errors[name] += 1
            now = time.monotonic()
            if now - self._last_error_log.get(name, -1e9) > 10.0:
                self._last_error_log[name] = now
                log.exception("loop step %s failed (%d time(s) so far); carrying on", name, self.loop_errors[name])

    def loop(self, rfd) -> int:
        d = self.dispatcher
        poller = self.poller
        poller.register(rfd.fileno(), zmq.POLLIN)
        offload_fd = None
        timeout = 0.05
        while True:
            fd = self.offload.fileno()
            if fd != offload_fd:
                if offload_fd is not None:
                    poller.unregister(offload_fd)
                if fd is not None:
                    poller.register(fd, zmq.POLLIN)
                offload_fd = fd
            events = dict(poller.poll(max(0, int(timeout * 1000))))
            now = self.last_turn = time.monotonic()
            if rfd.fileno() in events:
                try:
                    rfd.recv(4096)
                except BlockingIOError:
                    pass
            while self.signals:
                self._guard("signals", getattr(self, "handle_" + SIGNALS[self.signals.popleft()]))
            # The serving path first: results in (they free the instances), requests in, and the next batch
            # out at once; the bookkeeping steps below come after it.
            if d.backend in events:
                self._guard("workers", d.on_backend)
            for fs in d.frontends:
                if fs in events:
                    self._guard("clients", d.on_frontend, fs)
            if d.queue:
                self._guard("dispatch", d.dispatch_now, time.monotonic())
            # Everything else -- supervision, rollout, planner, monitor, timers -- runs when something asks for
            # it (a control request, a worker event, a signal) or every BOOKKEEPING_S, not on every message:
            # a request's path through the loop stays short.
            if (self.control.sock in events or offload_fd in events or d.events or self.supervisor.events
                    or self.stopping or now >= self.next["bookkeeping"] or now >= self._wake_at):
                timeout = self.bookkeeping(events, now)
                self.next["bookkeeping"] = now + BOOKKEEPING_S
                if self.stopping:
                    done = self.stop_check(now)
                    if done is not None:
                        return done
            else:
                timeout = min(self.next["bookkeeping"], self._wake_at) - now

    def bookkeeping(self, events: dict, now: float) -> float:
        """The loop's steps besides the serving path; returns how long the next poll may wait."""
        d = self.dispatcher
        if self.control.sock in events:
            self._guard("control", self.control.on_readable)
        self._guard("supervise", self.supervisor.step, now, self.rollout.state_of, self.stopping)
        self._guard("gateway", self.gateway.step, now, self.stopping)
        for z in list(self.zygotes.values()):
            self._guard("fork-servers", z.pump)
        self._guard("faults", self.handle_supervisor_events, now)
        self._guard("autotune", self.check_tuner, now)
        self._guard("rollout", self.rollout.step, now)
        self._guard("planner", self.offload.poll, now)
        self._guard("control-replies", self.control.poll)
        self._guard("monitor", self.check_monitor, now)
        self._guard("reconfigure", self.run_pending_reconfig, now)
        self._guard("outage", self.check_outage, now)
        self._wake = 0.1
        self._guard("dispatch", self.dispatch, now)
        self._wake_at = now + self._wake
        timeout = self._wake
        self._guard("housekeeping", self.housekeeping, now)
        if self.stopping or self.offload.busy() or d.orphans:
            timeout = min(timeout, 0.05)
        return min(timeout, 0.2)

    def dispatch(self, now: float) -> None:
        self._wake = self.dispatcher.tick(now)

    def stop_check(self, now: float) -> int | None:
        d = self.dispatcher
        done = None
        if self.force:
            done = "packratd was stopped before this request could finish"
        elif d.idle() and self.tuner is None:
            log.info("drained; stopping workers")
            done = ""
        elif now > self.stop_deadline:
            log.warning("drain grace (%.0fs) expired; failing what is left", self.cfg["workers.stop_grace_s"])
            done = "packratd stopped before this request could finish"
        if done is None:
            return None
        d.on_frontend()      # requests already on the socket get DRAINING, not silence
        if done:
            d.fail_all("DRAINING", done)
        return EXIT_OK

    def housekeeping(self, now: float) -> None:
        if self.watchdog and now >= self.next["watchdog"]:
            notify.notify("WATCHDOG=1")
            self.next["watchdog"] = now + self.watchdog
        if now >= self.next["status"]:
            if self.failed_reason is not None:
                notify.notify(f"STATUS=failed: {self.failed_reason}"[:400])
            elif self.serving:
                notify.notify(self.status_line())
            elif self.tuner is not None:
                # First-start profiling can take minutes: say how far it is and keep systemd's start timeout ahead.
                p = self.tuner.progress.snapshot()
                notify.notify(f"STATUS=autotuning: {p['state']} {p['progress']}\nEXTEND_TIMEOUT_USEC={int(120e6)}")
            self.next["status"] = now + 5.0
        if now >= self.next["metrics"]:
            self.metrics.update(self.commands.status())
            self.next["metrics"] = now + 1.0

    def status_line(self) -> str:
        a = self.rollout.active if self.rollout else None
        st = self.dispatcher.stats if self.dispatcher else None
        if a is None:
            return "STATUS=starting"
        return (f"STATUS=serving plan {a.plan_text} (generation {a.number}), {st.requests} requests served"
                + (", stopping" if self.stopping else ""))

    def shutdown(self) -> None:
        """SIGTERM every worker (SIGKILL when forced), wait up to stop_grace_s, then SIGKILL what is left."""
        from .procutil import stop_processes
        if self.tuner is not None:
            self.tuner.cancel.set()
            self.tuner.join(timeout=self.cfg["workers.stop_grace_s"] + 5)
        if self.supervisor is not None:
            stop_processes(self.supervisor.all_processes() + ([self.gateway.proc] if self.gateway.proc else []),
                           self.cfg["workers.stop_grace_s"], force=self.force, what="worker")
        for z in self.zygotes.values():
            z.stop()
        for z in self.zygotes.values():
            z.reap()
        self.offload.close()
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self.control is not None:
            self.control.close()
        self.metrics.stop()
        if self.auth is not None:
            self.auth.stop()               # its sockets live in self.ctx: stop it before term()
        self.ctx.term()
        if self.dispatcher is not None:
            for ep in [self.cfg.listen, self.cfg.worker_endpoint] + self.dispatcher.private_listeners:
                security.remove_ipc(ep)
        try:
            os.unlink(os.path.join(self.cfg["server.runtime_dir"], oip.PORTS_FILE))
        except OSError:
            pass
        if self.lock_fd is not None:
            os.close(self.lock_fd)


def main(argv=None) -> int:        # kept for `python -m packratd.daemon`; the entry point is packratd.cli
    from .cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

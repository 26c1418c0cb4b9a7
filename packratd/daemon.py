"""packratd: the daemon process.

One main loop does all the work: it polls the client and worker sockets, the control socket and
a self-pipe that the signal handlers write to (they only enqueue the signal), then dispatches
``handle_<signal>``, reaps and respawns workers, advances worker generations and forms batches.

Workers belong to numbered generations (see generations.py).  The first generation's plan comes
from the config, or from the autotuner (profile, solve, interference check), which runs in a
thread while the main loop keeps answering the control socket and signals.  A reconfiguration
(packratctl reconfigure, SIGHUP, or the batch-size monitor) starts a new generation beside the
serving one, switches new batches to it once all its workers are READY, and retires the old one
when it has nothing in flight.
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
import threading
import time

import zmq

from . import __version__, config as config_mod, notify, profiler, security
from . import worker as worker_mod
from .control import ControlServer, control_endpoint
from .dispatcher import BOOTING, READY, STOPPING, Dispatcher, WorkerHandle, proportional_split
from .metrics import Metrics
from .generations import (ACTIVE, DRAINING, FAILED, RETIRED, STARTING, Generation, GenView, ReconfigQueue,
                          may_retire, may_switch, should_abandon)
from .monitor import Monitor
from .placement import InstanceSpec, PlacementError, format_plan, parse_plan, place
from .solver import solve, split_batch, split_table
from .topology import TopologyError, read_topology

log = logging.getLogger("packratd")

EXIT_OK = 0
EXIT_CONFIG = 2          # bad config / plan / topology: nothing to retry
EXIT_BOOT = 3            # the first generation could not start (bad model?)

SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGHUP: "hup", signal.SIGCHLD: "chld"}
# Options that need a restart to change (they name sockets and directories already in use).
RESTART_ONLY = ("server.listen", "server.runtime_dir", "server.state_dir", "server.max_message_bytes",
                "server.socket_group", "server.curve", "server.curve_keys_dir", "server.curve_clients_dir",
                "metrics.port", "metrics.address")


class StartupError(Exception):
    def __init__(self, message: str, code: int = EXIT_CONFIG):
        super().__init__(message)
        self.code = code


class TableSplitter:
    """Per-batch optimal split (solver.split_table) for whatever set of instances is live."""

    def __init__(self, table, max_batch: int):
        self.table = table
        self.max_batch = max_batch
        self.cache: dict[tuple, list] = {}

    def __call__(self, n: int, workers) -> list[int]:
        key = tuple(w.threads for w in workers)
        tab = self.cache.get(key)
        if tab is None:
            try:
                tab = split_table(self.table, list(key), self.max_batch)
            except ValueError as e:
                log.warning("profile cannot split batches over %s (%s); splitting by plan shares", key, e)
                tab = False
            self.cache[key] = tab
        if tab is False or n >= len(tab):
            return proportional_split(n, workers)
        return list(tab[n])


class Tuner(threading.Thread):
    """Runs profiler.autotune off the main loop."""

    def __init__(self, daemon: "Daemon", reason: str, refresh: bool = False, batch_size: int | None = None):
        super().__init__(name="packratd-autotune", daemon=True)
        self.d = daemon
        self.reason = reason
        self.refresh = refresh
        self.batch_size = batch_size
        self.progress = profiler.Progress()
        self.cancel = threading.Event()
        self.result = None
        self.error = None

    def run(self):
        try:
            self.result = profiler.autotune(self.d.cfg, self.d.topology, self.d.ctx, self.d.cfg["server.runtime_dir"],
                                            self.progress, self.cancel, refresh=self.refresh, batch_size=self.batch_size)
        except profiler.Cancelled:
            self.error = "cancelled"
        except Exception as e:  # noqa: BLE001 - reported by the main loop
            log.exception("autotune failed")
            self.error = f"{type(e).__name__}: {e}"
            with self.progress.lock:
                self.progress.state, self.progress.message = "failed", self.error


class Daemon:
    def __init__(self, cfg: config_mod.Config, topology=None, config_path: str | None = None, overrides: dict | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides or {}
        self.topology = topology
        self.signals: collections.deque[int] = collections.deque()
        self.ctx = zmq.Context()
        self.dispatcher: Dispatcher | None = None
        self.control: ControlServer | None = None
        self.gens: dict[int, Generation] = {}
        self.active: Generation | None = None
        self.reconfig = ReconfigQueue()
        self.history: collections.deque = collections.deque(maxlen=20)
        self.tuner: Tuner | None = None
        self.table = None
        self.profile_rec = None
        self.autotune_info: dict = {}
        self.monitor = self._make_monitor()
        self.next_monitor = 0.0
        self.slots: dict[tuple[int, int], dict] = {}
        self.respawn: list = []
        self.retiring: list = []               # (handle, generation, SIGKILL deadline)
        self.stopping = False
        self.stop_deadline = None
        self.force = False
        self.serving = False
        self.started = time.monotonic()
        self.next_watchdog = 0.0
        self.next_status = 0.0
        self.watchdog = notify.watchdog_interval()
        self.reconfigurations = 0
        self.metrics = Metrics()
        self.next_metrics = 0.0
        self.auth = None                       # CURVE ZAP handler (tcp:// listen only)
        self.bad_cpus: set[int] = set()
        self._topo_view = None
        self.failed_instances: list = []

    def _make_monitor(self) -> Monitor:
        c = self.cfg
        return Monitor(window_s=c["monitor.window_s"], window_batches=c["monitor.window_batches"],
                       min_batches=c["monitor.min_batches"], min_dwell_s=c["monitor.min_dwell_s"],
                       min_improvement=c["monitor.min_improvement"], confirmations=c["monitor.confirmations"],
                       objective=c["monitor.objective"])

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
        group = cfg["server.socket_group"] or None
        try:
            security.prepare_runtime_dir(rd, group)
        except (security.SecurityError, OSError) as e:
            raise StartupError(f"server.runtime_dir: {e}") from None
        os.makedirs(cfg["server.state_dir"], mode=0o750, exist_ok=True)
        for ep in [cfg.worker_endpoint, cfg.listen, control_endpoint(rd)]:
            if ep.startswith("ipc://") and len(ep) - 6 > 100:
                raise StartupError(f"ipc socket path {ep[6:]!r} is longer than the 100 characters Unix sockets allow; "
                                   "use a shorter server.runtime_dir")
        curve_secret = None
        if cfg.listen.startswith("tcp://"):
            if cfg["server.curve"]:
                try:
                    _, curve_secret = security.load_or_create_server_keys(
                        cfg["server.curve_keys_dir"] or os.path.join(cfg["server.state_dir"], "curve"))
                    self.auth = security.start_authenticator(self.ctx, cfg["server.curve_clients_dir"])
                except (security.SecurityError, OSError) as e:
                    raise StartupError(f"CURVE for {cfg.listen}: {e}") from None
            else:
                log.warning("listening on %s without CURVE (server.curve = false): anyone who reaches it can use the model",
                            cfg.listen)
        try:
            self.metrics.start(cfg["metrics.address"], cfg["metrics.port"])
        except OSError as e:
            raise StartupError(f"metrics: cannot listen on {cfg['metrics.address']}:{cfg['metrics.port']}: {e}") from None
        try:
            self.dispatcher = Dispatcher(self.ctx, cfg, [cfg.listen], cfg.worker_endpoint, splitter=proportional_split,
                                         observers=[self, self.metrics], curve_secret_file=curve_secret, socket_group=group)
            self.control = ControlServer(self.ctx, control_endpoint(rd), self)
            security.secure_ipc(control_endpoint(rd), group)
        except security.SecurityError as e:
            raise StartupError(str(e)) from None

    def begin(self) -> None:
        if self.cfg["workers.plan"]:
            plan = parse_plan(self.cfg["workers.plan"])
            self.load_profile_quietly()
            try:
                place(plan, self.topology, use_smt=self.cfg["workers.use_smt"])
            except PlacementError as e:
                raise StartupError(f"plan {format_plan(plan)!r} cannot be placed: {e}") from None
            self.start_generation(plan, "workers.plan from the config")
        else:
            self.start_tuner("startup: no plan configured")

    def load_profile_quietly(self) -> None:
        """With a configured plan, use a cached profile (if any) for the per-batch split; never profile."""
        try:
            key, _ = profiler.cache_key(self.cfg, self.topology, self.cfg["model.path"])
            rec = profiler.load_cached(self.cfg, key)
        except (OSError, ValueError):
            rec = None
        if rec is not None:
            self.profile_rec = rec
            self.table = profiler.table_of(rec)
            log.info("using cached profile %s for per-batch splits", key)

    @property
    def T(self) -> int:
        t = self.topo_view()
        return t.n_cores * (max(1, t.smt) if self.cfg["workers.use_smt"] else 1)

    # ---- autotuning ----------------------------------------------------------------------
    def start_tuner(self, reason: str, refresh: bool = False, batch_size: int | None = None) -> None:
        self.tuner = Tuner(self, reason, refresh, batch_size)
        log.info("autotune: %s", reason)
        notify.notify("STATUS=profiling the model")
        self.tuner.start()

    def check_tuner(self) -> None:
        t = self.tuner
        if t is None or t.is_alive():
            return
        self.tuner = None
        if t.error is not None:
            self.history.append({"at": time.time(), "reason": t.reason, "error": f"autotune failed: {t.error}"})
            if self.active is None and not self.stopping:
                raise StartupError(f"autotune failed: {t.error}", EXIT_BOOT)
            log.error("autotune failed (%s); keeping generation %s", t.error, self.active.number if self.active else "-")
            return
        r = t.result
        self.profile_rec = r.profile
        self.table = r.table
        self.autotune_info = {"batch_size": r.batch_size, "candidates": r.candidates,
                              "predicted_ms": r.predicted_ms, "measured_ms": r.measured_ms,
                              "profile_wall_s": r.profile.get("wall_s")}
        plan = [InstanceSpec(tt, b) for tt, b in r.plan.instances]
        log.info("autotune chose %s for batch %d: predicted %.1f ms%s", format_plan(plan), r.batch_size, r.predicted_ms,
                 f", measured {r.measured_ms:.1f} ms" if r.measured_ms is not None else "")
        if self.stopping:
            return
        if self.active is not None and self.same_plan(plan):
            self.history.append({"at": time.time(), "reason": t.reason, "result": "plan unchanged"})
            return
        self.start_generation(plan, t.reason, r.predicted_ms, r.measured_ms)

    def same_plan(self, plan) -> bool:
        a = self.active
        return a is not None and sorted((p.threads, p.batch) for p in a.plan) == sorted((p.threads, p.batch) for p in plan)

    def solve_plan(self, batch_size: int):
        """Best placeable plan for batch_size from the profile: (InstanceSpec list, predicted ms)."""
        sol = solve(self.table, self.T, batch_size, top_k=max(2, self.cfg["autotune.candidates"]))
        plans = profiler.candidate_plans(self.cfg, self.topo_view(), sol)
        if not plans:
            raise ValueError(f"no plan for batch {batch_size} fits the NUMA layout")
        best, ms = profiler.prefer_fat([(p, p.latency_ms) for p in plans], sol.fat, self.cfg["autotune.split_margin"])
        return [InstanceSpec(t, b) for t, b in best.instances], ms

    def predict(self, plan, batch_size: int) -> float | None:
        if self.table is None:
            return None
        try:
            return split_batch(self.table, [p.threads for p in plan], batch_size)[1]
        except ValueError:
            return None

    # ---- generations ---------------------------------------------------------------------
    def start_generation(self, plan, reason: str, predicted: float | None = None, measured: float | None = None) -> Generation | None:
        try:
            placements = place(plan, self.topo_view(), use_smt=self.cfg["workers.use_smt"])
        except PlacementError as e:
            if self.active is None:
                raise StartupError(f"plan {format_plan(plan)!r} cannot be placed: {e}") from None
            log.error("reconfiguration refused: plan %s cannot be placed: %s", format_plan(plan), e)
            self.history.append({"at": time.time(), "reason": reason, "error": f"cannot place {format_plan(plan)}: {e}"})
            return None
        n = max(self.gens, default=0) + 1
        if predicted is None:
            predicted = self.predict(plan, sum(p.batch for p in plan))
        g = Generation(n, list(plan), placements, reason, created=time.monotonic(), plan_text=format_plan(plan),
                       predicted_ms=predicted, measured_ms=measured)
        self.gens[n] = g
        log.info("generation %d: starting plan %s (%s)", n, g.plan_text, reason)
        for i in range(len(placements)):
            self.spawn(g, i)
        return g

    def spawn(self, g: Generation, index: int) -> WorkerHandle:
        pl = g.placements[index]
        slot = self.slots.setdefault((g.number, index), {"restarts": 0, "failures": 0, "next_try": 0.0})
        ident = f"g{g.number}.i{index}.r{slot['restarts']}"
        proc = worker_mod.spawn(self.cfg, self.cfg.worker_endpoint, ident, pl.spec.threads, pl.cpus, pl.spec.batch)
        h = WorkerHandle(ident.encode(), g.number, index, pl.spec.threads, tuple(pl.cpus), pl.spec.batch, proc=proc)
        self.dispatcher.add_worker(h)
        log.info("worker %s started: pid %d, %d thread(s) on cpus %s", ident, proc.pid, h.threads,
                 ",".join(map(str, pl.cpus)))
        return h

    def workers_of(self, g: Generation) -> list[WorkerHandle]:
        return [w for w in self.dispatcher.workers.values() if w.generation == g.number]

    def view(self, g: Generation, now: float) -> GenView:
        ws = self.workers_of(g)
        inflight = sum(1 for b in self.dispatcher.batches.values() if b.generation == g.number)
        return GenView(state=g.state, size=g.size, ready=sum(1 for w in ws if w.state == READY),
                       failed=g.failed_boots, inflight=inflight, age_s=now - g.created)

    def advance_generations(self, now: float) -> None:
        for g in [g for g in self.gens.values() if g.state == STARTING]:
            v = self.view(g, now)
            why = should_abandon(v, self.cfg["workers.boot_timeout_s"])
            if why:
                self.abandon(g, why, now)
            elif may_switch(v):
                self.switch_to(g, now)
        active_view = self.view(self.active, now) if self.active else None
        for g in [g for g in self.gens.values() if g.state == DRAINING]:
            if may_retire(self.view(g, now), active_view):
                self.retire(g, now)

    def switch_to(self, g: Generation, now: float) -> None:
        g.ready_at = now
        g.state = ACTIVE
        g.active_at = now
        old = self.active
        self.active = g
        d = self.dispatcher
        d.active_generation = g.number
        if self.table is not None:
            d.splitter = TableSplitter(self.table, self.cfg["server.max_batch_size"])
        else:
            d.splitter = proportional_split
        if old is not None:
            old.state = DRAINING
            old.retire_at = now
            self.reconfigurations += 1
            self.metrics.on_reconfiguration(now - g.created)
            log.info("generation %d active (plan %s) %.2fs after it was started; generation %d draining",
                     g.number, g.plan_text, now - g.created, old.number)
        self.monitor.note_reconfigured(now)
        if not self.serving:
            d.bind_frontend()
            self.poller.register(d.frontend, zmq.POLLIN)
            self.serving = True
            log.info("serving %s on %s: plan %s (generation %d, %d instance(s)); try: %s -m packratd.client %s",
                     os.path.basename(self.cfg["model.path"]), self.cfg.listen, g.plan_text, g.number, g.size,
                     os.path.basename(sys.executable), self.cfg.listen)
            notify.notify("READY=1\n" + self.status_line())
        else:
            notify.notify(self.status_line())
        # Generations that never served can go now; their workers idle.
        for other in self.gens.values():
            if other.state == STARTING and other.number < g.number:
                self.abandon(other, f"superseded by generation {g.number}", now)

    def stop_workers_of(self, g: Generation, now: float, sig=signal.SIGTERM) -> None:
        for w in self.workers_of(g):
            self.dispatcher.remove_worker(w, "retired")
            w.state = STOPPING
            self.kill(w, sig)
            self.retiring.append((w, g, now + self.cfg["workers.stop_grace_s"]))
        self.respawn = [gi for gi in self.respawn if gi[0] != g.number]

    def retire(self, g: Generation, now: float) -> None:
        g.state = RETIRED
        log.info("generation %d retired (nothing in flight); stopping its %d worker(s)", g.number, g.size)
        self.stop_workers_of(g, now)
        self._finish_if_gone(g, now)

    def abandon(self, g: Generation, why: str, now: float) -> None:
        g.state = FAILED
        g.error = why
        errors = sorted({w.boot_error for w in self.workers_of(g) if w.boot_error} | set(g.boot_errors))
        if errors:
            g.error += ": " + "; ".join(errors)[:500]
        self.stop_workers_of(g, now, signal.SIGKILL)
        self._finish_if_gone(g, now)
        if self.active is None:
            raise StartupError(f"generation {g.number} failed to start: {g.error}", EXIT_BOOT)
        log.error("generation %d abandoned (%s); generation %d keeps serving", g.number, g.error, self.active.number)

    def _finish_if_gone(self, g: Generation, now: float) -> None:
        if g.state not in (RETIRED, FAILED) or any(gg is g for _, gg, _ in self.retiring):
            return
        g.gone_at = now
        if g.state in (RETIRED, FAILED):
            self.history.append({"at": time.time(), **g.timeline()})
            if g.state == RETIRED:
                # the timeline of a switch is the successor's: started -> active (this one draining) -> this one gone
                succ = self.active
                if succ is not None and succ.active_at is not None:
                    self.history[-1]["switch"] = {"to": succ.number, "green_ready_s": round(succ.ready_at - succ.created, 3),
                                                  "blue_gone_s": round(now - succ.created, 3), "reason": succ.reason}

    # ---- workers -------------------------------------------------------------------------
    def reap(self, now: float) -> None:
        still = []
        for w, g, deadline in self.retiring:
            if w.proc.poll() is None:
                if now > deadline:
                    log.warning("worker %s did not stop within %.0fs; SIGKILL", w.name, self.cfg["workers.stop_grace_s"])
                    self.kill(w, signal.SIGKILL)
                    deadline = float("inf")
                still.append((w, g, deadline))
        gone_gens = {id(g): g for _, g, _ in self.retiring}
        self.retiring = still
        for g in gone_gens.values():
            self._finish_if_gone(g, now)
        for h in list(self.dispatcher.workers.values()):
            rc = h.proc.poll()
            if rc is None:
                continue
            was = h.state
            self.dispatcher.remove_worker(h, f"exit {rc}")
            if not self.stopping:
                self.worker_lost(h, was, h.boot_error or f"exit status {rc}", now)

    def worker_lost(self, h: WorkerHandle, was: str, why: str, now: float) -> None:
        """A worker died or was killed: replace it on its cores, with back-off; give up on an instance that keeps failing."""
        g = self.gens[h.generation]
        self.dispatcher.stats.worker_deaths += 1
        slot = self.slots[(h.generation, h.index)]
        if g.state == STARTING:
            g.failed_boots += 1
            g.boot_errors.append(f"{h.name}: {why}")
            log.error("worker %s of starting generation %d failed: %s", h.name, g.number, why)
            return
        if g.state != ACTIVE:
            return
        if was == BOOTING:
            slot["failures"] += 1
            log.error("worker %s failed to boot: %s", h.name, why)
        else:
            slot["failures"] = 0 if now - h.spawned_at > 60 else slot["failures"] + 1
            log.error("worker %s (pid %d) lost (%s); replacing it on cpus %s",
                      h.name, h.proc.pid, why, ",".join(map(str, h.cpus)))
        if slot["failures"] > self.cfg["workers.max_restarts"]:
            self.instance_failed(g, h, slot["failures"], why)
            return
        slot["restarts"] += 1
        slot["next_try"] = now + (min(30.0, 0.5 * 2 ** (slot["failures"] - 1)) if slot["failures"] else 0.0)
        self.respawn.append((h.generation, h.index))

    def instance_failed(self, g: Generation, h: WorkerHandle, failures: int, why: str) -> None:
        """Stop restarting an instance that keeps failing; re-plan over the cores that remain."""
        self.bad_cpus |= set(h.cpus)
        self._topo_view = None
        msg = (f"instance {h.index} of generation {g.number} failed {failures} times in a row ({why}); "
               f"cpus {','.join(map(str, h.cpus))} taken out of service, re-planning over the remaining cores")
        log.error("%s", msg)
        self.history.append({"at": time.time(), "reason": "instance failed", "error": msg})
        self.failed_instances.append({"generation": g.number, "index": h.index, "cpus": list(h.cpus), "why": why})
        keep = [p for i, p in enumerate(g.plan) if i != h.index]
        if not self.topo_view().cores:
            log.error("no usable cores left; serving stops until an operator intervenes")
            return
        if self.table is not None and not self.cfg["workers.plan"]:
            self.request_reconfigure({"reason": "re-plan after instance failure", "force": True})
        elif keep:
            self.request_reconfigure({"plan": format_plan(keep), "reason": "re-plan after instance failure", "force": True})

    def topo_view(self):
        """The topology without CPUs taken out of service."""
        if not self.bad_cpus:
            return self.topology
        if self._topo_view is None:
            allowed = set(self.topology.allowed_cpus) - self.bad_cpus
            try:
                self._topo_view = read_topology(allowed=allowed) if allowed else _EmptyTopology()
            except TopologyError:
                self._topo_view = _EmptyTopology()
        return self._topo_view

    def respawn_due(self, now: float) -> None:
        for gi in list(self.respawn):
            g = self.gens.get(gi[0])
            if g is None or g.state != ACTIVE or self.stopping:
                self.respawn.remove(gi)
            elif self.slots[gi]["next_try"] <= now:
                self.respawn.remove(gi)
                self.spawn(g, gi[1])

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
                log.info("worker %s ready in %.1fs (pid %d, %d threads, cpus %s)", h.name, detail.get("boot_s", 0),
                         detail.get("pid", 0), detail.get("threads", 0), detail.get("cpus"))
            elif kind == "bootfail":
                log.error("worker %s reports boot failure: %s", h.name, detail)
                self.kill(h, signal.SIGKILL)
            elif kind == "silent" and h.identity in d.workers:
                # Stuck (SIGSTOP, a hung kernel, ...): take its slice back now, then SIGTERM, SIGKILL after a grace.
                log.error("worker %s is not answering (%s); re-sending its work and replacing it", h.name, detail)
                d.remove_worker(h, "not answering")
                h.state = STOPPING
                self.kill(h, signal.SIGTERM)
                self.retiring.append((h, self.gens[h.generation], now + min(2.0, self.cfg["workers.stop_grace_s"])))
                if not self.stopping:
                    self.worker_lost(h, READY, "not answering heartbeats", now)
        for h in d.workers.values():
            if h.state == BOOTING and now - h.spawned_at > self.cfg["workers.boot_timeout_s"]:
                h.boot_error = f"not READY after {self.cfg['workers.boot_timeout_s']:.0f}s"
                log.error("worker %s %s; killing it", h.name, h.boot_error)
                self.kill(h, signal.SIGKILL)
                h.spawned_at = now

    # ---- observers (called by the dispatcher) ------------------------------------------------
    def on_batch(self, rows: int, latency_s: float, generation: int) -> None:
        self.monitor.observe(time.monotonic(), rows)

    def on_request(self, latency_s: float) -> None:
        pass

    def on_error(self, code: str) -> None:
        pass

    # ---- reconfiguration -----------------------------------------------------------------
    def busy_reconfiguring(self) -> bool:
        return self.tuner is not None or any(g.state == STARTING for g in self.gens.values())

    def request_reconfigure(self, req: dict) -> bool:
        coalesced = self.reconfig.request(req)
        log.info("reconfiguration requested (%s)%s", req.get("reason"), "; coalesced with a pending one" if coalesced else "")
        return coalesced

    def run_pending_reconfig(self, now: float) -> None:
        if not self.serving or self.stopping:
            return
        req = self.reconfig.take(self.busy_reconfiguring())
        if req is None:
            return
        reason = req.get("reason", "requested")
        try:
            if req.get("plan"):
                plan = parse_plan(req["plan"])
                predicted = None
            elif req.get("refresh_profile") or (self.table is None and not self.cfg["workers.plan"] and req.get("reload")):
                self.start_tuner(reason, refresh=bool(req.get("refresh_profile")), batch_size=req.get("batch_size"))
                return
            elif self.cfg["workers.plan"] and not req.get("batch_size") and not req.get("shape"):
                plan = parse_plan(self.cfg["workers.plan"])
                predicted = None
            elif self.table is None:
                raise ValueError("no profile to solve with; give a plan (--plan) or profile first (packratctl profile --refresh)")
            elif req.get("shape_plan"):
                plan = [InstanceSpec(t, b) for t, b in req["shape_plan"]]
                predicted = req.get("predicted_ms")
            else:
                B = req.get("batch_size") or self.cfg["autotune.batch_size"] or self.cfg["server.max_batch_size"]
                plan, predicted = self.solve_plan(B)
        except ValueError as e:
            log.error("reconfiguration (%s) refused: %s", reason, e)
            self.history.append({"at": time.time(), "reason": reason, "error": str(e)})
            return
        if self.same_plan(plan) and not req.get("force"):
            log.info("reconfiguration (%s): plan %s is already serving", reason, format_plan(plan))
            self.history.append({"at": time.time(), "reason": reason, "result": f"plan {format_plan(plan)} already serving"})
            self.monitor.note_reconfigured(now)
            return
        self.start_generation(plan, reason, predicted)

    def check_monitor(self, now: float) -> None:
        if now < self.next_monitor:
            return
        self.next_monitor = now + self.cfg["monitor.interval_s"]
        if (not self.cfg["monitor.enabled"] or self.cfg["workers.plan"] or self.table is None or self.active is None
                or self.busy_reconfiguring() or self.reconfig.pending is not None):
            return
        d = self.monitor.evaluate(now, self.table, self.T, tuple(p.threads for p in self.active.plan))
        if d.reconfigure:
            fits = profiler.placeable(self.cfg, self.topo_view(), [_PlanShim(d.plan)])
            if not fits:
                log.info("monitor: recommended %s does not fit the NUMA layout; ignoring", d.plan)
                return
            self.request_reconfigure({"shape_plan": d.plan, "predicted_ms": d.best_ms, "reason": "monitor: " + d.reason})

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
        self.stop_deadline = time.monotonic() + self.cfg["workers.stop_grace_s"]
        if self.tuner is not None:
            self.tuner.cancel.set()

    def handle_hup(self) -> None:
        self.reload("SIGHUP")

    def reload(self, why: str) -> dict:
        # RELOADING=1/READY=1 only once serving: a READY=1 during start-up would tell systemd we serve.
        if self.serving:
            notify.notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
        try:
            new = config_mod.load(self.config_path, self.overrides)
        except config_mod.ConfigError as e:
            log.error("%s: config not reloaded, keeping the running one: %s", why, e)
            if self.serving:
                notify.notify("READY=1")
            return {"reloaded": False, "error": str(e)}
        kept = [k for k in RESTART_ONLY if new[k] != self.cfg[k]]
        if kept:
            log.warning("%s: %s change only on restart; keeping the running values", why, ", ".join(kept))
            new = new.replace(**{k: self.cfg[k] for k in kept})
        model_changed = new["model.path"] != self.cfg["model.path"]
        if self.auth is not None:          # pick up added / removed client keys
            self.auth.configure_curve(domain="*", location=new["server.curve_clients_dir"])
        self.cfg = new
        d = self.dispatcher
        d.cfg = new
        d.max_batch = new["server.max_batch_size"]
        d.max_delay = new["server.max_delay_ms"] / 1000.0
        d.max_queue_rows = new["server.max_queue_rows"]
        self.monitor = self._make_monitor()
        if model_changed:
            self.table = None
            d.spec = None if self.active is None else d.spec
        log.info("%s: config reloaded from %s; re-solving", why, self.config_path or "<defaults>")
        self.request_reconfigure({"reason": why + ": config reloaded", "reload": True, "force": model_changed})
        if self.serving:
            notify.notify("READY=1\n" + self.status_line())
        return {"reloaded": True, "restart_only_kept": kept}

    def handle_chld(self) -> None:
        pass   # reaping happens every loop iteration

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
            self.poller = zmq.Poller()
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

    def loop(self, rfd) -> int:
        d = self.dispatcher
        poller = self.poller
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
            self.check_tuner()
            self.advance_generations(now)
            self.check_monitor(now)
            self.run_pending_reconfig(now)
            timeout = d.tick(now)
            self.housekeeping(now)
            if self.stopping:
                done = None
                if self.force:
                    done = "packratd was stopped before this request could finish"
                elif d.idle() and self.tuner is None:
                    log.info("drained; stopping workers")
                    done = ""
                elif now > self.stop_deadline:
                    log.warning("drain grace (%.0fs) expired; failing what is left", self.cfg["workers.stop_grace_s"])
                    done = "packratd stopped before this request could finish"
                if done is not None:
                    if d.frontend is not None:
                        d.on_frontend()      # requests already on the socket get DRAINING, not silence
                    if done:
                        d.fail_all("DRAINING", done)
                    return EXIT_OK
                timeout = min(timeout, 0.05)
            timeout = min(timeout, 0.2)

    def housekeeping(self, now: float) -> None:
        if self.watchdog and now >= self.next_watchdog:
            notify.notify("WATCHDOG=1")
            self.next_watchdog = now + self.watchdog
        if now >= self.next_status:
            if self.serving:
                notify.notify(self.status_line())
            elif self.tuner is not None:
                # First-start profiling can take minutes: say how far it is and keep systemd's start timeout ahead.
                p = self.tuner.progress.snapshot()
                notify.notify(f"STATUS=autotuning: {p['state']} {p['progress']}\nEXTEND_TIMEOUT_USEC={int(120e6)}")
            self.next_status = now + 5.0
        if self.metrics.port and now >= self.next_metrics:
            self.metrics.update(self.cmd_status())
            self.next_metrics = now + 1.0

    def status_line(self) -> str:
        a = self.active
        st = self.dispatcher.stats if self.dispatcher else None
        if a is None:
            return "STATUS=starting"
        return (f"STATUS=serving plan {a.plan_text} (generation {a.number}), {st.requests} requests served"
                + (", stopping" if self.stopping else ""))

    def shutdown(self) -> None:
        """SIGTERM every worker (SIGKILL when forced), wait up to stop_grace_s, then SIGKILL what is left."""
        if self.tuner is not None:
            self.tuner.cancel.set()
            self.tuner.join(timeout=self.cfg["workers.stop_grace_s"] + 5)
        hs = [w for w, _, _ in self.retiring]
        if self.dispatcher is not None:
            hs += list(self.dispatcher.workers.values())
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
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self.control is not None:
            self.control.close()
        self.metrics.stop()
        if self.auth is not None:
            self.auth.stop()               # its sockets live in self.ctx: stop it before term()
        self.ctx.term()
        for ep in (self.cfg.listen, self.cfg.worker_endpoint):
            security.remove_ipc(ep)

    # ---- control commands (packratctl) -------------------------------------------------------
    def cmd_status(self) -> dict:
        d = self.dispatcher
        now = time.monotonic()
        st = d.stats
        workers = [{"name": w.name, "generation": w.generation, "index": w.index, "state": w.state,
                    "pid": w.proc.pid, "threads": w.threads, "cpus": list(w.cpus), "share": w.share,
                    "torch_threads": w.info.get("threads"), "busy_s": round(w.busy_s, 3), "compute_s": round(w.compute_s, 3), "tasks": w.tasks_done}
                   for w in sorted(d.workers.values(), key=lambda w: (w.generation, w.index))]
        a = self.active
        prof = {"state": "none"}
        if self.tuner is not None:
            prof = self.tuner.progress.snapshot()
        elif self.profile_rec is not None:
            prof = {"state": "ready", "key": self.profile_rec.get("key"),
                    "age_s": time.time() - self.profile_rec.get("created", time.time()),
                    "wall_s": self.profile_rec.get("wall_s")}
        hist = self.monitor.histogram(now)
        return {
            "version": __version__, "pid": os.getpid(), "uptime_s": now - self.started,
            "state": "stopping" if self.stopping else ("serving" if self.serving else
                                                       ("profiling" if self.tuner is not None else "starting")),
            "model": self.cfg["model.path"], "listen": self.cfg.listen,
            "topology": self.topology.to_dict() if self.topology else None,
            "plan": a.plan_text if a else None, "generation": max(self.gens, default=0),
            "active_generation": a.number if a else None,
            "generations": [g.timeline() for g in self.gens.values() if g.state in (STARTING, ACTIVE, DRAINING)],
            "instances": [{"index": p.index, "threads": p.spec.threads, "batch_share": p.spec.batch, "cpus": list(p.cpus),
                           "node": p.node} for p in (a.placements if a else [])],
            "predicted_ms": a.predicted_ms if a else None, "measured_ms": a.measured_ms if a else None,
            "autotune": self.autotune_info, "profile": prof,
            "workers": workers, "queue_rows": d.queued_rows, "inflight_batches": len(d.batches),
            "requests": st.requests, "rows": st.rows, "batches": st.batches, "errors": dict(st.errors),
            "request_rate": st.requests / max(1e-9, now - st.started),
            "worker_deaths": st.worker_deaths, "slices_resent": st.slices_resent,
            "failed_instances": self.failed_instances, "cpus_out_of_service": sorted(self.bad_cpus),
            "latency_ms": st.percentiles(), "spec": d.spec, "max_batch_size": d.max_batch,
            "batch_histogram": {str(k): v for k, v in sorted(hist.items())},
            "monitor": self.monitor.last.to_dict() if self.monitor.last else None,
            "reconfigurations": self.reconfigurations, "reconfig_coalesced": self.reconfig.coalesced,
            "reconfig_pending": self.reconfig.pending is not None,
            "last_reconfiguration": self.history[-1] if self.history else None,
            "history": list(self.history),
        }

    def cmd_reconfigure(self, batch_size: int | None = None, plan: str | None = None) -> dict:
        if plan:
            parse_plan(plan)   # ValueError -> error reply
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError("batch_size must be a positive integer")
        coalesced = self.request_reconfigure({"plan": plan, "batch_size": batch_size, "force": bool(plan or batch_size),
                                              "reason": "packratctl reconfigure" + (f" --plan {plan}" if plan else "")
                                              + (f" --batch-size {batch_size}" if batch_size else "")})
        return {"queued": True, "coalesced": coalesced}

    def cmd_reload(self) -> dict:
        return self.reload("packratctl reload")

    def cmd_plan(self, batch_size: int) -> dict:
        if self.table is None:
            raise ValueError("no profile yet; run packratctl profile --refresh or wait for profiling to finish")
        sol = solve(self.table, self.T, int(batch_size), top_k=4)
        return {"batch_size": batch_size, "best": str(sol.best), "best_instances": [list(i) for i in sol.best.instances],
                "predicted_ms": sol.best.latency_ms, "runners_up": [str(p) for p in sol.runners_up]}

    def cmd_profile(self, refresh: bool = False) -> dict:
        if refresh:
            if self.busy_reconfiguring():
                raise ValueError("a reconfiguration or profile is already in progress")
            self.request_reconfigure({"refresh_profile": True, "reason": "packratctl profile --refresh"})
            return {"queued": True}
        if self.profile_rec is None:
            raise ValueError("no profile (a configured plan without a cached profile, or profiling not finished)")
        r = self.profile_rec
        return {"key": r["key"], "created": r["created"], "wall_s": r.get("wall_s"), "threads": r["threads"],
                "batches": r["batches"], "lat_ms": r["lat_ms"], "p10_ms": r.get("p10_ms"), "p90_ms": r.get("p90_ms")}

    def cmd_drain(self) -> dict:
        if not self.stopping:
            self.begin_stop("packratctl drain")
        return {"draining": True}


class _EmptyTopology:
    cores = ()
    n_cores = 0
    smt = 1


class _PlanShim:
    def __init__(self, plan):
        self.instances = tuple((t, b) for t, b in plan)


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
    return Daemon(cfg, config_path=args.config, overrides=overrides).run()


if __name__ == "__main__":
    sys.exit(main())

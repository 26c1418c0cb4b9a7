"""Prometheus metrics for packratd.

One :class:`Metrics` object per daemon, with its own :class:`~prometheus_client.CollectorRegistry`
(never the process-global one, so tests and several daemons in one process do not collide).  It is
fed three ways, all from the daemon's main thread:

* as a dispatcher *observer*: ``on_batch(rows, latency_s, generation)``, ``on_request(latency_s)`` and
  ``on_error(code)`` are called for every batch, answered request and error reply (histograms and
  counters that must see every event);
* ``update(status)`` about once a second with the dict ``Daemon.cmd_status()`` returns (queue depth,
  in-flight batches, plan, generations, per-worker busy time, profile age, ...).  The snapshot is
  rendered at scrape time by a custom collector, so series of workers and plans that are gone
  disappear instead of lingering with stale values;
* ``on_reconfiguration(duration_s)`` when a new generation takes over (duration: from starting the new
  generation to it receiving batches).

``start(addr, port)`` serves HTTP from a daemon thread (a small WSGI router in front of prometheus_client's
``make_wsgi_app``; port 0 means disabled): ``/metrics`` the text exposition, ``/healthz`` and ``/readyz``
for probes (200 or 503), any other path 404.  Live means the main loop pushed a status snapshot less than
``live_timeout_s`` ago (it pushes one about every second, so the default of 5 s allows for a few slow
passes on a loaded host); ready means live and the snapshot's state is ``serving``.  Until the first
snapshot, the start of serving counts as one.  The scrape thread only reads prometheus_client's
thread-safe metrics and the last status snapshot; it never touches daemon state.

Exposed (all prefixed ``packratd_``):

===========================================  =========  =================================================
request_duration_seconds                     histogram  arrival to answer, successful requests
batch_duration_seconds                       histogram  batch dispatched to all slices back
batch_size_rows                              histogram  rows per batch (buckets 1..1024, powers of two)
requests_total / rows_total                  counter    requests answered OK / rows computed
errors_total{code}                           counter    error replies by protocol code
queue_rows, inflight_batches                 gauge      from status
worker_busy_seconds_total{worker,...}        counter    time each worker spent computing slices
worker_tasks_total{worker,...}               counter    slices each worker completed
workers{state}                               gauge      workers by state (booting, ready, stopping)
plan_info{plan,generation}                   gauge      1 for the active plan
runtime_info{runtime}                        gauge      1 for the runtime the active generation uses
runtime_available{runtime}                   gauge      1 / 0: could the runtime take the model
runtime_build_seconds{runtime}               gauge      compile/convert time of its cached artifact
runtime_latency_seconds{runtime,batch}       gauge      measured latency when the runtimes were compared
generation / active_generation               gauge      newest generation number / the serving one
reconfigurations_total                       counter    generations that replaced a serving one
reconfiguration_duration_seconds             histogram  start of the new generation to its first batch
profile_age_seconds                          gauge      age of the cost profile in use (absent: none)
plan_predicted_latency_seconds               gauge      solver's prediction for the active plan
plan_measured_latency_seconds                gauge      autotuner's measurement of the active plan
worker_deaths_total, worker_restarts_total   counter    unexpected worker exits / replacements started
slices_resent_total                          counter    slices re-sent after their worker died
state{state}                                 gauge      1 for the daemon's state (starting ... stopping)
up, build_info{version,...}, start_time_seconds
===========================================  =========  =================================================
"""
from __future__ import annotations

import logging
import math
import platform
import socket
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import __version__
from . import protocol as P

log = logging.getLogger("packratd.metrics")

# Sub-millisecond to tens of seconds: CPU inference of small models is ~0.1-10 ms, big ones seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RECONFIG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STATES = ("starting", "profiling", "checking", "serving", "failed", "stopping")
WORKER_STATES = ("booting", "ready", "stopping", "lost")



class _StatusCollector(Collector):
    """Renders the last status snapshot at scrape time."""

    def __init__(self, owner: "Metrics"):
        self.m = owner

    def describe(self):
        return []     # families vary with the snapshot; do not let the registry call collect() at register time

    def collect(self):
        st = self.m._snapshot()
        if st is None:
            return
        pre = self.m.prefix

        fam = GaugeMetricFamily(f"{pre}_queue_rows", "Rows waiting in the queue for a batch.")
        fam.add_metric([], _num(st.get("queue_rows"), 0))
        yield fam
        fam = GaugeMetricFamily(f"{pre}_inflight_batches", "Batches sent to workers and not yet complete.")
        fam.add_metric([], _num(st.get("inflight_batches"), 0))
        yield fam

        state = st.get("state")
        fam = GaugeMetricFamily(f"{pre}_state", "1 for the daemon's current state.", labels=["state"])
        for s in STATES:
            fam.add_metric([s], 1.0 if s == state else 0.0)
        yield fam

        workers = st.get("workers") or []
        labels = ["worker", "generation", "instance", "threads"]
        busy = CounterMetricFamily(f"{pre}_worker_busy_seconds", "Seconds each worker spent computing slices.", labels=labels)
        tasks = CounterMetricFamily(f"{pre}_worker_tasks", "Slices each worker completed.", labels=labels)
        by_state = {s: 0 for s in WORKER_STATES}
        for w in workers:
            lv = [str(w.get("name", "")), str(w.get("generation", "")), str(w.get("index", "")), str(w.get("threads", ""))]
            busy.add_metric(lv, _num(w.get("busy_s"), 0))
            tasks.add_metric(lv, _num(w.get("tasks"), 0))
            s = w.get("state")
            by_state[s] = by_state.get(s, 0) + 1
        yield busy
        yield tasks
        fam = GaugeMetricFamily(f"{pre}_workers", "Worker processes by state (all generations).", labels=["state"])
        for s, n in by_state.items():
            fam.add_metric([str(s)], n)
        yield fam

        fam = GaugeMetricFamily(f"{pre}_plan_info", "1 for the plan the active generation serves.",
                                labels=["plan", "generation"])
        if st.get("plan") is not None and st.get("active_generation") is not None:
            fam.add_metric([str(st["plan"]), str(st["active_generation"])], 1.0)
        yield fam
        rts = st.get("runtimes") or {}
        fam = GaugeMetricFamily(f"{pre}_runtime_info", "1 for the runtime the active generation runs the model on.",
                                labels=["runtime"])
        if st.get("runtime"):
            fam.add_metric([str(st["runtime"])], 1.0)
        yield fam
        fam = GaugeMetricFamily(f"{pre}_runtime_available", "1 if the runtime could take the model (checked against "
                                "eager), 0 if it was skipped (status says why).", labels=["runtime"])
        for name, i in rts.items():
            fam.add_metric([str(name)], 1.0 if i.get("available") else 0.0)
        yield fam
        fam = GaugeMetricFamily(f"{pre}_runtime_build_seconds", "Compile/convert time of the runtime's cached artifact.",
                                labels=["runtime"])
        for name, i in rts.items():
            if i.get("build_s") is not None:
                fam.add_metric([str(name)], _num(i["build_s"], 0))
        yield fam
        fam = GaugeMetricFamily(f"{pre}_runtime_latency_seconds", "The runtime's measured batch latency when runtimes "
                                "were compared (one instance, every core of a node).", labels=["runtime", "batch"])
        for name, i in rts.items():
            for b, ms in (i.get("ms") or {}).items():
                fam.add_metric([str(name), str(b)], _num(ms, 0) / 1000.0)
        yield fam
        fam = GaugeMetricFamily(f"{pre}_instances", "Instances in the active plan.")
        fam.add_metric([], len(st.get("instances") or []))
        yield fam
        fam = GaugeMetricFamily(f"{pre}_generation", "Newest worker generation number (0: none started).")
        fam.add_metric([], _num(st.get("generation"), 0))
        yield fam
        if st.get("active_generation") is not None:
            fam = GaugeMetricFamily(f"{pre}_active_generation", "Generation receiving new batches.")
            fam.add_metric([], float(st["active_generation"]))
            yield fam
        gens = st.get("generations") or []
        fam = GaugeMetricFamily(f"{pre}_generations", "Live generations by state.", labels=["state"])
        for s in ("starting", "active", "draining"):
            fam.add_metric([s], sum(1 for g in gens if g.get("state") == s))
        yield fam

        for key, name, doc in (("predicted_ms", "plan_predicted_latency_seconds",
                                "Batch latency the solver predicts for the active plan at its batch size."),
                               ("measured_ms", "plan_measured_latency_seconds",
                                "Batch latency the autotuner measured for the active plan (concurrent run).")):
            v = st.get(key)
            if v is not None:
                fam = GaugeMetricFamily(f"{pre}_{name}", doc)
                fam.add_metric([], float(v) / 1000.0)
                yield fam
        prof = st.get("profile") or {}
        if prof.get("age_s") is not None:
            fam = GaugeMetricFamily(f"{pre}_profile_age_seconds", "Age of the cost profile used for plans and splits.")
            fam.add_metric([], float(prof["age_s"]))
            yield fam
        fam = GaugeMetricFamily(f"{pre}_profiling", "1 while the autotuner is profiling or measuring plans.")
        fam.add_metric([], 1.0 if prof.get("state") not in (None, "none", "ready", "failed") else 0.0)
        yield fam
        if st.get("max_batch_size") is not None:
            fam = GaugeMetricFamily(f"{pre}_max_batch_size_rows", "server.max_batch_size in effect.")
            fam.add_metric([], float(st["max_batch_size"]))
            yield fam

        for key, name, doc in (("worker_deaths", "worker_deaths", "Workers that exited unexpectedly."),
                               ("slices_resent", "slices_resent", "Slices re-sent to another worker after theirs died.")):
            fam = CounterMetricFamily(f"{pre}_{name}", doc)
            fam.add_metric([], _num(st.get(key), 0))
            yield fam
        fam = CounterMetricFamily(f"{pre}_worker_restarts", "Replacement workers started for instances whose worker died.")
        fam.add_metric([], _num(st.get("worker_restarts"), 0))
        yield fam
        if st.get("uptime_s") is not None:
            fam = GaugeMetricFamily(f"{pre}_uptime_seconds", "Seconds since the daemon started.")
            fam.add_metric([], float(st["uptime_s"]))
            yield fam


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):     # no access log on stderr for every scrape and probe
        pass


def _num(v, default: float) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float(default)
    return f if math.isfinite(f) else float(default)


class Metrics:
    """packratd's metrics: a dispatcher observer plus a status-snapshot collector, served over HTTP."""

    def __init__(self, prefix: str = "packratd"):
        self.prefix = prefix
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._lock = threading.Lock()
        self._status: dict | None = None
        self._server = None
        self._thread = None
        self.port: int | None = None
        self.live_timeout_s = 5.0          # /healthz: the main loop pushed a snapshot this recently
        self._updated_at: float | None = None

        self.request_duration = Histogram(f"{prefix}_request_duration_seconds",
                                          "Time from a request's arrival to its answer (successful requests).",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.batch_duration = Histogram(f"{prefix}_batch_duration_seconds",
                                        "Time from a batch's dispatch to its last slice coming back.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{prefix}_batch_size_rows", "Rows in each completed batch.",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.requests = Counter(f"{prefix}_requests", "Requests answered successfully.", registry=r)
        self.rows = Counter(f"{prefix}_rows", "Rows computed in completed batches.", registry=r)
        self.errors = Counter(f"{prefix}_errors", "Error replies sent to clients, by protocol error code.",
                              ["code"], registry=r)
        for code in P.ERROR_CODES:          # zero series from the start, so rate() works before the first error
            self.errors.labels(code)
        self.reconfigurations = Counter(f"{prefix}_reconfigurations",
                                        "Reconfigurations completed: a new generation replaced the serving one.", registry=r)
        self.reconfiguration_duration = Histogram(f"{prefix}_reconfiguration_duration_seconds",
                                                  "From starting a new generation to it receiving batches.",
                                                  buckets=RECONFIG_BUCKETS, registry=r)
        self._reconfig_count = 0
        self.up = Gauge(f"{prefix}_up", "1 while the daemon runs.", registry=r)
        self.up.set(1)
        self.start_time = Gauge(f"{prefix}_start_time_seconds", "Unix time the daemon started.", registry=r)
        self.start_time.set(time.time())
        build = Gauge(f"{prefix}_build_info", "packratd build: 1, with versions as labels.",
                      ["version", "python", "pyzmq", "libzmq"], registry=r)
        build.labels(__version__, platform.python_version(), zmq.__version__, zmq.zmq_version()).set(1)
        r.register(_StatusCollector(self))

    # ---- observers (called by the dispatcher on the main thread) ---------------------------
    def on_batch(self, rows: int, latency_s: float, generation: int) -> None:
        self.batch_duration.observe(latency_s)
        self.batch_size.observe(rows)
        self.rows.inc(rows)

    def on_request(self, latency_s: float) -> None:
        self.request_duration.observe(latency_s)
        self.requests.inc()

    def on_error(self, code: str) -> None:
        self.errors.labels(str(code)).inc()

    def on_reconfiguration(self, duration_s: float) -> None:
        with self._lock:
            self._reconfig_count += 1
        self.reconfigurations.inc()
        self.reconfiguration_duration.observe(max(0.0, duration_s))

    # ---- status snapshot (about once a second) ---------------------------------------------
    def update(self, status: dict) -> None:
        """Take the dict Daemon.cmd_status() returns; gauges are rendered from it at scrape time."""
        with self._lock:
            self._status = status
            self._updated_at = time.monotonic()
            # Reconfigurations the daemon counted that on_reconfiguration() did not see (not wired, or
            # counted before the metrics existed): keep the counter in step with the status.
            behind = int(_num(status.get("reconfigurations"), 0)) - self._reconfig_count
            if behind > 0:
                self._reconfig_count += behind
        if behind > 0:
            self.reconfigurations.inc(behind)

    def _snapshot(self) -> dict | None:
        with self._lock:
            return self._status

    def health(self) -> tuple[bool, bool, str]:
        """(live, ready, why) from the last status snapshot and its age."""
        with self._lock:
            st, at = self._status, self._updated_at
        age = time.monotonic() - at if at is not None else None
        if age is None or age > self.live_timeout_s:
            why = "no status update yet" if age is None else f"no status update for {age:.1f}s"
            return False, False, f"not live: {why} (the main loop is not turning)"
        state = (st or {}).get("state") if st is not None else "starting"
        if state != "serving":
            return True, False, f"not ready: {state or 'unknown'}"
        return True, True, "ready"

    # ---- HTTP --------------------------------------------------------------------------------
    def start(self, addr: str = "127.0.0.1", port: int = 0) -> int | None:
        """Serve /metrics, /healthz and /readyz on addr:port (config semantics: port 0 = disabled, returns None).

        Returns the bound port.  Raises OSError when the address cannot be bound."""
        if not port:
            return None
        return self.serve(addr, port)

    def serve(self, addr: str, port: int) -> int:
        """Serve /metrics, /healthz and /readyz on addr:port; port 0 binds an ephemeral port (tests).  Returns the bound port."""
        if self._server is not None:
            raise RuntimeError(f"metrics already served on port {self.port}")
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        with self._lock:
            if self._updated_at is None:
                self._updated_at = time.monotonic()      # the grace before the first snapshot
        self._server = make_server(addr, port, self._wsgi(), server_class, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", addr if ":" not in addr else f"[{addr}]", self.port)
        return self.port

    def _wsgi(self):
        metrics_app = make_wsgi_app(self.registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics_app(environ, start_response)
            if path in ("/healthz", "/readyz"):
                if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
                    start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")])
                    return [b"use GET\n"]
                live, ready, why = self.health()
                ok = live if path == "/healthz" else ready
                text = ("ok" if path == "/healthz" else "ready") if ok else why
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
                return [text.encode() + b"\n"]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: this server has /metrics, /healthz and /readyz\n"]
        return app

    def stop(self) -> None:
        self.up.set(0)
        srv, self._server = self._server, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
        self._thread = None
        self.port = None

    def render(self) -> bytes:
        """The text exposition, without HTTP (debugging, tests)."""
        from prometheus_client import generate_latest
        return generate_latest(self.registry)

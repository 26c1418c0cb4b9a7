"""The dispatcher: clients in, batches out to pinned workers, answers back.

Two ROUTER sockets: the frontend for clients (DEALER or REQ) and the backend for workers.  Each
worker has two identities on the backend: ``<name>`` for work (READY, WORK, RESULT, ERROR,
BOOTFAIL) and ``<name>!hb`` for heartbeats, both ways (packratd.messages).

Batching is work-conserving: when the active generation's instances are idle, whatever is queued
is dispatched at once (up to ``max_batch_size`` rows); requests that arrive while they are busy
form the next batch.  ``max_delay_ms`` > 0 makes a batch wait up to that long for company instead
(more throughput, more latency).  The batch is split across the generation's ready instances
(planner.Splitter), each slice is sent to its worker as zero-copy segments of the clients' own
buffers, and when every slice is back each client gets exactly its own rows.  Results are checked
against the output spec recorded when the first worker booted (count, dtype, rows, row shape); a
batch whose result does not match fails with MODEL_ERROR and is counted.

What a client can hold is bounded: frames per message and bytes per message (a message is
refused before it is parsed), rows and bytes waiting in the queue, requests queued or running per
connection, replies queued per connection (the send high-water mark).  A retried request (same id,
same inputs) that arrives while the original is still queued or running is attached to it and
answered once, not run twice.

All methods run on the daemon's single main thread; nothing here blocks.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import zmq

from . import messages as M
from . import protocol as P
from . import security
from .planner import proportional_split
from .worker import HB_SUFFIX

log = logging.getLogger("packratd.dispatcher")

BOOTING, READY, STOPPING, LOST = "booting", "ready", "stopping", "lost"
TRIM_AFTER_BYTES = 64 << 20


def release_memory() -> None:
    """glibc keeps freed heap pages (libzmq's frames are malloc'd); malloc_trim(0) returns them, holes included."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
STARTING, SERVING, FAILED, DRAINING = "starting", "serving", "failed", "draining"


@dataclass(eq=False)
class WorkerHandle:
    identity: bytes
    generation: int
    index: int                      # the instance's index within its generation's plan
    threads: int
    cpus: tuple[int, ...]
    share: int                      # planned batch share
    digest: str = ""                # the generation's model digest
    hb_limit: float = 5.0           # silent this long: stuck (its heartbeat settings when it was started)
    proc: object = None             # the process, owned by the supervisor
    state: str = BOOTING
    task: "Slice | None" = None
    spawned_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    info: dict = field(default_factory=dict)   # the READY message
    busy_s: float = 0.0             # from sending a slice to its result arriving
    compute_s: float = 0.0          # the worker's own model time for those slices
    tasks_done: int = 0
    boot_error: str | None = None

    @property
    def name(self) -> str:
        return self.identity.decode()


@dataclass(eq=False)
class Pending:
    sock: object                    # the frontend socket it came in on
    envelope: list                  # routing frames to answer on
    id: str
    metas: list
    buffers: list                   # memoryviews of the request's tensors
    keep: list                      # the zmq frames behind the buffers
    rows: int
    nbytes: int
    t_arrival: float
    deadline: float | None
    isolate: bool = False           # run alone (after its batch failed on the model)
    extra: list = field(default_factory=list)   # (socket, envelope) of retries attached to this request
    trace: dict | None = None


@dataclass(eq=False)
class Slice:
    task: int
    batch: "Batch"
    start: int
    rows: int
    frames: list                    # the WORK message, kept so the slice can be re-sent
    worker: WorkerHandle | None = None
    result: list | None = None
    keep: list | None = None
    sent_at: float = 0.0
    resends: int = 0
    killed: list = field(default_factory=list)   # (generation, index) of workers that died holding it
    trace: dict | None = None


@dataclass(eq=False)
class Batch:
    id: int
    generation: int
    digest: str
    requests: list
    offsets: list
    rows: int
    slices: list
    remaining: int
    t_start: float
    failed: str | None = None
    failed_code: str = P.MODEL_ERROR


class Stats:
    """Counters and recent latencies the status command and metrics read."""

    def __init__(self, window: int = 2048):
        self.requests = 0
        self.rows = 0
        self.batches = 0
        self.errors = collections.Counter()
        self.latencies_ms = collections.deque(maxlen=window)
        self.worker_deaths = 0
        self.slices_resent = 0
        self.result_mismatches = 0
        self.deduplicated = 0
        self.started = time.monotonic()

    def percentiles(self) -> dict:
        if not self.latencies_ms:
            return {}
        a = np.fromiter(self.latencies_ms, float)
        return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


def _same_payload(a: Pending, metas: list, buffers: list) -> bool:
    if a.metas != metas or len(a.buffers) != len(buffers):
        return False
    return all(x.nbytes == y.nbytes and (x.nbytes == 0 or np.array_equal(np.frombuffer(x, np.uint8), np.frombuffer(y, np.uint8)))
               for x, y in zip(a.buffers, buffers))


class Dispatcher:
    def __init__(self, ctx: zmq.Context, cfg, listeners: list[str], worker_endpoint: str,
                 observers: Sequence = (), curve_secret_file: str | None = None, socket_group: str | None = None,
                 health: Callable[[], dict] | None = None, private_listeners: Sequence[str] = ()):
        self.ctx = ctx
        self.listeners = listeners
        self.private_listeners = list(private_listeners)   # owner-only ipc endpoints without CURVE (the OIP gateway)
        self.worker_endpoint = worker_endpoint
        self.splitter: Callable[[int, Sequence[WorkerHandle]], list[int]] = proportional_split
        self.observers = list(observers)   # objects with on_batch(rows, latency_s, generation) etc. (metrics, monitor)
        self.curve_secret_file = curve_secret_file   # CURVE server key for tcp:// listeners (None: plain)
        self.socket_group = socket_group
        self.health = health or (lambda: {"live": True, "ready": self.state == SERVING, "state": self.state})
        self.configure(cfg)
        self.max_bytes = cfg["server.max_message_bytes"]
        self.client_hwm = cfg["server.client_hwm"]

        self.backend = ctx.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.bind(worker_endpoint)       # the process umask (0077) creates it 0600: only packratd's uid
        security.secure_ipc(worker_endpoint, None, mode=0o600)
        self.frontend = None
        self.frontends: list = []

        self.workers: dict[bytes, WorkerHandle] = {}
        self.active_generation = 0
        self.state = STARTING
        self.state_message = "packratd is starting"
        self.spec: list[dict] | None = None
        self.output_spec: list[dict] | None = None
        self.queue: collections.deque[Pending] = collections.deque()
        self.queued_rows = 0
        self.queued_bytes = 0
        self.per_peer: collections.Counter = collections.Counter()
        self.by_id: dict[str, Pending] = {}
        self.batches: dict[int, Batch] = {}
        self.tasks: dict[int, Slice] = {}
        self.orphans: collections.deque[Slice] = collections.deque()
        self.next_batch = 1
        self.next_task = 1
        self.next_hb = 0.0
        self.draining = False
        self.stats = Stats()
        self.events: list[tuple] = []    # (kind, handle, detail) for the daemon: ready, bootfail, silent, unreachable, poison

    def configure(self, cfg) -> None:
        """Take the limits and heartbeat settings from the config (at start and on reload)."""
        self.cfg = cfg
        self.max_batch = cfg["server.max_batch_size"]
        self.max_delay = cfg["server.max_delay_ms"] / 1000.0
        self.max_queue_rows = cfg["server.max_queue_rows"]
        self.max_queue_bytes = cfg["server.max_queue_bytes"]
        self.max_per_peer = cfg["server.max_requests_per_client"]
        self.hb_interval = cfg["workers.heartbeat_interval_s"]

    # ---- sockets -------------------------------------------------------------------------
    def _client_socket(self):
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)
        s.setsockopt(zmq.ROUTER_MANDATORY, 0)      # a reply to a peer that is gone (or over its HWM) is dropped
        s.setsockopt(zmq.SNDHWM, self.client_hwm)  # replies queued per connection
        s.setsockopt(zmq.RCVHWM, self.client_hwm)  # unread requests per connection: then TCP/ipc back-pressure
        return s

    def bind_frontend(self) -> None:
        s = self._client_socket()
        if self.curve_secret_file and any(ep.startswith("tcp://") for ep in self.listeners):
            security.make_curve_server(s, self.curve_secret_file)   # before bind; applies to every endpoint of s
        for ep in self.listeners:
            s.bind(ep)
            security.secure_ipc(ep, self.socket_group)
        self.frontend = s
        self.frontends = [s]
        if self.private_listeners:
            p = self._client_socket()
            for ep in self.private_listeners:
                p.bind(ep)                         # created 0600 under the daemon's umask
                security.secure_ipc(ep, None, mode=0o600)
            self.frontends.append(p)

    def close(self) -> None:
        for s in self.frontends + [self.backend]:
            if s is not None:
                s.close(linger=0)

    def set_state(self, state: str, message: str) -> None:
        """starting | serving | failed | draining: what an infer request gets when there is no serving."""
        self.state, self.state_message = state, message
        if state == FAILED:
            self.fail_all(P.UNAVAILABLE, message)

    # ---- workers -------------------------------------------------------------------------
    def add_worker(self, h: WorkerHandle) -> None:
        self.workers[h.identity] = h

    def remove_worker(self, h: WorkerHandle, reason: str) -> list:
        """The worker is gone (exited, stuck or unreachable): its slice goes to another instance.

        Returns the (generation, index) of every worker that died holding a slice now declared poison
        (three deaths on the same rows: the data is to blame, not the workers), else []."""
        if self.workers.get(h.identity) is h:
            del self.workers[h.identity]
        if h.task is not None:
            sl = h.task
            h.task = None
            sl.worker = None
            if sl.task not in self.tasks:
                return []
            sl.killed.append((h.generation, h.index))
            if sl.resends >= 2:
                del self.tasks[sl.task]
                sl.batch.failed = f"three workers died while running it (last: {reason})"
                self._slice_done(sl.batch, time.monotonic())
                return list(sl.killed)
            else:
                log.warning("worker %s lost holding task %d (%d rows): re-sending (%s)", h.name, sl.task, sl.rows, reason)
                self.stats.slices_resent += 1
                self.orphans.append(sl)
        return []

    def ready_workers(self, generation: int | None = None) -> list[WorkerHandle]:
        g = self.active_generation if generation is None else generation
        ws = [w for w in self.workers.values() if w.generation == g and w.state == READY]
        ws.sort(key=lambda w: w.index)
        return ws

    def inflight(self, generation: int) -> int:
        """Batches of this generation not yet complete (orphaned slices included)."""
        return sum(1 for b in self.batches.values() if b.generation == generation)

    def _send_worker(self, w: WorkerHandle, frames: list, hb: bool = False) -> bool:
        try:
            self.backend.send_multipart([w.identity + (HB_SUFFIX if hb else b"")] + frames, copy=False)
            return True
        except zmq.ZMQError as e:   # EHOSTUNREACH: not connected (yet / any more)
            log.debug("cannot send to %s: %s", w.name, e)
            return False

    def on_backend(self) -> None:
        for _ in range(10000):
            try:
                frames = self.backend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            ident = frames[0].bytes
            hb = ident.endswith(HB_SUFFIX)
            w = self.workers.get(ident[:-len(HB_SUFFIX)] if hb else ident)
            if w is None:
                continue
            now = time.monotonic()
            w.last_seen = now
            try:
                msg = M.decode(frames[1:])
            except M.MessageError as e:
                log.warning("worker %s sent a malformed message (%s); ignored", w.name, e)
                continue
            if hb or msg.kind == M.HB:
                continue
            if msg.kind == M.RESULT:
                self._on_result(w, msg, now)
            elif msg.kind == M.ERROR:
                self._on_task_error(w, msg.head)
            elif msg.kind == M.READY:
                self._on_ready(w, msg.head)
            elif msg.kind == M.BOOTFAIL:
                w.boot_error = str(msg.head.get("message", "unknown"))[:2000]
                self.events.append(("bootfail", w, w.boot_error))

    def _on_ready(self, w: WorkerHandle, info: dict) -> None:
        if w.state != BOOTING:
            return
        spec, outputs = info.get("spec"), info.get("outputs")
        if not isinstance(spec, list) or not isinstance(outputs, list):
            w.boot_error = "READY without the model's input and output spec"
            self.events.append(("bootfail", w, w.boot_error))
            return
        if self.spec is None:
            self.spec, self.output_spec = spec, outputs
        elif spec != self.spec or outputs != self.output_spec:
            w.boot_error = (f"model inputs or outputs changed: {spec} -> {outputs} vs serving {self.spec} -> "
                            f"{self.output_spec}; a new signature needs a restart")
            self.events.append(("bootfail", w, w.boot_error))
            return
        w.info = info
        w.state = READY
        self.events.append(("ready", w, info))

    def _check_result(self, outs: list, sl: Slice) -> str | None:
        spec = self.output_spec or []
        if len(outs) != len(spec):
            return f"the model returned {len(outs)} outputs, {len(spec)} when it booted"
        for i, (o, s) in enumerate(zip(outs, spec)):
            if o.dtype.name != s["dtype"]:
                return f"output {i} has dtype {o.dtype.name}, {s['dtype']} when the model booted"
            if o.shape[0] != sl.rows:
                return f"output {i} has {o.shape[0]} rows for a slice of {sl.rows}: outputs must be batched on dim 0"
            if list(o.shape[1:]) != list(s["shape"][1:]):
                return f"output {i} has row shape {list(o.shape[1:])}, {s['shape'][1:]} when the model booted"
        return None

    def _on_result(self, w: WorkerHandle, msg: M.Message, now: float) -> None:
        sl = self.tasks.get(msg.head["task"])
        if sl is None or sl.worker is not w:
            return   # a stale answer for a slice that was re-sent elsewhere
        w.task = None
        w.busy_s += now - sl.sent_at
        try:
            w.compute_s += float(msg.head.get("ms", 0.0)) / 1000.0
        except (TypeError, ValueError):
            pass
        w.tasks_done += 1
        del self.tasks[sl.task]
        try:
            outs = M.result_tensors(msg)
            bad = self._check_result(outs, sl)
        except M.MessageError as e:
            outs, bad = None, str(e)
        if bad is not None:
            self.stats.result_mismatches += 1
            log.error("worker %s: result does not match the model's output spec: %s", w.name, bad)
            sl.batch.failed = f"the model's result does not match its output spec: {bad}"
        else:
            sl.result, sl.keep = outs, msg.buffers
            if isinstance(msg.head.get("trace"), dict):
                sl.trace = dict(msg.head["trace"], result=now, sent=sl.sent_at)
        self._slice_done(sl.batch, now)

    def _on_task_error(self, w: WorkerHandle, head: dict) -> None:
        sl = self.tasks.get(head.get("task"))
        if sl is None or sl.worker is not w:
            return
        del self.tasks[sl.task]
        w.task = None
        sl.batch.failed = str(head.get("message", "model error"))[:1000]
        self._slice_done(sl.batch, time.monotonic())

    def _slice_done(self, b: Batch, now: float) -> None:
        b.remaining -= 1
        if b.remaining > 0:
            return
        del self.batches[b.id]
        if b.failed is not None:
            if len(b.requests) == 1 or any(r.isolate for r in b.requests):
                for r in b.requests:
                    self._reply_error(r, b.failed_code, f"the model failed on this request: {b.failed}")
            else:
                # Someone's data made the model fail; re-run each request on its own so only it fails.
                for r in reversed(b.requests):
                    r.isolate = True
                    self._requeue(r)
            return
        self.stats.batches += 1
        lat = now - b.t_start
        for obs in self.observers:
            obs.on_batch(b.rows, lat, b.generation)
        slices = [s for s in b.slices if s.rows > 0]
        for r, off in zip(b.requests, b.offsets):
            outs = []
            for j in range(len(self.output_spec)):
                parts = [s.result[j][max(off, s.start) - s.start: min(off + r.rows, s.start + s.rows) - s.start]
                         for s in slices if s.start < off + r.rows and off < s.start + s.rows]
                outs.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
            metas = [P.tensor_meta(o) for o in outs]
            head = {"v": P.VERSION, "id": r.id, "status": "ok", "tensors": [m.to_json() for m in metas]}
            if r.trace is not None:
                r.trace.update(batch_start=b.t_start, batch_done=now, slices=[s.trace for s in slices if s.trace],
                               reply=time.monotonic())
                head["trace"] = r.trace
            body = [P.encode_header(head)] + [memoryview(o).cast("B") if o.size else b"" for o in outs]
            self._send_client(r, body)
            self.stats.requests += 1
            self.stats.rows += r.rows
            self.stats.latencies_ms.append((now - r.t_arrival) * 1000)
            for obs in self.observers:
                obs.on_request(now - r.t_arrival)

    # ---- clients -------------------------------------------------------------------------
    @staticmethod
    def _peer(sock, env: list) -> tuple:
        return (id(sock), env[0])

    def _forget(self, r: Pending) -> None:
        """r gets its answer now: it (and the retries attached to it) no longer count against their
        connections, and it cannot be joined any more."""
        for sock, env in [(r.sock, r.envelope)] + r.extra:
            peer = self._peer(sock, env)
            self.per_peer[peer] -= 1
            if self.per_peer[peer] <= 0:
                del self.per_peer[peer]
        if r.id and self.by_id.get(r.id) is r:
            del self.by_id[r.id]

    @staticmethod
    def _send(sock, frames: list) -> None:
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.ZMQError as e:
            log.debug("cannot answer client: %s", e)

    def _send_client(self, r: Pending, body: list) -> None:
        self._forget(r)
        for sock, env in [(r.sock, r.envelope)] + r.extra:
            self._send(sock, list(env) + body)

    def _reply_error(self, r_or_sock, code: str, message: str, rid: str = "", env: list | None = None) -> None:
        self.stats.errors[code] += 1
        for obs in self.observers:
            obs.on_error(code)
        if isinstance(r_or_sock, Pending):
            self._send_client(r_or_sock, [P.error_header(r_or_sock.id, code, message)])
        else:
            self._send(r_or_sock, list(env) + [P.error_header(rid, code, message)])

    def _reply_ok(self, sock, env: list, rid: str, **fields) -> None:
        self._send(sock, env + [P.encode_header({"v": P.VERSION, "id": rid, "status": "ok", "tensors": [], **fields})])

    def on_frontend(self, sock=None) -> None:
        for s in ([sock] if sock is not None else self.frontends):
            for _ in range(1000):   # bounded so a flood cannot starve the backend
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                big = len(frames) > P.MAX_FRAMES or sum(f.buffer.nbytes for f in frames) > TRIM_AFTER_BYTES
                self._on_client(frames, time.monotonic(), s)
                if big:
                    del frames
                    release_memory()       # a big message (refused, or done with): give its pages back now

    def _on_client(self, frames: list, now: float, sock=None) -> None:
        sock = sock if sock is not None else self.frontend
        if len(frames) >= 2 and len(frames[1]) == 0:
            env, body = [frames[0].bytes, b""], frames[2:]      # REQ client
        else:
            env, body = [frames[0].bytes], frames[1:]           # DEALER client
        rid = ""
        try:
            req = P.parse_request([f.buffer for f in body], self.max_bytes)
            rid = req.id
            if req.op == "ping":
                return self._reply_ok(sock, env, rid)
            if req.op == "health":
                return self._reply_ok(sock, env, rid, **self.health())
            if req.op == "spec":
                return self._reply_ok(sock, env, rid, inputs=self.spec, outputs=self.output_spec,
                                      max_batch_size=self.max_batch)
            if self.draining:
                raise P.ProtocolError(P.DRAINING, "packratd is shutting down; retry on another instance or after restart")
            if self.state != SERVING or self.spec is None:
                raise P.ProtocolError(P.UNAVAILABLE, self.state_message)
            P.check_against_spec(req.tensors, self.spec)
            rows = req.tensors[0].shape[0]
            if rows > self.max_batch:
                raise P.ProtocolError(P.TOO_LARGE, f"request has {rows} rows, server.max_batch_size is {self.max_batch}; split it")
            if self.per_peer[self._peer(sock, env)] >= self.max_per_peer:
                raise P.ProtocolError(P.OVERLOADED, f"this connection already has {self.max_per_peer} requests queued "
                                      "or running (server.max_requests_per_client); wait for answers")
            if rid and rid in self.by_id and _same_payload(self.by_id[rid], req.tensors, req.buffers):
                orig = self.by_id[rid]           # a retry of a request still queued or running: answer both once
                orig.extra.append((sock, env))
                self.per_peer[self._peer(sock, env)] += 1
                self.stats.deduplicated += 1
                return
            nbytes = sum(b.nbytes for b in req.buffers)
            if self.queued_rows + rows > self.max_queue_rows or self.queued_bytes + nbytes > self.max_queue_bytes:
                raise P.ProtocolError(P.OVERLOADED, f"queue is full ({self.queued_rows} rows, {self.queued_bytes} bytes "
                                      "waiting); retry later")
        except P.ProtocolError as e:
            self._reply_error(sock, e.code, e.message, rid or e.id, env=env)
            return
        except Exception as e:  # noqa: BLE001 - nothing a client sends may take the daemon down
            log.exception("unexpected error on a client message")
            self._reply_error(sock, P.INTERNAL, f"{type(e).__name__}: {e}", rid, env=env)
            return
        deadline = now + req.timeout_ms / 1000.0 if req.timeout_ms else None
        r = Pending(sock, env, req.id, req.tensors, req.buffers, body, rows, nbytes, now, deadline,
                    trace={"arrival": now} if req.trace else None)
        self.per_peer[self._peer(sock, env)] += 1
        if rid and rid not in self.by_id:
            self.by_id[rid] = r
        self._enqueue(r)

    def _enqueue(self, r: Pending) -> None:
        self.queue.append(r)
        self.queued_rows += r.rows
        self.queued_bytes += r.nbytes

    def _requeue(self, r: Pending) -> None:
        self.queue.appendleft(r)
        self.queued_rows += r.rows
        self.queued_bytes += r.nbytes

    def _take(self, r: Pending) -> None:
        self.queued_rows -= r.rows
        self.queued_bytes -= r.nbytes

    # ---- scheduling ----------------------------------------------------------------------
    def tick(self, now: float) -> float:
        """Heartbeats, liveness, re-sends and batch dispatch.  Returns seconds until the next deadline."""
        wake = 0.1
        if now >= self.next_hb:
            for w in list(self.workers.values()):
                self._send_worker(w, M.hb(), hb=True)
            self.next_hb = now + self.hb_interval
        wake = min(wake, max(0.0, self.next_hb - now))
        for w in list(self.workers.values()):
            # A booting worker may hold the GIL for seconds while torch loads; boot_timeout_s covers it.
            # Each worker is judged by the heartbeat settings it was started with (a reload may change them).
            if now - w.last_seen > w.hb_limit and w.state == READY:
                self.events.append(("silent", w, f"no heartbeat for {now - w.last_seen:.1f}s"))
                w.last_seen = now   # report once per period; the daemon kills it
        self._resend_orphans(now)
        if self.queue:
            wake = min(wake, self._maybe_dispatch(now))
        return wake

    def dispatch_now(self, now: float) -> None:
        """Form and send a batch now if the instances are idle (right after requests or results came in)."""
        if self.queue:
            self._maybe_dispatch(now)

    def _eligible(self, sl: Slice) -> list[WorkerHandle]:
        """Idle ready workers that may compute an orphaned slice: its own generation first, then any
        generation serving the same model (same digest)."""
        own = [w for w in self.ready_workers(sl.batch.generation) if w.task is None]
        if own:
            return own
        return [w for w in self.workers.values()
                if w.state == READY and w.task is None and w.digest == sl.batch.digest]

    def _resend_orphans(self, now: float) -> None:
        for _ in range(len(self.orphans)):
            sl = self.orphans.popleft()
            idle = self._eligible(sl)
            if not idle:
                self.orphans.append(sl)
                continue
            w = max(idle, key=lambda w: (w.threads, -w.index))
            sl.resends += 1
            self._send_slice(w, sl, now)

    def _send_slice(self, w: WorkerHandle, sl: Slice, now: float) -> None:
        sl.worker = w
        sl.sent_at = now
        w.task = sl
        self.tasks[sl.task] = sl
        if not self._send_worker(w, sl.frames):
            # Not connected (died, not yet reaped): it can take no more work; the slice waits for another.
            w.task = None
            sl.worker = None
            del self.tasks[sl.task]
            w.state = LOST
            self.events.append(("unreachable", w, "cannot send work to it"))
            self.orphans.append(sl)

    def _expire(self, now: float) -> None:
        if not any(r.deadline is not None and r.deadline <= now for r in self.queue):
            return
        keep = collections.deque()
        for r in self.queue:
            if r.deadline is not None and r.deadline <= now:
                self._take(r)
                self._reply_error(r, P.TIMEOUT, f"deadline passed after {(now - r.t_arrival) * 1000:.0f} ms in the queue")
            else:
                keep.append(r)
        self.queue = keep

    def _maybe_dispatch(self, now: float) -> float:
        self._expire(now)
        if not self.queue:
            return 0.1
        g = self.active_generation
        if self.inflight(g):
            return 0.1
        workers = self.ready_workers(g)
        if not workers or any(w.task is not None for w in workers):
            return 0.1
        oldest = self.queue[0]
        due = oldest.t_arrival + self.max_delay
        if self.max_delay > 0 and self.queued_rows < self.max_batch and now < due and not oldest.isolate:
            # Do not hold a request for batch mates past its own deadline.
            soonest = min((r.deadline for r in self.queue if r.deadline is not None), default=None)
            if soonest is None or soonest > due:
                return due - now
        taken, rows = [], 0
        while self.queue:
            r = self.queue[0]
            if taken and (r.isolate or taken[0].isolate or rows + r.rows > self.max_batch):
                break
            taken.append(self.queue.popleft())
            self._take(r)
            rows += r.rows
        self._dispatch(taken, rows, workers, now)
        return 0.0 if self.queue else 0.1

    def _dispatch(self, reqs: list[Pending], rows: int, workers: list[WorkerHandle], now: float) -> None:
        counts = self.splitter(rows, workers)
        offsets, o = [], 0
        for r in reqs:
            offsets.append(o)
            o += r.rows
        b = Batch(self.next_batch, self.active_generation, workers[0].digest, reqs, offsets, rows, [], 0, now)
        self.next_batch += 1
        self.batches[b.id] = b
        trace = any(r.trace is not None for r in reqs)
        start = 0
        plan = []
        for w, n in zip(workers, counts):
            if n <= 0:
                continue
            sl = Slice(self.next_task, b, start, n, self._work_frames(self.next_task, reqs, offsets, start, n, trace))
            self.next_task += 1
            b.slices.append(sl)
            plan.append((w, sl))
            start += n
        assert start == rows, (counts, rows)
        b.remaining = len(plan)
        for w, sl in plan:
            self._send_slice(w, sl, now)

    def _work_frames(self, task: int, reqs, offsets, start: int, n: int, trace: bool) -> list:
        """The WORK message for rows [start, start+n) of the batch: segments of the clients' buffers, no copies."""
        inputs, segs = [], []
        end = start + n
        for i, s in enumerate(self.spec):
            tail = s["shape"][1:]
            row_bytes = int(np.prod(tail, dtype=np.int64)) * P.DTYPES[s["dtype"]].itemsize
            rows = []
            for r, off in zip(reqs, offsets):
                lo, hi = max(start, off), min(end, off + r.rows)
                if lo >= hi:
                    continue
                buf = r.buffers[i]
                segs.append(buf[(lo - off) * row_bytes:(hi - off) * row_bytes])
                rows.append(hi - lo)
            inputs.append({"dtype": s["dtype"], "tail": tail, "rows": rows})
        return M.work(task, inputs, segs, {} if trace else None)

    # ---- draining ------------------------------------------------------------------------
    def idle(self) -> bool:
        return not self.queue and not self.batches and not self.orphans

    def fail_all(self, code: str, message: str) -> None:
        """Answer everything still queued or in flight with an error (forced shutdown, failed state)."""
        while self.queue:
            r = self.queue.popleft()
            self._take(r)
            self._reply_error(r, code, message)
        for b in list(self.batches.values()):
            for r in b.requests:
                self._reply_error(r, code, message)
        self.batches.clear()
        self.tasks.clear()
        self.orphans.clear()
        for w in self.workers.values():
            w.task = None

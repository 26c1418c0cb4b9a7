"""The dispatcher: clients in, batches out to pinned workers, answers back.

Two ROUTER sockets: the frontend for clients (DEALER or REQ) and the backend for workers
(identity-addressed DEALERs that say READY before they get work; heartbeats both ways).
Concurrent requests are aggregated into a batch (``max_batch_size`` rows, or whatever is queued
once the oldest request has waited ``max_delay_ms`` while the workers are idle); the batch is
split across the active generation's ready instances, each slice is sent to its worker as
zero-copy segments of the clients' own buffers, and when every slice is back each client gets
exactly its own rows.

All methods run on the daemon's single main thread; nothing here blocks.
"""
from __future__ import annotations

import collections
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import zmq

from . import protocol as P
from . import security

log = logging.getLogger("packratd.dispatcher")

BOOTING, READY, STOPPING = "booting", "ready", "stopping"


@dataclass(eq=False)
class WorkerHandle:
    identity: bytes
    generation: int
    index: int                      # the instance's index within its generation's plan
    threads: int
    cpus: tuple[int, ...]
    share: int                      # planned batch share
    proc: object = None             # subprocess.Popen, owned by the daemon
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
    envelope: list                  # routing frames to answer on
    id: str
    metas: list
    buffers: list                   # memoryviews of the request's tensors
    keep: list                      # the zmq frames behind the buffers
    rows: int
    t_arrival: float
    deadline: float | None
    isolate: bool = False           # run alone (after its batch failed on the model)
    retries: int = 0


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


@dataclass(eq=False)
class Batch:
    id: int
    generation: int
    requests: list
    offsets: list
    rows: int
    slices: list
    remaining: int
    t_start: float
    failed: str | None = None


def proportional_split(n: int, workers: Sequence[WorkerHandle]) -> list[int]:
    """Split n rows across workers in proportion to their planned shares (largest remainder).

    With fewer rows than workers, the workers with the largest shares (then most threads) get one row each."""
    k = len(workers)
    if n <= 0 or k == 0:
        return [0] * k
    order = sorted(range(k), key=lambda i: (-workers[i].share, -workers[i].threads, i))
    if n < k:
        out = [0] * k
        for i in order[:n]:
            out[i] = 1
        return out
    total = sum(max(1, w.share) for w in workers)
    exact = [n * max(1, w.share) / total for w in workers]
    out = [int(x) for x in exact]
    rest = n - sum(out)
    for i in sorted(range(k), key=lambda i: (-(exact[i] - out[i]), order.index(i)))[:rest]:
        out[i] += 1
    return out


class Stats:
    """Counters and recent latencies the status command and metrics read."""

    def __init__(self, window: int = 2048):
        self.requests = 0
        self.rows = 0
        self.batches = 0
        self.errors = collections.Counter()
        self.latencies_ms = collections.deque(maxlen=window)
        self.batch_sizes = collections.Counter()
        self.worker_deaths = 0
        self.slices_resent = 0
        self.started = time.monotonic()

    def percentiles(self) -> dict:
        if not self.latencies_ms:
            return {}
        a = np.fromiter(self.latencies_ms, float)
        return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


class Dispatcher:
    def __init__(self, ctx: zmq.Context, cfg, listeners: list[str], worker_endpoint: str,
                 splitter: Callable[[int, Sequence[WorkerHandle]], list[int]] = proportional_split,
                 observers: Sequence = (), curve_secret_file: str | None = None, socket_group: str | None = None):
        self.ctx = ctx
        self.cfg = cfg
        self.max_batch = cfg["server.max_batch_size"]
        self.max_delay = cfg["server.max_delay_ms"] / 1000.0
        self.max_queue_rows = cfg["server.max_queue_rows"]
        self.max_bytes = cfg["server.max_message_bytes"]
        self.hb_interval = cfg["workers.heartbeat_interval_s"]
        self.hb_liveness = cfg["workers.heartbeat_liveness"]
        self.listeners = listeners
        self.worker_endpoint = worker_endpoint
        self.splitter = splitter
        self.observers = list(observers)   # objects with on_batch(rows, latency_s) etc. (metrics, monitor)
        self.curve_secret_file = curve_secret_file   # CURVE server key for tcp:// listeners (None: plain)
        self.socket_group = socket_group

        self.backend = ctx.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.bind(worker_endpoint)
        security.secure_ipc(worker_endpoint, None, mode=0o600)   # a peer here could pose as a worker
        self.frontend = None

        self.workers: dict[bytes, WorkerHandle] = {}
        self.active_generation = 0
        self.spec: list[dict] | None = None
        self.output_spec: list[dict] | None = None
        self.queue: collections.deque[Pending] = collections.deque()
        self.queued_rows = 0
        self.batches: dict[int, Batch] = {}
        self.tasks: dict[int, Slice] = {}
        self.orphans: collections.deque[Slice] = collections.deque()
        self.next_batch = 1
        self.next_task = 1
        self.next_hb = 0.0
        self.draining = False
        self.stats = Stats()
        self.events: list[tuple] = []    # (kind, handle, detail) for the daemon: ready, bootfail, dead

    # ---- sockets -------------------------------------------------------------------------
    def bind_frontend(self) -> None:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)
        s.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if self.curve_secret_file and any(ep.startswith("tcp://") for ep in self.listeners):
            security.make_curve_server(s, self.curve_secret_file)   # before bind; applies to every endpoint of s
        for ep in self.listeners:
            s.bind(ep)
            security.secure_ipc(ep, self.socket_group)
        self.frontend = s

    def close(self) -> None:
        for s in (self.frontend, self.backend):
            if s is not None:
                s.close(linger=0)

    def sockets(self) -> list:
        return [s for s in (self.frontend, self.backend) if s is not None]

    # ---- workers -------------------------------------------------------------------------
    def add_worker(self, h: WorkerHandle) -> None:
        self.workers[h.identity] = h

    def remove_worker(self, h: WorkerHandle, reason: str) -> None:
        """The worker is gone (exited or declared dead): its slice goes to another instance."""
        self.workers.pop(h.identity, None)
        if h.task is not None:
            sl = h.task
            h.task = None
            sl.worker = None
            if sl.task in self.tasks and sl.resends >= 2:
                # Two instances died holding these rows: treat the data as poison, not the workers.
                del self.tasks[sl.task]
                sl.batch.failed = f"worker died while running it ({reason})"
                self._slice_done(sl.batch, time.monotonic())
            elif sl.task in self.tasks:
                log.warning("worker %s lost holding task %d (%d rows): re-sending (%s)", h.name, sl.task, sl.rows, reason)
                self.stats.slices_resent += 1
                self.orphans.append(sl)

    def ready_workers(self, generation: int | None = None) -> list[WorkerHandle]:
        g = self.active_generation if generation is None else generation
        ws = [w for w in self.workers.values() if w.generation == g and w.state == READY]
        ws.sort(key=lambda w: w.index)
        return ws

    def generation_busy(self, generation: int) -> bool:
        return any(b.generation == generation for b in self.batches.values())

    def _send_worker(self, w: WorkerHandle, frames: list) -> bool:
        try:
            self.backend.send_multipart([w.identity] + frames, copy=False)
            return True
        except zmq.ZMQError as e:   # EHOSTUNREACH: not connected (yet / any more)
            log.debug("cannot send to %s: %s", w.name, e)
            return False

    def on_backend(self) -> None:
        while True:
            try:
                frames = self.backend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            ident = frames[0].bytes
            w = self.workers.get(ident)
            if w is None or len(frames) < 2:
                continue
            now = time.monotonic()
            w.last_seen = now
            kind = frames[1].bytes
            if kind == b"HB":
                continue
            if kind == b"RESULT":
                self._on_result(w, frames, now)
            elif kind == b"ERROR":
                head = json.loads(frames[2].bytes)
                self._on_task_error(w, head)
            elif kind == b"READY":
                info = json.loads(frames[2].bytes)
                self._on_ready(w, info)
            elif kind == b"BOOTFAIL":
                info = json.loads(frames[2].bytes)
                w.boot_error = info.get("message", "unknown")
                self.events.append(("bootfail", w, w.boot_error))

    def _on_ready(self, w: WorkerHandle, info: dict) -> None:
        if w.state != BOOTING:
            return
        if self.spec is None:
            self.spec = info["spec"]
            self.output_spec = info["outputs"]
        elif info["spec"] != self.spec:
            w.boot_error = f"model inputs changed: {info['spec']} vs serving {self.spec}"
            self.events.append(("bootfail", w, w.boot_error))
            return
        w.info = info
        w.state = READY
        self.events.append(("ready", w, info))

    def _on_result(self, w: WorkerHandle, frames: list, now: float) -> None:
        head = json.loads(frames[2].bytes)
        sl = self.tasks.get(head["task"])
        if sl is None or sl.worker is not w:
            return   # a stale answer for a slice that was re-sent elsewhere
        w.task = None
        w.busy_s += now - sl.sent_at
        w.compute_s += float(head.get("ms", 0.0)) / 1000.0
        w.tasks_done += 1
        del self.tasks[sl.task]
        sl.result = [np.frombuffer(fr.buffer, dtype=P.DTYPES[m["dtype"]]).reshape(m["shape"])
                     for m, fr in zip(head["tensors"], frames[3:])]
        sl.keep = frames
        self._slice_done(sl.batch, now)

    def _on_task_error(self, w: WorkerHandle, head: dict) -> None:
        sl = self.tasks.pop(head.get("task"), None)
        if sl is None or sl.worker is not w:
            return
        w.task = None
        sl.batch.failed = head.get("message", "model error")
        self._slice_done(sl.batch, time.monotonic())

    def _slice_done(self, b: Batch, now: float) -> None:
        b.remaining -= 1
        if b.remaining > 0:
            return
        del self.batches[b.id]
        if b.failed is not None:
            if len(b.requests) == 1:
                r = b.requests[0]
                self._reply_error(r, P.MODEL_ERROR, f"the model failed on this request: {b.failed}")
                self.stats.requests += 1
            else:
                # Someone's data made the model raise; re-run each request on its own so only it fails.
                for r in reversed(b.requests):
                    r.isolate = True
                    self.queue.appendleft(r)
                    self.queued_rows += r.rows
            return
        self.stats.batches += 1
        self.stats.batch_sizes[b.rows] += 1
        lat = now - b.t_start
        for obs in self.observers:
            obs.on_batch(b.rows, lat, b.generation)
        slices = [s for s in b.slices if s.rows > 0]
        for r, off in zip(b.requests, b.offsets):
            outs = []
            for j, meta in enumerate(self.output_spec):
                parts = [s.result[j][max(off, s.start) - s.start: min(off + r.rows, s.start + s.rows) - s.start]
                         for s in slices if s.start < off + r.rows and off < s.start + s.rows]
                outs.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
            metas = [P.tensor_meta(o) for o in outs]
            frames = list(r.envelope) + [P.ok_header(r.id, metas)] + [memoryview(o).cast("B") if o.size else b"" for o in outs]
            self.frontend.send_multipart(frames, copy=False)
            self.stats.requests += 1
            self.stats.rows += r.rows
            self.stats.latencies_ms.append((now - r.t_arrival) * 1000)
            for obs in self.observers:
                obs.on_request(now - r.t_arrival)

    # ---- clients -------------------------------------------------------------------------
    def _reply_error(self, r_or_env, code: str, message: str, rid: str = "") -> None:
        if isinstance(r_or_env, Pending):
            env, rid = r_or_env.envelope, r_or_env.id
        else:
            env = r_or_env
        self.stats.errors[code] += 1
        for obs in self.observers:
            obs.on_error(code)
        try:
            self.frontend.send_multipart(list(env) + [P.error_header(rid, code, message)])
        except zmq.ZMQError as e:
            log.debug("cannot answer client: %s", e)

    def on_frontend(self) -> None:
        for _ in range(1000):   # bounded so a flood cannot starve the backend
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_client(frames, time.monotonic())

    def _on_client(self, frames: list, now: float) -> None:
        if len(frames) >= 2 and len(frames[1]) == 0:
            env, body = [frames[0].bytes, b""], frames[2:]      # REQ client
        else:
            env, body = [frames[0].bytes], frames[1:]           # DEALER client
        rid = ""
        try:
            req = P.parse_request([f.buffer for f in body], self.max_bytes)
            rid = req.id
            if req.op == "ping":
                self.frontend.send_multipart(env + [P.encode_header({"v": P.VERSION, "id": rid, "status": "ok", "tensors": []})])
                return
            if req.op == "spec":
                self.frontend.send_multipart(env + [P.encode_header({
                    "v": P.VERSION, "id": rid, "status": "ok", "tensors": [],
                    "inputs": self.spec, "outputs": self.output_spec, "max_batch_size": self.max_batch})])
                return
            if self.draining:
                raise P.ProtocolError(P.DRAINING, "packratd is shutting down; retry on another instance or after restart")
            P.check_against_spec(req.tensors, self.spec)
            rows = req.tensors[0].shape[0]
            if rows > self.max_batch:
                raise P.ProtocolError(P.TOO_LARGE, f"request has {rows} rows, server.max_batch_size is {self.max_batch}; split it")
            if self.queued_rows + rows > self.max_queue_rows:
                raise P.ProtocolError(P.OVERLOADED, f"queue is full ({self.queued_rows} rows waiting); retry later")
        except P.ProtocolError as e:
            self._reply_error(env, e.code, e.message, rid or e.id)
            return
        except Exception as e:  # noqa: BLE001 - nothing a client sends may take the daemon down
            log.exception("unexpected error on a client message")
            self._reply_error(env, P.INTERNAL, f"{type(e).__name__}: {e}", rid)
            return
        deadline = now + req.timeout_ms / 1000.0 if req.timeout_ms else None
        self.queue.append(Pending(env, req.id, req.tensors, req.buffers, body, rows, now, deadline))
        self.queued_rows += rows

    # ---- scheduling ----------------------------------------------------------------------
    def tick(self, now: float) -> float:
        """Heartbeats, liveness, re-sends and batch dispatch.  Returns seconds until the next deadline."""
        wake = 0.1
        if now >= self.next_hb:
            for w in list(self.workers.values()):
                self._send_worker(w, [b"HB"])
            self.next_hb = now + self.hb_interval
        wake = min(wake, max(0.0, self.next_hb - now))
        limit = self.hb_interval * self.hb_liveness
        for w in list(self.workers.values()):
            # A booting worker may hold the GIL for seconds while torch loads; boot_timeout_s covers it.
            if now - w.last_seen > limit and w.state == READY:
                self.events.append(("silent", w, f"no heartbeat for {now - w.last_seen:.1f}s"))
                w.last_seen = now   # report once per period; the daemon kills it
        self._resend_orphans(now)
        if self.queue:
            wake = min(wake, self._maybe_dispatch(now))
        return wake

    def _resend_orphans(self, now: float) -> None:
        while self.orphans:
            sl = self.orphans[0]
            idle = [w for w in self.ready_workers(sl.batch.generation) if w.task is None] or \
                   [w for w in self.ready_workers() if w.task is None]
            if not idle:
                return
            self.orphans.popleft()
            w = max(idle, key=lambda w: w.threads)
            sl.resends += 1
            self._send_slice(w, sl, now)

    def _send_slice(self, w: WorkerHandle, sl: Slice, now: float) -> None:
        sl.worker = w
        sl.sent_at = now
        w.task = sl
        self.tasks[sl.task] = sl
        if not self._send_worker(w, sl.frames):
            w.task = None
            sl.worker = None
            self.orphans.append(sl)

    def _expire(self, now: float) -> None:
        if not any(r.deadline is not None and r.deadline <= now for r in self.queue):
            return
        keep = collections.deque()
        for r in self.queue:
            if r.deadline is not None and r.deadline <= now:
                self.queued_rows -= r.rows
                self._reply_error(r, P.TIMEOUT, f"deadline passed after {(now - r.t_arrival) * 1000:.0f} ms in the queue")
            else:
                keep.append(r)
        self.queue = keep

    def _maybe_dispatch(self, now: float) -> float:
        self._expire(now)
        if not self.queue:
            return 0.1
        g = self.active_generation
        if self.generation_busy(g):
            return 0.1
        workers = self.ready_workers(g)
        if not workers or any(w.task is not None for w in workers):
            return 0.1
        oldest = self.queue[0]
        due = oldest.t_arrival + self.max_delay
        if self.queued_rows < self.max_batch and now < due and not oldest.isolate:
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
            rows += r.rows
        self.queued_rows -= rows
        self._dispatch(taken, rows, workers, now)
        return 0.0 if self.queue else 0.1

    def _dispatch(self, reqs: list[Pending], rows: int, workers: list[WorkerHandle], now: float) -> None:
        counts = self.splitter(rows, workers)
        offsets, o = [], 0
        for r in reqs:
            offsets.append(o)
            o += r.rows
        b = Batch(self.next_batch, self.active_generation, reqs, offsets, rows, [], 0, now)
        self.next_batch += 1
        self.batches[b.id] = b
        start = 0
        plan = []
        for w, n in zip(workers, counts):
            if n <= 0:
                continue
            sl = Slice(self.next_task, b, start, n, self._work_frames(self.next_task, reqs, offsets, start, n))
            self.next_task += 1
            b.slices.append(sl)
            plan.append((w, sl))
            start += n
        assert start == rows, (counts, rows)
        b.remaining = len(plan)
        for w, sl in plan:
            self._send_slice(w, sl, now)

    def _work_frames(self, task: int, reqs, offsets, start: int, n: int) -> list:
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
        return [b"WORK", json.dumps({"task": task, "inputs": inputs}).encode()] + segs

    # ---- draining ------------------------------------------------------------------------
    def idle(self) -> bool:
        return not self.queue and not self.batches and not self.orphans

    def fail_all(self, code: str, message: str) -> None:
        """Answer everything still queued or in flight with an error (forced shutdown)."""
        while self.queue:
            self._reply_error(self.queue.popleft(), code, message)
        self.queued_rows = 0
        for b in list(self.batches.values()):
            for r in b.requests:
                self._reply_error(r, code, message)
        self.batches.clear()
        self.tasks.clear()
        self.orphans.clear()

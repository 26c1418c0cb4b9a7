"""packratd client library.

    from packratd.client import Client
    c = Client("ipc:///run/packratd/packratd.sock")
    (y,) = c.infer(x)                 # x: numpy array or torch tensor, batch on dim 0
    y1, y2 = c.infer(ids, mask)       # several inputs / outputs

    fleet = Client(["tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555"], timeout=5,
                   curve_server_key=server_pub, curve_keypair=(pub, sec))
    fleet = Client("tcp://packratd.default.svc:5555", ...)    # a name resolving to several addresses

Endpoints
    ``endpoint`` is one endpoint or a list.  A ``tcp://NAME:PORT`` whose NAME is not an IP literal is
    resolved with ``socket.getaddrinfo`` (every A/AAAA record becomes one endpoint) and resolved again
    every ``resolve_interval`` seconds, so the changing pods behind a Kubernetes headless Service are
    followed.  ipc:// and IP-literal endpoints are used as given.

Routing
    Each request goes to the endpoint with the fewest requests outstanding from this client (all
    threads together); ties are broken at random, so independent clients do not herd onto one host.
    An endpoint that failed (no answer, lost connection, not reachable, or DRAINING / OVERLOADED /
    UNAVAILABLE) is put in a cool-down (``cooldown`` seconds, doubled on each further failure, at most
    30x) during which it is chosen only if nothing else is left.

Retries
    DRAINING, OVERLOADED, UNAVAILABLE, a timeout, a lost connection and an endpoint that cannot be
    reached are retried, with the SAME request id, up to ``retries`` more times (default: once on every
    other endpoint, so a single endpoint is not retried unless asked).  A retry goes to an endpoint not
    yet tried for this request while one remains; only when every endpoint has been tried does a request
    go back to one it already visited.  Before every retry the client sleeps a "full jitter" back-off:
    uniform in [0, min(max_backoff, backoff * 2**k)] for the k-th retry.  Every other error reply raises
    ReplyError at once.  When all attempts fail, the last error reply is raised, or InferenceTimeout
    naming every endpoint tried, what happened there and after how long.

Timeouts and queued copies
    ``timeout`` bounds each attempt: the send and the wait for the answer together.  Nothing blocks
    longer: sockets use ZMQ_IMMEDIATE, so a request is never queued for a connection that is not up;
    the send waits for a connection (Client polls POLLOUT; AsyncClient retries every SEND_RETRY_S, since
    pyzmq's asyncio POLLOUT poll would queue other requests' sends) until the attempt's deadline, or at most
    ``connect_timeout`` while another endpoint could take the request instead.  After a failed attempt
    (timeout, lost connection, unreachable) the socket is closed with linger 0 and a fresh one is made
    for the next attempt: at most one copy of a request is ever queued, and a daemon that comes back
    finds no backlog of retries.  A lost connection is noticed at once through the socket's monitor
    (the daemon died or closed it) or by ZeroMQ heartbeats (``heartbeat`` seconds; a peer silent for 3
    heartbeats is dropped), without waiting for the timeout.  A request whose attempt timed out may
    still run on that daemon; its late answer is never returned.

CURVE (tcp://)
    ``curve_keypair`` is the client's (public, secret) Z85 keypair, the same for every endpoint.
    ``curve_server_key`` is either one server public key used for every endpoint (a fleet whose daemons
    share one server keypair, e.g. one Kubernetes Secret mounted as server.curve_keys_dir), or a mapping
    {endpoint as given: server key} for daemons with their own keys; endpoints resolved from a DNS name
    use the name's key.  With a mapping, every tcp:// endpoint given needs an entry (a missing one raises
    ValueError; entries for other endpoints are ignored, so one fleet-wide mapping can serve clients of
    a few hosts); endpoints not in the mapping (ipc://) speak without CURVE.

Thread safety
    One Client may be shared by many threads; each thread gets its own ZeroMQ DEALER socket per
    endpoint (sockets are not thread-safe), created on first use.  Replies are matched to requests by
    id, so an answer for another request is never returned.  AsyncClient is the asyncio variant (one
    socket per endpoint shared by every coroutine of one event loop) with the same routing, retries and
    timeouts.
"""
from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import protocol as P
from .protocol import ReplyError  # noqa: F401  (re-exported: callers catch client.ReplyError)

log = logging.getLogger("packratd.client")

# "No generation can serve" (daemon-side, being added to protocol.py); spelled out so this module
# does not depend on the daemon's version of protocol.py.
UNAVAILABLE = getattr(P, "UNAVAILABLE", "UNAVAILABLE")
RETRY_CODES = frozenset({P.DRAINING, P.OVERLOADED, UNAVAILABLE})

# Attempt outcomes other than an error code.
OK, NO_ANSWER, LOST, UNREACHABLE, UNRESOLVED = "ok", "timeout", "lost", "unreachable", "unresolved"
_FAILURES = frozenset({NO_ANSWER, LOST, UNREACHABLE, UNRESOLVED})
_WHAT = {NO_ANSWER: "no answer within {s:.2f}s", LOST: "connection lost after {s:.2f}s",
         UNREACHABLE: "not connected within {s:.2f}s", UNRESOLVED: "no endpoint (name did not resolve)"}

_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_MONITOR_EVENTS = zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED
MAX_COOLDOWN_FACTOR = 30
SEND_RETRY_S = 0.002        # AsyncClient: how often a send is retried while no connection is up
# plain ints: the enum flags pyzmq returns make every `&` on the hot path a Python-level enum operation
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)


class InferenceTimeout(TimeoutError):
    """No answer from any attempt.  ``.attempts`` lists (endpoint, outcome, seconds) per attempt.

    The request may still run on a daemon that got it; its late answer is dropped."""

    def __init__(self, message: str, attempts: Sequence[tuple[str, str, float]] = ()):
        super().__init__(message)
        self.attempts = list(attempts)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "numpy"):      # torch.Tensor, without importing torch
        return x.detach().cpu().contiguous().numpy()
    return np.asarray(x)


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential back-off before the ``retry``-th retry (0-based): U(0, min(cap, base * 2**retry))."""
    bound = min(cap, base * 2.0 ** min(retry, 60))
    return (rng or random).uniform(0.0, max(0.0, bound))


# ---- endpoints: resolution, balancing, cool-down ---------------------------------------------------------
def _tcp_name(target: str) -> tuple[str, int] | None:
    """(host, port) of a tcp:// endpoint whose host is a DNS name; None when there is nothing to resolve."""
    if not target.startswith("tcp://"):
        return None
    rest = target[6:]
    if ";" in rest:                          # libzmq's "source;destination" syntax: leave it to libzmq
        return None
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or host in ("", "*"):
        return None
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
        return None                          # an IP literal
    except ValueError:
        return host, int(port)


def resolve(target: str) -> list[str]:
    """The endpoints a target stands for: every address of a tcp:// DNS name, else the target itself.

    Raises socket.gaierror when the name does not resolve."""
    hp = _tcp_name(target)
    if hp is None:
        return [target]
    host, port = hp
    out: list[str] = []
    for family, _, _, _, sa in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        addr = sa[0]
        ep = f"tcp://[{addr}]:{port}" if family == socket.AF_INET6 else f"tcp://{addr}:{port}"
        if ep not in out:
            out.append(ep)
    return out


@dataclass
class _EndpointState:
    target: str                      # the endpoint as the caller gave it (a DNS name for resolved ones)
    outstanding: int = 0
    fails: int = 0                   # consecutive failures (cool-down grows with them)
    cool_until: float = 0.0
    sent: int = 0
    answered: int = 0
    errors: Counter = field(default_factory=Counter)   # error replies by code
    failures: Counter = field(default_factory=Counter)  # timeout / lost / unreachable


class _Fleet:
    """The endpoint set of one client, shared by all its threads: resolution, least-outstanding choice, cool-down."""

    def __init__(self, targets: Sequence[str], resolve_interval: float, cooldown: float):
        self.targets = list(targets)
        self.resolve_interval = resolve_interval
        self.cooldown = cooldown
        self.lock = threading.Lock()
        self.rng = random.Random()
        self.by_target: dict[str, list[str]] = {t: [] for t in self.targets}
        self.state: dict[str, _EndpointState] = {}
        self.order: list[str] = []
        self.version = 0
        self.next_resolve = 0.0
        self.resolving = False
        self.resolve_errors: dict[str, str] = {}
        self.refresh(force=True)

    # resolution -------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            if self.resolving or (not force and now < self.next_resolve):
                return
            self.resolving = True
        try:
            found: dict[str, list[str]] = {}
            errors: dict[str, str] = {}
            for t in self.targets:
                try:
                    found[t] = resolve(t)
                except (OSError, UnicodeError) as e:      # socket.gaierror is an OSError
                    errors[t] = f"{t}: {e}"
        finally:
            with self.lock:
                self.resolving = False
        with self.lock:
            for t, eps in found.items():
                self.by_target[t] = eps
            for t, msg in errors.items():           # keep the addresses we had; say so once per change
                if self.resolve_errors.get(t) != msg:
                    log.warning("cannot resolve %s (keeping %d known address(es))", msg, len(self.by_target[t]))
            self.resolve_errors = errors
            order: list[str] = []
            for t in self.targets:
                for ep in self.by_target[t]:
                    if ep not in order:
                        order.append(ep)
                        if ep not in self.state:
                            self.state[ep] = _EndpointState(t)
            if order != self.order:
                self.order = order
                self.version += 1
                if len(self.state) > 4 * len(order) + 64:     # pods come and go: forget idle old addresses
                    for ep in [e for e, st in self.state.items() if e not in order and st.outstanding == 0]:
                        del self.state[ep]
            any_names = any(_tcp_name(t) for t in self.targets)
            # an empty set (the name did not resolve yet) is retried soon, not in resolve_interval
            wait = self.resolve_interval if order else min(1.0, self.resolve_interval)
            self.next_resolve = time.monotonic() + (wait if any_names else math.inf)

    def endpoints(self) -> list[str]:
        if time.monotonic() >= self.next_resolve:
            self.refresh()
        with self.lock:
            return list(self.order)

    # choice -----------------------------------------------------------------------------------
    def pick(self, tried: Mapping[str, int]) -> str | None:
        """The endpoint for the next attempt (its outstanding count is taken): not yet tried for this
        request first, then out of cool-down, then fewest outstanding; ties at random."""
        if time.monotonic() >= self.next_resolve:
            self.refresh()
        now = time.monotonic()
        with self.lock:
            if not self.order:
                return None
            if len(self.order) == 1:                  # the common single-endpoint case, without the search
                ep = self.order[0]
                st = self.state[ep]
                st.outstanding += 1
                st.sent += 1
                return ep

            def key(ep):
                st = self.state[ep]
                return (tried.get(ep, 0), st.cool_until > now, st.outstanding)
            best = min(key(ep) for ep in self.order)
            ep = self.rng.choice([e for e in self.order if key(e) == best])
            st = self.state[ep]
            st.outstanding += 1
            st.sent += 1
            return ep

    def others(self, ep: str) -> bool:
        with self.lock:
            return any(e != ep for e in self.order)

    def done(self, ep: str, outcome: str) -> None:
        """Give back the endpoint taken by pick() with the attempt's outcome (OK, a failure or an error code)."""
        with self.lock:
            st = self.state[ep]
            st.outstanding -= 1
            if outcome in _FAILURES or outcome in RETRY_CODES:
                st.fails += 1
                st.cool_until = time.monotonic() + self.cooldown * min(MAX_COOLDOWN_FACTOR, 2 ** (st.fails - 1))
                if outcome in _FAILURES:
                    st.failures[outcome] += 1
                else:
                    st.errors[outcome] += 1
                return
            st.fails = 0
            st.cool_until = 0.0
            if outcome == OK:
                st.answered += 1
            else:
                st.errors[outcome] += 1       # a non-retryable error reply: the endpoint itself is fine

    def stats(self) -> dict:
        now = time.monotonic()
        with self.lock:
            return {ep: {"target": st.target, "current": ep in self.order, "outstanding": st.outstanding,
                         "sent": st.sent, "answered": st.answered, "errors": dict(st.errors),
                         "timeouts": st.failures[NO_ANSWER], "lost": st.failures[LOST],
                         "unreachable": st.failures[UNREACHABLE], "cooldown_s": max(0.0, st.cool_until - now)}
                    for ep, st in self.state.items()}


class _Attempts:
    """The retry policy of one request: which endpoint next, whether to retry, how long to wait, what to say."""

    def __init__(self, fleet: _Fleet, rid: str, retries: int | None, backoff: float, max_backoff: float,
                 rng: random.Random):
        self.fleet = fleet
        self.rid = rid
        n = len(fleet.order)         # a racy read is fine: only the default retry count depends on it
        self.allowed = 1 + (max(0, n - 1) if retries is None else max(0, int(retries)))
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.rng = rng
        self.tried: dict[str, int] = {}
        self.log: list[tuple[str, str, float]] = []
        self.limits: list[float] = []
        self.t0 = time.monotonic()

    @property
    def last(self) -> bool:
        """True when the attempt being made now is the last one allowed."""
        return len(self.log) + 1 >= self.allowed

    def choose(self) -> str | None:
        ep = self.fleet.pick(self.tried)
        if ep is not None:
            self.tried[ep] = self.tried.get(ep, 0) + 1
        return ep

    def failover_possible(self, ep: str) -> bool:
        return not self.last and self.fleet.others(ep)

    def record(self, ep: str | None, outcome: str, seconds: float, limit: float | None = None) -> None:
        """``limit``: the bound the attempt ran into (shown in the message), else ``seconds`` is shown."""
        self.log.append((ep or "-", outcome, seconds))
        self.limits.append(seconds if limit is None else limit)
        if ep is not None:
            self.fleet.done(ep, outcome)

    def more(self) -> bool:
        return len(self.log) < self.allowed

    def delay(self) -> float:
        return backoff_delay(len(self.log) - 1, self.backoff, self.max_backoff, self.rng)

    def timeout_error(self) -> InferenceTimeout:
        parts = []
        for (ep, outcome, _), s in zip(self.log, self.limits):
            what = _WHAT[outcome].format(s=s) if outcome in _WHAT else f"error reply {outcome}"
            parts.append(what if ep == "-" else f"{ep}: {what}")
        targets = ", ".join(self.fleet.targets)
        hint = ""
        if any(o == UNRESOLVED for _, o, _ in self.log) and self.fleet.resolve_errors:
            hint = " (" + "; ".join(self.fleet.resolve_errors.values()) + ")"
        elif all(o in (UNREACHABLE, NO_ANSWER) for _, o, _ in self.log):
            hint = " (is the daemon running? for tcp://, is the CURVE key right?)"
        return InferenceTimeout(
            f"no answer from packratd at {targets} for request {self.rid}: {len(self.log)} attempt(s) in "
            f"{time.monotonic() - self.t0:.2f}s: " + "; ".join(parts) + hint, self.log)


# ---- one socket to one endpoint -------------------------------------------------------------------------------
_monitor_ids = itertools.count()


class _Link:
    """One DEALER connected to one endpoint, with a monitor that tells when its connection is lost."""

    def __init__(self, ctx: zmq.Context, endpoint: str, server_key: bytes | None, keypair, heartbeat: float | None,
                 connect_timeout: float):
        self.endpoint = endpoint
        self.mon = None
        s = ctx.socket(zmq.DEALER)
        try:
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IMMEDIATE, 1)            # queue only on a connection that is up
            s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            if endpoint.startswith("tcp://"):
                s.setsockopt(zmq.CONNECT_TIMEOUT, max(100, int(connect_timeout * 1000)))
                if endpoint.startswith("tcp://["):
                    s.setsockopt(zmq.IPV6, 1)
            if heartbeat:
                s.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(heartbeat * 1000)))
                s.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(3 * heartbeat * 1000)))
            if server_key is not None:
                if keypair is None:
                    raise ValueError("curve_server_key needs curve_keypair (the client's public and secret key)")
                pub, sec = (k.encode("ascii") if isinstance(k, str) else k for k in keypair)
                s.curve_serverkey = server_key
                s.curve_publickey = pub
                s.curve_secretkey = sec
            addr = f"inproc://packratd-client-monitor-{os.getpid()}-{next(_monitor_ids)}"
            s.monitor(addr, _MONITOR_EVENTS)
            self.mon = ctx.socket(zmq.PAIR)
            self.mon.setsockopt(zmq.LINGER, 0)
            self.mon.connect(addr)
            s.connect(endpoint)
        except BaseException:
            if self.mon is not None:
                self.mon.close(linger=0)
            s.close(linger=0)
            raise
        self.sock = s
        self.lost = 0                # connections that ended
        self.refused = 0             # connect attempts that failed
        self.bad_handshakes = 0      # handshakes that failed (CURVE key refused, ...)
        self.closed = False
        self._pollers = None

    def on_event(self, frames) -> None:
        ev = parse_monitor_message(frames)["event"]
        if ev == zmq.EVENT_DISCONNECTED:
            self.lost += 1
        elif ev == zmq.EVENT_CONNECT_RETRIED:
            self.refused += 1
        elif ev & _HANDSHAKE_FAILED:
            self.bad_handshakes += 1

    def drain_events(self) -> None:
        """Read the monitor's queued events (sync sockets only)."""
        while self.mon.getsockopt(_EVENTS) & _POLLIN:
            self.on_event(self.mon.recv_multipart())

    def writable(self) -> bool:
        return bool(self.sock.getsockopt(_EVENTS) & _POLLOUT)

    def pollers(self) -> tuple[zmq.Poller, zmq.Poller]:
        """(wait to send, wait for an answer): both also wake on a monitor event.  Sync sockets only."""
        if self._pollers is None:
            out, inp = zmq.Poller(), zmq.Poller()
            out.register(self.sock, zmq.POLLOUT)
            out.register(self.mon, zmq.POLLIN)
            inp.register(self.sock, zmq.POLLIN)
            inp.register(self.mon, zmq.POLLIN)
            self._pollers = (out, inp)
        return self._pollers

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.mon.close(linger=0)
        self.sock.close(linger=0)      # drops anything still queued: no stale copy is sent later


def _curve_keys(targets: Sequence[str], curve_server_key) -> dict[str, bytes | None]:
    def b(k):
        return k.encode("ascii") if isinstance(k, str) else k
    if curve_server_key is None:
        return {t: None for t in targets}
    if not isinstance(curve_server_key, Mapping):
        return {t: b(curve_server_key) for t in targets}
    missing = [t for t in targets if t.startswith("tcp://") and t not in curve_server_key]
    if missing:
        raise ValueError(f"curve_server_key has no key for {', '.join(missing)} (give one per tcp:// endpoint, "
                         "or one key for all)")
    return {t: b(curve_server_key.get(t)) for t in targets}


def _targets(endpoint) -> list[str]:
    targets = [endpoint] if isinstance(endpoint, str) else list(endpoint)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError("endpoint must be an endpoint string or a non-empty list of them")
    return list(dict.fromkeys(targets))


class _Common:
    RETRY_CODES = RETRY_CODES

    def _setup(self, endpoint, timeout, curve_server_key, curve_keypair, retries, backoff, max_backoff,
               connect_timeout, cooldown, resolve_interval, heartbeat):
        self.endpoints = _targets(endpoint)
        self.endpoint = self.endpoints[0]          # the first endpoint as given (kept for old callers)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.heartbeat = heartbeat
        self._keys = _curve_keys(self.endpoints, curve_server_key)
        self._keypair = curve_keypair
        self._curve = (curve_server_key, curve_keypair)
        self._rng = random.Random()
        self._fleet = _Fleet(self.endpoints, resolve_interval, cooldown)

    def addresses(self) -> list[str]:
        """The endpoints requests are spread over now (DNS names resolved)."""
        return self._fleet.endpoints()

    def stats(self) -> dict:
        """Per endpoint: sent (attempts), answered, error replies by code, timeouts, lost, unreachable,
        outstanding and the cool-down left."""
        return self._fleet.stats()

    def _server_key(self, ep: str) -> bytes | None:
        with self._fleet.lock:
            st = self._fleet.state.get(ep)
        return self._keys.get(ep, self._keys.get(st.target) if st else None)

    def _new_link(self, ctx, ep: str) -> _Link:
        return _Link(ctx, ep, self._server_key(ep), self._keypair, self.heartbeat, self.connect_timeout)

    def _attempts(self, rid, retries, backoff) -> _Attempts:
        return _Attempts(self._fleet, rid, self.retries if retries is None else retries,
                         self.backoff if backoff is None else backoff, self.max_backoff, self._rng)

    def _note_reply(self, endpoint: str, rid: str, matched: bool, code: str | None) -> None:
        """Called for every reply read from any socket, also the ones no request waits for any more
        (``matched`` False); ``code`` is None for an ok reply.  A hook for tests and instrumentation."""


def _match(reply, rid: str):
    """(reply id, matched, arrays, head, error) for one reply read on a socket that carries only request ``rid``."""
    try:
        got, arrays, head = P.parse_reply([f.buffer for f in reply])
    except ReplyError as e:
        # "" : an early wire-level error (protocol.md section 6); one request at a time on this socket
        return e.id, e.id in (rid, ""), None, None, e
    return got, got == rid, arrays, head, None


# ---- the thread-safe blocking client ----------------------------------------------------------------------
class Client(_Common):
    def __init__(self, endpoint: str | Sequence[str], timeout: float = 30.0, ctx: zmq.Context | None = None,
                 curve_server_key: bytes | str | Mapping[str, bytes | str] | None = None,
                 curve_keypair: tuple[bytes, bytes] | None = None, *, retries: int | None = None,
                 backoff: float = 0.1, max_backoff: float = 2.0, connect_timeout: float = 1.0,
                 cooldown: float = 1.0, resolve_interval: float = 30.0, heartbeat: float | None = 2.0):
        """``timeout``: seconds per attempt (send + answer).  ``retries``: extra attempts (None: one on each
        other endpoint).  ``backoff``/``max_backoff``: full-jitter back-off base and cap.  ``connect_timeout``:
        the longest a send waits for a connection while another endpoint could take the request.
        ``cooldown``: seconds a failed endpoint is avoided (doubling per further failure).  See the module
        docstring for endpoints, DNS names and CURVE."""
        self.ctx = ctx or zmq.Context.instance()
        self._setup(endpoint, timeout, curve_server_key, curve_keypair, retries, backoff, max_backoff,
                    connect_timeout, cooldown, resolve_interval, heartbeat)
        self._local = threading.local()
        self._links: set[_Link] = set()
        self._lock = threading.Lock()

    # sockets -------------------------------------------------------------------------------------
    def _thread_links(self) -> dict[str, _Link]:
        loc = self._local
        links = getattr(loc, "links", None)
        if links is None:
            links = loc.links = {}
            loc.version = self._fleet.version
        if loc.version != self._fleet.version:        # the endpoint set changed: drop sockets to gone ones
            current = set(self._fleet.endpoints())
            for ep in [e for e in links if e not in current]:
                self._drop(links, ep)
            loc.version = self._fleet.version
        return links

    def _link(self, ep: str) -> _Link:
        links = self._thread_links()
        link = links.get(ep)
        if link is None or link.closed:
            link = links[ep] = self._new_link(self.ctx, ep)
            with self._lock:
                self._links.add(link)
        return link

    def _drop(self, links: dict, ep: str) -> None:
        link = links.pop(ep, None)
        if link is not None:
            with self._lock:
                self._links.discard(link)
            link.close()

    # one attempt ------------------------------------------------------------------------------------
    def _attempt(self, link: _Link, frames, rid: str, send_until: float, until: float, fail_fast: bool):
        """Returns (OK, (arrays, head)) | ("error", ReplyError) | (NO_ANSWER|LOST|UNREACHABLE, None)."""
        link.drain_events()
        refused, bad = link.refused, link.bad_handshakes
        sock = link.sock
        wait_out, wait_in = link.pollers()
        while True:                                   # the send: never blocks past send_until
            if sock.getsockopt(_EVENTS) & _POLLOUT:
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:
                    pass
            left = send_until - time.monotonic()
            if left <= 0:
                return UNREACHABLE, None
            wait_out.poll(int(1000 * (min(left, 0.1) if fail_fast else left)) + 1)
            link.drain_events()
            if fail_fast and (link.refused > refused or link.bad_handshakes > bad):
                return UNREACHABLE, None              # refused / handshake failed: another endpoint can take it
        lost = link.lost
        while True:                                   # the answer
            left = until - time.monotonic()
            if left > 0:
                wait_in.poll(int(1000 * left) + 1)
            while sock.getsockopt(_EVENTS) & _POLLIN:
                reply = sock.recv_multipart(copy=False)
                got, matched, arrays, head, err = _match(reply, rid)
                self._note_reply(link.endpoint, got, matched, err.code if err else None)
                if matched:
                    return ("error", err) if err is not None else (OK, (arrays, head))
            link.drain_events()
            if link.lost > lost:
                return LOST, None
            if time.monotonic() >= until:
                return NO_ANSWER, None

    def _call(self, frames: list, rid: str, timeout: float | None, retries: int | None = None,
              backoff: float | None = None):
        per = self.timeout if timeout is None else timeout
        at = self._attempts(rid, retries, backoff)
        while True:
            ep = at.choose()
            t0 = time.monotonic()
            if ep is None:
                at.record(None, UNRESOLVED, 0.0)
                outcome, val = UNRESOLVED, None
            else:
                fail_fast = at.failover_possible(ep)
                send_until = t0 + (min(per, self.connect_timeout) if fail_fast else per)
                try:
                    link = self._link(ep)
                    outcome, val = self._attempt(link, frames, rid, send_until, t0 + per, fail_fast)
                except BaseException:
                    self._drop(self._thread_links(), ep)     # a copy may be queued: drop it with the socket
                    at.record(ep, UNREACHABLE, time.monotonic() - t0)
                    raise
                if outcome == "error":
                    at.record(ep, val.code, time.monotonic() - t0)
                    if val.code not in self.RETRY_CODES or not at.more():
                        raise val
                else:
                    if outcome != OK:
                        # timed out, lost or never connected: a fresh socket for the next attempt, and
                        # nothing of this one left queued anywhere
                        self._drop(self._thread_links(), ep)
                    at.record(ep, outcome, time.monotonic() - t0,
                              {NO_ANSWER: per, UNREACHABLE: send_until - t0}.get(outcome))
                    if outcome == OK:
                        return val[0], val[1], ep
            if not at.more():
                raise at.timeout_error()
            self._pause(at.delay())

    def _pause(self, seconds: float) -> None:
        time.sleep(seconds)

    # API ----------------------------------------------------------------------------------------
    def infer(self, *inputs, timeout: float | None = None, request_id: str | None = None,
              deadline_ms: float | None = None, retries: int | None = None,
              backoff: float | None = None) -> list[np.ndarray]:
        """Run the model on one request (each input with the batch on dim 0); returns the outputs.

        Raises ReplyError (with .code) for an error reply and InferenceTimeout when no attempt is
        answered.  ``timeout`` is per attempt; ``retries`` (default: the client's, i.e. one attempt on
        each other endpoint) and ``backoff`` as in the module docstring.  Every attempt carries the same
        request id; ``deadline_ms`` is sent as the request's ``timeout_ms`` (queueing bound on the daemon)."""
        rid = request_id or uuid.uuid4().hex
        arrays = [_to_numpy(x) for x in inputs]
        frames = P.request_frames(rid, arrays, timeout_ms=deadline_ms)
        out, _, _ = self._call(frames, rid, timeout, retries, backoff)
        return out

    def spec(self, timeout: float | None = None, retries: int | None = None) -> dict:
        """The model's inputs and outputs and the daemon's max batch size."""
        rid = uuid.uuid4().hex
        _, head, _ = self._call([P.encode_header({"v": P.VERSION, "id": rid, "op": "spec"})], rid, timeout, retries)
        return head

    def health(self, timeout: float | None = None, retries: int | None = None) -> dict:
        """One endpoint's health: ``{"live": bool, "ready": bool, "state": "serving" | ...}`` (docs/protocol.md)."""
        rid = uuid.uuid4().hex
        _, head, _ = self._call([P.encode_header({"v": P.VERSION, "id": rid, "op": "health"})], rid, timeout, retries)
        return {k: head.get(k) for k in ("live", "ready", "state")}

    def ping(self, timeout: float | None = None, retries: int | None = None) -> float:
        """Seconds until one endpoint answered a ping."""
        rid = uuid.uuid4().hex
        t0 = time.monotonic()
        self._call([P.encode_header({"v": P.VERSION, "id": rid, "op": "ping"})], rid, timeout, retries)
        return time.monotonic() - t0

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links), set()
        for link in links:
            link.close()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- asyncio ------------------------------------------------------------------------------------------
def probe_health(endpoint: str, timeout: float = 5.0, **kw) -> dict | None:
    """One daemon's health (Client.health), or None when it has no socket yet or gives no answer in time:
    what a script waiting for a daemon to come up polls.  kw go to Client (CURVE keys for tcp://)."""
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[6:]):
        return None
    c = Client(endpoint, timeout=timeout, **kw)
    try:
        return c.health(retries=0)
    except InferenceTimeout:
        return None
    finally:
        c.close()


class _Lost(Exception):
    pass


class _AsyncLink:
    """An asyncio DEALER to one endpoint shared by many requests: a reader task matches replies to waiters,
    a monitor task fails the requests sent on a connection that ended."""

    def __init__(self, owner: "AsyncClient", link: _Link):
        self.owner = owner
        self.link = link
        self.waiters: dict[str, asyncio.Future] = {}
        self.sent: set[str] = set()
        self.retired = False
        self.tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._watch())]

    async def _read(self):
        try:
            while True:
                reply = await self.link.sock.recv_multipart(copy=False)
                try:
                    rid, arrays, head = P.parse_reply([f.buffer for f in reply])
                    result = (arrays, head)
                except ReplyError as e:
                    rid, result, head = e.id, e, None
                fut = self.waiters.get(rid)
                live = fut is not None and not fut.done() and rid in self.sent
                self.owner._note_reply(self.link.endpoint, rid, live,
                                       result.code if isinstance(result, ReplyError) else None)
                if live:
                    if isinstance(result, Exception):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        except (asyncio.CancelledError, zmq.ZMQError):
            pass

    async def _watch(self):
        try:
            while True:
                frames = await self.link.mon.recv_multipart()
                lost = self.link.lost
                self.link.on_event(frames)
                if self.link.lost > lost:
                    for rid in list(self.sent):
                        fut = self.waiters.get(rid)
                        if fut is not None and not fut.done():
                            fut.set_exception(_Lost())
        except (asyncio.CancelledError, zmq.ZMQError):
            pass

    def release(self, rid: str) -> None:
        self.waiters.pop(rid, None)
        self.sent.discard(rid)
        if self.retired and not self.waiters:
            self.owner._retired.discard(self)
            self.close()

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.link.close()


class AsyncClient(_Common):
    """asyncio variant: many concurrent ``await c.infer(x)`` calls share one socket per endpoint.

    Same endpoints, routing, retries, timeouts and CURVE options as Client.  A timed-out attempt retires
    its socket: new requests get a fresh socket (so nothing new queues behind a silent connection) and the
    old one is closed with linger 0 once the requests still waiting on it are done."""

    def __init__(self, endpoint: str | Sequence[str], timeout: float = 30.0, ctx: zmq.asyncio.Context | None = None,
                 curve_server_key: bytes | str | Mapping[str, bytes | str] | None = None,
                 curve_keypair: tuple[bytes, bytes] | None = None, *, retries: int | None = None,
                 backoff: float = 0.1, max_backoff: float = 2.0, connect_timeout: float = 1.0,
                 cooldown: float = 1.0, resolve_interval: float = 30.0, heartbeat: float | None = 2.0):
        if ctx is not None and not isinstance(ctx, zmq.asyncio.Context):
            ctx = zmq.asyncio.Context.shadow(ctx.underlying)
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self._setup(endpoint, timeout, curve_server_key, curve_keypair, retries, backoff, max_backoff,
                    connect_timeout, cooldown, resolve_interval, heartbeat)
        self._alinks: dict[str, _AsyncLink] = {}
        self._retired: set[_AsyncLink] = set()
        self._version = self._fleet.version

    def _alink(self, ep: str) -> _AsyncLink:
        if self._version != self._fleet.version:
            current = set(self._fleet.endpoints())
            for e in [e for e in self._alinks if e not in current]:
                self._retire(e)
            self._version = self._fleet.version
        al = self._alinks.get(ep)
        if al is None:
            al = self._alinks[ep] = _AsyncLink(self, self._new_link(self.ctx, ep))
        return al

    def _retire(self, ep: str) -> None:
        al = self._alinks.pop(ep, None)
        if al is not None:
            al.retired = True
            if al.waiters:
                self._retired.add(al)
            else:
                al.close()

    async def _attempt(self, al: _AsyncLink, frames, rid: str, send_until: float, until: float, fail_fast: bool):
        if rid in al.waiters:
            raise ValueError(f"request id {rid!r} is already in flight on {al.link.endpoint}")
        link = al.link
        fut = asyncio.get_running_loop().create_future()
        al.waiters[rid] = fut
        try:
            refused, bad = link.refused, link.bad_handshakes
            while True:                               # the send: never blocks past send_until
                if link.writable():
                    # marked sent before the await: the reply can reach the reader task before this
                    # coroutine resumes after the send, and a reply for an id not marked is dropped
                    al.sent.add(rid)
                    try:
                        await link.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                        break
                    except zmq.Again:
                        al.sent.discard(rid)
                left = send_until - time.monotonic()
                if left <= 0:
                    return UNREACHABLE, None
                # not sock.poll(POLLOUT): pyzmq's asyncio poll parks an event in the socket's send queue,
                # and a NOBLOCK send made meanwhile by another request is queued behind it instead of
                # failing at once -- a future with no timeout that resolves only when the socket turns
                # writable, so never for a peer that never comes up.  A short sleep keeps every send
                # immediate (done or EAGAIN); it only runs while no connection is up.
                await asyncio.sleep(min(left, SEND_RETRY_S))
                if fail_fast and (link.refused > refused or link.bad_handshakes > bad):
                    return UNREACHABLE, None
            try:
                arrays, head = await asyncio.wait_for(fut, max(0.0, until - time.monotonic()))
                return OK, (arrays, head)
            except ReplyError as e:
                return "error", e
            except _Lost:
                return LOST, None
            except asyncio.TimeoutError:
                return NO_ANSWER, None
        finally:
            if not fut.done():
                fut.cancel()
            al.release(rid)

    async def _call(self, frames: list, rid: str, timeout: float | None, retries: int | None = None,
                    backoff: float | None = None):
        per = self.timeout if timeout is None else timeout
        at = self._attempts(rid, retries, backoff)
        while True:
            ep = at.choose()
            t0 = time.monotonic()
            if ep is None:
                at.record(None, UNRESOLVED, 0.0)
            else:
                fail_fast = at.failover_possible(ep)
                send_until = t0 + (min(per, self.connect_timeout) if fail_fast else per)
                try:
                    al = self._alink(ep)
                    outcome, val = await self._attempt(al, frames, rid, send_until, t0 + per, fail_fast)
                except BaseException:                 # cancelled: drop whatever may still be queued
                    self._retire(ep)
                    at.record(ep, UNREACHABLE, time.monotonic() - t0)
                    raise
                if outcome == "error":
                    at.record(ep, val.code, time.monotonic() - t0)
                    if val.code not in self.RETRY_CODES or not at.more():
                        raise val
                else:
                    if outcome != OK and self._alinks.get(ep) is al:
                        self._retire(ep)
                    at.record(ep, outcome, time.monotonic() - t0,
                              {NO_ANSWER: per, UNREACHABLE: send_until - t0}.get(outcome))
                    if outcome == OK:
                        return val[0], val[1], ep
            if not at.more():
                raise at.timeout_error()
            await asyncio.sleep(at.delay())

    async def infer(self, *inputs, timeout: float | None = None, request_id: str | None = None,
                    deadline_ms: float | None = None, retries: int | None = None,
                    backoff: float | None = None) -> list[np.ndarray]:
        """As Client.infer."""
        rid = request_id or uuid.uuid4().hex
        frames = P.request_frames(rid, [_to_numpy(x) for x in inputs], timeout_ms=deadline_ms)
        out, _, _ = await self._call(frames, rid, timeout, retries, backoff)
        return out

    async def spec(self, timeout: float | None = None, retries: int | None = None) -> dict:
        rid = uuid.uuid4().hex
        _, head, _ = await self._call([P.encode_header({"v": P.VERSION, "id": rid, "op": "spec"})], rid, timeout, retries)
        return head

    async def ping(self, timeout: float | None = None, retries: int | None = None) -> float:
        rid = uuid.uuid4().hex
        t0 = time.monotonic()
        await self._call([P.encode_header({"v": P.VERSION, "id": rid, "op": "ping"})], rid, timeout, retries)
        return time.monotonic() - t0

    def close(self) -> None:
        for al in list(self._alinks.values()) + list(self._retired):
            al.close()
        self._alinks.clear()
        self._retired.clear()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


# ---- command line ------------------------------------------------------------------------------------
def _load_key(path: str, secret: bool):
    import zmq.auth
    from .security import SERVER_KEY_NAME
    if os.path.isdir(path):
        path = os.path.join(path, SERVER_KEY_NAME + ".key")
    pub, sec = zmq.auth.load_certificate(path)
    if secret and not sec:
        raise ValueError(f"{path} holds no secret key")
    return (pub, sec) if secret else pub


def main(argv=None) -> int:
    """python -m packratd.client [ENDPOINT ...] [--batch N]: send one request shaped from the model's spec."""
    import argparse
    import sys
    from .model import example_inputs
    p = argparse.ArgumentParser(prog="python -m packratd.client", description=main.__doc__)
    p.add_argument("endpoint", nargs="*", default=["ipc:///run/packratd/packratd.sock"],
                   help="one or more endpoints; a tcp:// DNS name stands for all its addresses")
    p.add_argument("--batch", "-b", type=int, default=1)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per attempt")
    p.add_argument("--retries", type=int, default=None, help="extra attempts (default: one on each other endpoint)")
    p.add_argument("--curve-server-key", metavar="FILE", help="the server's public key file (or its keys dir) for tcp://")
    p.add_argument("--curve-client-key", metavar="FILE", help="this client's secret key file (zmq.auth certificate)")
    args = p.parse_args(argv)
    kw = {}
    try:
        if args.curve_server_key:
            kw["curve_server_key"] = _load_key(args.curve_server_key, secret=False)
        if args.curve_client_key:
            kw["curve_keypair"] = _load_key(args.curve_client_key, secret=True)
    except (OSError, ValueError) as e:
        print(f"packratd.client: {e}", file=sys.stderr)
        return 2
    c = Client(args.endpoint, timeout=args.timeout, retries=args.retries, **kw)
    try:
        spec = c.spec()
        xs = example_inputs(spec["inputs"], args.batch)
        t0 = time.perf_counter()
        ys = c.infer(*xs)
        ms = (time.perf_counter() - t0) * 1000
    except (InferenceTimeout, ReplyError, ValueError) as e:
        print(f"packratd.client: {e}", file=sys.stderr)
        return 1
    finally:
        c.close()
    ins = ", ".join(f"{s['name']} {x.dtype}{list(x.shape)}" for s, x in zip(spec["inputs"], xs))
    outs = ", ".join(f"{y.dtype}{list(y.shape)}" for y in ys)
    print(f"sent {ins} -> got {outs} in {ms:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

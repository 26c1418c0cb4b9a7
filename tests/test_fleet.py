"""A fleet of real packratd daemons behind one client: one is SIGKILLed and another drained mid-run.

test_fleet_over_tcp_in_network_namespaces: three daemons, each in its own network namespace with its own
address (a veth pair per namespace, made here and removed afterwards, names unique per run), each pinned
to one core with taskset (2 cores here: two daemons share one), listening on tcp://<its address> with
CURVE on; one Client (CURVE, one server key per endpoint) drives load from the root namespace.
test_fleet_over_ipc: the same scenario over ipc:// sockets, for machines without namespaces.

What each asserts (run_scenario):
  * every request is answered, and every answer equals the model run in-process;
  * no request is answered twice: every reply any client socket read is recorded (also replies nobody
    waited for any more), and each request id has exactly one ok reply;
  * each daemon ran exactly what the client got from it while it lived: its status "requests" counter
    moved by the number of ok replies the client read from it (phase 1 for all three; the whole run for
    the survivor) -- a daemon that ran a request twice, or ran one whose answer was lost, breaks it;
  * the load spreads over all three, and moves to the survivor: every request started after the drained
    daemon exited is answered by the survivor, and the survivor's counter shows it.
"Never twice on one host" rests on two things: the client never re-sends to an endpoint while another
remains untried (in this scenario nothing times out, so the survivor's "deduplicated" counter stays 0),
and the daemon attaches a retry that arrives while the original is queued or running to it
(test_retry_on_the_only_daemon_after_a_timeout_runs_once).
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter, defaultdict

import numpy as np
import psutil
import pytest
import torch
import zmq
import zmq.auth

from packratd import protocol as P
from packratd import security
from packratd.client import Client, ReplyError
from tests.conftest import DaemonProc, load_module, wait_for

pytestmark = pytest.mark.slow

PLAN = "1x1:8"
THREADS = 4
PACE_S = 0.02          # between one thread's requests: a few hundred requests in all
PORT = 15555
# Tolerance.  tiny_mlp is three float32 Linear layers (K = 64, 256, 256).  An answer may come from a batch of
# up to 8 rows formed with other clients' requests, so the GEMM may sum each dot product in another order
# than the in-process 1..3-row run.  Two orders of a K-term float32 sum differ by at most 2*K*u*sum|w_i x_i|
# (u = 2^-24); with N(0,1) inputs and the default U(+-1/sqrt(K)) weights, sum|w x| ~ 0.4*sqrt(K) ~ 3-6, so the
# worst case is about 2*256*6e-8*6 ~ 2e-4 absolute per layer; the typical (random-walk) error is ~sqrt(K)
# smaller, ~1e-5.  Outputs are O(0.1-1) and another request's answer differs by O(0.1): atol 1e-4 plus
# rtol 1e-4 tolerates reordering and still catches a wrong row.
RTOL, ATOL = 1e-4, 1e-4


# ---- the client under test, with every reply it reads recorded ------------------------------------------
class RecordingClient(Client):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.replies: list[tuple[float, str, str, bool, str | None]] = []   # (time, endpoint, id, matched, code)
        self._rec = threading.Lock()

    def _note_reply(self, endpoint, rid, matched, code):
        with self._rec:
            self.replies.append((time.monotonic(), endpoint, rid, matched, code))

    def ok_from(self, endpoint, since=0.0, until=float("inf")) -> int:
        with self._rec:
            return sum(1 for t, ep, _, _, code in self.replies if ep == endpoint and code is None and since <= t < until)


class Load:
    """THREADS threads sharing one client; unique ids and inputs; every answer checked against the model."""

    def __init__(self, client, module):
        self.client = client
        self.module = module
        self.lock = threading.Lock()
        self.done: list[tuple[str, float, float]] = []    # (id, started, finished)
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.quota = None
        self.ids = itertools.count()

    def _one(self, rng, k):
        i = next(self.ids)
        rid = f"fleet-{os.getpid()}-{i}"
        x = rng.standard_normal((int(rng.integers(1, 4)), 64)).astype(np.float32)
        t0 = time.monotonic()
        try:
            (y,) = self.client.infer(x, request_id=rid)
        except Exception as e:  # noqa: BLE001 - every failure is reported by the test
            with self.lock:
                self.failures.append(f"{rid}: {type(e).__name__}: {e}")
            return
        with torch.inference_mode():
            want = self.module(torch.from_numpy(x)).numpy()
        with self.lock:
            if y.shape != want.shape or not np.allclose(y, want, rtol=RTOL, atol=ATOL):
                self.failures.append(f"{rid}: wrong answer (max |diff| {np.abs(y - want).max():.3g})")
            self.done.append((rid, t0, time.monotonic()))

    def run(self, k, n=None):
        rng = np.random.default_rng(1000 + k)
        count = 0
        while not self.stop.is_set() and (n is None or count < n):
            self._one(rng, k)
            count += 1
            time.sleep(PACE_S)

    def burst(self, per_thread):
        ts = [threading.Thread(target=self.run, args=(k, per_thread)) for k in range(THREADS)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(300)
        assert not any(t.is_alive() for t in ts), "a load thread is stuck"

    def start(self):
        self.stop.clear()
        self.threads = [threading.Thread(target=self.run, args=(k + THREADS,), daemon=True) for k in range(THREADS)]
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(300)
        assert not any(t.is_alive() for t in self.threads), "a load thread is stuck"

    def answered(self) -> int:
        with self.lock:
            return len(self.done)


def wait_state(d: DaemonProc, state="serving", timeout=180.0):
    return d.wait_state(state, timeout)


def cpus_for(n):
    cpus = sorted(os.sched_getaffinity(0))
    return [cpus[i % len(cpus)] for i in range(n)]


def taskset(cpu):
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") else []


# ---- the scenario -----------------------------------------------------------------------------------------
def run_scenario(daemons: list[DaemonProc], endpoints: list[str], client_kw: dict, module, tag: str):
    killed, drained, survivor = 0, 1, 2
    c = RecordingClient(endpoints, timeout=20, backoff=0.02, cooldown=1.0, **client_kw)
    load = Load(c, module)
    try:
        st0 = [d.control() for d in daemons]
        base = [s["requests"] for s in st0]

        # phase 1: three daemons; the load spreads; each daemon ran what the client got from it
        load.burst(per_thread=20)
        assert not load.failures, load.failures[:5]
        st1 = [d.control() for d in daemons]
        after1 = [s["requests"] for s in st1]
        dedup1 = st1[survivor]["deduplicated"]
        got1 = [c.ok_from(ep) for ep in endpoints]
        assert [a - b for a, b in zip(after1, base)] == got1, (after1, base, got1)
        assert sum(got1) == THREADS * 20 and min(got1) > 0, got1
        assert [b["deduplicated"] - a["deduplicated"] for a, b in zip(st0, st1)] == [0, 0, 0]   # nothing re-sent

        # phase 2: under load, SIGKILL one daemon, then drain another
        t_phase2 = time.monotonic()
        load.start()
        wait_for(lambda: load.answered() >= THREADS * 20 + 30, 120, "answers before the kill")
        kids = daemons[killed].children()
        for w in kids:                       # so that requests are surely in flight there when it dies
            w.suspend()
        wait_for(lambda: daemons[killed].control()["inflight_batches"] >= 1, 3, "a batch in flight on the daemon to kill")
        t_kill = time.monotonic()
        daemons[killed].proc.kill()
        daemons[killed].proc.wait(30)
        for w in kids:                       # whatever signal its death sends them, they must be running to act on it
            try:
                w.resume()
            except psutil.NoSuchProcess:
                pass
        gone, alive = psutil.wait_procs(kids, timeout=30)            # workers die with it (PDEATHSIG)
        assert not alive, f"workers of the killed daemon left behind: {[p.pid for p in alive]}"
        n_kill = load.answered()
        wait_for(lambda: load.answered() >= n_kill + 30, 120, "answers after the kill")
        # freeze the drained daemon's worker so requests are in flight there when the drain starts
        workers = daemons[drained].children()
        assert workers
        for w in workers:
            w.suspend()
        try:
            wait_for(lambda: daemons[drained].control()["inflight_batches"] >= 1, 3, "a batch in flight on the drained daemon")
            t_drain = time.monotonic()
            assert daemons[drained].control("drain")
            probe = Client(endpoints[drained], timeout=5, **client_kw)   # alone: no other endpoint to go to
            try:
                with pytest.raises(ReplyError) as ei:
                    probe.infer(np.zeros((1, 64), np.float32))
                assert ei.value.code == P.DRAINING
            finally:
                probe.close()
        finally:
            for w in workers:
                w.resume()
        rc = daemons[drained].proc.wait(120)
        t_drained = time.monotonic()
        assert rc == 0, daemons[drained].logs()[-3000:]
        n_drained = load.answered()
        wait_for(lambda: load.answered() >= n_drained + 50, 120, "answers after the drain")
        load.finish()
        fin = daemons[survivor].control()
        final_survivor, final_dedup = fin["requests"], fin["deduplicated"]
    finally:
        c.close()

    assert not load.failures, load.failures[:5]
    total = len(load.done)
    ids = [rid for rid, _, _ in load.done]
    assert len(set(ids)) == total

    # no request answered twice: every ok reply any socket read, per id
    oks = Counter(rid for _, _, rid, _, code in c.replies if code is None)
    assert set(oks) == set(ids), (len(oks), total)
    twice = {rid: n for rid, n in oks.items() if n != 1}
    assert not twice, f"answered more than once: {list(twice.items())[:5]}"
    assert all(m for _, _, _, m, code in c.replies if code is None), "an ok reply arrived for a request nobody waited for"

    # the survivor ran exactly what the client got from it (a timed-out attempt there, whose answer the
    # client no longer reads, is the only way it may have run more)
    st = c.stats()
    ran = final_survivor - after1[survivor]
    got = c.ok_from(endpoints[survivor], since=t_phase2)
    assert got <= ran <= got + st[endpoints[survivor]]["timeouts"], (ran, got, st)
    if not st[endpoints[survivor]]["timeouts"]:
        assert final_dedup == dedup1, "the client sent a request twice to the survivor"

    # nothing came from the killed daemon after the kill, nor from the drained one after it exited
    by_ep = defaultdict(list)
    for t, ep, rid, _, code in c.replies:
        if code is None:
            by_ep[ep].append(t)
    assert all(t < t_kill for t in by_ep[endpoints[killed]])
    # what was in flight on the killed daemon was noticed lost (not waited out) and answered elsewhere
    assert st[endpoints[killed]]["lost"] >= 1 and st[endpoints[killed]]["timeouts"] == 0, st[endpoints[killed]]
    assert all(t < t_drained for t in by_ep[endpoints[drained]])
    # what was in flight on the draining daemon finished there (drained, not re-run elsewhere)
    assert any(t > t_drain for t in by_ep[endpoints[drained]])
    # the load moved: every request started after the drained daemon exited was answered by the survivor
    late = {rid for rid, t0, _ in load.done if t0 > t_drained}
    answered_by = {rid: ep for _, ep, rid, _, code in c.replies if code is None}
    assert len(late) >= 40 and {answered_by[r] for r in late} == {endpoints[survivor]}, (len(late), Counter(answered_by[r] for r in late))
    assert ran >= len(late)

    print(f"\nfleet[{tag}]: {total} requests from {THREADS} threads, 0 lost, 0 answered twice, all equal to the "
          f"model; phase 1 per daemon {got1}; killed daemon: {st[endpoints[killed]]['lost']} in-flight attempt(s) "
          f"lost and retried, {st[endpoints[killed]]['unreachable']} refused; drained daemon: "
          f"{sum(1 for t in by_ep[endpoints[drained]] if t > t_drain)} in-flight request(s) finished after the drain began, "
          f"{st[endpoints[drained]]['errors'].get('DRAINING', 0)} DRAINING reply(ies) retried elsewhere; survivor ran "
          f"{ran} in phase 2 ({len(late)} after the drain)")


def start_fleet(daemons, tmp_path, tiny_model, listen_for, prefix_for, extra=()):
    """Start three daemons into ``daemons`` (filled as they start, so the caller stops them even if one fails)."""
    for i in range(3):
        ex = list(extra)
        ep = listen_for(i)
        if ep:
            ex += ["--listen", ep]
        daemons.append(DaemonProc(tmp_path / f"d{i}", tiny_model, PLAN, extra=ex, prefix=prefix_for(i)))
    for d in daemons:
        wait_state(d)


def stop_all(daemons):
    errors = []
    for d in daemons:
        try:
            if d.proc.poll() is None:
                d.stop()
            else:
                d.log.close()
        except Exception as e:  # noqa: BLE001 - stop the others first, then report
            errors.append(e)
    if errors:
        raise errors[0]


# ---- over ipc -------------------------------------------------------------------------------------------
def test_fleet_over_ipc(tmp_path, tiny_model):
    module = load_module(tiny_model)
    cpus = cpus_for(3)
    daemons = []
    try:
        start_fleet(daemons, tmp_path, tiny_model, lambda i: None, lambda i: taskset(cpus[i]))
        for d, cpu in zip(daemons, cpus):
            if taskset(cpu):
                assert psutil.Process(d.proc.pid).cpu_affinity() == [cpu]
        run_scenario(daemons, [d.endpoint for d in daemons], {}, module, "ipc")
    finally:
        stop_all(daemons)


# ---- over TCP, one network namespace per daemon ---------------------------------------------------------------
def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Namespaces:
    """n network namespaces, each joined to the root namespace by a veth pair with its own /30:
    root side 10.A.B.(4i+1), namespace side 10.A.B.(4i+2).  Names carry this process's pid."""

    def __init__(self, n: int):
        self.n = n
        pid = os.getpid()
        self.names = [f"prk{pid}n{i}" for i in range(n)]
        self.veths = [f"prk{pid}v{i}" for i in range(n)]
        routes = _ip("-4", "route", "show").stdout + _ip("-4", "addr", "show").stdout
        for k in range(256):                      # a 10.A.B.0/24 no interface or route of this host uses
            a, b = 200 + (pid // 256 + k) % 50, (pid + k) % 256
            if f"10.{a}.{b}." not in routes:
                break
        self.prefix = f"10.{a}.{b}"
        self.made_ns: list[str] = []
        self.made_links: list[str] = []

    def address(self, i: int) -> str:
        return f"{self.prefix}.{4 * i + 2}"

    def __enter__(self):
        try:
            for i, (ns, veth) in enumerate(zip(self.names, self.veths)):
                _ip("netns", "add", ns)
                self.made_ns.append(ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                self.made_links.append(veth)
                _ip("addr", "add", f"{self.prefix}.{4 * i + 1}/30", "dev", veth)
                _ip("link", "set", veth, "up")
                _ip("-n", ns, "addr", "add", f"{self.address(i)}/30", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def exec_prefix(self, i: int, cpu: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i], *taskset(cpu)]

    def __exit__(self, *exc):
        for ns in self.made_ns:
            # anything still running in our namespace is a process this test started
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)       # takes the namespace's veth end, and so its peer
        for veth in self.made_links:
            if _ip("link", "show", veth, check=False).returncode == 0:
                _ip("link", "del", veth, check=False)
        left = [ns for ns in self.made_ns if ns in _ip("netns", "list", check=False).stdout]
        assert not left, f"network namespaces left behind: {left}"


def netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "the iproute2 'ip' command is not installed"
    probe = f"prk{os.getpid()}probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"'ip netns add' is not permitted here ({r.stderr.strip()}); it needs CAP_SYS_ADMIN and CAP_NET_ADMIN"
    _ip("netns", "del", probe, check=False)
    return None


def test_fleet_over_tcp_in_network_namespaces(tmp_path, tiny_model):
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    if not zmq.has("curve"):
        pytest.skip("this libzmq has no CURVE")
    module = load_module(tiny_model)
    clients, mine = tmp_path / "curve-clients", tmp_path / "client-key"
    clients.mkdir()
    mine.mkdir()
    pub_file, sec_file = zmq.auth.create_certificates(str(mine), "fleet-test")
    shutil.copy(pub_file, clients)
    keypair = zmq.auth.load_certificate(sec_file)
    cpus = cpus_for(3)
    daemons = []
    with Namespaces(3) as nss:
        endpoints = [f"tcp://{nss.address(i)}:{PORT}" for i in range(3)]
        try:
            start_fleet(daemons, tmp_path, tiny_model, lambda i: endpoints[i], lambda i: nss.exec_prefix(i, cpus[i]),
                        extra=["--set", "server.curve=true", "--set", f"server.curve_clients_dir={clients}"])
            for i, d in enumerate(daemons):
                # really inside its namespace, really pinned
                assert os.readlink(f"/proc/{d.proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")
                if taskset(cpus[i]):
                    assert psutil.Process(d.proc.pid).cpu_affinity() == [cpus[i]]
            keys = {ep: security.server_public_key(os.path.join(d.state_dir, "curve"))
                    for ep, d in zip(endpoints, daemons)}
            assert len(set(keys.values())) == 3                 # each daemon has its own server key
            # without the right key nothing gets through
            stranger = Client(endpoints[0], timeout=1.0, curve_server_key=keys[endpoints[0]],
                              curve_keypair=zmq.curve_keypair())
            with pytest.raises(TimeoutError):
                stranger.ping()
            stranger.close()
            run_scenario(daemons, endpoints, {"curve_server_key": keys, "curve_keypair": keypair}, module, "tcp-netns")
        finally:
            stop_all(daemons)


# ---- the one case where a request goes to the same daemon twice ----------------------------------------------
def test_retry_on_the_only_daemon_after_a_timeout_runs_once(tmp_path, tiny_model):
    """Only one daemon, its worker frozen: the attempt times out, the client closes that socket and sends the
    same id again on a fresh one (the one case where the client re-sends to a daemon: no other is left).
    The daemon attaches the retry to the original, runs it once and answers the retry's connection too
    (the first is gone): the client gets the right answer, "requests" moves by 1, "deduplicated" by 1.
    Without the daemon's deduplication "requests" moves by 2."""
    module = load_module(tiny_model)
    d = DaemonProc(tmp_path / "d", tiny_model, PLAN, prefix=taskset(cpus_for(1)[0]))
    try:
        wait_state(d)
        c = Client(d.endpoint, timeout=2.0)
        x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
        st0 = d.control()
        workers = d.children()
        for w in workers:
            w.suspend()
        box = {}

        def call():
            try:
                box["y"] = c.infer(x, request_id="dedup-1", retries=1, backoff=0.0)[0]
            except Exception as e:  # noqa: BLE001 - checked below
                box["e"] = e

        t = threading.Thread(target=call)
        try:
            t.start()
            wait_for(lambda: c.stats()[d.endpoint]["timeouts"] >= 1, 10, "the first attempt to time out")
            wait_for(lambda: c.stats()[d.endpoint]["outstanding"] == 1, 5, "the retry")
        finally:
            for w in workers:
                w.resume()
        t.join(30)
        c.close()
        assert "e" not in box, box.get("e")
        with torch.inference_mode():
            want = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(box["y"], want, rtol=RTOL, atol=ATOL)
        wait_for(lambda: d.control()["inflight_batches"] == 0 and d.control()["queue_rows"] == 0, 10, "an idle daemon")
        st1 = d.control()
        assert (st1["requests"] - st0["requests"], st1["deduplicated"] - st0["deduplicated"]) == (1, 1)
    finally:
        if d.proc.poll() is None:
            d.stop()

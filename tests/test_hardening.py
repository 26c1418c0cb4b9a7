"""Nothing a client, a worker, a model or an operator does can crash or wedge the daemon (issue 12).

One test per fault found in the first version; each failed on that version and passes now
(docs/reliability.md lists them).  Real daemons, real workers, real sockets; the assertions read
status fields, exit codes and answers, never log wording.
"""
from __future__ import annotations

import json
import os
import signal
import time
import uuid

import numpy as np
import psutil
import pytest
import torch
import zmq

from packratd import protocol as P
from packratd.client import Client, ReplyError
from packratd.control import control_endpoint
from tests.test_reliability import (SLOW, _close, collect, dealer, gone_or_zombie, infer_in_thread,  # noqa: F401
                                    send, slow_model, slow_pool, wait_for)

pytestmark = pytest.mark.slow


def _export(tmp_path, name: str, module: torch.nn.Module, batch: int = 2, width: int = 8) -> str:
    """Export a small nn.Module with a dynamic batch dim, as tools/export_model.py does."""
    module.eval()
    dim = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        ep = torch.export.export(module, (torch.randn(batch, width),), dynamic_shapes={"x": {0: dim}})
    path = str(tmp_path / f"{name}.pt2")
    torch.export.save(ep, path)
    return path


class _Out(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# ---- the control socket ---------------------------------------------------------------------------
def test_two_frame_control_request_does_not_kill_the_daemon(daemon, tiny_model):
    """Once: a REQ sending [status, 'x'] made the REP socket raise EFSM and the daemon exit."""
    d = daemon(tiny_model, plan="1x1:8")
    ctx = zmq.Context.instance()
    for frames in ([b'{"cmd":"status"}', b"x"], [b"\xff\xfe"], [b'{"cmd":"status"}'] * 5, [b"[]"]):
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(control_endpoint(d.runtime_dir))
        s.send_multipart(frames)
        assert s.poll(10000), f"no reply to {frames!r}"
        reply = json.loads(s.recv())
        assert reply["ok"] is False, reply
        s.close()
    assert d.proc.poll() is None
    c = Client(d.endpoint, timeout=30)
    (y,) = c.infer(np.ones((2, 64), np.float32))
    assert y.shape == (2, 10)
    c.close()
    assert d.control()["state"] == "serving"
    assert d.stop() == 0


def test_plan_for_a_huge_batch_is_refused_and_nothing_waits(daemon, tiny_model, tmp_path):
    """Once: `packratctl plan -b 100000` ran the O(B^2) solver on the main loop; after 30 s every worker quit."""
    from tests.conftest import write_profile
    state = str(tmp_path / "state")
    write_profile(state, tiny_model, {1: lambda b: 1 + b, 2: lambda b: 0.6 + 0.6 * b})
    d = daemon(tiny_model, plan="1x1:8", extra=["--state-dir", state])
    t0 = time.monotonic()
    with pytest.raises(Exception, match="larger than server.max_batch_size"):
        d.control("plan", batch_size=100000)
    with pytest.raises(Exception, match="positive integer"):
        d.control("plan", batch_size=-3)
    with pytest.raises(Exception, match="larger than server.max_batch_size"):
        d.control("reconfigure", batch_size=100000)
    r = d.control("plan", batch_size=32)                  # the solver runs in the planner process, answer comes back
    assert r["batch_size"] == 32 and r["best"] and r["predicted_ms"] > 0
    c = Client(d.endpoint, timeout=30)
    (y,) = c.infer(np.ones((3, 64), np.float32))
    assert y.shape == (3, 10) and time.monotonic() - t0 < 60
    st = d.control()
    assert st["loop_errors"] == {} and st["worker_deaths"] == 0
    c.close()
    assert d.stop() == 0


# ---- client messages -------------------------------------------------------------------------------
def test_many_frame_message_is_refused_and_memory_comes_back(daemon, tiny_model):
    """8,000 frames of 64 KiB in one message: refused (BAD_HEADER) without being parsed, and the daemon's
    memory returns to where it was.  libzmq itself holds a multipart message whole before the daemon sees
    its first frame (atomic delivery), so the peak during one such message is bounded only by the unit's
    MemoryMax; see docs/reliability.md."""
    d = daemon(tiny_model, plan="1x1:8")
    ps = psutil.Process(d.proc.pid)
    good = dealer(d.endpoint)
    x = np.ones((1, 64), np.float32)
    collect(good, [send(good, x)])
    rss0 = ps.memory_info().rss
    s = dealer(d.endpoint)
    chunk = b"\0" * (64 * 1024)
    for rep in range(2):
        rid = f"many-{rep}"
        hdr = json.dumps({"v": 1, "id": rid, "op": "infer", "tensors": [{"dtype": "uint8", "shape": [1, 65536]}]}).encode()
        s.send_multipart([hdr] + [chunk] * 8000)
        got = collect(s, [rid], timeout=60)
        assert got[rid][0] == "BAD_HEADER" and "frames" in got[rid][1], got
        assert collect(good, [send(good, x)])   # others keep getting answers
    rss1 = wait_for(lambda: (lambda r: r if r < rss0 + 64 * 2**20 else None)(ps.memory_info().rss), 30,
                    "daemon RSS back within 64 MiB of where it was")
    print(f"\nhardening[many-frames]: RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB after two 512 MiB messages")
    s.close()
    good.close()
    assert d.stop() == 0


def test_pipelining_clients_that_never_read_are_bounded(daemon, slow_model, slow_pool):
    """One client that pipelines 400 requests and never reads, and 30 connections that each send 10 and never
    read: each connection holds at most server.max_requests_per_client queued or running (the rest get
    OVERLOADED), at most server.client_hwm replies wait for it; RSS stays bounded and a well-behaved client
    keeps getting correct answers."""
    d = daemon(slow_model, plan="1x2:16", extra=SLOW + ["--set", "server.max_requests_per_client=4",
                                                        "--set", "server.client_hwm=8"])
    ps = psutil.Process(d.proc.pid)
    x, want = slow_pool[0]
    one = np.ascontiguousarray(x[:1])                     # 256 KiB per request

    def frames():
        return P.request_frames(uuid.uuid4().hex, [one])
    ctx = zmq.Context()
    try:
        good = Client(d.endpoint, timeout=120)
        (y,) = good.infer(x[:2])
        rss0 = ps.memory_info().rss
        hog = ctx.socket(zmq.DEALER)
        hog.setsockopt(zmq.LINGER, 0)
        hog.setsockopt(zmq.SNDHWM, 0)
        hog.connect(d.endpoint)
        for _ in range(400):
            hog.send_multipart(frames())
        many = []
        for _ in range(30):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(d.endpoint)
            for _ in range(10):
                s.send_multipart(frames())
            many.append(s)
        st = wait_for(lambda: (lambda s: s if s["errors"].get("OVERLOADED", 0) >= 300 else None)(d.control()), 60,
                      "the caps answering OVERLOADED")
        assert st["queue_rows"] <= 31 * 4                 # at most max_requests_per_client per connection
        for i in range(3):
            (y,) = good.infer(x[4 * i:4 * i + 2])
            assert _close(y, want[4 * i:4 * i + 2])
        # one id sent 8 times at once (8 = client_hwm, so no reply is dropped): the copies are attached to the
        # first (run once) up to the connection's cap of 4, the rest get OVERLOADED
        dup = ctx.socket(zmq.DEALER)
        dup.setsockopt(zmq.LINGER, 0)
        dup.connect(d.endpoint)
        dup_frames = P.request_frames("same-id", [one])
        before = wait_for(lambda: (lambda s: s if s["queue_rows"] == 0 and s["inflight_batches"] == 0 else None)(
            d.control()), 120, "the pipelined work done")
        for _ in range(8):
            dup.send_multipart(dup_frames)
        got = collect_all(dup, 8, timeout=120)
        codes = sorted(c for c, _ in got)
        assert len(got) == 8 and set(codes) <= {"ok", "OVERLOADED"}, codes         # every copy answered once
        after = d.control()
        dups = after["deduplicated"] - before["deduplicated"]
        runs = after["requests"] - before["requests"]            # the attached copies ride on these runs
        ok = codes.count("ok")
        assert dups >= 3 and ok == runs + dups and ok <= 4 * runs, (ok, runs, dups)   # never more than the cap at once
        rss1 = ps.memory_info().rss
        assert rss1 < rss0 + 128 * 2**20, (rss0, rss1)
        assert d.control()["state"] == "serving"
        print(f"\nhardening[pipelining]: 700 requests pipelined unread, RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB, "
              f"queue {st['queue_rows']} rows, errors {st['errors']}")
        good.close()
    finally:
        ctx.destroy(linger=0)
    assert d.stop() == 0


def test_retried_request_id_runs_once_while_the_original_is_in_flight(daemon, slow_model, slow_pool):
    d = daemon(slow_model, plan="1x2:16", extra=SLOW)
    x, want = slow_pool[0]
    a, b = dealer(d.endpoint), dealer(d.endpoint)
    rid = uuid.uuid4().hex
    a.send_multipart(P.request_frames(rid, [x]))
    wait_for(lambda: d.control()["inflight_batches"] >= 1, 60, "the original in flight", interval=0.02)
    b.send_multipart(P.request_frames(rid, [x]))                  # a retry from another socket, same id and inputs
    ga, gb = collect(a, [rid]), collect(b, [rid])
    assert ga[rid][0] == gb[rid][0] == "ok" and _close(ga[rid][1], want) and _close(gb[rid][1], want)
    st = d.control()
    assert st["requests"] == 1 and st["deduplicated"] == 1
    # same id, different inputs: not a retry, run separately
    c = dealer(d.endpoint)
    rid2 = uuid.uuid4().hex
    c.send_multipart(P.request_frames(rid2, [x[:2]]))
    c.send_multipart(P.request_frames(rid2, [x[2:4]]))
    got = []
    t_end = time.monotonic() + 120
    while len(got) < 2 and time.monotonic() < t_end:
        if c.poll(200):
            got.append(P.parse_reply(c.recv_multipart())[1][0])
    assert len(got) == 2 and d.control()["deduplicated"] == 1
    for s in (a, b, c):
        s.close()
    assert d.stop() == 0


def test_deadline_passes_in_the_queue_timeout(daemon, slow_model, slow_pool):
    """A request whose deadline passes while the instances are busy gets TIMEOUT and is not run
    (deleting the dispatcher's expiry makes it run and answer ok: this test fails then)."""
    d = daemon(slow_model, plan="1x2:16", extra=SLOW)
    x, want = slow_pool[1]
    busy = dealer(d.endpoint)
    big = send(busy, x)                                           # 16 rows: the instance is busy for a while
    wait_for(lambda: d.control()["inflight_batches"] >= 1, 60, "a batch in flight", interval=0.02)
    s = dealer(d.endpoint)
    rid = uuid.uuid4().hex
    s.send_multipart(P.request_frames(rid, [x[:1]], timeout_ms=50))
    got = collect(s, [rid], timeout=120)
    assert got[rid][0] == "TIMEOUT", got
    assert collect(busy, [big])[big][0] == "ok"
    st = d.control()
    assert st["errors"].get("TIMEOUT") == 1 and st["requests"] == 1 and st["rows"] == 16   # the late one never ran
    assert d.stop() == 0


def collect_all(sock, n, timeout=60.0) -> list:
    """n replies, whatever their ids: [(code or "ok", id)]."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        if sock.poll(200):
            try:
                rid, _, _ = P.parse_reply(sock.recv_multipart())
                out.append(("ok", rid))
            except P.ReplyError as e:
                out.append((e.code, e.id))
    return out


# ---- the model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, fn, why", [
    ("bf16_out", lambda x: (x * 2).to(torch.bfloat16), "dtype"),              # a dtype the wire cannot carry
    ("scalar_out", lambda x: x.sum(), "scalar"),                               # a 0-d output
    ("unbatched_out", lambda x: x.sum(0), "rows on dim 0"),                    # dim 0 is not the batch
])
def test_model_with_outputs_the_wire_cannot_carry_fails_to_boot_clearly(daemon, tmp_path, name, fn, why):
    """Once: such an output raised on the main loop (KeyError / IndexError), killing the daemon on every
    restart.  Now the worker refuses at boot, the daemon exits 3 (not restarted by the unit) at once."""
    model = _export(tmp_path, name, _Out(fn))
    d = daemon(model, plan="1x1:4", wait=False)
    rc = d.proc.wait(timeout=180)
    assert rc == 3, d.logs()[-2000:]
    assert why in d.logs()            # the reason reaches the journal (the only place it can: the daemon has exited)


def test_results_that_do_not_match_the_output_spec_fail_that_batch(daemon, tmp_path):
    """A model that drops the rows whose first value is -inf passes the boot check (warm-up data has none)
    but returns 3 rows for a slice of 4 when one is: that batch fails with MODEL_ERROR and is counted (once,
    the first version sliced such results into other requests' rows).  The daemon serves on."""
    model = _export(tmp_path, "mask", _Out(lambda x: x[x[:, 0] > -1e30] * 2.0))
    d = daemon(model, plan="1x1:2")
    c = Client(d.endpoint, timeout=30)
    x = np.arange(32, dtype=np.float32).reshape(4, 8)
    bad = x.copy()
    bad[1, 0] = -np.inf
    with pytest.raises(ReplyError) as e:
        c.infer(bad)
    assert e.value.code == "MODEL_ERROR"
    (y,) = c.infer(x)
    np.testing.assert_array_equal(y, x * 2)
    st = d.control()
    assert st["result_mismatches"] == 1 and st["errors"] == {"MODEL_ERROR": 1} and st["state"] == "serving"
    c.close()
    assert d.stop() == 0


# ---- workers ----------------------------------------------------------------------------------------
def test_poison_request_fails_alone_and_costs_no_core(daemon, slow_model, slow_pool):
    """Every worker that holds this request's rows dies (killed from outside while it holds them): after
    three deaths the request gets MODEL_ERROR, the workers' deaths are not counted as a crash loop, and
    no core is taken out of service."""
    d = daemon(slow_model, plan="1x1:16", extra=SLOW + ["--set", "workers.max_restarts=2"])
    x, _ = slow_pool[2]
    c = Client(d.endpoint, timeout=300)
    t, box = infer_in_thread(c, x)
    killed: list[int] = []
    while t.is_alive() and len(killed) < 5:
        try:
            busy = [w for w in d.control()["workers"] if w["busy"] and w["pid"] not in killed]
        except Exception:  # noqa: BLE001
            busy = []
        for w in busy:
            os.kill(w["pid"], signal.SIGKILL)
            killed.append(w["pid"])
            wait_for(lambda: gone_or_zombie(w["pid"]), 30, "the killed worker gone")
        time.sleep(0.02)
    t.join(300)
    assert isinstance(box.get("error"), ReplyError) and box["error"].code == "MODEL_ERROR", box
    assert len(killed) == 3, killed
    st = wait_for(lambda: (lambda s: s if s["workers"] and all(w["state"] == "ready" for w in s["workers"]) else None)(
        d.control()), 120, "instance back")
    assert st["worker_deaths"] == 3 and st["slices_resent"] == 2
    assert st["cpus_out_of_service"] == [] and st["failed_instances"] == [] and st["state"] == "serving"
    (y,) = c.infer(slow_pool[3][0][:2])
    assert _close(y, slow_pool[3][1][:2])
    c.close()
    assert d.stop() == 0


def test_last_instance_failing_is_not_a_silent_outage(daemon, tiny_model):
    """Once: the only instance failing left status 'serving' and requests queued forever.  Now the daemon
    re-plans onto the cores it still has, and with none left reports `failed` (status, health, metrics)
    and answers UNAVAILABLE; an operator's reconfigure brings it back."""
    from tests.test_reliability import Killer
    d = daemon(tiny_model, plan="1x1:4", extra=["--set", "workers.max_restarts=1"])
    cpus = sorted(psutil.Process(d.proc.pid).cpu_affinity())
    first = d.control()["instances"][0]["cpus"][0]
    with Killer(d, first):
        st = wait_for(lambda: (lambda s: s if s["cpus_out_of_service"] and s["state"] == "serving"
                               and s["instances"] and first not in s["instances"][0]["cpus"]
                               and all(w["state"] == "ready" for w in s["workers"]) and s["workers"] else None)(d.control()),
                      120, "re-planned onto the remaining core")
    assert st["cpus_out_of_service"] == [first]
    c = Client(d.endpoint, timeout=30)
    (y,) = c.infer(np.ones((1, 64), np.float32))
    others = [k for k in cpus if k != first]
    killers = [Killer(d, k) for k in cpus]
    for k in killers:
        k.__enter__()
    try:
        st = wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(d.control()), 120, "state failed")
    finally:
        for k in killers:
            k.__exit__(None, None, None)
    assert sorted(st["cpus_out_of_service"]) == cpus and st["failed_reason"]
    h = d.health()
    assert h["live"] is True and h["ready"] is False and h["state"] == "failed"
    with pytest.raises(ReplyError) as e:
        c.infer(np.ones((1, 64), np.float32))
    assert e.value.code == "UNAVAILABLE"
    r = d.control("reconfigure", plan="1x1:4")
    assert sorted(r["cpus_back_in_service"]) == cpus
    wait_for(lambda: d.control()["state"] == "serving", 120, "serving again")
    (y,) = c.infer(np.ones((1, 64), np.float32))
    assert y.shape == (1, 10) and others
    c.close()
    assert d.stop() == 0


def test_worker_that_cannot_be_started_does_not_kill_the_loop(daemon, tiny_model):
    """Popen failing (EMFILE here: the daemon's file limit lowered from outside to what it has open) once
    raised out of the loop.  Now it is a failed start of that instance, retried with back-off; the loop
    goes on, and once the limit is back the instance starts."""
    # new processes (the fork server would fork the replacement from its own fds; its connection to the
    # daemon would then need an fd, and libzmq's ipc listener aborts on EMFILE: see docs/reliability.md)
    d = daemon(tiny_model, plan="2x1:4", extra=["--set", "workers.max_restarts=20", "--set", "workers.fork_server=false"])
    ps = psutil.Process(d.proc.pid)
    soft, hard = ps.rlimit(psutil.RLIMIT_NOFILE)
    w = d.control()["workers"][1]

    def workers():
        out = []
        for p in ps.children():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "packratd.worker" in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                pass
        return out
    try:
        ps.rlimit(psutil.RLIMIT_NOFILE, (16, hard))              # below what it has open: no new fd, not even Popen's pipe
        os.kill(w["pid"], signal.SIGKILL)
        wait_for(lambda: len(workers()) == 1, 30, "the killed worker reaped")
        t_end = time.monotonic() + 3.0                           # respawns are tried (0.5 s, 1 s, 2 s) and fail
        while time.monotonic() < t_end:
            assert d.proc.poll() is None and len(workers()) == 1
            time.sleep(0.1)
    finally:
        ps.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    st = wait_for(lambda: (lambda s: s if len(s["workers"]) == 2 and all(x["state"] == "ready" for x in s["workers"])
                           else None)(d.control()), 120, "instance 1 started once the limit is back")
    assert st["spawn_failures"] >= 1 and st["loop_errors"] == {} and st["state"] == "serving"
    c = Client(d.endpoint, timeout=30)
    (y,) = c.infer(np.ones((3, 64), np.float32))
    assert y.shape == (3, 10)
    c.close()
    assert d.stop() == 0


def test_reload_with_longer_heartbeats_does_not_kill_respawned_workers(daemon, tiny_model, tmp_path):
    """Once: reload gave new workers the new heartbeat interval but kept the dispatcher's old liveness limit,
    so respawned workers were killed as silent over and over.  Each worker is judged by its own settings."""
    cfg = tmp_path / "p.toml"
    cfg.write_text("[workers]\nheartbeat_interval_s = 0.5\nheartbeat_liveness = 4\n")
    d = daemon(tiny_model, plan="2x1:4", config=str(cfg))
    cfg.write_text("[workers]\nheartbeat_interval_s = 3.0\nheartbeat_liveness = 4\n")
    assert d.control("reload")["reloaded"] is True
    w = d.control()["workers"][0]
    os.kill(w["pid"], signal.SIGKILL)
    wait_for(lambda: (lambda s: len(s["workers"]) == 2 and all(x["state"] == "ready" for x in s["workers"])
                      and w["pid"] not in [x["pid"] for x in s["workers"]])(d.control()), 120, "respawned")
    t_end = time.monotonic() + 9.0            # three of the new heartbeat periods: the old limit was 2 s
    while time.monotonic() < t_end:
        st = d.control()
        assert st["worker_deaths_by"].get("heartbeat", 0) == 0, st["worker_deaths_by"]
        time.sleep(0.2)
    assert st["worker_deaths"] == 1
    assert d.stop() == 0


@pytest.mark.parametrize("toml, why", [
    ('[workers]\nallocator = "jemalloc"\n', "jemalloc"),       # not installed here: refused before anything changes
    ("[server\nmax_batch_size = 3\n", "not valid TOML"),
    ('[oip]\nhttp_listen = "0"\ntls_cert = "/x.pem"\n', "tls_key"),
])
def test_reload_that_cannot_apply_keeps_serving(daemon, tiny_model, tmp_path, toml, why):
    from packratd.worker import find_allocator
    if "jemalloc" in toml:
        try:
            find_allocator("jemalloc")
            pytest.skip("jemalloc is installed here, so switching to it is not an error")
        except FileNotFoundError:
            pass
    cfg = tmp_path / "p.toml"
    cfg.write_text("[server]\nmax_batch_size = 8\n")
    d = daemon(tiny_model, plan="1x1:4", config=str(cfg))
    cfg.write_text(toml)
    r = d.control("reload")
    assert r["reloaded"] is False and why in r["error"]
    d.proc.send_signal(signal.SIGHUP)                             # the same through SIGHUP
    c = Client(d.endpoint, timeout=30)
    (y,) = c.infer(np.ones((1, 64), np.float32))
    st = d.control()
    assert st["max_batch_size"] == 8 and st["loop_errors"] == {} and st["state"] == "serving"
    c.close()
    assert d.stop() == 0


def test_switch_with_slices_in_flight_loses_nothing(daemon, slow_model, slow_pool):
    """A reconfiguration lands while blue holds a batch: the batch is answered by blue, blue retires only
    after it, and the next request runs on green."""
    d = daemon(slow_model, plan="2x1:8", extra=SLOW)
    x, want = slow_pool[3]
    c = Client(d.endpoint, timeout=300)
    t, box = infer_in_thread(c, x)
    wait_for(lambda: d.control()["inflight_batches"] >= 1, 60, "blue busy", interval=0.02)
    blue = d.control()["active_generation"]
    d.control("reconfigure", plan="1x2:16")
    t.join(300)
    assert "error" not in box and _close(box["y"], want)
    # blue leaves status's live generations when it stops draining; its history entry (with the switch
    # timeline) lands only once its workers have exited, so wait for that entry, not for the list
    def blue_gone():
        s = d.control()
        gone = [h for h in s["history"] if h.get("generation") == blue and h.get("state") == "retired"]
        return (s, gone) if gone and s["active_generation"] != blue and len(s["generations"]) == 1 else None
    st, gone = wait_for(blue_gone, 120, "green active, blue gone")
    assert gone[-1]["switch"]["to"] == st["active_generation"]
    (y,) = c.infer(x[:3])
    assert _close(y, want[:3]) and st["errors"] == {}
    c.close()
    assert d.stop() == 0

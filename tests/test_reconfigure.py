"""Blue-green reconfiguration under load: no request lost, failed or answered twice."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import uuid

import numpy as np
import psutil
import pytest
import torch
import zmq

from packratd import protocol as P
from tests.conftest import DaemonProc, load_module, wait_for, write_profile

pytestmark = pytest.mark.skipif(len(psutil.Process().cpu_affinity()) < 2, reason="needs 2 usable CPUs")

MAXB = 16
# A crafted profile in which one 2-thread instance wins small batches and two 1-thread instances
# win large ones (see tests/test_monitor.py); everything downstream of the cache is real.
TABLE = {1: lambda b: 2 + 0.8 * b, 2: lambda b: 1 + 0.6 * b}
MONITOR = ["--set", f"server.max_batch_size={MAXB}", "--set", "autotune.batch_size=1",
           "--set", "autotune.interference_check=false", "--set", "monitor.interval_s=0.3",
           "--set", "monitor.window_s=2.5", "--set", "monitor.min_batches=8", "--set", "monitor.min_dwell_s=2",
           "--set", "monitor.confirmations=2", "--set", "server.max_delay_ms=1"]


@pytest.fixture
def start():
    """Start daemons with the monitor settings; every one is stopped at teardown, pass or fail."""
    started = []

    def go(tmp_path, model, extra=(), plan=None):
        d = DaemonProc(tmp_path, model, plan=plan, extra=list(MONITOR) + list(extra))
        started.append(d)
        return d
    yield go
    for d in started:
        if d.proc.poll() is None:
            d.stop()


class Load:
    """Client threads with raw DEALER sockets: unique ids, every reply checked and counted."""

    def __init__(self, endpoint, module, n_threads=3):
        self.endpoint = endpoint
        self.module = module
        self.rows = 1
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.ok = 0
        self.failures = []
        self.dupes = []
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(n_threads)]

    def run(self, k):
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        rng = np.random.default_rng(k)
        answered = set()
        while not self.stop.is_set():
            n = self.rows
            x = rng.standard_normal((n, 64)).astype(np.float32)
            rid = uuid.uuid4().hex
            s.send_multipart(P.request_frames(rid, [x]))
            with self.lock:
                self.sent += 1
            got = None
            deadline = time.monotonic() + 60
            while got is None and time.monotonic() < deadline:
                if not s.poll(1000):
                    continue
                frames = s.recv_multipart()
                try:
                    rrid, arrays, _ = P.parse_reply(frames)
                except P.ReplyError as e:
                    with self.lock:
                        self.failures.append(f"{e.code}: {e.message}")
                    got = "error"
                    break
                if rrid in answered or rrid != rid:
                    with self.lock:
                        self.dupes.append(rrid)
                    continue
                answered.add(rrid)
                got = arrays
            if got is None:
                with self.lock:
                    self.failures.append(f"no answer for {rid}")
                continue
            if got == "error":
                continue
            with torch.inference_mode():
                want = self.module(torch.from_numpy(x)).numpy()
            if got[0].shape != want.shape or not np.allclose(got[0], want, rtol=1e-4, atol=1e-5):
                with self.lock:
                    self.failures.append(f"wrong answer for {rid}")
            else:
                with self.lock:
                    self.ok += 1
        # anything arriving late would be a duplicate answer
        while s.poll(300):
            with self.lock:
                self.dupes.append(P.parse_reply(s.recv_multipart())[0])
        s.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(90)


def more_answers(load, n: int, timeout: float = 60.0):
    """Wait until the load has n more correct answers (the traffic runs a while: state, not a sleep)."""
    start = load.ok
    wait_for(lambda: load.ok >= start + n, timeout, f"{n} more answers")


def shape(d):
    return sorted(i["threads"] for i in d.control()["instances"])


def live_worker_pids(d):
    out = []
    for p in d.children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "packratd.worker" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:          # gone meanwhile (a forked worker is reaped by its fork server)
            pass
    return sorted(out)


def test_reconfigures_by_itself_under_shifting_load(start, tmp_path, tiny_model):
    state = str(tmp_path / "d" / "state")
    write_profile(state, tiny_model, TABLE, **{"server.max_batch_size": MAXB})
    d = start(tmp_path / "d", tiny_model)
    d.wait_serving()
    st = d.control()
    assert st["plan"] == "2:1", st["plan"]                   # small batches: one fat instance
    module = load_module(tiny_model)
    with Load(d.endpoint, module) as load:
        more_answers(load, 40)                                 # small batches for a while: the monitor keeps 2:1
        load.rows = MAXB                                       # traffic shifts to large batches
        wait_for(lambda: shape(d) == [1, 1], 90, "switch to two 1-thread instances")
        more_answers(load, 40)
        load.rows = 1                                          # and back
        wait_for(lambda: shape(d) == [2], 90, "switch back to one 2-thread instance")
        more_answers(load, 20)                                 # and served by it
    assert not load.failures, load.failures[:5]
    assert not load.dupes, load.dupes[:5]
    assert load.ok == load.sent and load.ok > 50
    # a switch's history entry lands once the old generation's workers have exited: wait for both
    st = wait_for(lambda: (lambda s: s if len([h for h in s["history"] if h.get("switch")]) >= 2 else None)(
        d.control()), 60, "both switches in the history")
    assert st["reconfigurations"] >= 2
    switches = [h for h in st["history"] if h.get("switch")]
    assert all(h["switch"]["reason"].startswith("monitor:") for h in switches[:2])
    # exactly one live generation once the old one is gone
    wait_for(lambda: len(d.control()["generations"]) == 1, 30, "one live generation")
    assert len(live_worker_pids(d)) == 1
    print(f"\nreconfiguration under load: {load.sent} requests, {load.ok} correct, 0 failed; timelines: "
          + json.dumps([h["switch"] for h in switches]))
    assert d.stop() == 0


def _export_tiny(path: str, seed: int) -> None:
    from tools import models as M
    from tools.export_model import export_program, save_atomic
    ep, _ = export_program("tiny_mlp", model=M.tiny_mlp(seed=seed))
    save_atomic(ep, path)


def test_green_that_fails_to_boot_leaves_blue_serving(start, tmp_path, tiny_model):
    model = str(tmp_path / "model.pt2")
    shutil.copy(tiny_model, model)
    d = start(tmp_path / "d", model, plan="2x1:8")
    d.wait_serving()
    module = load_module(model)
    blue = d.control()["active_generation"]
    digest = d.control()["model_digest"]
    with Load(d.endpoint, module, n_threads=2) as load:
        more_answers(load, 10)
        with open(model, "wb") as f:                            # the model file is broken on disk
            f.write(b"not a model any more")
        d.control("reconfigure", plan="1x2:16")                 # generations run their own copy: this one serves
        wait_for(lambda: (lambda s: s["plan"] == "2:16" and len(s["generations"]) == 1)(d.control()), 60,
                 "plan 2:16 serving the copy")
        assert d.control()["model_digest"] == digest
        blue = d.control()["active_generation"]
        r = d.control("reload")                                 # reload takes the file as it is now: broken
        assert r["model_changed"] is True
        st = wait_for(lambda: (lambda s: s if any(h.get("state") == "failed" for h in s["history"]) else None)(d.control()),
                      60, "failed attempt in status")
        more_answers(load, 10)                                  # blue still answering after green was given up
    failed = [h for h in st["history"] if h.get("state") == "failed"]
    assert failed and "failed to start" in failed[-1]["error"], failed
    assert st["active_generation"] == blue and st["state"] == "serving"
    assert not load.failures and not load.dupes and load.ok == load.sent and load.ok > 10
    assert len(live_worker_pids(d)) == len(st["instances"])
    assert d.stop() == 0


def test_model_rewritten_in_place_is_served_only_after_reload(start, tmp_path):
    """A model file rewritten in place never reaches running generations (not even a respawned worker);
    reload notices the new digest and rolls out a generation with it, without a failed request."""
    model = str(tmp_path / "model.pt2")
    _export_tiny(model, seed=0)
    old = load_module(model)
    d = start(tmp_path / "d", model, plan="2x1:8")
    d.wait_serving()
    digest0 = d.control()["model_digest"]
    newfile = str(tmp_path / "new.pt2")
    _export_tiny(newfile, seed=1)
    new = load_module(newfile)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    with torch.inference_mode():
        y_old, y_new = old(torch.from_numpy(x)).numpy(), new(torch.from_numpy(x)).numpy()
    assert not np.allclose(y_old, y_new, atol=1e-3)
    c = __import__("packratd.client", fromlist=["Client"]).Client(d.endpoint, timeout=60)
    shutil.copyfile(newfile, model)                             # rewritten in place (same inode)
    # a worker dies and is respawned: it still loads the generation's copy, not the rewritten file
    w0 = d.control()["workers"][0]
    os.kill(w0["pid"], signal.SIGKILL)
    wait_for(lambda: (lambda ws: len(ws) == 2 and all(w["state"] == "ready" for w in ws)
                      and w0["pid"] not in [w["pid"] for w in ws])(d.control()["workers"]), 90, "worker respawned")
    for _ in range(4):
        (y,) = c.infer(x)
        np.testing.assert_allclose(y, y_old, rtol=1e-4, atol=1e-5)
    with Load(d.endpoint, old, n_threads=1) as load:
        more_answers(load, 10)
    assert not load.failures and load.ok == load.sent
    r = d.control("reload")
    assert r["reloaded"] and r["model_changed"]
    st = wait_for(lambda: (lambda s: s if s["model_digest"] != digest0 and len(s["generations"]) == 1
                           and s["generations"][0]["state"] == "active" and s["active_generation"] > 1 else None)(d.control()),
                  90, "a generation serving the new model")
    (y,) = c.infer(x)
    np.testing.assert_allclose(y, y_new, rtol=1e-4, atol=1e-5)
    assert st["errors"] == {}, st["errors"]
    c.close()
    assert d.stop() == 0


def test_repeated_triggers_leave_one_generation(start, tmp_path, tiny_model):
    d = start(tmp_path / "d", tiny_model, plan="2x1:8")
    d.wait_serving()
    module = load_module(tiny_model)
    with Load(d.endpoint, module, n_threads=2) as load:
        r1 = d.control("reconfigure", plan="1x2:16")
        d.control("reconfigure", plan="1x1:8")             # while the first is starting: waits, then is replaced
        d.proc.send_signal(signal.SIGHUP)
        d.proc.send_signal(signal.SIGHUP)
        r3 = d.control("reconfigure", plan="2x1:4")
        assert r1["coalesced"] is False and r3["coalesced"] is True
        wait_for(lambda: (lambda s: not s["reconfig_pending"] and len(s["generations"]) == 1
                          and s["generations"][0]["state"] == "active")(d.control()), 90, "settled")
        more_answers(load, 10)
        st = d.control()
        if st["reconfig_pending"] or len(st["generations"]) != 1:
            st = wait_for(lambda: (lambda s: s if not s["reconfig_pending"] and len(s["generations"]) == 1 else None)(d.control()),
                          60, "settled again")
    assert not load.failures and not load.dupes and load.ok == load.sent
    st = d.control()
    assert len(st["generations"]) == 1
    assert st["reconfig_coalesced"] >= 2
    inst = st["instances"]
    pids = live_worker_pids(d)
    assert len(pids) == len(inst) == len(st["workers"])
    cpus = [c for i in inst for c in i["cpus"]]
    assert len(cpus) == len(set(cpus))                    # no two instances on one core
    assert d.stop() == 0

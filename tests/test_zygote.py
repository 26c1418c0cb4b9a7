"""The fork server (issue 10): workers forked from a process that loaded the model once.

The zygote must stay one thread (no OpenMP or oneDNN pool may exist when it forks: libgomp hangs in
a child whose parent had a team); a forked worker must set up its own thread pool of the instance's
size and answer like the model in-process; if the zygote dies its workers die with it and are
replaced by spawned ones.
"""
from __future__ import annotations

import os
import signal

import numpy as np
import psutil
import pytest
import torch

from packratd.client import Client
from tests.conftest import load_module
from tests.test_reliability import _close, wait_for

pytestmark = pytest.mark.slow


def _threads(pid: int) -> list[str]:
    """The names of a process's threads, ZeroMQ's own left out."""
    out = []
    for t in psutil.Process(pid).threads():
        with open(f"/proc/{pid}/task/{t.id}/comm") as f:
            name = f.read().strip()
        if not name.startswith("ZMQbg"):
            out.append(name)
    return out


def _ready(d, n):
    return wait_for(lambda: (lambda s: s if len(s["workers"]) == n and all(w["state"] == "ready" for w in s["workers"])
                             else None)(d.control()), 120, f"{n} ready worker(s)")


def _forked_generation(d, plan: str):
    """Reconfigure once the fork server is ready, so the new generation's workers are forked."""
    wait_for(lambda: any(z["state"] == "ready" for z in d.control()["fork_servers"]), 60, "fork server ready")
    g = d.control()["active_generation"]
    d.control("reconfigure", plan=plan)
    return wait_for(lambda: (lambda s: s if s["active_generation"] != g and len(s["generations"]) == 1
                             and all(w["state"] == "ready" for w in s["workers"]) else None)(d.control()),
                    120, "the forked generation serving")


def _answers_like_the_model(d, model_path, rows: int, seed: int) -> None:
    """One request of random rows through the daemon; the answer equals the model run in-process."""
    module = load_module(model_path)
    c = Client(d.endpoint, timeout=60)
    try:
        x = np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)
        (y,) = c.infer(x)
        with torch.inference_mode():
            assert _close(y, module(torch.from_numpy(x)).numpy())
    finally:
        c.close()


def test_forked_workers_have_their_own_thread_pool_and_answer_like_the_model(daemon, tiny_model):
    d = daemon(tiny_model, plan="2:8")
    st = _forked_generation(d, "2:8")
    (w,) = st["workers"]
    assert w["forked"] is True and w["threads"] == 2
    z = st["fork_servers"][0]
    assert z["state"] == "ready" and z["forks"] >= 1
    assert psutil.Process(z["pid"]).num_threads() == 1              # the zygote never ran a parallel region
    _answers_like_the_model(d, tiny_model, rows=8, seed=5)
    assert len(_threads(w["pid"])) == 2 + 1                          # main + heartbeat + one more OpenMP thread
    assert sorted(psutil.Process(w["pid"]).cpu_affinity()) == sorted(w["cpus"])
    assert psutil.Process(z["pid"]).num_threads() == 1
    assert d.stop() == 0


def test_a_dead_fork_server_takes_its_workers_and_spawned_ones_replace_them(daemon, tiny_model):
    d = daemon(tiny_model, plan="2x1:4")
    st = _forked_generation(d, "2x1:4")
    assert all(w["forked"] for w in st["workers"])
    z = st["fork_servers"][0]["pid"]
    os.kill(z, signal.SIGKILL)
    st = wait_for(lambda: (lambda s: s if s["fork_servers"][0]["state"] == "failed" and len(s["workers"]) == 2
                           and all(w["state"] == "ready" and not w["forked"] for w in s["workers"]) else None)(
        d.control()), 120, "spawned workers serving after the fork server died")
    for w in st["workers"]:
        assert psutil.Process(w["pid"]).ppid() == d.proc.pid
    c = Client(d.endpoint, timeout=60)
    (y,) = c.infer(np.ones((3, 64), np.float32))
    assert y.shape == (3, 10) and d.control()["state"] == "serving"
    c.close()
    assert d.stop() == 0


def test_fork_server_off_spawns_every_worker(daemon, tiny_model):
    d = daemon(tiny_model, plan="1x1:4", extra=["--set", "workers.fork_server=false"])
    w = d.control()["workers"][0]
    os.kill(w["pid"], signal.SIGKILL)
    st = wait_for(lambda: (lambda s: s if s["workers"] and s["workers"][0]["pid"] != w["pid"]
                           and s["workers"][0]["state"] == "ready" else None)(d.control()), 120, "respawned")
    assert st["workers"][0]["forked"] is False and st["fork_servers"] == []
    assert d.stop() == 0


@pytest.mark.skipif(__import__("packratd.runtimes", fromlist=["x"]).unavailable_reason("onnxruntime") is not None,
                    reason="onnxruntime is not installed")
def test_a_runtime_that_starts_threads_on_import_is_imported_after_the_fork(daemon, tiny_model):
    """Importing onnxruntime starts a thread, so its fork server holds only what every worker imports;
    the forked worker imports the runtime and loads the model itself, and answers like the model."""
    d = daemon(tiny_model, plan="1x1:8", runtime="onnxruntime")
    st = _forked_generation(d, "1x1:8")
    (w,) = st["workers"]
    assert w["forked"] is True and w["runtime"] == "onnxruntime"
    assert psutil.Process(st["fork_servers"][0]["pid"]).num_threads() == 1
    _answers_like_the_model(d, tiny_model, rows=5, seed=6)
    assert d.stop() == 0

"""Shared fixtures: exported test models and a real packratd daemon in a subprocess."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    from tools.export_model import export
    d = tmp_path_factory.mktemp("models")
    for name in ("tiny_mlp", "tiny_two_input"):
        export(name, str(d / f"{name}.pt2"))
    return d


@pytest.fixture(scope="session")
def tiny_model(models_dir):
    return str(models_dir / "tiny_mlp.pt2")


@pytest.fixture(scope="session")
def two_input_model(models_dir):
    return str(models_dir / "tiny_two_input.pt2")


def wait_for(fn, timeout, what, interval=0.05):
    """Poll fn until it returns something truthy (returned); on timeout fail naming what and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on host just now (bound and released)."""
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def load_module(path):
    import torch
    return torch.export.load(path).module()


def health(endpoint: str, timeout: float = 5.0) -> dict | None:
    """The daemon's health op, or None: no socket yet, or no answer in time."""
    from packratd.client import probe_health
    return probe_health(endpoint, timeout)


_ALL_DAEMONS: list = []


@pytest.fixture(scope="session", autouse=True)
def _no_daemon_outlives_the_session():
    """Whatever a failing test left running is stopped (daemon and workers) when the session ends."""
    yield
    for d in _ALL_DAEMONS:
        if d.proc.poll() is None:
            for p in d.children():
                p.kill()
            d.proc.kill()
            d.proc.wait()


class DaemonProc:
    """A real packratd process; stop() checks it leaves no worker behind."""

    def __init__(self, tmp_path, model, plan=None, extra=(), config=None, env=None, prefix=(), runtime="eager"):
        """``prefix``: a command the daemon runs under, e.g. ["ip", "netns", "exec", NS, "taskset", "-c", "0"]
        (each part must exec the next, so proc.pid stays the daemon's).  ``runtime``: workers.runtime; eager
        unless a test is about runtimes (the default, auto, compiles the model for every runtime on a fresh
        state dir: tests/test_runtime_serving.py does that once)."""
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.dir = tmp_path
        self.runtime_dir = str(tmp_path / "run")
        self.state_dir = str(tmp_path / "state")
        self.endpoint = f"ipc://{self.runtime_dir}/packratd.sock"
        self.log_path = tmp_path / "daemon.log"
        cmd = [sys.executable, "-m", "packratd.daemon", "--model", model,
               "--runtime-dir", self.runtime_dir, "--state-dir", self.state_dir,
               "--set", "workers.warmup_batches=1"] + (["--set", f"workers.runtime={runtime}"] if runtime else [])
        if plan:
            cmd += ["--plan", plan]
        if config:
            cmd += ["--config", config]
        cmd += list(extra)
        if "--listen" in cmd:
            self.endpoint = cmd[cmd.index("--listen") + 1]
        self.log = open(self.log_path, "w")
        e = dict(os.environ, PYTHONPATH=ROOT)
        e.update(env or {})
        self.proc = subprocess.Popen(list(prefix) + cmd, stdout=self.log, stderr=subprocess.STDOUT, env=e, cwd=ROOT)
        self.ps = psutil.Process(self.proc.pid)
        _ALL_DAEMONS.append(self)

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def health(self, timeout=5.0) -> dict | None:
        """The daemon's answer to the client protocol's health op, or None (no socket, no answer).

        With a tcp:// listen (CURVE: this harness holds no client key) the same answer comes from the
        control socket's status."""
        if not self.endpoint.startswith("ipc://"):
            try:
                from packratd.control import ControlClient, control_endpoint
                return ControlClient(control_endpoint(self.runtime_dir), timeout=timeout).call("status")["health"]
            except Exception:
                return None
        return health(self.endpoint, timeout)

    def wait_serving(self, timeout=120.0):
        """Until the daemon says it is ready (a generation serves); raises with its log if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            h = self.health(timeout=2.0)
            if h is not None and h.get("ready"):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"daemon not serving after {timeout}s:\n{self.logs()}")

    def wait_state(self, state="serving", timeout=180.0):
        """Until the control socket's status says ``state`` (works whatever the client listen is)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.control()["state"] == state:
                    return self
            except Exception:  # noqa: BLE001 - control socket not up yet
                pass
            time.sleep(0.2)
        raise RuntimeError(f"daemon not {state} after {timeout}s:\n{self.logs()[-4000:]}")

    def control(self, cmd="status", **args):
        from packratd.control import ControlClient, control_endpoint
        return ControlClient(control_endpoint(self.runtime_dir), timeout=10).call(cmd, **args)

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.control()["workers"]]

    def children(self):
        try:
            return self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig=signal.SIGTERM, timeout=60.0) -> int:
        kids = self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        gone, alive = psutil.wait_procs(kids, timeout=15)
        for p in alive:
            p.kill()
        self.log.close()
        assert not alive, f"workers left behind after stop: {[p.pid for p in alive]}"
        return rc


@pytest.fixture
def daemon(tmp_path):
    started = []

    def start(model, plan=None, wait=True, **kw):
        d = DaemonProc(tmp_path / f"d{len(started)}", model, plan, **kw)
        started.append(d)
        if wait:
            d.wait_serving()
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.stop()


def write_profile(state_dir: str, model: str, lat_by_threads: dict, **overrides) -> str:
    """Put a profile with the given table into the daemon's cache, under the key the daemon will compute.

    Used where a real profile of a tiny model on 2 noisy cores could not give a reliable shape shift;
    everything after the cache (solver, monitor, generations, workers) is real."""
    import json
    from packratd import config as config_mod, profiler
    from packratd.topology import read_topology
    over = {"model.path": model, "server.state_dir": state_dir}
    over.update(overrides)
    cfg = config_mod.load(None, over)
    topo = read_topology()
    key, ident = profiler.cache_key(cfg, topo, model)
    assert ident["threads"] == sorted(lat_by_threads), (ident["threads"], sorted(lat_by_threads))
    lat = [[float(lat_by_threads[t](b)) for b in ident["batches"]] for t in ident["threads"]]
    rec = {"format": profiler.PROFILE_FORMAT, "key": key, "ident": ident, "created": time.time(), "wall_s": 0.0,
           "threads": ident["threads"], "batches": ident["batches"], "lat_ms": lat}
    profiler.write_atomic(os.path.join(profiler.profile_dir(cfg), f"{key}.json"), json.dumps(rec).encode())
    return key

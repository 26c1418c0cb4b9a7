"""packratd under a real systemd: systemd/install.sh + systemd/packratd.service, booted in a sandbox.

A systemd 252 runs as PID 1 of a private PID + mount namespace (tests/systemd_sandbox.py): /tmp,
/run, /var/tmp, /var/lib and /var/log are fresh tmpfs there and /etc and /usr are overlays, so
install.sh really creates the packratd user and installs the unit, config and docs without touching
the host.  The model and the config source live in a directory under /srv (outside /tmp: the service has
PrivateTmp, and the sandbox's /tmp is a tmpfs anyway), readable by the service user.

The client runs here, in the test process, and reaches the daemon's socket on the namespace's /run
tmpfs through /proc/<sandbox PID 1>/root/run/packratd/packratd.sock (root may traverse it).

The checkout may live anywhere, /tmp included (a `git clone` into /tmp, CI's work folder): the
sandbox binds the checkout and the venv back over its fresh tmpfs (``keep=``), and when they are under
/tmp or /var/tmp, which the unit's PrivateTmp= replaces once more, a drop-in binds them read-only
into the service too (BindReadOnlyPaths=).

Order matters (one daemon, one sandbox, module scope): start -> status -> reload -> stop (drain) ->
watchdog (starts it again, hangs it, and checks systemd restarts it).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
import uuid

import numpy as np
import pytest

import packratd
from tests import systemd_sandbox as sbx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the sandbox and the unit must see: the checkout (install.sh, docs), the venv (sys.prefix), and
# the packratd package itself (an editable install points into a checkout, maybe another one).
NEEDED = tuple(dict.fromkeys(os.path.realpath(p) for p in (
    ROOT, sys.prefix, os.path.dirname(os.path.dirname(os.path.abspath(packratd.__file__))))))
UNIT = "packratd.service"
WATCHDOG_SEC = 10          # as in systemd/packratd.service
HB_INTERVAL, HB_LIVENESS, STOP_GRACE = 0.5, 10, 5.0

_reason = sbx.unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"no systemd sandbox: {_reason}")


def _test_config(model: str) -> str:
    return f"""# packratd config for tests/test_systemd.py
[model]
path = "{model}"

[workers]
plan = "2x1:4"
runtime = "eager"
warmup_batches = 1
heartbeat_interval_s = {HB_INTERVAL}
heartbeat_liveness = {HB_LIVENESS}
stop_grace_s = {STOP_GRACE}

[log]
level = "info"
"""


@pytest.fixture(scope="module")
def testdir():
    """A world-readable directory outside /tmp with the model and the config source."""
    from tools.export_model import export
    d = f"/srv/packratd-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    os.makedirs(d, mode=0o755)
    os.chmod(d, 0o755)
    try:
        model = os.path.join(d, "tiny_mlp.pt2")
        export("tiny_mlp", model)
        os.chmod(model, 0o644)
        with open(os.path.join(d, "packratd.toml"), "w") as f:
            f.write(_test_config(model))
        os.chmod(os.path.join(d, "packratd.toml"), 0o644)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _private_tmp_dropin(paths) -> str | None:
    """A drop-in that binds paths under /tmp or /var/tmp into the unit, whose PrivateTmp= hides them."""
    hidden = [p for p in paths if any(sbx._under(p, t) for t in ("/tmp", "/var/tmp"))]
    if not hidden:
        return None
    return ("# tests/test_systemd.py: the checkout / venv under test lives under a PrivateTmp= path\n"
            "[Service]\nBindReadOnlyPaths=" + " ".join(hidden) + "\n")


@pytest.fixture(scope="module")
def sandbox(testdir):
    sb = sbx.SystemdSandbox(overlay=("/etc", "/usr"), keep=NEEDED)
    sb.boot()
    try:
        r = sb.run(["sh", os.path.join(ROOT, "systemd", "install.sh"),
                    "--bin", os.path.join(ROOT, ".venv", "bin", "packratd"),
                    "--config", os.path.join(testdir, "packratd.toml")], timeout=120)
        sb.install_log = r.stdout + r.stderr
        dropin = _private_tmp_dropin([p for p, _ in sb.kept])
        if dropin:
            d = "/etc/systemd/system/packratd.service.d"
            sb.run(["mkdir", "-p", d])
            sb.run(["sh", "-c", f"cat > {d}/90-test-checkout-in-tmp.conf"], input=dropin)
            sb.systemctl("daemon-reload")
        yield sb
    finally:
        sb.stop()


class Ctx:
    """What the tests share: the sandbox, the socket paths as the host sees them, the reference model."""

    def __init__(self, sb, testdir):
        self.sb = sb
        self.model_path = os.path.join(testdir, "tiny_mlp.pt2")
        self.sock = sb.host_path("/run/packratd/packratd.sock")
        self.endpoint = "ipc://" + self.sock
        self.timings: dict[str, float] = {}
        self._module = None

    def client(self, timeout=10.0):
        from packratd.client import Client
        return Client(self.endpoint, timeout=timeout)

    def control(self, cmd="status", **args):
        from packratd.control import ControlClient
        return ControlClient("ipc://" + self.sb.host_path("/run/packratd/control.sock"), timeout=10).call(cmd, **args)

    def reference(self, x):
        import torch
        if self._module is None:
            self._module = torch.export.load(self.model_path).module()
        with torch.inference_mode():
            return self._module(torch.from_numpy(x)).numpy()

    def check_infer(self, rows=3, timeout=10.0):
        x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
        c = self.client(timeout)
        try:
            (y,) = c.infer(x)
        finally:
            c.close()
        np.testing.assert_allclose(y, self.reference(x), rtol=1e-4, atol=1e-5)

    def show(self, *props):
        return self.sb.show(UNIT, *props)

    def wait_state(self, state, timeout, sub=None):
        def ok():
            p = self.show("ActiveState", "SubState", "Result")
            return p if p["ActiveState"] == state and (sub is None or p["SubState"] == sub) else None
        try:
            return self.sb.wait_for(ok, timeout, what=f"{UNIT} {state}")
        except sbx.SandboxError as e:
            raise AssertionError(f"{e}\n{self.sb.journal(UNIT)[-4000:]}") from None

    def ns_kill(self, sig, pid):
        self.sb.run(["kill", f"-{sig}", str(pid)])


@pytest.fixture(scope="module")
def ctx(sandbox, testdir):
    return Ctx(sandbox, testdir)


# ---- tests ------------------------------------------------------------------------------------


def test_install(ctx):
    sb = ctx.sb
    log = sb.install_log
    assert "created user packratd" in log, log
    unit = sb.run(["cat", "/etc/systemd/system/packratd.service"]).stdout
    assert f"ExecStart={ROOT}/.venv/bin/packratd --config /etc/packratd/packratd.toml" in unit
    assert sb.run(["getent", "passwd", "packratd"]).stdout.startswith("packratd:")
    sb.run(["test", "-f", "/usr/share/doc/packratd/operations.md"])
    assert "tests/test_systemd.py" in sb.run(["cat", "/etc/packratd/packratd.toml"]).stdout
    r = sb.systemctl("cat", UNIT)
    assert "Type=notify" in r.stdout
    # the checkout and venv are visible in the sandbox at their own paths, wherever they are
    for p in NEEDED:
        sb.run(["test", "-d", p])
    if _private_tmp_dropin([p for p, _ in sb.kept]):
        assert "BindReadOnlyPaths=" in r.stdout, r.stdout


def test_start_returns_once_serving(ctx):
    t0 = time.monotonic()
    r = ctx.sb.systemctl("start", UNIT, check=False, timeout=180)
    ctx.timings["start"] = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr + ctx.sb.journal(UNIT)[-4000:]
    # No polling: Type=notify means the socket answers as soon as `systemctl start` returns.
    ctx.check_infer(rows=5, timeout=5)
    p = ctx.show("ActiveState", "SubState", "MainPID", "Type", "NotifyAccess", "WatchdogUSec", "User")
    assert (p["ActiveState"], p["SubState"]) == ("active", "running"), p
    assert p["WatchdogUSec"] == f"{WATCHDOG_SEC}s", p
    st = ctx.control()
    assert st["plan"] == "2x1:4" and st["state"] == "serving", st
    # the service user owns the runtime directory and the socket, and others can neither reach the socket
    # nor put anything in the directory (which group may do what is the privilege separation's to decide:
    # docs/operations.md)
    uid = int(ctx.sb.run(["id", "-u", "packratd"]).stdout)
    s = os.stat(ctx.sock)
    d = os.stat(os.path.dirname(ctx.sock))
    assert s.st_uid == uid and d.st_uid == uid
    assert d.st_mode & 0o007 in (0, 0o001) and not d.st_mode & 0o002, oct(d.st_mode)
    assert s.st_mode & 0o007 == 0, oct(s.st_mode)                      # packratd.security.secure_ipc
    # the daemon and its workers run as packratd
    main = ctx.sb.host_pid(int(p["MainPID"]))
    assert main and os.stat(f"/proc/{main}").st_uid == uid


def test_status_shows_status_line(ctx):
    c = ctx.client()
    try:
        for n in range(3):
            c.infer(np.ones((n + 1, 64), np.float32))
    finally:
        c.close()
    rx = re.compile(r"\b(\d+) requests\b")

    def served():
        p = ctx.show("StatusText", "ActiveState", "SubState")
        m = rx.search(p.get("StatusText", ""))
        return p if m and int(m.group(1)) >= 3 else None
    # the daemon refreshes STATUS= every 5 s
    p = ctx.sb.wait_for(served, 15, interval=0.5, what="STATUS= with the requests counted")
    assert "serving" in p["StatusText"] and "2x1:4" in p["StatusText"], p
    assert (p["ActiveState"], p["SubState"]) == ("active", "running"), p


def test_reload(ctx):
    sb = ctx.sb
    pid = ctx.show("MainPID")["MainPID"]
    c = ctx.client()
    try:
        assert c.spec()["max_batch_size"] == 32
    finally:
        c.close()
    # change a reloadable option in the installed config, then reload
    sb.sh("printf '\\n[server]\\nmax_batch_size = 16\\n' >> /etc/packratd/packratd.toml")
    t0 = time.monotonic()
    r = sb.systemctl("reload", UNIT, check=False)
    assert r.returncode == 0, r.stdout + r.stderr

    def reloaded():
        c = ctx.client()
        try:
            return c.spec()["max_batch_size"] == 16
        finally:
            c.close()
    try:
        sb.wait_for(reloaded, 20, interval=0.2, what="max_batch_size 16 after the reload")
    except sbx.SandboxError as e:
        raise AssertionError(f"{e}\n{sb.journal(UNIT)[-4000:]}") from None
    ctx.wait_state("active", 20, sub="running")
    ctx.timings["reload"] = time.monotonic() - t0
    assert ctx.show("MainPID")["MainPID"] == pid, "reload restarted the daemon"
    ctx.check_infer(rows=2)


def test_stop_drains_in_flight_request(ctx):
    sb = ctx.sb
    st = ctx.control()
    workers = [w["pid"] for w in st["workers"]]          # PIDs inside the namespace
    host_workers = [sb.host_pid(p) for p in workers]
    assert len(workers) == 2 and all(host_workers), (workers, host_workers)
    # Freeze both workers, so a request is certainly in flight when the stop begins.
    for p in workers:
        ctx.ns_kill("STOP", p)
    x = np.random.default_rng(7).standard_normal((8, 64)).astype(np.float32)
    result: dict = {}

    def request():
        c = ctx.client(timeout=40)
        try:
            result["y"] = c.infer(x)[0]
        except BaseException as e:  # noqa: BLE001
            result["error"] = e
        finally:
            c.close()

    t = threading.Thread(target=request)
    t.start()
    try:
        sb.wait_for(lambda: ctx.control()["inflight_batches"] >= 1, 10, what="a batch in flight")
        t0 = time.monotonic()
        sb.systemctl("stop", "--no-block", UNIT)
        ctx.wait_state("deactivating", 10)
        # The daemon has taken the SIGTERM (it says it is stopping) while the batch is still in flight
        # and the client still waits: the stop drains, it does not fail what it holds.
        st = sb.wait_for(lambda: (s := ctx.control())["state"] == "stopping" and s, 10, interval=0.1,
                         what="status state 'stopping'")
        assert st["inflight_batches"] >= 1, st
        assert t.is_alive(), result
    finally:
        for p in workers:
            ctx.ns_kill("CONT", p)
    t.join(40)
    assert "error" not in result, result
    np.testing.assert_allclose(result["y"], ctx.reference(x), rtol=1e-4, atol=1e-5)
    p = ctx.wait_state("inactive", 60)
    ctx.timings["stop"] = time.monotonic() - t0
    assert p["Result"] == "success", p
    assert ctx.show("ExecMainStatus")["ExecMainStatus"] == "0"
    j = sb.journal(UNIT)
    assert not re.search(r"SIGKILL|Killing process", j), j[-3000:]      # systemd had nothing left to kill
    for hp in host_workers:
        assert not os.path.exists(f"/proc/{hp}"), f"worker {hp} survived the stop"
    assert not os.path.exists(ctx.sock)


def test_watchdog_restarts_hung_daemon(ctx):
    sb = ctx.sb
    sb.systemctl("start", UNIT, timeout=180)
    ctx.check_infer()
    p = ctx.show("MainPID", "NRestarts")
    pid, restarts = int(p["MainPID"]), int(p["NRestarts"])
    old_workers = [sb.host_pid(w["pid"]) for w in ctx.control()["workers"]]
    t0 = time.monotonic()
    ctx.ns_kill("STOP", pid)     # hang the main loop: no more WATCHDOG=1

    def restarted():
        q = ctx.show("MainPID", "NRestarts", "ActiveState", "SubState")
        return q if (int(q["NRestarts"]) > restarts and q["MainPID"] not in ("0", str(pid))
                     and q["ActiveState"] == "active" and q["SubState"] == "running") else None
    try:
        sb.wait_for(restarted, WATCHDOG_SEC + 60, interval=0.25, what="a watchdog restart")
    except sbx.SandboxError as e:
        raise AssertionError(f"{e}\n{sb.journal(UNIT)[-4000:]}") from None
    ctx.timings["watchdog_restart"] = time.monotonic() - t0
    j = sb.journal(UNIT)
    assert re.search(r"Watchdog timeout", j), j[-3000:]
    # PYTHONFAULTHANDLER=1: the SIGABRT put the hung main thread's stack, frames in packratd, in the journal
    assert "Fatal Python error: Aborted" in j, j[-3000:]
    assert re.search(r'File ".*/packratd/\w+\.py", line \d+ in \w+', j), j[-3000:]
    assert ctx.timings["watchdog_restart"] >= WATCHDOG_SEC * 0.9
    ctx.check_infer()
    for hp in old_workers:
        assert hp and not os.path.exists(f"/proc/{hp}"), f"worker {hp} of the hung daemon survived"
    print("\nsystemd test timings:", {k: round(v, 2) for k, v in ctx.timings.items()},
          "sandbox boot", round(sb.boot_s, 2))
    sb.systemctl("stop", UNIT, timeout=120)

"""Boot a real systemd as PID 1 of a private PID + mount namespace, for tests (root only).

    sb = SystemdSandbox(overlay=("/etc", "/usr"))
    sb.boot()                                   # returns once `systemctl is-system-running` settles
    sb.systemctl("start", "packratd")           # CompletedProcess; check=True raises with output
    sb.journal("packratd")                      # the unit's journal, as text
    sb.stop()                                   # SIGKILL the namespace's PID 1: every process in it dies

Safety (see shared/notes/systemd-sandbox.md): systemd-tmpfiles empties /tmp at boot and the
mount namespace does not protect the files underneath a shared mount, so fresh tmpfs are mounted
over /tmp, /run and /var/tmp (and any ``tmpfs_extra`` path) inside the namespace *before* systemd
is exec'd.  Each ``overlay`` directory (e.g. /etc, /usr) is seen through an overlay whose upper
layer lives on the namespace's /run tmpfs, so useradd, unit installs, config and doc files written
there inside the sandbox never reach the host.  Everything else (the checkout, /srv) is the host's.

The namespace's PID 1 is found as the only child of the ``unshare`` process this object started,
never by a name match: other sessions may run their own systemd sandboxes on the same host.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time

SYSTEMD_CANDIDATES = ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
DEFAULT_TMPFS = ("/tmp", "/run", "/var/tmp")
# Also masked by default: /var/log (journald would otherwise write a persistent journal into the
# host's /var/log/journal) and /var/lib (StateDirectory= and every unit's state stay in the sandbox,
# and host services' data directories are not there to be used).
DEFAULT_TMPFS_EXTRA = ("/var/log", "/var/lib")


class SandboxError(RuntimeError):
    pass


def find_systemd() -> str | None:
    for p in SYSTEMD_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    return None


def unavailable_reason() -> str | None:
    """Why a sandbox cannot be booted here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (unshare --pid --mount and a system systemd)"
    for tool in ("unshare", "nsenter", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if find_systemd() is None:
        return "no systemd binary (" + ", ".join(SYSTEMD_CANDIDATES) + ")"
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--propagation", "private", "true"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"unshare --pid --mount not permitted here: {r.stderr.strip()}"
    return None


def _children(pid: int) -> list[int]:
    """Direct children of pid, from /proc (no psutil needed)."""
    kids = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


class SystemdSandbox:
    def __init__(self, tmpfs_extra: tuple[str, ...] = DEFAULT_TMPFS_EXTRA, overlay: tuple[str, ...] = (),
                 unit: str = "basic.target", boot_timeout: float = 60.0):
        # basic.target, not multi-user.target: the host's enabled services (databases, ...) are not
        # started inside the sandbox; journald, sockets and timers are.
        self.tmpfs = tuple(DEFAULT_TMPFS) + tuple(tmpfs_extra)
        self.overlay = tuple(overlay)
        self.unit = unit
        self.boot_timeout = boot_timeout
        self.unshare: subprocess.Popen | None = None
        self.pid: int | None = None          # the namespace's PID 1, as the host sees it
        self.boot_s: float | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def _script(self) -> str:
        systemd = find_systemd()
        if systemd is None:
            raise SandboxError("no systemd binary")
        steps = ["set -e"]
        # /run first: the /etc overlay keeps its upper layer there.
        for path in sorted(self.tmpfs, key=lambda p: (p != "/run", p)):
            steps.append(f"mount -t tmpfs -o mode=1777 tmpfs {shlex.quote(path)}"
                         if path in ("/tmp", "/var/tmp") else f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(path)}")
        for i, path in enumerate(self.overlay):
            d = f"/run/.sandbox-overlay/{i}"
            steps += [f"mkdir -p {d}/upper {d}/work",
                      f"mount -t overlay overlay -o lowerdir={shlex.quote(path)},upperdir={d}/upper,workdir={d}/work "
                      f"{shlex.quote(path)}"]
        # container=other: systemd skips what needs a real machine (no getty, no udev trigger, ...).
        steps.append(f"exec env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin {systemd} --system "
                     f"--unit={shlex.quote(self.unit)} --log-target=journal")
        return "\n".join(steps)

    def boot(self) -> "SystemdSandbox":
        t0 = time.monotonic()
        self.unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--propagation", "private",
             "sh", "-c", self._script()],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = t0 + self.boot_timeout
        try:
            # 1. the namespace's PID 1 is the unshare process's only child; wait until it has exec'd systemd
            while True:
                if self.unshare.poll() is not None:
                    err = self.unshare.stderr.read().decode(errors="replace") if self.unshare.stderr else ""
                    raise SandboxError(f"sandbox exited with {self.unshare.returncode} before systemd ran: {err.strip()}")
                kids = _children(self.unshare.pid)
                if len(kids) == 1 and (_exe(kids[0]) or "").rsplit("/", 1)[-1] == "systemd":
                    self.pid = kids[0]
                    break
                if time.monotonic() > deadline:
                    raise SandboxError(f"no systemd under unshare pid {self.unshare.pid} after {self.boot_timeout}s")
                time.sleep(0.05)
            # 2. systemd answers and the boot has settled
            state = ""
            while time.monotonic() < deadline:
                r = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
                state = r.stdout.strip()
                if state in ("running", "degraded"):
                    self.boot_s = time.monotonic() - t0
                    return self
                time.sleep(0.2)
            raise SandboxError(f"systemd in the sandbox not up after {self.boot_timeout}s (state {state!r})")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGKILL the namespace's PID 1: the kernel then kills every process of the namespace."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.unshare is not None:
            if self.pid is None and self.unshare.poll() is None:
                try:
                    os.killpg(self.unshare.pid, signal.SIGKILL)   # its own session (start_new_session)
                except ProcessLookupError:
                    pass
            try:
                self.unshare.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            if self.unshare.stderr:
                self.unshare.stderr.close()
        self.pid = None

    def __enter__(self):
        return self.boot()

    def __exit__(self, *exc):
        self.stop()

    # ---- inside the namespace ----------------------------------------------------------------
    def nsenter_argv(self, argv: list[str]) -> list[str]:
        if self.pid is None:
            raise SandboxError("sandbox not booted")
        return ["nsenter", "-t", str(self.pid), "-p", "-m", "--"] + list(argv)

    def run(self, argv: list[str], check: bool = True, timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
        """Run argv inside the namespace (PID + mount); text output captured."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        r = subprocess.run(self.nsenter_argv(argv), timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise SandboxError(f"{shlex.join(argv)} exited with {r.returncode}:\n{r.stdout}{r.stderr}")
        return r

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["sh", "-c", script], **kw)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.systemctl("show", unit, "-p", ",".join(props))
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def journal(self, unit: str | None = None, *args: str) -> str:
        argv = ["journalctl", "--no-pager", "-o", "short-monotonic", *args]
        if unit:
            argv += ["-u", unit]
        return self.run(argv, check=False, timeout=30).stdout

    def host_path(self, path: str) -> str:
        """A path inside the namespace (e.g. on its /run tmpfs) as the host can open it: /proc/PID1/root/..."""
        if self.pid is None:
            raise SandboxError("sandbox not booted")
        return f"/proc/{self.pid}/root" + path

    def host_pid(self, ns_pid: int) -> int | None:
        """Translate a PID as seen inside the namespace (MainPID=...) to the host's PID."""
        if self.pid is None:
            return None
        todo = [self.pid]
        while todo:
            p = todo.pop()
            try:
                with open(f"/proc/{p}/status") as f:
                    for line in f:
                        if line.startswith("NSpid:"):
                            ids = line.split()[1:]
                            if len(ids) >= 2 and int(ids[-1]) == ns_pid:
                                return p
                            break
            except OSError:
                continue
            todo.extend(_children(p))
        return None

    def wait_for(self, predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
        """Poll predicate() until it returns something truthy; return it, or raise after timeout."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = predicate()
            if last:
                return last
            if time.monotonic() > deadline:
                raise SandboxError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
            time.sleep(interval)

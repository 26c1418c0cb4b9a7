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

A checkout (or venv, or test directory) that lives under one of the masked paths -- a ``git clone``
into /tmp, a CI work folder under /var/lib -- would be hidden by those tmpfs.  Name it in ``keep``
(read-only inside the namespace) or ``keep_rw``: before the tmpfs go on, the script binds each such
path to a staging tmpfs on a spare directory outside the masked paths; once they are on, it
``mkdir -p``'s the original path on the new tmpfs, binds it back there, and unmounts the staging
area, so the namespace sees the same files at the same paths.  The bound-back paths are mount
points, which systemd-tmpfiles' boot-time removal of /tmp's contents does not descend into, and the
``keep`` ones are read-only as well, so nothing in the sandbox can delete or change them.

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
# Where kept paths are staged while the tmpfs go on: a tmpfs is mounted over the first of these that
# exists, inside the namespace only (private propagation), and unmounted again before systemd runs.
STAGING_CANDIDATES = ("/media", "/mnt", "/opt", "/srv")


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


def _under(path: str, top: str) -> bool:
    """path is top or below it (both absolute, normalised)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


class SystemdSandbox:
    def __init__(self, tmpfs_extra: tuple[str, ...] = DEFAULT_TMPFS_EXTRA, overlay: tuple[str, ...] = (),
                 unit: str = "basic.target", boot_timeout: float = 60.0,
                 keep: tuple[str, ...] = (), keep_rw: tuple[str, ...] = ()):
        # basic.target, not multi-user.target: the host's enabled services (databases, ...) are not
        # started inside the sandbox; journald, sockets and timers are.
        self.tmpfs = tuple(DEFAULT_TMPFS) + tuple(tmpfs_extra)
        self.overlay = tuple(overlay)
        self.kept = self._kept(keep, keep_rw)      # [(path, read_only)] that needed a bind-back
        self.unit = unit
        self.boot_timeout = boot_timeout
        self.unshare: subprocess.Popen | None = None
        self.pid: int | None = None          # the namespace's PID 1, as the host sees it
        self.boot_s: float | None = None

    def _kept(self, keep, keep_rw) -> list[tuple[str, bool]]:
        """The paths of keep / keep_rw that a masked path would hide, outermost only: [(path, read_only)]."""
        want: dict[str, bool] = {}
        for paths, ro in ((keep_rw, False), (keep, True)):
            for p in paths:
                real = os.path.realpath(p)
                if not os.path.exists(real):
                    raise SandboxError(f"cannot keep {p}: it does not exist")
                for m in self.tmpfs:
                    if _under(m, real):
                        raise SandboxError(f"cannot keep {p}: binding it back would uncover {m}, which must be "
                                           "a fresh tmpfs in the sandbox (systemd-tmpfiles empties it at boot)")
                if any(_under(real, m) for m in self.tmpfs):
                    want[real] = want.get(real, True) and ro      # rw wins when named in both
        out = []
        for p in sorted(want, key=len):
            outer = next((q for q, _ in out if _under(p, q)), None)
            if outer is None:
                out.append((p, want[p]))
            elif not want[p] and dict(out)[outer]:
                raise SandboxError(f"cannot keep {p} writable inside {outer}, which is kept read-only")
        return out

    def _staging(self) -> str:
        for d in STAGING_CANDIDATES:
            if (os.path.isdir(d) and not os.path.islink(d) and not any(_under(d, m) or _under(m, d) for m in self.tmpfs)
                    and not any(_under(d, p) or _under(p, d) for p, _ in self.kept)):
                return d
        raise SandboxError("no spare directory to stage kept paths on (tried " + ", ".join(STAGING_CANDIDATES) + ")")

    # ---- lifecycle -------------------------------------------------------------------------
    def _script(self) -> str:
        systemd = find_systemd()
        if systemd is None:
            raise SandboxError("no systemd binary")
        steps = ["set -e"]
        staging = self._staging() if self.kept else None
        if staging:
            # 1. bind every kept path to the staging tmpfs while it is still visible
            steps.append(f"mount -t tmpfs -o mode=0700 tmpfs {shlex.quote(staging)}")
            for i, (path, _) in enumerate(self.kept):
                kind = "d" if os.path.isdir(path) else "f"
                st = shlex.quote(f"{staging}/{i}")
                steps += [f"mkdir {st}" if kind == "d" else f": > {st}",
                          f"mount --bind {shlex.quote(path)} {st}"]
        # /run first: the /etc overlay keeps its upper layer there.
        for path in sorted(self.tmpfs, key=lambda p: (p != "/run", p)):
            steps.append(f"mount -t tmpfs -o mode=1777 tmpfs {shlex.quote(path)}"
                         if path in ("/tmp", "/var/tmp") else f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(path)}")
        if staging:
            # 2. the same path on the fresh tmpfs, bound back (read-only for keep), then drop the staging area
            for i, (path, ro) in enumerate(self.kept):
                q, st = shlex.quote(path), shlex.quote(f"{staging}/{i}")
                if os.path.isdir(path):
                    steps.append(f"mkdir -p {q}")
                else:
                    steps += [f"mkdir -p {shlex.quote(os.path.dirname(path))}", f": > {q}"]
                steps.append(f"mount --bind {st} {q}")
                if ro:
                    steps.append(f"mount -o remount,bind,ro {q}")
                steps.append(f"umount {st}")
            steps.append(f"umount {shlex.quote(staging)}")
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

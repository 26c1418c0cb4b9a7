"""sd_notify: tell systemd about readiness, status, reloads and watchdog pings.

Uses systemd-python when it is importable, else a tiny datagram sender; does nothing when
NOTIFY_SOCKET is unset (not started by systemd with Type=notify).
"""
from __future__ import annotations

import os
import socket

try:
    from systemd import daemon as _sd
except ImportError:  # pragma: no cover - depends on the host
    _sd = None


def _send(message: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(message.encode())
    return True


def notify(message: str) -> bool:
    """Send one sd_notify message (several assignments separated by newlines)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    try:
        if _sd is not None:
            return bool(_sd.notify(message))
        return _send(message)
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd expects (half of WatchdogSec), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None

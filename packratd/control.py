"""The control API: one object (:class:`ControlServer`) with its transport beside it.

Requests and replies are JSON objects over a ZeroMQ REP socket on ``ipc://<runtime_dir>/control.sock``,
separate from the inference socket.  A request is ``{"cmd": NAME, ...args}``; the reply is
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.  Commands are the daemon's
``cmd_<name>`` methods, so the command set lives in one place.
"""
from __future__ import annotations

import json
import logging
import os

import zmq

from .security import remove_ipc

log = logging.getLogger("packratd.control")

MAX_REQUEST_BYTES = 64 * 1024


def control_endpoint(runtime_dir: str) -> str:
    return "ipc://" + os.path.join(runtime_dir, "control.sock")


class ControlServer:
    def __init__(self, ctx: zmq.Context, endpoint: str, target):
        self.endpoint = endpoint
        self.target = target
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        self.sock.bind(endpoint)

    def handle(self, request: dict) -> dict:
        cmd = request.get("cmd")
        fn = getattr(self.target, f"cmd_{cmd}", None) if isinstance(cmd, str) and cmd.isidentifier() else None
        if fn is None:
            names = sorted(n[4:] for n in dir(self.target) if n.startswith("cmd_"))
            return {"ok": False, "error": f"unknown command {cmd!r}; known: {', '.join(names)}"}
        args = {k: v for k, v in request.items() if k != "cmd"}
        try:
            out = fn(**args)
        except TypeError as e:
            return {"ok": False, "error": f"bad arguments for {cmd}: {e}"}
        except ValueError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - a control request must not take the daemon down
            log.exception("control command %s failed", cmd)
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return {"ok": True, **(out or {})}

    def on_readable(self) -> None:
        while True:
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                req = json.loads(raw.decode())
                if not isinstance(req, dict):
                    raise ValueError("request must be a JSON object")
                reply = self.handle(req)
            except (UnicodeDecodeError, ValueError) as e:
                reply = {"ok": False, "error": f"bad control request: {e}"}
            self.sock.send(json.dumps(reply, default=str).encode())

    def close(self) -> None:
        self.sock.close(linger=0)
        remove_ipc(self.endpoint)


class ControlError(Exception):
    pass


class ControlClient:
    """Talks to a running daemon's control socket; raises ControlError with an actionable message."""

    def __init__(self, endpoint: str, timeout: float = 10.0):
        self.endpoint = endpoint
        self.timeout = timeout

    def call(self, cmd: str, **args) -> dict:
        path = self.endpoint[6:] if self.endpoint.startswith("ipc://") else None
        if path is not None:
            if not os.path.exists(path):
                raise ControlError(f"no control socket at {path}: is packratd running? "
                                   f"(systemctl status packratd; or pass --runtime-dir where it runs)")
            if not os.access(path, os.R_OK | os.W_OK):
                raise ControlError(f"permission denied on {path}: run as root or as a member of the socket's group")
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        try:
            s.connect(self.endpoint)
            s.send(json.dumps({"cmd": cmd, **args}).encode())
            if not s.poll(int(self.timeout * 1000)):
                raise ControlError(f"packratd did not answer on {self.endpoint} within {self.timeout:.0f}s: "
                                   "it may be stopped (SIGSTOP), overloaded or a stale socket is left behind")
            reply = json.loads(s.recv().decode())
        finally:
            s.close(linger=0)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "unknown error"))
        return reply

"""The control API for operators: requests and replies over ``ipc://<runtime_dir>/control.sock``.

A request is one frame holding a JSON object ``{"cmd": NAME, ...args}``; the reply is one frame
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.  The socket is a ROUTER, so

* a request of any other shape (several frames, not JSON, not an object, too big) gets an error
  reply and nothing else happens -- the socket cannot be driven into a state where it stops
  answering;
* a command whose work runs off the main loop (the solver for ``plan``) answers later, when that
  work is done, while other requests keep being answered meanwhile.

Handlers come from packratd.commands (one function per command); a handler returns the reply's
fields, or a :class:`Deferred`.  Only operators can reach this socket: it is 0600 (or 0660 for
``server.admin_group``), separate from the client socket.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Callable

import zmq

from .security import remove_ipc

log = logging.getLogger("packratd.control")

MAX_REQUEST_BYTES = 64 * 1024
MAX_PENDING = 64


def control_endpoint(runtime_dir: str) -> str:
    return "ipc://" + os.path.join(runtime_dir, "control.sock")


class Deferred:
    """A reply that comes once ``job`` (an offload.Job) is done: ``convert(result) -> dict``."""

    def __init__(self, job, convert: Callable[[object], dict] = lambda r: r):
        self.job = job
        self.convert = convert


class ControlServer:
    def __init__(self, ctx: zmq.Context, endpoint: str, handlers: dict[str, Callable]):
        self.endpoint = endpoint
        self.handlers = handlers
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.RCVHWM, 64)
        self.sock.setsockopt(zmq.SNDHWM, 64)
        self.sock.bind(endpoint)
        self.waiting: list[tuple[list, Deferred]] = []

    # ---- requests ------------------------------------------------------------------------
    def handle(self, request: dict) -> dict | Deferred:
        cmd = request.get("cmd")
        fn = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if fn is None:
            return {"ok": False, "error": f"unknown command {cmd!r}; known: {', '.join(sorted(self.handlers))}"}
        args = {k: v for k, v in request.items() if k != "cmd"}
        try:
            inspect.signature(fn).bind(**args)
        except TypeError as e:
            return {"ok": False, "error": f"bad arguments for {cmd}: {e}"}
        try:
            out = fn(**args)
        except ValueError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - a control request must not take the daemon down
            log.exception("control command %s failed", cmd)
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        if isinstance(out, Deferred):
            return out
        return {"ok": True, **(out or {})}

    def _reply(self, env: list, reply: dict) -> None:
        try:
            body = json.dumps(reply, default=str).encode()
        except (TypeError, ValueError) as e:
            body = json.dumps({"ok": False, "error": f"reply could not be encoded: {e}"}).encode()
        try:
            self.sock.send_multipart(env + [body], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.debug("cannot answer a control client: %s", e)

    def on_readable(self) -> None:
        for _ in range(100):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # REQ peers put an empty delimiter after the routing id; DEALER peers need not.
            if len(frames) >= 2 and frames[1] == b"":
                env, body = frames[:2], frames[2:]
            else:
                env, body = frames[:1], frames[1:]
            if len(body) != 1:
                self._reply(env, {"ok": False, "error": f"bad control request: expected one frame holding a JSON "
                                                        f"object, got {len(body)} frames"})
                continue
            try:
                req = json.loads(body[0].decode())
                if not isinstance(req, dict):
                    raise ValueError("request must be a JSON object")
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                self._reply(env, {"ok": False, "error": f"bad control request: {str(e)[:200]}"})
                continue
            reply = self.handle(req)
            if isinstance(reply, Deferred):
                if len(self.waiting) >= MAX_PENDING:
                    self._reply(env, {"ok": False, "error": "too many control requests waiting; try again"})
                else:
                    self.waiting.append((env, reply))
            else:
                self._reply(env, reply)

    def poll(self) -> None:
        """Send the replies whose work is done (called every loop turn)."""
        if not self.waiting:
            return
        still = []
        for env, dfr in self.waiting:
            if not dfr.job.done:
                still.append((env, dfr))
                continue
            if dfr.job.error is not None:
                self._reply(env, {"ok": False, "error": dfr.job.error})
                continue
            try:
                self._reply(env, {"ok": True, **(dfr.convert(dfr.job.result) or {})})
            except Exception as e:  # noqa: BLE001
                log.exception("control reply failed")
                self._reply(env, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        self.waiting = still

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
                raise ControlError(f"permission denied on {path}: packratctl is for operators (root, packratd's "
                                   "user, or a member of server.admin_group)")
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

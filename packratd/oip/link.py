"""The gateway's one connection to packratd: a ZeroMQ DEALER driven by the asyncio loop.

Every OIP request becomes one packratd request on this socket, with an id of the gateway's own
(unique on this socket); replies come back in completion order and are matched by id.  The socket
is ``ZMQ_IMMEDIATE``: while the daemon is not there (not started, restarting) a send fails at once
(:class:`NotConnected`) instead of queueing for a daemon that may never come.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging

import zmq
import zmq.asyncio

from .. import protocol as P

log = logging.getLogger("packratd.oip")


class NotConnected(Exception):
    """No connection to packratd (it is not running, or its socket is not bound yet)."""


class NoAnswer(Exception):
    """packratd did not answer in time."""


class DaemonLink:
    def __init__(self, endpoint: str, ctx: zmq.asyncio.Context | None = None):
        self.endpoint = endpoint
        self.ctx = ctx or zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def call(self, head: dict, buffers=(), timeout: float = 60.0) -> tuple[dict, list]:
        """Send one request; return (reply header, reply buffer frames).  Error replies are returned too
        (header ``status`` is ``"error"``); raises NotConnected or NoAnswer."""
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        loop = asyncio.get_running_loop()
        rid = format(next(self._ids), "x")
        head = dict(head, v=P.VERSION, id=rid)
        fut = loop.create_future()
        self._pending[rid] = fut
        timer = loop.call_later(timeout, _expire, fut, timeout)
        try:
            try:
                frames = [P.encode_header(head), *buffers]
                # Zero-copy pays only for big buffers: below pyzmq's threshold it costs twice a copy.
                big = sum(memoryview(f).nbytes for f in buffers) >= zmq.COPY_THRESHOLD
                await self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=not big)
            except zmq.Again:
                raise NotConnected(f"packratd is not accepting connections at {self.endpoint}") from None
            return await fut
        finally:
            timer.cancel()
            self._pending.pop(rid, None)

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            try:
                head = json.loads(frames[0].bytes)
                rid = head.get("id", "")
            except (ValueError, AttributeError):
                log.error("unreadable reply from packratd: %r", frames[0].bytes[:200])
                continue
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result((head, frames[1:]))
            elif rid == "":
                # The gateway checks every message so the daemon's early (id-less) errors cannot happen.
                log.error("packratd sent an error the gateway cannot attribute: %s", head)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close(linger=0)


def _expire(fut: asyncio.Future, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(NoAnswer(f"packratd did not answer within {timeout:g} s"))

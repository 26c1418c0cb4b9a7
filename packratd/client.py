"""packratd client library.

    from packratd.client import Client
    c = Client("ipc:///run/packratd/packratd.sock")
    (y,) = c.infer(x)                 # x: numpy array or torch tensor, batch on dim 0
    y1, y2 = c.infer(ids, mask)       # several inputs / outputs

Thread safety: one Client may be shared by many threads; each thread gets its own ZeroMQ
DEALER socket (sockets are not thread-safe), created on first use.  Replies are matched to
requests by id, so a late answer to a request that timed out is discarded, never returned
for another request.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid

import numpy as np
import zmq
import zmq.asyncio

from . import protocol as P
from .protocol import ReplyError  # noqa: F401  (re-exported: callers catch client.ReplyError)


class InferenceTimeout(TimeoutError):
    """No answer within the timeout.  The request may still run on the daemon; its late answer is dropped."""


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "numpy"):      # torch.Tensor, without importing torch
        return x.detach().cpu().contiguous().numpy()
    return np.asarray(x)


class Client:
    def __init__(self, endpoint: str, timeout: float = 30.0, ctx: zmq.Context | None = None,
                 curve_server_key: bytes | None = None, curve_keypair: tuple[bytes, bytes] | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.ctx = ctx or zmq.Context.instance()
        self._curve = (curve_server_key, curve_keypair)
        self._local = threading.local()
        self._sockets: list = []
        self._lock = threading.Lock()

    def _socket(self) -> zmq.Socket:
        s = getattr(self._local, "sock", None)
        if s is None:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            server_key, keypair = self._curve
            if server_key is not None:
                pub, sec = keypair
                s.curve_serverkey = server_key
                s.curve_publickey = pub
                s.curve_secretkey = sec
            s.connect(self.endpoint)
            self._local.sock = s
            with self._lock:
                self._sockets.append(s)
        return s

    def _call(self, frames: list, rid: str, timeout: float | None):
        s = self._socket()
        s.send_multipart(frames, copy=False)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not s.poll(int(left * 1000) + 1):
                if time.monotonic() >= deadline:
                    raise InferenceTimeout(f"no answer from packratd at {self.endpoint} within "
                                           f"{self.timeout if timeout is None else timeout:.1f}s (is the daemon running?)")
                continue
            reply = s.recv_multipart(copy=False)
            try:
                got, arrays, head = P.parse_reply([f.buffer for f in reply])
            except ReplyError as e:
                if e.id == rid:
                    raise
                continue   # a late error for an earlier, timed-out request
            if got == rid:
                return arrays, head

    RETRY_CODES = frozenset({P.DRAINING, P.OVERLOADED})

    def infer(self, *inputs, timeout: float | None = None, request_id: str | None = None,
              deadline_ms: float | None = None, retries: int = 0, backoff: float = 0.1) -> list[np.ndarray]:
        """Run the model on one request (each input with the batch on dim 0); returns the outputs.

        Raises ReplyError (with .code) for an error reply and InferenceTimeout when no answer comes.
        With ``retries``, a timeout or a DRAINING/OVERLOADED reply (a daemon restarting or busy) is
        retried with the SAME request id after an exponential back-off; an answer to any attempt of
        this request is this request's answer, and answers for other ids are never returned."""
        rid = request_id or uuid.uuid4().hex
        arrays = [_to_numpy(x) for x in inputs]
        frames = P.request_frames(rid, arrays, timeout_ms=deadline_ms)
        attempt = 0
        while True:
            try:
                out, _ = self._call(frames, rid, timeout)
                return out
            except (InferenceTimeout, ReplyError) as e:
                if attempt >= retries or (isinstance(e, ReplyError) and e.code not in self.RETRY_CODES):
                    raise
            time.sleep(min(2.0, backoff * 2 ** attempt))
            attempt += 1

    def spec(self, timeout: float | None = None) -> dict:
        """The model's inputs and outputs and the daemon's max batch size."""
        rid = uuid.uuid4().hex
        _, head = self._call([P.encode_header({"v": P.VERSION, "id": rid, "op": "spec"})], rid, timeout)
        return head

    def ping(self, timeout: float | None = None) -> float:
        rid = uuid.uuid4().hex
        t0 = time.monotonic()
        self._call([P.encode_header({"v": P.VERSION, "id": rid, "op": "ping"})], rid, timeout)
        return time.monotonic() - t0

    def close(self) -> None:
        with self._lock:
            for s in self._sockets:
                s.close(linger=0)
            self._sockets.clear()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """asyncio variant: many concurrent ``await c.infer(x)`` calls share one socket."""

    def __init__(self, endpoint: str, timeout: float = 30.0):
        self.endpoint = endpoint
        self.timeout = timeout
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._waiters: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def _read(self):
        while True:
            reply = await self.sock.recv_multipart(copy=False)
            try:
                rid, arrays, _ = P.parse_reply([f.buffer for f in reply])
                result = arrays
            except ReplyError as e:
                rid, result = e.id, e
            fut = self._waiters.pop(rid, None)
            if fut is not None and not fut.done():
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    async def infer(self, *inputs, timeout: float | None = None) -> list[np.ndarray]:
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        rid = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        await self.sock.send_multipart(P.request_frames(rid, [_to_numpy(x) for x in inputs]), copy=False)
        try:
            return await asyncio.wait_for(fut, self.timeout if timeout is None else timeout)
        except asyncio.TimeoutError:
            raise InferenceTimeout(f"no answer from packratd at {self.endpoint}") from None
        finally:
            self._waiters.pop(rid, None)

    def close(self):
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close(linger=0)


def main(argv=None) -> int:
    """python -m packratd.client ENDPOINT [--batch N]: send one request shaped from the model's spec."""
    import argparse
    import sys
    from .model import example_inputs
    p = argparse.ArgumentParser(prog="python -m packratd.client", description=main.__doc__)
    p.add_argument("endpoint", nargs="?", default="ipc:///run/packratd/packratd.sock")
    p.add_argument("--batch", "-b", type=int, default=1)
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    c = Client(args.endpoint, timeout=args.timeout)
    try:
        spec = c.spec()
        xs = example_inputs(spec["inputs"], args.batch)
        t0 = time.perf_counter()
        ys = c.infer(*xs)
        ms = (time.perf_counter() - t0) * 1000
    except (InferenceTimeout, ReplyError) as e:
        print(f"packratd.client: {e}", file=sys.stderr)
        return 1
    finally:
        c.close()
    ins = ", ".join(f"{s['name']} {x.dtype}{list(x.shape)}" for s, x in zip(spec["inputs"], xs))
    outs = ", ".join(f"{y.dtype}{list(y.shape)}" for y in ys)
    print(f"sent {ins} -> got {outs} in {ms:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

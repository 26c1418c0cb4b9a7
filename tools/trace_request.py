#!/usr/bin/env python3
"""Where the time of one request goes, hop by hop: client -> daemon -> worker -> model -> back.

    .venv/bin/python tools/trace_request.py ipc://$PWD/run/packratd.sock [--rows 1] [-n 200]

Each request asks for ``"trace": true`` (docs/protocol.md): the daemon and the worker stamp it with
CLOCK_MONOTONIC times, which every process on the host shares, so the hops can be subtracted:

    client send    -> daemon arrival     client library, ZeroMQ, ipc, the daemon's poll wake-up
    arrival        -> batch start        queueing and batching (0 on an idle daemon with max_delay_ms = 0)
    batch start    -> slice sent         splitting, building the WORK message
    slice sent     -> worker receive     ZeroMQ to the worker, its wake-up
    worker receive -> model start        decoding the slice (zero-copy)
    model start    -> model end          the model itself
    model end      -> worker send        encoding the result
    worker send    -> result at daemon   ZeroMQ back, the daemon's wake-up
    result         -> reply sent         gathering the slices, validating, the reply header
    reply sent     -> client receive     ZeroMQ to the client, its wake-up

For a batch split over several workers, the slowest slice's hops are shown.  Prints medians and
p90 in microseconds, and ``--json`` writes every sample.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from packratd import protocol as P  # noqa: E402
from packratd.model import example_inputs  # noqa: E402

HOPS = ("client->daemon", "queue+batching", "split+encode", "daemon->worker", "decode", "model", "encode result",
        "worker->daemon", "gather+reply", "daemon->client")


def hops(t_send: float, t_recv: float, tr: dict) -> dict:
    sl = max(tr["slices"], key=lambda s: s["result"])          # the slice the batch waited for
    return dict(zip(HOPS, (tr["arrival"] - t_send, tr["batch_start"] - tr["arrival"], sl["sent"] - tr["batch_start"],
                           sl["recv"] - sl["sent"], sl["start"] - sl["recv"], sl["end"] - sl["start"],
                           sl["send"] - sl["end"], sl["result"] - sl["send"], tr["reply"] - sl["result"],
                           t_recv - tr["reply"])), total=t_recv - t_send)


def trace(endpoint: str, rows: int, n: int, warmup: int = 20, gap_s: float = 0.0) -> list[dict]:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    s.send_multipart([P.encode_header({"v": P.VERSION, "id": "spec", "op": "spec"})])
    if not s.poll(30000):
        raise SystemExit(f"no answer from {endpoint}")
    spec = json.loads(s.recv_multipart()[0])
    if not spec.get("inputs"):
        raise SystemExit("the daemon is not serving yet")
    xs = example_inputs(spec["inputs"], rows)
    out = []
    for i in range(warmup + n):
        frames = P.request_frames(f"t{i}", xs, trace=True)
        t0 = time.monotonic()
        s.send_multipart(frames, copy=False)
        reply = s.recv_multipart()
        t1 = time.monotonic()
        head = json.loads(reply[0])
        if head.get("status") != "ok":
            raise SystemExit(f"request failed: {head}")
        if i >= warmup:
            out.append(hops(t0, t1, head["trace"]))
        time.sleep(gap_s)                                       # one at a time, as a lone client
    s.close()
    return out


def summarize(samples: list[dict]) -> list[tuple[str, float, float]]:
    keys = list(HOPS) + ["total"]
    return [(k, float(np.median([x[k] for x in samples])) * 1e6, float(np.percentile([x[k] for x in samples], 90)) * 1e6)
            for k in keys]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("endpoint")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--json", help="write every sample here")
    a = p.parse_args(argv)
    samples = trace(a.endpoint, a.rows, a.n)
    print(f"{a.n} requests of {a.rows} row(s), one at a time; microseconds")
    print(f"{'hop':<18}{'p50':>10}{'p90':>10}")
    for k, p50, p90 in summarize(samples):
        print(f"{k:<18}{p50:>10.0f}{p90:>10.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(samples, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

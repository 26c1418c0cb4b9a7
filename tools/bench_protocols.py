#!/usr/bin/env python3
"""What the Open Inference Protocol front end costs: OIP REST (binary) and OIP gRPC vs packratd's ZeroMQ client.

    python tools/bench_protocols.py                          # ResNet-50, B in {1, 8} (exports models/resnet50.pt2)
    python tools/bench_protocols.py --quick                  # smoke: B=1, 5 rounds, prints only
    python tools/bench_protocols.py --model tiny_mlp --batches 1,8,32 --reps 300
    python tools/bench_protocols.py --md                     # also write the BENCHMARKS.md section

One packratd (plan ``1x<cores>:<max B>``, ``server.max_delay_ms=0`` so a lone request is not held for
company) with the OIP gateway (``python -m packratd.oip``) in front of it.  The driver holds three
clients of the same daemon, one per path:

  zmq    packratd.client.Client                  (client -> daemon -> worker)
  rest   tritonclient.http, binary tensors both ways (its default; keep-alive)
                                                 (client -> gateway -> daemon -> worker)
  grpc   tritonclient.grpc, raw_input_contents / raw_output_contents

Each call is timed around the client library call (end to end, encoding and decoding included).
Rounds interleave the paths one call at a time, rotating the order every round, so all paths share
the same minutes of a noisy machine; the added latency of a path is the per-round paired difference
``path - zmq`` (median, p10, p90).  A "ping" row prices the protocols without the model: Client.ping,
GET /v2/health/live and ServerLive (each of the latter two is one daemon health round trip behind the
gateway).  Every path's outputs are checked against the zmq path's (max |diff|, must be 0: same
daemon, same worker, same rows).

Writes benchmarks/protocols.json and, with --md, the "## Protocol overhead (issue 11)" section of
BENCHMARKS.md.  The figures name the CPU; on a shared machine they are indicative only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import benchlib as BL  # noqa: E402

SECTION = "## Protocol overhead (issue 11)"
PATHS = ("zmq", "rest", "grpc")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class BenchGateway:
    """``python -m packratd.oip`` in front of a BenchDaemon, on ephemeral loopback ports."""

    def __init__(self, daemon: BL.BenchDaemon, model_name: str, max_message_bytes: int):
        self.ports_file = os.path.join(daemon.dir, "oip-ports.json")
        self.log_path = os.path.join(daemon.dir, "gateway.log")
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "packratd.oip", "--daemon", daemon.endpoint, "--http", "127.0.0.1:0",
               "--grpc", "127.0.0.1:0", "--model-name", model_name, "--ports-file", self.ports_file,
               "--max-message-bytes", str(max_message_bytes), "--request-timeout", "600"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=BL.base_env(), cwd=BL.ROOT)
        BL._LIVE.append(self.proc)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.ports_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start:\n{open(self.log_path).read()}")
            time.sleep(0.05)
        with open(self.ports_file) as f:
            ports = json.load(f)
        self.http, self.grpc = f"127.0.0.1:{ports['http']}", f"127.0.0.1:{ports['grpc']}"

    def stop(self) -> int:
        self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self.proc in BL._LIVE:
            BL._LIVE.remove(self.proc)
        self._log.close()
        return rc


OIP_DTYPE = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int16": "INT16", "int32": "INT32",
             "int64": "INT64", "float16": "FP16", "float32": "FP32", "float64": "FP64"}


def make_callers(daemon: BL.BenchDaemon, gw: BenchGateway, model_name: str, spec: dict, inputs: list):
    """{path: () -> (ms, outputs)} for one batch of inputs (request objects are built once, outside the timing,
    as a client that reuses its buffers would)."""
    import tritonclient.grpc as tg
    import tritonclient.http as th
    zc = daemon.client
    hc = th.InferenceServerClient(gw.http, connection_timeout=600, network_timeout=600)
    gc = tg.InferenceServerClient(gw.grpc)
    names = [s["name"] for s in spec["inputs"]]
    n_out = len(spec["outputs"])

    def oip_inputs(mod):
        ins = []
        for name, a in zip(names, inputs):
            i = mod.InferInput(name, list(a.shape), OIP_DTYPE[a.dtype.name])
            i.set_data_from_numpy(a)
            ins.append(i)
        return ins

    hin, gin = oip_inputs(th), oip_inputs(tg)

    def zmq_call():
        t = time.perf_counter()
        out = zc.infer(*inputs)
        return (time.perf_counter() - t) * 1000, out

    def rest_call():
        t = time.perf_counter()
        r = hc.infer(model_name, hin)
        out = [r.as_numpy(f"output_{i}") for i in range(n_out)]
        return (time.perf_counter() - t) * 1000, out

    def grpc_call():
        t = time.perf_counter()
        r = gc.infer(model_name, gin, client_timeout=600)
        out = [r.as_numpy(f"output_{i}") for i in range(n_out)]
        return (time.perf_counter() - t) * 1000, out

    def pings():
        def z():
            t = time.perf_counter()
            zc.ping()
            return (time.perf_counter() - t) * 1000

        def h():
            t = time.perf_counter()
            assert hc.is_server_live()
            return (time.perf_counter() - t) * 1000

        def g():
            t = time.perf_counter()
            assert gc.is_server_live()
            return (time.perf_counter() - t) * 1000
        return {"zmq": z, "rest": h, "grpc": g}

    return {"zmq": zmq_call, "rest": rest_call, "grpc": grpc_call}, pings, (hc, gc)


def wait_model(daemon: BL.BenchDaemon, timeout: float) -> dict:
    """The daemon's spec once it serves (its socket may answer before: spec then has no inputs)."""
    deadline = time.monotonic() + timeout
    while True:
        spec = daemon.client.spec()
        if spec.get("inputs"):
            return spec
        if time.monotonic() > deadline or daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon not serving after {timeout:.0f}s:\n{daemon.logs()}")
        time.sleep(0.2)


def paired(rounds: list[dict], path: str) -> list[float]:
    return [r[path] - r["zmq"] for r in rounds if path in r and "zmq" in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50", help="tools/models.py registry name (exported to models/ if missing)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=None, help="rounds per batch size (default: time budget)")
    ap.add_argument("--budget-s", type=float, default=120.0, help="seconds of timed rounds per batch size")
    ap.add_argument("--min-reps", type=int, default=20)
    ap.add_argument("--max-reps", type=int, default=300)
    ap.add_argument("--ping-reps", type=int, default=300)
    ap.add_argument("--plan", default=None, help="default 1x<cores>:<max B>")
    ap.add_argument("--quick", action="store_true", help="B=1, 5 rounds, 50 pings, prints only")
    ap.add_argument("--out", default=os.path.join(BL.ROOT, "benchmarks", "protocols.json"))
    ap.add_argument("--md", action="store_true", help="write the BENCHMARKS.md section")
    a = ap.parse_args(argv)
    batches = [1] if a.quick else [int(b) for b in a.batches.split(",")]
    reps = 5 if a.quick else a.reps
    ping_reps = 50 if a.quick else a.ping_reps
    model_path = BL.ensure_model(a.model, log=log)
    cores = BL.topology().n_cores
    plan = a.plan or f"1x{cores}:{max(batches)}"
    max_bytes = 1 << 28
    env = BL.env_info()
    log(f"{env['cpu_model']}, {cores} core(s); plan {plan}; load average {env['loadavg_at_start']}")
    daemon = BL.BenchDaemon(model_path, plan=plan, name="daemon",
                            sets={"server.max_delay_ms": 0, "server.max_batch_size": max(batches, default=1)})
    gw = None
    rows, checks = [], []
    try:
        daemon.wait_serving(timeout=900)
        spec = wait_model(daemon, timeout=900)
        gw = BenchGateway(daemon, a.model, max_bytes)
        calls, pings, clients = None, None, ()
        busy0 = BL.cpu_busy()
        for b in batches:
            inputs = BL.make_inputs(spec["inputs"], b, seed=b)
            calls, pings, clients = make_callers(daemon, gw, a.model, spec, inputs)
            last = {}

            def timed(path, fn=None):
                def run():
                    ms, out = (fn or calls[path])()
                    last[path] = out
                    return ms
                return run
            log(f"B={b}: interleaving {', '.join(PATHS)}")
            res = BL.interleave({p: timed(p) for p in PATHS}, budget_s=a.budget_s, min_reps=a.min_reps,
                                max_reps=a.max_reps, reps=reps, warmup=3)
            diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(z, np.float64))))
                       for p in ("rest", "grpc") for x, z in zip(last[p], last["zmq"]))
            checks.append({"batch": b, "max_abs_diff_vs_zmq": diff})
            for p in PATHS:
                row = {"model": a.model, "batch": b, "path": p, **BL.summarize(res[p]["ms"])}
                if p != "zmq":
                    d = BL.summarize(paired(res["rounds"], p))
                    row.update(added_median_ms=d["median_ms"], added_p10_ms=d["p10_ms"], added_p90_ms=d["p90_ms"])
                rows.append(row)
            for c in clients:
                c.close()
        _, pings, clients = make_callers(daemon, gw, a.model, spec, BL.make_inputs(spec["inputs"], 1))
        res = BL.interleave(pings(), reps=ping_reps, warmup=10)
        for p in PATHS:
            row = {"model": "-", "batch": 0, "path": p + " ping", **BL.summarize(res[p]["ms"])}
            if p != "zmq":
                d = BL.summarize(paired(res["rounds"], p))
                row.update(added_median_ms=d["median_ms"], added_p10_ms=d["p10_ms"], added_p90_ms=d["p90_ms"])
            rows.append(row)
        for c in clients:
            c.close()
        env["busy_cpus_during_run"] = round(BL.cpu_busy_since(busy0), 2)
    finally:
        if gw is not None:
            gw.stop()
        daemon.stop()
    print()
    print(table(rows, checks, env, plan))
    if not a.quick:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "env": env, "plan": plan,
                       "rows": rows, "checks": checks, "command": " ".join(["tools/bench_protocols.py", *(argv or sys.argv[1:])])},
                      f, indent=1)
        log(f"wrote {a.out}")
        if a.md:
            BL.replace_md_section(os.path.join(BL.ROOT, "BENCHMARKS.md"), SECTION, table(rows, checks, env, plan))
            log("wrote BENCHMARKS.md")
    return 0


def table(rows: list[dict], checks: list[dict], env: dict, plan: str) -> str:
    f = BL.fmt_ms
    out = [f"`python tools/bench_protocols.py` on {env['cpu_model']} ({env.get('cores', '?')} cores), plan {plan}, "
           "server.max_delay_ms=0; ms, end to end in the client; interleaved rounds; added = per-round paired "
           "difference to the ZeroMQ client.", "",
           "| model | B | path | median | p10 | p90 | added median | added p10 | added p90 | n |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['batch'] or '-'} | {r['path']} | {f(r['median_ms'])} | {f(r['p10_ms'])} | "
                   f"{f(r['p90_ms'])} | {f(r.get('added_median_ms'))} | {f(r.get('added_p10_ms'))} | "
                   f"{f(r.get('added_p90_ms'))} | {r['n']} |")
    out.append("")
    out.append("Outputs identical across paths: " + ", ".join(f"B={c['batch']} max |diff| {c['max_abs_diff_vs_zmq']:g}"
                                                           for c in checks) + f"; busy CPUs during the run "
               f"{env.get('busy_cpus_during_run', '?')} (load from others shows here).")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())

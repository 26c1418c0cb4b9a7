#!/usr/bin/env python3
"""Serving overhead: what packratd adds to the model's own time, per request size, hop by hop.

For each model (default: tiny_mlp and resnet50) a daemon runs with the defaults (runtime auto,
work-conserving batching, fork server) and one instance on every core (plan 1x<cores>), and the
same model runs in-process in a separate process on the same cores with the same runtime, artifact,
threads and allocator (python -m packratd.runtimes runner).  One client sends B-row requests one at
a time (closed loop); in-process calls and end-to-end requests alternate in blocks, so drift hits
both alike.  Reported per B: p50/p99 of each, the difference of the p50s (the overhead) and the
per-hop p50s from traced requests (tools/trace_request.py).

    .venv/bin/python tools/bench_overhead.py [--models tiny_mlp,resnet50] [--batches 1,4,8] [--quick]

Writes benchmarks/overhead.json and the "Serving overhead (issue 10)" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import benchlib as BL  # noqa: E402
import bench_runtimes as BR  # noqa: E402
import trace_request as TR  # noqa: E402


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else None


def measure_model(name: str, batches: list[int], rounds: int, block: int, state_dir: str, log_dir: str) -> dict:
    path = BL.ensure_model(name)
    topo = BL.topology()
    T = topo.n_cores
    cpus = BL.fat_cpus(topo)
    d = BL.BenchDaemon(path, plan=f"1x{T}:{max(batches)}", sets={"server.max_batch_size": max(batches)},
                       name=f"overhead-{name}", state_dir=state_dir)
    try:
        d.wait_serving(timeout=3600)
        st = d.control()
        runtime, artifact = st["runtime"], st.get("runtime_artifact") or None
        spec = d.client.spec()["inputs"]
        rr = BR.RtRunner(runtime, path, artifact, T, cpus, BL.worker_like_env(T, cpus), log_dir, name=f"{name}-inproc")
        out = {"runtime": runtime, "plan": st["plan"], "batches": {}}
        for b in batches:
            x = BL.make_inputs(spec, b, seed=b)
            rr.set_batch(b, seed=b)
            inproc, e2e = [], []
            for k in range(rounds):
                blocks = [("inproc", lambda: rr.calls(block)), ("e2e", lambda: [BL.timed_infer(d, x)[0] for _ in range(block)])]
                for tag, fn in (blocks if k % 2 == 0 else blocks[::-1]):
                    ms = fn()
                    (inproc if tag == "inproc" else e2e).extend(ms[1:])
                    time.sleep(0.05)
            hops = TR.summarize(TR.trace(d.endpoint, b, max(50, rounds * block // 2), warmup=5))
            r = {"inproc": {"p50_ms": pct(inproc, 50), "p99_ms": pct(inproc, 99), "n": len(inproc)},
                 "e2e": {"p50_ms": pct(e2e, 50), "p99_ms": pct(e2e, 99), "n": len(e2e)},
                 "hops_us": {k: {"p50": p50, "p90": p90} for k, p50, p90 in hops}}
            r["overhead_ms"] = r["e2e"]["p50_ms"] - r["inproc"]["p50_ms"]
            r["ratio"] = r["e2e"]["p50_ms"] / r["inproc"]["p50_ms"]
            out["batches"][str(b)] = r
            print(f"{name} B={b}: in-process {r['inproc']['p50_ms']:.3f} ms, packratd {r['e2e']['p50_ms']:.3f} ms "
                  f"(+{r['overhead_ms']:.3f} ms, {r['ratio']:.3f}x)", flush=True)
        rr.close()
        return out
    finally:
        d.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny_mlp,resnet50")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--block", type=int, default=0, help="calls per block (default: 100 for tiny models, 10 otherwise)")
    p.add_argument("--quick", action="store_true", help="tiny_mlp only, 3 rounds")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "overhead.json"))
    p.add_argument("--md", default=os.path.join(ROOT, "BENCHMARKS.md"))
    a = p.parse_args(argv)
    models = ["tiny_mlp"] if a.quick else a.models.split(",")
    batches = [int(b) for b in a.batches.split(",")]
    rounds = 3 if a.quick else a.rounds
    state_dir = tempfile.mkdtemp(prefix="prb-overhead-state-", dir="/tmp")
    log_dir = tempfile.mkdtemp(prefix="prb-overhead-logs-", dir="/tmp")
    res = {"env": BL.env_info(), "models": {}}
    for m in models:
        block = a.block or (100 if m.startswith("tiny") else 10)
        res["models"][m] = measure_model(m, batches, rounds, block, state_dir, log_dir)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    f = BL.fmt_ms
    lines = [f"Command: `.venv/bin/python tools/bench_overhead.py {' '.join(sys.argv[1:])}` (part of `make bench`), "
             f"{time.strftime('%Y-%m-%d')}, {res['env']['cpu_model']}, {len(res['env']['usable_cpus'])} cpus.", "",
             "Daemon with the defaults (runtime auto, work-conserving batching, fork server), one instance on every "
             "core; in-process: the same runtime, artifact, threads, cores and allocator in its own process; one "
             "closed-loop client, blocks alternated.", "",
             "| model | runtime | B | in-process p50 / p99 ms | packratd p50 / p99 ms | overhead p50 | ratio |",
             "|---|---|---|---|---|---|---|"]
    for m, r in res["models"].items():
        for b, x in r["batches"].items():
            lines.append(f"| {m} | {r['runtime']} | {b} | {f(x['inproc']['p50_ms'])} / {f(x['inproc']['p99_ms'])} | "
                         f"{f(x['e2e']['p50_ms'])} / {f(x['e2e']['p99_ms'])} | +{x['overhead_ms']:.3f} ms | {x['ratio']:.3f} |")
    lines += ["", "Per hop, traced requests (`tools/trace_request.py`), p50 in microseconds:", "",
              "| model | B | " + " | ".join(TR.HOPS) + " | total |", "|---|---|" + "---|" * (len(TR.HOPS) + 1)]
    for m, r in res["models"].items():
        for b, x in r["batches"].items():
            lines.append(f"| {m} | {b} | " + " | ".join(f"{x['hops_us'][h]['p50']:.0f}" for h in list(TR.HOPS) + ["total"]) + " |")
    BL.replace_md_section(a.md, "## Serving overhead (issue 10)", "\n".join(lines))
    print(json.dumps({m: {b: {k: v for k, v in x.items() if k != "hops_us"} for b, x in r["batches"].items()}
                      for m, r in res["models"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

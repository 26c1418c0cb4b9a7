#!/usr/bin/env python3
"""Reconfiguration benchmark: the timeline of one blue-green switch under steady load.

A real daemon serves ResNet-50 (default) with plan A while client threads send B-row requests in a
closed loop.  After a steady period we ask for plan B (``packratctl reconfigure --plan``) and keep
the load on until well after the old generation is gone.  Reported: time from the decision to
green READY (its workers loaded and warmed while blue kept serving on the same cores), to the
switch, to blue gone; request latency p50/p99 before, during (decision -> blue gone) and after;
requests failed (must be 0).  Compare: the Packrat paper's switch took ~5 s in TorchServe with
latency 2-3x higher meanwhile; TorchServe interrupts serving for seconds when it rescales.

Runs twice, with the fork server (the default: green's workers are forked from a process that has
the model loaded) and without it (each worker a new interpreter that imports torch and loads the
model), on one shared state dir so the runtime is compiled once.

Writes benchmarks/reconfig.json and the "Reconfiguration (issues 4 and 10)" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import benchlib as BL  # noqa: E402


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=4, help="rows per request")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--from-plan", default="2x1:4")
    p.add_argument("--to-plan", default="1x2:8")
    p.add_argument("--steady-s", type=float, default=20.0)
    p.add_argument("--after-s", type=float, default=20.0)
    p.add_argument("--fork-server", choices=("on", "off", "both"), default="both")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more daemon options")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "reconfig.json"))
    p.add_argument("--md", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = p.parse_args(argv)
    path = BL.ensure_model(args.model)
    import tempfile
    state = tempfile.mkdtemp(prefix="prb-reconfig-state-", dir="/tmp")
    runs = {"on": [True], "off": [False], "both": [True, False]}[args.fork_server]
    results = [one(args, path, state, fs) for fs in runs]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f)
    fm = BL.fmt_ms
    rows = []
    for r in results:
        b50 = r["during"]["p50_ms"] / r["before"]["p50_ms"] if r["before"]["n"] and r["during"]["n"] else float("nan")
        b99 = r["during"]["p99_ms"] / r["before"]["p99_ms"] if r["before"]["n"] and r["during"]["n"] else float("nan")
        rows.append(f"| {'on' if r['fork_server'] else 'off'} | {r['runtime']} | {r['green_boot_s']} | "
                    f"{r['decision_to_green_ready_s']:.2f} s | {r['decision_to_blue_gone_s']:.2f} s | {r['requests']} | "
                    f"{r['failed']} | {fm(r['before']['p50_ms'])} / {fm(r['before']['p99_ms'])} | "
                    f"{fm(r['during']['p50_ms'])} / {fm(r['during']['p99_ms'])} ({b50:.2f}x / {b99:.2f}x) | "
                    f"{fm(r['after']['p50_ms'])} / {fm(r['after']['p99_ms'])} |")
    body = "\n".join([
        f"Command: `.venv/bin/python tools/bench_reconfig.py {' '.join(sys.argv[1:])}` (part of `make bench`), "
        f"{time.strftime('%Y-%m-%d')}, {BL.env_info()['cpu_model']}.",
        "",
        f"{args.model}, {args.clients} closed-loop clients sending {args.batch}-row requests; switch {args.from_plan} -> "
        f"{args.to_plan} requested by `packratctl reconfigure --plan` (the monitor uses the same path); defaults "
        "otherwise (runtime auto).",
        "",
        "| fork server | runtime | green workers' boot s (of which loading the model) | decision -> green READY (= switch) | decision -> blue gone | "
        "requests | failed | before p50 / p99 ms | during p50 / p99 ms (x steady) | after p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Green's workers warm up on the cores blue is serving on (a host packratd owns has no spare cores), so blue "
        "slows while green warms; the switch itself is a pointer change in the dispatcher (batches already on blue "
        "finish there) and blue is stopped the moment it has nothing in flight. With the fork server a green worker "
        "skips the interpreter start, the torch import and the model load: what is left is its warm-up at the batch "
        "sizes it will see. The paper reports ~5 s with latency 2-3x higher in TorchServe.",
    ])
    BL.replace_md_section(args.md, "## Reconfiguration (issues 4 and 10)", body)
    print(json.dumps([{k: v for k, v in r.items() if k != "timeline"} for r in results], indent=1))
    return 0


def one(args, path: str, state: str, fork_server: bool) -> dict:
    sets = {"server.max_batch_size": max(8, args.batch * args.clients), "monitor.enabled": False,
            "workers.fork_server": fork_server}
    sets.update(kv.split("=", 1) for kv in args.set)
    d = BL.BenchDaemon(path, plan=args.from_plan, sets=sets, name="reconfig", state_dir=state)
    d.wait_serving(timeout=3600)
    spec = d.client.spec()["inputs"]
    from packratd.client import Client
    stop = threading.Event()
    samples = []          # (t_sent, latency_ms, ok)
    lock = threading.Lock()

    def client(k):
        c = Client(d.endpoint, timeout=120)
        xs = BL.make_inputs(spec, args.batch, seed=k)
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                c.infer(*xs)
                ok = True
            except Exception as e:  # noqa: BLE001 - counted as a failure
                ok = False
                print(f"request failed: {e}", flush=True)
            with lock:
                samples.append((t0, (time.monotonic() - t0) * 1000, ok))
        c.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(args.steady_s)
        fork_state = None
        if fork_server:       # the fork server loads in the background at start; be sure it is there (or failed)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                zs = d.control()["fork_servers"]
                fork_state = zs[0]["state"] if zs else None
                if fork_state in ("ready", "failed"):
                    break
                time.sleep(0.2)
        from packratd.placement import format_plan, parse_plan
        target = format_plan(parse_plan(args.to_plan))
        t_decide = time.monotonic()
        d.control("reconfigure", plan=args.to_plan)
        st = None
        while time.monotonic() - t_decide < 600:
            st = d.control()
            sw = [h for h in st["history"] if h.get("switch")]
            if sw and st["plan"] == target and len(st["generations"]) == 1:
                break
            time.sleep(0.1)
        t_gone = time.monotonic()
        green_boot = [f"{w['boot_s']:.2f} (load {w.get('load_s') or 0:.2f})" for w in st["workers"] if w.get("boot_s") is not None]
        runtime = st["runtime"]
        time.sleep(args.after_s)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
        d.stop()
    sw = [h for h in st["history"] if h.get("switch")][-1]["switch"]
    before = [ms for t, ms, ok in samples if t < t_decide and t >= t_decide - args.steady_s + 3]
    during = [ms for t, ms, ok in samples if t_decide <= t < t_gone]
    after = [ms for t, ms, ok in samples if t >= t_gone + 1]
    failed = sum(1 for _, _, ok in samples if not ok)
    return {"model": args.model, "batch": args.batch, "clients": args.clients, "from": args.from_plan, "to": args.to_plan,
            "fork_server": fork_server, "fork_server_state": fork_state, "runtime": runtime, "green_boot_s": green_boot,
            "decision_to_green_ready_s": sw["green_ready_s"], "decision_to_switch_s": sw["green_ready_s"],
            "decision_to_blue_gone_s": sw["blue_gone_s"], "observed_settled_s": t_gone - t_decide,
            "requests": len(samples), "failed": failed,
            "before": {"n": len(before), "p50_ms": pct(before, 50), "p99_ms": pct(before, 99)},
            "during": {"n": len(during), "p50_ms": pct(during, 50), "p99_ms": pct(during, 99)},
            "after": {"n": len(after), "p50_ms": pct(after, 50), "p99_ms": pct(after, 99)},
            "timeline": [(round(t - t_decide, 3), round(ms, 2), ok) for t, ms, ok in samples]}


if __name__ == "__main__":
    sys.exit(main())

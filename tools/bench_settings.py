#!/usr/bin/env python3
"""Worker settings benchmark: which allocator, and does per-thread pinning help?

One fat instance (all cores) of each model, in-process in a subprocess set up exactly as a packratd
worker, under each worker setting; calls interleaved round-robin so drift hits every variant alike.
This is the measurement behind the defaults workers.allocator = "glibc-tuned" and
workers.pin_threads = true.  Writes benchmarks/settings.json and the "Worker settings" section
of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import benchlib as BL  # noqa: E402

VARIANTS = {                      # name: (allocator, pin_threads)
    "glibc-tuned, pinned": ("glibc-tuned", True),
    "glibc-tuned, unpinned": ("glibc-tuned", False),
    "glibc, pinned": ("glibc", True),
    "jemalloc, pinned": ("jemalloc", True),
    "tcmalloc, pinned": ("tcmalloc", True),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="resnet50,bert")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "settings.json"))
    p.add_argument("--md", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = p.parse_args(argv)
    topo = BL.topology()
    T = topo.n_cores
    cpus = BL.fat_cpus(topo)
    rows = []
    for m in args.models.split(","):
        path = BL.ensure_model(m)
        runners = {}
        for name, (alloc, pin) in VARIANTS.items():
            try:
                env = BL.worker_like_env(T, cpus, allocator=alloc, pin_threads=pin)
            except FileNotFoundError as e:
                print(f"skipping {name}: {e}", flush=True)
                continue
            runners[name] = BL.InProcRunner(path, T, cpus, env, name=name)
        for r in runners.values():
            r.wait_ready()
        try:
            for B in [int(b) for b in args.batches.split(",")]:
                for r in runners.values():
                    r.prepare(B)
                res = BL.interleave({n: r.call_ms for n, r in runners.items()}, reps=args.reps, warmup=1)
                base = BL.median(res["glibc-tuned, pinned"]["ms"])
                for n in runners:
                    s = BL.summarize(res[n]["ms"])
                    rows.append({"model": m, "batch": B, "variant": n, **s, "vs_default": s["median_ms"] / base})
                    print(f"{m} B={B:>3} {n:<24} {BL.fmt_ms(s['median_ms']):>8} ms  ({s['median_ms'] / base:.2f}x default)",
                          flush=True)
        finally:
            for r in runners.values():
                r.stop()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    lines = [f"Command: `.venv/bin/python tools/bench_settings.py {' '.join(sys.argv[1:])}` (part of `make bench`), "
             f"{time.strftime('%Y-%m-%d')}. One instance on all {T} cores, in-process, set up as a worker; "
             f"{args.reps} interleaved calls per variant; median ms (p10-p90), and the ratio to the default "
             "(glibc-tuned, pinned; below 1.00 would be faster than the default).", "",
             "| model | B | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for m in args.models.split(","):
        for B in [int(b) for b in args.batches.split(",")]:
            cells = []
            for n in VARIANTS:
                r = next((r for r in rows if r["model"] == m and r["batch"] == B and r["variant"] == n), None)
                cells.append("-" if r is None else f"{BL.fmt_ms(r['median_ms'])} ({r['vs_default']:.2f})")
            lines.append(f"| {m} | {B} | " + " | ".join(cells) + " |")
    BL.replace_md_section(args.md, "## Worker settings: allocator and thread pinning", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

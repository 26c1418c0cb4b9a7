#!/usr/bin/env python3
"""Autotuning benchmark: packratd's chosen plan vs one fat instance vs the measured oracle.

For each model and batch size B, measured in one run on this machine, interleaved (one call at a
time, round-robin, rotating the order every round):

  fat       the model in-process, one instance, all usable cores (a subprocess with exactly the
            environment and pinning packratd's workers get: allocator, OpenMP, thread pinning);
  packratd  end to end through the client, with the plan the daemon chose for B
            (``packratctl reconfigure --batch-size B``: the solver over the profile it measured);
  oracle    the best of all plans measured exhaustively for B: on 2 cores, every split of B
            across two concurrent 1-thread instances (b1 >= b2 by symmetry; b2 = 0 is one
            1-thread instance), plus the fat instance.  Every split is measured once, the ones
            within 20% of the best are measured again for the medians.

Writes benchmarks/autotune.json, benchmarks/autotune.png, and the "Autotuning (issue 3)" section
of BENCHMARKS.md.  Usage: tools/bench_autotune.py [--models resnet50,bert,gpt2] [--batches ...] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import benchlib as BL  # noqa: E402

BATCHES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]


def settle(d: BL.BenchDaemon, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = d.control()
        if (st["state"] == "serving" and not st["reconfig_pending"] and len(st["generations"]) == 1
                and st["generations"][0]["state"] == "active" and st["profile"].get("state") in ("ready", "done", "cached")):
            return st
        time.sleep(0.3)
    raise TimeoutError(f"daemon did not settle:\n{d.logs()[-3000:]}")


def concurrent_ms(runners, sizes) -> float:
    """Run each runner on its prepared slice at the same time; the batch is done when the slowest is."""
    busy = [r for r, b in zip(runners, sizes) if b > 0]
    for r in busy:
        r.proc.stdin.write(json.dumps({"op": "run", "n": 1}) + "\n")
        r.proc.stdin.flush()
    return max(r._read(600)["ms"][0] for r in busy)


def bench_model(name: str, batches: list[int], reps: int, log) -> tuple[list[dict], dict]:
    path = BL.ensure_model(name, log=log)
    topo = BL.topology()
    T = topo.n_cores
    cpus = BL.fat_cpus(topo)
    fat = BL.InProcRunner(path, T, cpus, BL.worker_like_env(T, cpus), name=f"{name}-fat")
    singles = []
    if T == 2:
        singles = [BL.InProcRunner(path, 1, c, BL.worker_like_env(1, c), name=f"{name}-single{i}")
                   for i, c in enumerate(BL.plan_cpus("2x1:1", topo))]
    hello = fat.wait_ready()
    for r in singles:
        r.wait_ready()
    maxb = max(batches)
    t0 = time.monotonic()
    d = BL.BenchDaemon(path, sets={"server.max_batch_size": maxb, "server.max_delay_ms": 0,
                                   "monitor.enabled": False, "autotune.batch_size": maxb}, name=f"{name}-packratd")
    d.wait_serving(timeout=3600)
    st = settle(d)
    info = {"model": name, "startup_s": time.monotonic() - t0, "profile_wall_s": st["profile"].get("wall_s"),
            "startup_plan": st["plan"], "startup_predicted_ms": st["predicted_ms"], "startup_measured_ms": st["measured_ms"],
            "candidates": st["autotune"].get("candidates"), "env": BL.env_info(hello),
            "worker_env": BL.relevant_env(BL.worker_like_env(T, cpus))}
    log(f"{name}: profiled in {info['profile_wall_s']:.0f}s, startup plan {st['plan']} "
        f"(pred {st['predicted_ms']:.1f} ms, measured {st['measured_ms'] or float('nan'):.1f} ms)")
    rows = []
    try:
        for B in batches:
            d.control("reconfigure", batch_size=B)
            time.sleep(0.5)
            st = settle(d)
            plan = st["plan"]
            inputs = BL.make_inputs(hello["spec"], B)
            fat.prepare(B)
            splits = []
            if singles:
                splits = [(b1, B - b1) for b1 in range(B, math.ceil(B / 2) - 1, -1)]
            variants = {"fat": fat.call_ms, "packratd": lambda: BL.timed_infer(d, inputs)[0]}
            prepared = {}

            def split_fn(sp):
                def run():
                    for r, b in zip(singles, sp):
                        if b > 0 and prepared.get(id(r)) != b:
                            r.prepare(b)
                            prepared[id(r)] = b
                    return concurrent_ms(singles, sp)
                return run
            # Pass 1: every split once (after one warm call), interleaved with fat and packratd.
            first = {f"split{sp[0]}+{sp[1]}": split_fn(sp) for sp in splits}
            res1 = BL.interleave({**variants, **first}, reps=1, warmup=1)
            best = min(res1[k]["ms"][0] for k in first) if first else float("inf")
            keep = {k: first[k] for k in first if res1[k]["ms"][0] <= 1.2 * best}
            res = BL.interleave({**variants, **keep}, reps=reps, warmup=0)
            med = {k: BL.median(res[k]["ms"] + res1[k]["ms"]) for k in list(variants) + list(keep)}
            for k in first:
                if k not in keep:
                    med[k] = res1[k]["ms"][0]
            oracle_candidates = {"fat": med["fat"], **{k: med[k] for k in first}}
            oracle_plan, oracle_ms = min(oracle_candidates.items(), key=lambda kv: kv[1])
            fat_s = BL.summarize(res["fat"]["ms"] + res1["fat"]["ms"])
            pk_s = BL.summarize(res["packratd"]["ms"] + res1["packratd"]["ms"])
            row = {"model": name, "batch": B, "fat_ms": fat_s["median_ms"], "fat_p10_ms": fat_s["p10_ms"],
                   "fat_p90_ms": fat_s["p90_ms"], "packratd_ms": pk_s["median_ms"], "packratd_p10_ms": pk_s["p10_ms"],
                   "packratd_p90_ms": pk_s["p90_ms"], "oracle_ms": oracle_ms if singles else None,
                   "plan": plan, "predicted_ms": st["predicted_ms"],
                   "oracle_plan": ("fat" if oracle_plan == "fat" else oracle_plan.replace("split", "2x1t:")) if singles else None,
                   "speedup": fat_s["median_ms"] / pk_s["median_ms"],
                   "vs_oracle": pk_s["median_ms"] / oracle_ms if singles else None,
                   "paired_fat_over_packratd": BL.median(BL.paired_ratios(res["rounds"], "fat", "packratd")),
                   "n": pk_s["n"], "splits": {k: med[k] for k in first}}
            rows.append(row)
            log(f"{name} B={B:>3}: fat {BL.fmt_ms(row['fat_ms'])}  packratd {BL.fmt_ms(row['packratd_ms'])} [{plan}]  "
                f"oracle {BL.fmt_ms(row['oracle_ms'])} [{row['oracle_plan']}]  speedup {row['speedup']:.2f}  "
                f"vs oracle {row['vs_oracle'] or float('nan'):.2f}")
    finally:
        d.stop()
        fat.stop()
        for r in singles:
            r.stop()
    return rows, info


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, m in enumerate(sorted({r["model"] for r in rows})):
        rs = sorted((r for r in rows if r["model"] == m), key=lambda r: r["batch"])
        c = f"C{i}"
        ax.plot([r["batch"] for r in rs], [r["speedup"] for r in rs], "o-", color=c, label=f"{m}: packratd")
        if rs[0]["oracle_ms"]:
            ax.plot([r["batch"] for r in rs], [r["fat_ms"] / r["oracle_ms"] for r in rs], "x--", color=c, alpha=0.6,
                    label=f"{m}: oracle")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["batch"] for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size B")
    ax.set_ylabel("speedup over one fat instance (median)")
    ax.set_title("packratd vs fat instance, 2-core VM (higher is better)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(rows, infos, args, solver_rows) -> str:
    out = [f"Command: `{' '.join(['.venv/bin/python', 'tools/bench_autotune.py'] + sys.argv[1:])}` "
           f"(part of `make bench`), {time.strftime('%Y-%m-%d')}.", ""]
    e = infos[0]["env"] if infos else {}
    out.append(f"Machine: {e.get('cpu_model')}, {e.get('cores')} cores, torch {e.get('torch')}, oneDNN {e.get('onednn')}; "
               f"every variant runs with the workers' settings: {', '.join(f'{k}={v}' for k, v in infos[0]['worker_env'].items()) if infos else ''}.")
    out.append("fat = the model in-process on all cores; packratd = end to end through the client with the plan it chose "
               "for B; oracle = best of every split of B over two concurrent 1-thread instances and the fat instance. "
               "Medians of interleaved calls (ms); speedup = fat / packratd; vs oracle = packratd / oracle (1.00 = as good).")
    out.append("")
    out.append("| model | B | fat ms | packratd ms (p10-p90) | plan | oracle ms | oracle plan | speedup | vs oracle |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        out.append(f"| {r['model']} | {r['batch']} | {BL.fmt_ms(r['fat_ms'])} | {BL.fmt_ms(r['packratd_ms'])} "
                   f"({BL.fmt_ms(r['packratd_p10_ms'])}-{BL.fmt_ms(r['packratd_p90_ms'])}) | {r['plan']} | "
                   f"{BL.fmt_ms(r['oracle_ms'])} | {r['oracle_plan']} | {r['speedup']:.2f} | "
                   f"{(r['vs_oracle'] or float('nan')):.2f} |")
    out.append("")
    out.append("Profiling wall time and the start-up choice (plan for B = max batch, after the interference check):")
    out.append("")
    for i in infos:
        cands = "; ".join(f"{c[0]} measured {BL.fmt_ms(c[2])} ms" for c in (i.get("candidates") or []))
        out.append(f"- {i['model']}: profile {i['profile_wall_s']:.0f} s, start-up to serving {i['startup_s']:.0f} s; "
                   f"chose {i['startup_plan']} (predicted {BL.fmt_ms(i['startup_predicted_ms'])} ms, measured "
                   f"{BL.fmt_ms(i['startup_measured_ms'])} ms); candidates: {cands}")
    if solver_rows:
        out.append("")
        out.append("Solver time (`tools/bench_solver.py`, synthetic table, median of 3):")
        out.append("")
        out.append("| T | B=64 | B=256 | B=1024 |")
        out.append("|---|---|---|---|")
        for T in (16, 64, 256):
            cells = {r["B"]: r["seconds"] for r in solver_rows if r.get("op", "solve") == "solve" and r["T"] == T}
            out.append(f"| {T} | " + " | ".join(f"{cells.get(B, float('nan')) * 1000:.1f} ms" for B in (64, 256, 1024)) + " |")
    out.append("")
    out.append("![speedup vs B](benchmarks/autotune.png)")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,bert,gpt2")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="B in {1, 8} and 2 reps")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "autotune.json"))
    p.add_argument("--md", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = p.parse_args(argv)
    batches = [1, 8] if args.quick else [int(b) for b in args.batches.split(",")]
    reps = 2 if args.quick else args.reps

    def log(msg):
        print(msg, flush=True)
    rows, infos = [], []
    for m in args.models.split(","):
        r, i = bench_model(m, batches, reps, log)
        rows += r
        infos.append(i)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "models": infos}, f, indent=1)
    solver_rows = []
    sp = os.path.join(ROOT, "benchmarks", "solver.json")
    if os.path.exists(sp):
        with open(sp) as f:
            solver_rows = json.load(f)
    plot(rows, os.path.join(os.path.dirname(args.out), "autotune.png"))
    BL.replace_md_section(args.md, "## Autotuning (issue 3)", report(rows, infos, args, solver_rows))
    log(f"wrote {args.out}, benchmarks/autotune.png and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

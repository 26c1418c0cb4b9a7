#!/usr/bin/env python3
"""Runtimes benchmark: eager vs inductor (AOTInductor) vs OpenVINO vs ONNX Runtime, same model.

For each model (ResNet-50, BERT-base, GPT-2-small by default) and batch size (1, 8, 32):

* every runtime is prepared the way packratd prepares it (``python -m packratd.runtimes prepare``
  in a child pinned to the instance's CPUs; compile/convert time recorded, artifact cached);
* every runtime then gets ONE PROCESS of its own (``python -m packratd.runtimes runner``), started
  exactly like a packratd worker with the same allocator environment (``workers.allocator``
  default, glibc-tuned) and thread settings for all: one fat instance on every usable core, pinned;
  worker "boot" = load of the cached artifact + 2 warm-up calls, in that fresh process;
* calls are interleaved in blocks: round r runs a block of ``--block`` calls of each runtime in
  turn (order rotated every round), the first call of each block is dropped (it pays for caches
  the previous runtime evicted), and there is a short pause between blocks so that no thread pool
  spins into another's turn; medians with p10/p90 over all rounds;
* each runtime's outputs are compared with eager's on the same inputs (packratd.runtimes.numerics)
  and the NaN/Inf verdict from prepare is shown.  A column is what packratd serves under its
  default ``specials=strict``; where that refuses a runtime (OpenVINO on ReLU networks) or picks a
  slower variant (inductor without freezing), the fastest variant is timed too as ``X*``.

Extra columns: ``COLUMNS`` maps a name to a factory ``f(ctx) -> Column``; a Column has
``.call(batch) -> ms`` and ``.close()``.  ``--packratd`` adds "packratd (runtime=auto)": a real
packratd daemon started with ``--set workers.runtime=auto`` and timed end to end through the client
(ready for when the daemon has that option).

Diagnostics: ``--compare-inductor`` (AOTInductor vs torch.compile with freezing: compile time,
time to the first answer in a fresh process with a warm cache, latency); ``--spin-check`` (ONNX
Runtime with intra-op spinning on vs off: latency and CPU burnt while idle).

    python tools/bench_runtimes.py                 # full run; writes benchmarks/runtimes.{json,md}
    python tools/bench_runtimes.py --quick         # ResNet-50, B = 1, 8, a few rounds; prints only
    python tools/bench_runtimes.py --quick --compare-inductor --spin-check

The driver process never imports torch or any runtime.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import numpy as np  # noqa: E402

import benchlib as BL  # noqa: E402

RUNTIMES = ("eager", "inductor", "openvino", "onnxruntime")
PAUSE_BETWEEN_BLOCKS_S = 0.05


# ---------------------------------------------------------------------------------------------
# one runtime in its own process
# ---------------------------------------------------------------------------------------------

class RtRunner:
    """``python -m packratd.runtimes runner`` in a worker-like process; JSON lines over a pipe."""

    def __init__(self, runtime: str, model: str, artifact: str | None, threads: int, cpus, env: dict,
                 log_dir: str, name: str | None = None, cmd: list[str] | None = None):
        self.runtime = runtime
        self.name = name or runtime
        self.cpus = list(cpus)
        cmd = cmd or [sys.executable, "-m", "packratd.runtimes", "runner", "--runtime", runtime,
                      "--model", os.path.abspath(model), "--threads", str(threads),
                      "--cpus", ",".join(map(str, self.cpus))] + (["--artifact", artifact] if artifact else [])
        self._log = open(os.path.join(log_dir, f"runner-{self.name}.log"), "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, cwd=ROOT, text=True, bufsize=1)
        BL._LIVE.append(self.proc)
        self.hello = self._read(900)
        self.hello["process_start_to_ready_s"] = time.monotonic() - t0
        self.tmp = tempfile.mkdtemp(prefix=f"rt-{self.name}-", dir=log_dir)
        self._n = 0

    def _read(self, timeout: float = 900.0) -> dict:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"{self.name}: no answer within {timeout:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: runner exited with {self.proc.wait()} (log: {self._log.name})")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.name}: {msg['error']}")
        return msg

    def rpc(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def set_batch(self, b: int, seed: int = 0) -> None:
        self.rpc(op="batch", batch=b, seed=seed)

    def calls(self, n: int) -> list[float]:
        return self.rpc(op="time", n=n)["ms"]

    def outputs(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        self._n += 1
        fin, fout = os.path.join(self.tmp, f"i{self._n}.npz"), os.path.join(self.tmp, f"o{self._n}.npz")
        np.savez(fin, *arrays)
        self.rpc(op="run_npz", inputs=fin, out=fout)
        with np.load(fout, allow_pickle=False) as z:
            out = [z[f"arr_{i}"] for i in range(len(z.files))]
        os.unlink(fin)
        os.unlink(fout)
        return out

    def idle_cpu(self, seconds: float = 5.0, gaps: int = 10, gap_s: float = 0.05) -> dict:
        return self.rpc(op="idle_cpu", seconds=seconds, gaps=gaps, gap_s=gap_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
        if self.proc in BL._LIVE:
            BL._LIVE.remove(self.proc)
        self._log.close()


def prepare(runtime: str, model: str, cache_dir: str, threads: int, cpus, env: dict, retry: bool = False,
            specials: str = "strict") -> dict:
    cmd = [sys.executable, "-m", "packratd.runtimes", "prepare", "--runtime", runtime, "--model", model,
           "--cache-dir", cache_dir, "--threads", str(threads), "--cpus", ",".join(map(str, cpus)),
           "--specials", specials] + (["--retry"] if retry else [])
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.monotonic() - t0
    lines = p.stdout.strip().splitlines()
    res = json.loads(lines[-1]) if lines else {"ok": False, "error": f"exit {p.returncode}: {p.stderr[-500:]}"}
    res["prepare_wall_s"] = wall
    return res


# ---------------------------------------------------------------------------------------------
# extra columns (hook): packratd end to end
# ---------------------------------------------------------------------------------------------

class PackratdColumn:
    """A real packratd serving the model with workers.runtime = auto; one client call per sample."""

    def __init__(self, ctx: dict):
        sets = {"workers.runtime": "auto", "server.max_batch_size": max(ctx["batches"])}
        # the benchmark's own cache dir is <repo>/state/runtimes: the daemon reuses the artifacts built there
        self.d = BL.BenchDaemon(ctx["model"], sets=sets, env=BL.base_env(), name="packratd-auto",
                                state_dir=os.path.dirname(os.path.abspath(ctx.get("cache_dir") or os.path.join(ROOT, "state", "runtimes"))))
        self.d.wait_serving(timeout=3600)
        self.spec = ctx["spec"]
        self.inputs: dict[int, list] = {}
        try:
            self.status = self.d.control("status")
        except Exception as e:  # noqa: BLE001
            self.status = {"error": str(e)}

    def call(self, batch: int) -> float:
        x = self.inputs.get(batch)
        if x is None:
            x = self.inputs[batch] = BL.make_inputs(self.spec, batch)
        ms, _ = BL.timed_infer(self.d, x)
        return ms

    def info(self) -> dict:
        st = self.status if isinstance(self.status, dict) else {}
        return {"status_runtime": st.get("runtime"), "plan": st.get("plan")}

    def close(self) -> None:
        self.d.stop()


COLUMNS = {"packratd (runtime=auto)": PackratdColumn}
SECTION = "## Runtimes (issue 9)"


# ---------------------------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------------------------

def interleave_blocks(callers: dict, rounds: int, block: int, budget_s: float, min_rounds: int) -> dict:
    """callers: name -> f(n) -> list of n ms.  Round-robin blocks, order rotated every round; the
    first call of each block is dropped; stops after ``rounds`` or, past min_rounds, the budget."""
    names = list(callers)
    res = {n: [] for n in names}
    t0 = time.monotonic()
    for k in range(rounds):
        if k >= min_rounds and time.monotonic() - t0 > budget_s:
            break
        for n in names[k % len(names):] + names[:k % len(names)]:
            ms = callers[n](block)
            res[n].extend(ms[1:] if block > 1 else ms)
            time.sleep(PAUSE_BETWEEN_BLOCKS_S)
    return res


def bench_model(name: str, args, threads: int, cpus: list[int], env: dict, log_dir: str) -> dict:
    path = BL.ensure_model(name, args.models_dir)
    out = {"model": name, "path": path, "runtimes": {}, "cells": {}}
    runtimes = [r for r in args.runtimes.split(",") if r]
    runners: dict[str, RtRunner] = {}
    jobs = []
    for rt in runtimes:
        print(f"[{name}] preparing {rt} ...", flush=True)
        pr = prepare(rt, path, args.cache_dir, threads, cpus, env, retry=args.retry)
        jobs.append((rt, rt, pr))
        nan_refused = not pr.get("ok") and "does not propagate NaN/Inf" in (pr.get("reason") or "")
        if nan_refused or (pr.get("ok") and pr.get("note")):
            # what packratd would serve under specials=ignore (the fastest variant), marked *
            jobs.append((rt + "*", rt, prepare(rt, path, args.cache_dir, threads, cpus, env, specials="ignore")))
    for col, rt, pr in jobs:
        info = out["runtimes"][col] = {"runtime": rt, "specials": "ignore" if col.endswith("*") else "strict"}
        info["prepare"] = {k: pr.get(k) for k in ("ok", "cached", "build_seconds", "seconds", "prepare_wall_s",
                                                   "verified", "reason", "error", "artifact", "options", "note")}
        if not pr.get("ok"):
            info["unavailable"] = pr.get("reason") or pr.get("error")
            print(f"[{name}] {col} unavailable: {info['unavailable']}", flush=True)
            continue
        try:
            r = runners[col] = RtRunner(rt, path, pr.get("artifact"), threads, cpus, env, log_dir, name=col.replace("*", "-ignore"))
        except Exception as e:  # noqa: BLE001
            info["unavailable"] = f"runner failed: {e}"
            print(f"[{name}] {col} runner failed: {e}", flush=True)
            continue
        info["boot"] = {k: r.hello.get(k) for k in ("load_s", "warmup_s", "boot_s", "process_start_to_ready_s")}
        info["settings"] = r.hello.get("settings")
        print(f"[{name}] {col}: compile/convert {pr.get('build_seconds') or 0:.1f} s "
              f"({'cached' if pr.get('cached') else 'built now'}), boot {r.hello['boot_s']:.2f} s", flush=True)
    extra = {}
    try:
        if runners:
            spec = next(iter(runners.values())).hello["input_spec"]
            # numerics on the benchmark's own inputs, against the eager runner when there is one
            if "eager" in runners:
                from packratd.runtimes.numerics import explain
                x = BL.make_inputs(spec, min(args.batch_list), seed=3)
                ref = runners["eager"].outputs(x)
                for rt, r in runners.items():
                    ok, err, bound, why = explain(r.outputs(x), ref)
                    out["runtimes"][rt]["numerics"] = {"ok": ok, "max_abs_err": err, "bound": bound, "why": why,
                                                       "batch": min(args.batch_list)}
            ctx = {"model": path, "spec": spec, "batches": args.batch_list, "threads": threads, "cpus": cpus, "cache_dir": args.cache_dir}
            if args.packratd:
                for cname, factory in COLUMNS.items():
                    try:
                        extra[cname] = factory(ctx)
                    except Exception as e:  # noqa: BLE001
                        print(f"[{name}] column {cname} unavailable: {e}", flush=True)
                        out["runtimes"][cname] = {"unavailable": str(e)[:500]}
            for B in args.batch_list:
                for r in runners.values():
                    r.set_batch(B)
                callers = {rt: r.calls for rt, r in runners.items()}
                for cname, col in extra.items():
                    callers[cname] = (lambda n, c=col, b=B: [c.call(b) for _ in range(n)])
                # warm-up at this batch size (interleaved too)
                interleave_blocks(callers, rounds=1, block=2, budget_s=1e9, min_rounds=1)
                load0 = BL.cpu_busy()
                res = interleave_blocks(callers, rounds=args.rounds, block=args.block, budget_s=args.budget,
                                        min_rounds=args.min_rounds)
                busy = BL.cpu_busy_since(load0)
                cell = out["cells"][str(B)] = {rt: BL.summarize(ms) for rt, ms in res.items()}
                cell["_machine_busy_cpus"] = busy
                line = "  ".join(f"{rt} {BL.fmt_ms(s['median_ms'])}" for rt, s in cell.items() if not rt.startswith("_"))
                print(f"[{name}] B={B}: {line} ms (busy CPUs {busy:.1f})", flush=True)
    finally:
        for cname, col in extra.items():
            try:
                out.setdefault("columns", {})[cname] = col.info()
            except Exception as e:  # noqa: BLE001
                out.setdefault("columns", {})[cname] = {"error": str(e)[:200]}
            col.close()
        for r in runners.values():
            r.close()
    return out


# ---------------------------------------------------------------------------------------------
# diagnostics: inductor flavour, ORT spinning
# ---------------------------------------------------------------------------------------------

def tc_child_main(argv) -> int:
    """torch.compile(freezing) in a worker-like process, speaking the runner's JSON-lines protocol.
    hello reports the time to the first answer for each batch class in --first (compile or cache load)."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--cpus", required=True)
    p.add_argument("--first", default="1,8")
    a = p.parse_args(argv)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    cpus = [int(c) for c in a.cpus.split(",")]
    os.sched_setaffinity(0, cpus)
    from packratd.worker import thread_env
    os.environ.update(thread_env(a.threads, cpus, True))
    t0 = time.monotonic()
    import torch
    import torch._inductor.config as ic
    from packratd import model as model_mod
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    ic.freezing = True
    ep = torch.export.load(a.model)
    spec = model_mod.input_spec(ep)
    fn = torch.compile(ep.module())
    t_load = time.monotonic() - t0
    first = {}
    for b in [int(x) for x in a.first.split(",")]:
        x = model_mod.example_inputs(spec, b)
        t = time.monotonic()
        model_mod.run(fn, x)
        first[str(b)] = time.monotonic() - t
    out.write(json.dumps({"ready": True, "input_spec": spec, "load_s": t_load, "first_call_s": first,
                          "boot_s": time.monotonic() - t0}) + "\n")
    arrays = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "batch":
            arrays = model_mod.example_inputs(spec, int(cmd["batch"]), int(cmd.get("seed", 0)))
            out.write(json.dumps({"ok": True}) + "\n")
        elif cmd["op"] == "time":
            ms = []
            for _ in range(int(cmd.get("n", 1))):
                t = time.perf_counter()
                model_mod.run(fn, arrays)
                ms.append((time.perf_counter() - t) * 1000)
            out.write(json.dumps({"ms": ms}) + "\n")
        else:
            out.write(json.dumps({"error": f"unsupported op {cmd['op']}"}) + "\n")
    return 0


def compare_inductor(name: str, args, threads, cpus, env, log_dir) -> dict:
    """AOTInductor vs torch.compile(freezing): what a worker would pay, and what it would serve at."""
    path = BL.ensure_model(name, args.models_dir)
    res = {"model": name}
    fresh_cache = tempfile.mkdtemp(prefix="aoti-fresh-", dir=log_dir)
    pr = prepare("inductor", path, fresh_cache, threads, cpus, env)
    res["aoti"] = {"compile_s": pr.get("build_seconds"), "prepare_wall_s": pr.get("prepare_wall_s"), "ok": pr.get("ok")}
    tc_cache = tempfile.mkdtemp(prefix="tc-cache-", dir=log_dir)
    tenv = dict(env, TORCHINDUCTOR_CACHE_DIR=tc_cache)
    first = ",".join(str(b) for b in args.batch_list)
    cmd = [sys.executable, os.path.abspath(__file__), "_tc_child", "--model", path, "--threads", str(threads),
           "--cpus", ",".join(map(str, cpus)), "--first", first]
    cold = RtRunner("torch.compile", path, None, threads, cpus, tenv, log_dir, name="tc-cold", cmd=cmd)
    res["torch_compile_cold"] = {"load_s": cold.hello["load_s"], "first_call_s": cold.hello["first_call_s"]}
    cold.close()
    warm = RtRunner("torch.compile", path, None, threads, cpus, tenv, log_dir, name="tc-warm", cmd=cmd)
    res["torch_compile_warm_cache_new_process"] = {"load_s": warm.hello["load_s"], "first_call_s": warm.hello["first_call_s"]}
    aoti = RtRunner("inductor", path, pr.get("artifact"), threads, cpus, env, log_dir, name="aoti")
    res["aoti"]["boot_s"] = aoti.hello["boot_s"]
    res["latency"] = {}
    try:
        for B in args.batch_list:
            warm.set_batch(B)
            aoti.set_batch(B)
            callers = {"aoti": aoti.calls, "torch.compile": warm.calls}
            interleave_blocks(callers, rounds=1, block=2, budget_s=1e9, min_rounds=1)
            r = interleave_blocks(callers, rounds=args.rounds, block=args.block, budget_s=args.budget, min_rounds=args.min_rounds)
            res["latency"][str(B)] = {k: BL.summarize(v) for k, v in r.items()}
            print(f"[{name}] inductor flavours B={B}: " + ", ".join(f"{k} {BL.fmt_ms(v['median_ms'])} ms"
                                                                     for k, v in res["latency"][str(B)].items()), flush=True)
    finally:
        warm.close()
        aoti.close()
    print(f"[{name}] AOTI compile {res['aoti']['compile_s']:.1f} s, worker boot {res['aoti']['boot_s']:.2f} s; "
          f"torch.compile first answers cold {res['torch_compile_cold']['first_call_s']} s, "
          f"new process with warm cache {res['torch_compile_warm_cache_new_process']['first_call_s']} s", flush=True)
    return res


def spin_check(name: str, args, threads, cpus, env, log_dir) -> dict:
    """ONNX Runtime with intra-op spinning on vs off: latency (interleaved) and idle CPU burn."""
    path = BL.ensure_model(name, args.models_dir)
    pr = prepare("onnxruntime", path, args.cache_dir, threads, cpus, env)
    if not pr.get("ok"):
        return {"unavailable": pr.get("reason") or pr.get("error")}
    rs = {s: RtRunner("onnxruntime", path, pr["artifact"], threads, cpus, dict(env, PACKRATD_ORT_ALLOW_SPINNING=v),
                      log_dir, name=f"ort-spin-{s}") for s, v in (("on", "1"), ("off", "0"))}
    out = {"model": name, "latency": {}, "idle": {}}
    try:
        for B in args.batch_list:
            for r in rs.values():
                r.set_batch(B)
            callers = {s: r.calls for s, r in rs.items()}
            interleave_blocks(callers, rounds=1, block=2, budget_s=1e9, min_rounds=1)
            res = interleave_blocks(callers, rounds=args.rounds, block=args.block, budget_s=args.budget, min_rounds=args.min_rounds)
            out["latency"][str(B)] = {s: BL.summarize(v) for s, v in res.items()}
        for s, r in rs.items():
            r.set_batch(min(args.batch_list))
            out["idle"][s] = r.idle_cpu(seconds=5.0, gaps=10, gap_s=0.05)
    finally:
        for r in rs.values():
            r.close()
    for s in rs:
        i = out["idle"][s]
        lat = ", ".join(f"B={b} {BL.fmt_ms(v[s]['median_ms'])} ms" for b, v in out["latency"].items())
        print(f"[{name}] ORT spinning {s}: {lat}; CPU burnt idle {i['idle_cpu_s']:.3f} s in {i['seconds']:.0f} s, "
              f"{i['gap_cpu_s'] * 1000:.1f} ms per {i['gap_s'] * 1000:.0f} ms gap", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def _cell(s: dict | None) -> str:
    if not s or s.get("median_ms") is None:
        return "-"
    return f"{BL.fmt_ms(s['median_ms'])} ({BL.fmt_ms(s['p10_ms'])}–{BL.fmt_ms(s['p90_ms'])})"


def render_md(report: dict) -> str:
    env = report["env"]
    lines = [f"`{report['command']}` — {env.get('cpu_model')}, {report['threads']} threads on CPUs {report['cpus']}, "
             f"allocator {report['allocator']}; torch {report.get('versions', {}).get('torch')}, "
             + ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items() if k != "torch")
             + f". Load average at start {env.get('loadavg_at_start')}.", "",
             "Milliseconds per call, median (p10–p90); one process per runtime, calls interleaved in blocks. "
             "A plain column is what packratd serves under specials=strict (its default); `X*` is runtime X's "
             "fastest variant, whose outputs for NaN/Inf inputs differ from eager's (served only under "
             "specials=ignore).", ""]
    for r in report.get("reruns", []):
        lines += [f"**{r['model']}** was measured again, alone: `{r['command']}`, load average at start "
                  f"{(r.get('env') or {}).get('loadavg_at_start')}; {r.get('why', '')}.", ""]
    for m in report["models"]:
        names = [n for n in m["runtimes"] if n not in COLUMNS]
        # end-to-end columns (--packratd): what the daemon serves, against the best in-process runtime
        cols = [c for c in COLUMNS if any(c in cell for cell in m["cells"].values())]
        chosen = {c: (m.get("columns", {}).get(c) or {}).get("status_runtime") for c in cols}
        lines.append(f"**{m['model']}**" + "".join(f" — {c} served on **{chosen[c]}**" for c in cols if chosen[c]))
        lines.append("")
        heads = names + cols
        lines.append("| B | " + " | ".join(heads) + " | best / eager (strict) |"
                     + "".join(f" {c} / best |" for c in cols))
        lines.append("|---|" + "---|" * (len(heads) + 1 + len(cols)))
        for B, cell in m["cells"].items():
            meds = {n: cell[n]["median_ms"] for n in names if n in cell and cell[n].get("median_ms") is not None
                    and not n.endswith("*")}
            ratio, best = "", None
            if "eager" in meds and meds:
                best = min(meds, key=meds.get)
                ratio = f"{meds['eager'] / meds[best]:.2f}x ({best})"
            vs = ""
            for c in cols:
                v = (cell.get(c) or {}).get("median_ms")
                vs += (f" {v / meds[best]:.3f} (+{v - meds[best]:.1f} ms) |" if v is not None and best else " - |")
            lines.append(f"| {B} | " + " | ".join(_cell(cell.get(n)) if n in cell else
                                                   ("n/a" if (m["runtimes"].get(n) or {}).get("unavailable") else "-")
                                                   for n in heads)
                         + f" | {ratio} |" + vs)
        lines.append("")
        lines.append("| runtime | compile/convert s | prepare wall s | worker boot s (load + warm-up) | max abs diff vs eager (bound) | NaN/Inf like eager | note |")
        lines.append("|---|---|---|---|---|---|---|")
        for n in names:
            i = m["runtimes"][n]
            p = i.get("prepare") or {}
            sp = ((p.get("verified") or {}).get("specials") or {})
            num = i.get("numerics") or {}
            boot = i.get("boot") or {}
            bs = boot.get("boot_s")
            boot_txt = "-" if bs is None else f"{bs:.2f} ({boot.get('load_s') or 0:.2f} + {boot.get('warmup_s') or 0:.2f})"
            num_txt = "-" if not num else f"{num['max_abs_err']:.2g} ({num['bound']:.2g})"
            sp_txt = "n/a" if not sp else ("yes" if sp.get("ok") else "no: " + sp.get("why", ""))
            cached = " (cached)" if p.get("cached") else ""
            note = i.get("unavailable") or p.get("note") or ""
            opts = p.get("options") or {}
            if opts.get("freezing") is False:
                note = ("freezing off. " + note).strip()
            lines.append(f"| {n} | {p.get('build_seconds') or 0:.1f}{cached} | {(p.get('prepare_wall_s') or 0):.1f} | "
                         f"{boot_txt} | {num_txt} | {sp_txt} | {note} |")
        lines.append("")
    for d in report.get("compare_inductor", []):
        lines.append(f"**Inductor flavour, {d['model']}**: AOTInductor compile {d['aoti']['compile_s']:.1f} s, worker boot "
                     f"{d['aoti']['boot_s']:.2f} s; torch.compile(freezing) first answers per batch class {d['torch_compile_cold']['first_call_s']} s "
                     f"cold, {d['torch_compile_warm_cache_new_process']['first_call_s']} s in a new process with a warm cache. Latency: "
                     + "; ".join(f"B={b}: " + ", ".join(f"{k} {_cell(v)}" for k, v in c.items()) for b, c in d["latency"].items()))
        lines.append("")
    for d in report.get("spin_check", []):
        if "idle" not in d:
            continue
        lines.append(f"**ONNX Runtime spinning, {d['model']}**: " + "; ".join(
            f"{s}: " + ", ".join(f"B={b} {_cell(v[s])} ms" for b, v in d["latency"].items())
            + f", idle CPU {d['idle'][s]['idle_cpu_s']:.3f} s over {d['idle'][s]['seconds']:.0f} s, "
              f"{d['idle'][s]['gap_cpu_s'] * 1000:.1f} ms per {d['idle'][s]['gap_s'] * 1000:.0f} ms gap" for s in ("on", "off")))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_tc_child"]:
        return tc_child_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet50,bert,gpt2")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--threads", type=int, default=None, help="threads of the one instance (default: every usable core)")
    p.add_argument("--rounds", type=int, default=15, help="rounds of blocks (max)")
    p.add_argument("--min-rounds", type=int, default=5)
    p.add_argument("--block", type=int, default=3, help="calls per block; the first of each is dropped")
    p.add_argument("--budget", type=float, default=120.0, help="seconds per (model, B) cell after min-rounds")
    p.add_argument("--quick", action="store_true", help="ResNet-50, B = 1, 8, 4 rounds of blocks of 2; prints only")
    p.add_argument("--packratd", action="store_true", help="add the packratd end-to-end column(s) of COLUMNS")
    p.add_argument("--compare-inductor", action="store_true", help="AOTInductor vs torch.compile(freezing)")
    p.add_argument("--spin-check", action="store_true", help="ONNX Runtime spinning on vs off")
    p.add_argument("--retry", action="store_true", help="prepare again runtimes remembered as unavailable")
    p.add_argument("--models-dir", default=os.path.join(ROOT, "models"))
    p.add_argument("--cache-dir", default=os.path.join(ROOT, "state", "runtimes"))
    p.add_argument("--out", default=None, help="JSON (default benchmarks/runtimes.json; none with --quick)")
    p.add_argument("--md", default=None, help="markdown (default benchmarks/runtimes.md; none with --quick)")
    p.add_argument("--bench-md", default=os.path.join(ROOT, "BENCHMARKS.md"),
                   help=f"also put the tables in this file's {SECTION!r} section ('' for none; none with --quick)")
    p.add_argument("--render", metavar="JSON", help="only render the markdown of an earlier run's JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.models = "resnet50" if a.models == p.get_default("models") else a.models
        a.batches = "1,8" if a.batches == p.get_default("batches") else a.batches
        a.rounds, a.min_rounds, a.block, a.budget = 4, 3, 2, 20.0
    elif a.out is None:
        a.out = os.path.join(ROOT, "benchmarks", "runtimes.json")
        a.md = a.md or os.path.join(ROOT, "benchmarks", "runtimes.md")
    if a.render:
        with open(a.render) as f:
            report = json.load(f)
        md_text = render_md(report)
        print(md_text)
        if a.md:
            with open(a.md, "w") as f:
                f.write("# Runtimes\n\n" + md_text + "\n")
        if a.bench_md:
            BL.replace_md_section(a.bench_md, SECTION, md_text)
        return 0
    a.batch_list = [int(b) for b in a.batches.split(",")]
    topo = BL.topology()
    cpus = BL.fat_cpus(topo)
    threads = a.threads or len(cpus)
    cpus = cpus[:threads]
    allocator = BL.config_default("workers.allocator")
    env = BL.worker_like_env(threads, cpus, allocator=allocator)
    os.makedirs(a.cache_dir, exist_ok=True)
    log_dir = tempfile.mkdtemp(prefix="bench-runtimes-", dir=os.path.join(ROOT, "state") if os.path.isdir(os.path.join(ROOT, "state")) else None)
    import importlib.metadata as md
    versions = {}
    for d in ("torch", "openvino", "onnxruntime", "onnx", "onnxscript"):
        try:
            versions[d] = md.version(d)
        except md.PackageNotFoundError:
            pass
    report = {"command": "python tools/bench_runtimes.py " + " ".join(argv), "env": BL.env_info(), "threads": threads,
              "cpus": cpus, "allocator": allocator, "worker_env": BL.relevant_env(env), "versions": versions,
              "models": [], "compare_inductor": [], "spin_check": []}
    print(f"{report['env'].get('cpu_model')}; {threads} threads on CPUs {cpus}; allocator {allocator}; "
          f"load average {report['env'].get('loadavg_at_start')}", flush=True)
    for m in a.models.split(","):
        report["models"].append(bench_model(m, a, threads, cpus, env, log_dir))
        if a.compare_inductor:
            report["compare_inductor"].append(compare_inductor(m, a, threads, cpus, env, log_dir))
        if a.spin_check:
            report["spin_check"].append(spin_check(m, a, threads, cpus, env, log_dir))
    md_text = render_md(report)
    print()
    print(md_text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write("# Runtimes\n\n" + md_text + "\n")
    if a.out and a.bench_md:
        BL.replace_md_section(a.bench_md, SECTION, md_text)
    import shutil
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

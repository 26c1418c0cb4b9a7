"""Command line of packratd.runtimes (the daemon never imports torch: it runs these as children).

    python -m packratd.runtimes prepare --runtime X --model M --cache-dir D --threads N [--cpus 0,1]
                                       [--specials strict|ignore] [--no-verify] [--retry]
        Build (or find in the cache) runtime X's artifact for model M.  Prints ONE JSON line on stdout:
          {"ok": true, "runtime", "artifact", "seconds", "cached", "key", "build_seconds", "verified", ...}
        or {"ok": false, "runtime", "unavailable": true, "reason"} with exit code 2 (this runtime cannot
        take this model: not installed, conversion failed, answers differ from eager), or
        {"ok": false, "error"} with exit code 1 (anything else, e.g. an unreadable model file).
    python -m packratd.runtimes check
        {"eager": null, "openvino": "openvino needs ...", ...}: which runtimes this host has.
    python -m packratd.runtimes runner --runtime X --model M [--artifact A] --threads N --cpus 0,1 [--pin-threads 1]
        Drive one runtime in this process, set up like a packratd worker (pinned to --cpus and with the
        worker's thread environment before any runtime is imported), over JSON lines on stdin/stdout.
        Used by tests/test_runtimes.py and tools/bench_runtimes.py so that every runtime gets a process of
        its own.  Requests: {"op": "run_npz", "inputs": IN.npz, "out": OUT.npz}, {"op": "batch", "batch": B,
        "seed": S}, {"op": "time", "n": N}, {"op": "idle_cpu", "seconds": S, "gaps": K, "gap_s": G}, {"op": "os_threads"},
        {"op": "quit"}; answers are one JSON line each ({"error": ...} on failure).

Anything a library prints goes to stderr: stdout carries only these JSON lines.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _private_stdout():
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _setup_process(threads: int, cpus: list[int] | None, pin: bool) -> None:
    """What packratd.worker does before torch loads: pin, then the OpenMP/MKL environment."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    from ..worker import thread_env
    os.environ.update(thread_env(threads, cpus or sorted(os.sched_getaffinity(0)), bool(pin and cpus)))


def _cpus(s: str | None) -> list[int] | None:
    return [int(c) for c in s.split(",") if c.strip()] if s else None


def cmd_prepare(a, out) -> int:
    _setup_process(a.threads, _cpus(a.cpus), True)
    from . import RuntimeUnavailable, describe_error, prepare
    try:
        p = prepare(a.runtime, a.model, a.cache_dir, a.threads, verify=not a.no_verify,
                    remember_failure=not a.retry, specials=a.specials)
    except RuntimeUnavailable as e:
        out.write(json.dumps({"ok": False, "runtime": a.runtime, "unavailable": True, "reason": e.reason}) + "\n")
        return 2
    except Exception as e:  # noqa: BLE001
        out.write(json.dumps({"ok": False, "runtime": a.runtime, "error": describe_error(e)}) + "\n")
        return 1
    out.write(json.dumps(dict(p.to_dict(), ok=True)) + "\n")
    return 0


def cmd_check(a, out) -> int:
    from . import available
    out.write(json.dumps(available()) + "\n")
    return 0


def _settings(sess) -> dict:
    if hasattr(sess, "settings"):
        return sess.settings()
    if sess.runtime in ("eager", "inductor"):
        import torch
        return {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
    return {}


def _os_threads() -> list[dict]:
    from ..topology import parse_cpulist
    out = []
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                st = dict(l.rstrip("\n").split(":\t", 1) for l in f if ":\t" in l)
            out.append({"tid": int(tid), "name": st.get("Name", ""),
                        "cpus": sorted(parse_cpulist(st.get("Cpus_allowed_list", "").strip()))})
        except OSError:
            pass
    return out


def cmd_runner(a, out) -> int:
    cpus = _cpus(a.cpus)
    _setup_process(a.threads, cpus, bool(a.pin_threads))
    import numpy as np
    from .. import model as model_mod
    from . import describe_error, load

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    t0 = time.monotonic()
    try:
        sess = load(a.runtime, a.model, a.artifact, a.threads, cpus, bool(a.pin_threads))
        t1 = time.monotonic()
        for i in range(max(1, a.warmup)):
            sess.run(model_mod.example_inputs(sess.input_spec, max(1, a.warmup_batch), seed=i))
        t2 = time.monotonic()
    except Exception as e:  # noqa: BLE001
        reply({"error": describe_error(e)})
        return 1
    reply({"ready": True, "runtime": sess.runtime, "pid": os.getpid(), "input_spec": sess.input_spec,
           "load_s": t1 - t0, "warmup_s": t2 - t1, "boot_s": t2 - t0, "threads": a.threads,
           "cpus": cpus, "settings": _settings(sess),
           "torch_imported": "torch" in sys.modules})
    arrays = None
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "quit":
                break
            if op == "run_npz":
                with np.load(cmd["inputs"], allow_pickle=False) as z:
                    ins = [z[f"arr_{i}"] for i in range(len(z.files))]
                t = time.perf_counter()
                outs = sess.run(ins)
                ms = (time.perf_counter() - t) * 1000
                np.savez(cmd["out"], *outs)
                reply({"ok": True, "ms": ms, "contiguous": all(o.flags.c_contiguous for o in outs)})
            elif op == "batch":
                arrays = model_mod.example_inputs(sess.input_spec, int(cmd["batch"]), int(cmd.get("seed", 0)))
                reply({"ok": True})
            elif op == "time":
                ms = []
                for _ in range(int(cmd.get("n", 1))):
                    t = time.perf_counter()
                    sess.run(arrays)
                    ms.append((time.perf_counter() - t) * 1000)
                reply({"ms": ms})
            elif op == "os_threads":
                # every OS thread of this process with the CPUs it may run on (pinning checks)
                reply({"threads": _os_threads()})
            elif op == "idle_cpu":
                # CPU this process burns while it waits for work: right after a call, over `seconds`,
                # and in each of `gaps` short gaps of `gap_s` between calls (what a spinning pool
                # steals from whoever runs next on these cores).
                x = arrays or model_mod.example_inputs(sess.input_spec, 1)
                sess.run(x)
                c0 = time.process_time()
                time.sleep(float(cmd.get("seconds", 5.0)))
                idle = time.process_time() - c0
                gaps, gap_s, burnt = int(cmd.get("gaps", 10)), float(cmd.get("gap_s", 0.05)), 0.0
                for _ in range(gaps):
                    sess.run(x)
                    c0 = time.process_time()
                    time.sleep(gap_s)
                    burnt += time.process_time() - c0
                reply({"idle_cpu_s": idle, "seconds": float(cmd.get("seconds", 5.0)),
                       "gap_cpu_s": burnt / max(1, gaps), "gap_s": gap_s})
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception as e:  # noqa: BLE001
            reply({"error": describe_error(e)})
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m packratd.runtimes", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="build or find a runtime's artifact; one JSON line")
    pp.add_argument("--runtime", required=True)
    pp.add_argument("--model", required=True)
    pp.add_argument("--cache-dir", required=True)
    pp.add_argument("--threads", type=int, required=True)
    pp.add_argument("--cpus", help="comma-separated CPUs to pin this process to")
    pp.add_argument("--no-verify", action="store_true", help="skip the check against eager")
    pp.add_argument("--retry", action="store_true", help="ignore a remembered failure")
    pp.add_argument("--specials", choices=("strict", "ignore"), default="strict",
                    help="refuse (strict) or accept a runtime whose NaN/Inf outputs differ from eager's")
    sub.add_parser("check", help="which runtimes this host has")
    pr = sub.add_parser("runner", help="drive one runtime over JSON lines (tests, benchmarks)")
    pr.add_argument("--runtime", required=True)
    pr.add_argument("--model", required=True)
    pr.add_argument("--artifact")
    pr.add_argument("--threads", type=int, required=True)
    pr.add_argument("--cpus", required=True)
    pr.add_argument("--pin-threads", type=int, default=1)
    pr.add_argument("--warmup", type=int, default=2)
    pr.add_argument("--warmup-batch", type=int, default=1)
    a = p.parse_args(argv)
    out = _private_stdout()
    return {"prepare": cmd_prepare, "check": cmd_check, "runner": cmd_runner}[a.cmd](a, out)


if __name__ == "__main__":
    sys.exit(main())

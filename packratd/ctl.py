"""packratctl: ask a running packratd what it is doing, and tell it what to do."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .control import ControlClient, ControlError, control_endpoint

DEFAULT_RUNTIME_DIR = "/run/packratd"


def _fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def render_status(st: dict) -> str:
    lines = []
    lines.append(f"packratd {st['version']}  pid {st['pid']}  {st['state']}  up {st['uptime_s']:.0f}s")
    lines.append(f"model      {st['model']}")
    lines.append(f"listen     {st['listen']}")
    topo = st.get("topology") or {}
    if topo:
        lines.append(f"topology   {topo.get('cpu_model', '?')}: {len(topo.get('sockets', []))} socket(s), "
                     f"{len(topo.get('nodes', []))} NUMA node(s), {topo.get('n_cores', '?')} usable core(s)")
    lines.append(f"plan       {st['plan']}  (generation {st['generation']}, active {st['active_generation']})")
    for k in ("predicted_ms", "measured_ms"):
        if st.get(k) is not None:
            lines.append(f"{k.split('_')[0]:<10} {_fmt_ms(st[k])}")
    if st.get("profile"):
        p = st["profile"]
        lines.append(f"profile    {p.get('state', '?')}" + (f", age {p['age_s']:.0f}s" if p.get("age_s") is not None else "")
                     + (f", {p['progress']}" if p.get("progress") else ""))
    lines.append("")
    lines.append(f"{'instance':<12}{'state':<10}{'pid':>8}{'threads':>9}  {'cpus':<12}{'share':>6}{'tasks':>8}{'busy':>9}")
    for w in st["workers"]:
        cpus = ",".join(map(str, w["cpus"]))
        lines.append(f"{w['name']:<12}{w['state']:<10}{w['pid']:>8}{w['threads']:>9}  {cpus:<12}{w['share']:>6}"
                     f"{w['tasks']:>8}{w['busy_s']:>8.1f}s")
    lines.append("")
    lat = st.get("latency_ms") or {}
    lines.append(f"requests   {st['requests']} ({st['rows']} rows in {st['batches']} batches), queue {st['queue_rows']} rows, "
                 f"{st['inflight_batches']} batch(es) in flight")
    lines.append("latency    " + (", ".join(f"{k} {v:.1f} ms" for k, v in lat.items()) if lat else "no requests yet"))
    if st.get("errors"):
        lines.append("errors     " + ", ".join(f"{k} {v}" for k, v in sorted(st["errors"].items())))
    if st.get("worker_deaths"):
        lines.append(f"faults     {st['worker_deaths']} worker death(s), {st['slices_resent']} slice(s) re-sent")
    if st.get("last_reconfiguration"):
        lines.append(f"last reconfiguration: {st['last_reconfiguration']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="packratctl", description="Inspect and control a running packratd.")
    p.add_argument("--runtime-dir", default=os.environ.get("PACKRATD_RUNTIME_DIR", DEFAULT_RUNTIME_DIR),
                   help="where packratd keeps its sockets (default: $PACKRATD_RUNTIME_DIR or /run/packratd)")
    p.add_argument("--timeout", type=float, default=10.0)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status", help="topology, plan, workers, traffic")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    client = ControlClient(control_endpoint(args.runtime_dir), timeout=args.timeout)
    try:
        if args.command == "status":
            st = client.call("status")
            st.pop("ok", None)
            print(json.dumps(st, indent=2) if args.json else render_status(st))
    except ControlError as e:
        print(f"packratctl: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

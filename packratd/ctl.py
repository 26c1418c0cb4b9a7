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
    inst = st.get("instances") or []
    shape = ", ".join(f"{i['threads']}t x {i['batch_share']} rows on cpus {','.join(map(str, i['cpus']))}" for i in inst)
    lines.append(f"plan       {st['plan']}  = {len(inst)} instance(s): {shape}" if inst else f"plan       {st['plan']}")
    lines.append(f"generation {st['active_generation']} active" + (f", {len(st['generations'])} live" if len(st.get("generations") or []) > 1 else "")
                 + (f", {st['reconfigurations']} reconfiguration(s) so far" if st.get("reconfigurations") else ""))
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
    if st.get("batch_histogram"):
        lines.append("batches    " + ", ".join(f"{k} rows x{v}" for k, v in st["batch_histogram"].items()) + " (monitor window)")
    if st.get("monitor"):
        lines.append(f"monitor    {st['monitor']['reason']}")
    last = st.get("last_reconfiguration")
    if last:
        if last.get("switch"):
            sw = last["switch"]
            lines.append(f"last switch generation {last['generation']} -> {sw['to']}: green ready after {sw['green_ready_s']:.1f}s, "
                         f"old gone after {sw['blue_gone_s']:.1f}s ({sw['reason']})")
        else:
            lines.append(f"last reconfiguration: {last.get('reason')}: {last.get('error') or last.get('result') or last.get('state')}")
    if st.get("cpus_out_of_service"):
        lines.append(f"out of service: cpus {','.join(map(str, st['cpus_out_of_service']))} (instance failed repeatedly)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="packratctl", description="Inspect and control a running packratd.")
    p.add_argument("--runtime-dir", default=os.environ.get("PACKRATD_RUNTIME_DIR", DEFAULT_RUNTIME_DIR),
                   help="where packratd keeps its sockets (default: $PACKRATD_RUNTIME_DIR or /run/packratd)")
    p.add_argument("--timeout", type=float, default=10.0)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status", help="topology, plan, workers, traffic")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s = sub.add_parser("profile", help="show the latency table, or measure it again with --refresh")
    s.add_argument("--refresh", action="store_true", help="re-profile now (the running plan keeps serving meanwhile)")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("plan", help="what the solver would choose for a batch size, without switching")
    s.add_argument("--batch-size", "-b", type=int, required=True)
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("reconfigure", help="start a new worker generation (blue-green, no request lost)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--batch-size", "-b", type=int, help="re-solve for this batch size")
    g.add_argument("--plan", help='run this plan, e.g. "2x1:4"')
    sub.add_parser("reload", help="reload the config file and re-solve (same as SIGHUP / systemctl reload)")
    sub.add_parser("drain", help="stop taking requests, finish those in flight, then exit")
    args = p.parse_args(argv)
    client = ControlClient(control_endpoint(args.runtime_dir), timeout=args.timeout)
    try:
        if args.command == "status":
            st = client.call("status")
            st.pop("ok", None)
            print(json.dumps(st, indent=2) if args.json else render_status(st))
        elif args.command == "profile":
            r = client.call("profile", refresh=args.refresh)
            r.pop("ok", None)
            if args.refresh:
                print("re-profiling queued; watch progress with: packratctl status")
            else:
                print(json.dumps(r, indent=2) if args.json else render_profile(r))
        elif args.command == "plan":
            r = client.call("plan", batch_size=args.batch_size)
            r.pop("ok", None)
            if args.json:
                print(json.dumps(r, indent=2))
            else:
                print(f"batch {r['batch_size']}: {r['best']}")
                for ru in r["runners_up"]:
                    print(f"  runner-up: {ru}")
        elif args.command == "reconfigure":
            r = client.call("reconfigure", batch_size=args.batch_size, plan=args.plan)
            print("reconfiguration queued" + (" (replaced one already waiting)" if r.get("coalesced") else "")
                  + "; watch it with: packratctl status")
        elif args.command == "reload":
            r = client.call("reload")
            if not r.get("reloaded"):
                print(f"packratctl: config not reloaded: {r.get('error')}", file=sys.stderr)
                return 1
            print("config reloaded; re-solving" + (f" (restart needed for: {', '.join(r['restart_only_kept'])})"
                                                  if r.get("restart_only_kept") else ""))
        elif args.command == "drain":
            client.call("drain")
            print("draining: new requests get DRAINING, the daemon exits when in-flight work is done")
    except ControlError as e:
        print(f"packratctl: {e}", file=sys.stderr)
        return 1
    return 0


def render_profile(r: dict) -> str:
    bs = r["batches"]
    lines = [f"profile {r['key']}: measured in {r.get('wall_s') or 0:.0f}s, latency in ms (rows: threads, columns: batch)"]
    lines.append("threads " + "".join(f"{b:>9}" for b in bs))
    for t, row in zip(r["threads"], r["lat_ms"]):
        lines.append(f"{t:>7} " + "".join(f"{v:>9.2f}" if v == v else f"{'-':>9}" for v in row))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

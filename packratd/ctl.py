"""packratctl: ask a running packratd what it is doing, and tell it what to do.

Conventions (those of git, kubectl, systemctl):

* global options go before or after the subcommand: ``packratctl --json status`` and
  ``packratctl status --json`` are the same, and so are ``--runtime-dir`` and ``--timeout``;
* ``--json`` prints the daemon's reply as JSON, for every subcommand;
* output into a closed pipe (``packratctl status | head -1``) ends quietly, with status 141
  (128 + SIGPIPE), what a shell reports for ``ls``, ``git`` or ``kubectl`` in the same place;
  Ctrl-C ends with 130; an error from the daemon goes to stderr with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from .control import ControlClient, ControlError, control_endpoint
from .topology import format_cpulist

DEFAULT_RUNTIME_DIR = "/run/packratd"
EXIT_SIGPIPE = 128 + signal.SIGPIPE       # 141
EXIT_INTERRUPTED = 128 + signal.SIGINT    # 130


def _fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def _cpus(cpus) -> str:
    return format_cpulist(cpus) if cpus else "-"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def render_progress(p: dict) -> str:
    """One line for the autotuner's progress (status["profile"]): profiling and the interference
    check are told apart, with how far each has got."""
    state = p.get("state") or "?"
    if state == "profiling":
        done, total = p.get("done"), p.get("total")
        text = f"profiling {done}/{total} points" if total else "profiling"
        if p.get("eta_s"):
            text += f", about {p['eta_s']:.0f}s left"
        elif p.get("elapsed_s") is not None and total and done == total:
            text += ", finishing"
        return text
    if state == "checking":
        n = p.get("candidates")
        text = (f"checking {_plural(n, 'candidate plan')} concurrently" if isinstance(n, int)
                else "checking candidate plans concurrently (interference check)")
        if isinstance(p.get("checked"), int) and isinstance(n, int):
            text += f", {p['checked']}/{n} measured"
        if p.get("elapsed_s") is not None:
            text += f", {p['elapsed_s']:.0f}s so far"
        return text
    if state == "ready":
        text = "ready" + (f" (key {p['key']})" if p.get("key") else "")
        if p.get("wall_s") is not None:
            text += f", measured in {p['wall_s']:.0f}s"
        if p.get("age_s") is not None:
            text += f", {p['age_s']:.0f}s ago"
        return text
    if state == "none":
        return "none (the plan was given, nothing profiled)"
    msg = p.get("message") or p.get("progress") or p.get("error")
    return state + (f": {msg}" if msg else "")


def _ms(v: float) -> str:
    """Milliseconds with the digits that matter: 0.039, 2.41, 76.4, 2038."""
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def render_runtimes(chosen, info: dict) -> str:
    """``onnxruntime  (eager 2.1/40.0 ms, onnxruntime 1.0/30.0 ms, openvino skipped: ...)``: the serving
    runtime, then each one's timings at the measured batch sizes or why it was skipped."""
    parts = []
    for name, i in info.items():
        if not i.get("available"):
            parts.append(f"{name} skipped: {i.get('reason', '?')}")
        elif i.get("ms"):
            parts.append(f"{name} " + "/".join(_ms(v) for _, v in sorted(i["ms"].items(), key=lambda kv: int(kv[0])))
                         + " ms" + (f" (built in {i['build_s']:.0f}s)" if i.get("build_s") else ""))
        else:
            parts.append(name + (f" (built in {i['build_s']:.0f}s)" if i.get("build_s") else ""))
    batches = sorted({int(b) for i in info.values() for b in (i.get("ms") or {})})
    head = str(chosen or "-")
    if parts:
        head += "  (" + "; ".join(parts) + ")"
    if batches:
        head += f"  at batch {'/'.join(map(str, batches))}"
    return head


def render_status(st: dict) -> str:
    """The human view of the daemon's status reply (``packratctl status``)."""
    lines = []
    head = f"packratd {st.get('version', '?')}  pid {st.get('pid', '?')}  {st.get('state', '?')}"
    if st.get("uptime_s") is not None:
        head += f"  up {st['uptime_s']:.0f}s"
    lines.append(head)
    lines.append(f"model      {st.get('model', '?')}")
    lines.append(f"listen     {st.get('listen', '?')}")
    topo = st.get("topology") or {}
    if topo:
        lines.append(f"topology   {topo.get('cpu_model', '?')}: {_plural(len(topo.get('sockets', [])), 'socket')}, "
                     f"{_plural(len(topo.get('nodes', [])), 'NUMA node')}, {topo.get('n_cores', '?')} usable core(s)"
                     + (f", cpus {topo['allowed_cpus']}" if topo.get("allowed_cpus") else ""))
    prof = st.get("profile") or {}
    if prof.get("state") in ("profiling", "checking"):
        # the first plan is being chosen (or a refresh runs beside the serving plan): say which phase
        lines.append(f"autotune   {render_progress(prof)}")
    inst = st.get("instances") or []
    if st.get("plan"):
        shape = ", ".join(f"{i['threads']}t x {i['batch_share']} rows on cpus {_cpus(i.get('cpus'))}" for i in inst)
        lines.append(f"plan       {st['plan']}  = {_plural(len(inst), 'instance')}: {shape}" if inst else f"plan       {st['plan']}")
    else:
        lines.append("plan       none yet")
    if st.get("active_generation") is not None:
        live = st.get("generations") or []
        lines.append(f"generation {st['active_generation']} active" + (f", {len(live)} live" if len(live) > 1 else "")
                     + (f", {st['reconfigurations']} reconfiguration(s) so far" if st.get("reconfigurations") else ""))
    for k in ("predicted_ms", "measured_ms"):
        if st.get(k) is not None:
            lines.append(f"{k.split('_')[0]:<10} {_fmt_ms(st[k])}")
    if st.get("runtime") or st.get("runtimes"):
        lines.append(f"runtime    {render_runtimes(st.get('runtime'), st.get('runtimes') or {})}")
    if st.get("state") == "failed" and st.get("failed_reason"):
        lines.append(f"FAILED     {st['failed_reason']}")
    if prof and prof.get("state") not in ("profiling", "checking"):
        lines.append(f"profile    {render_progress(prof)}")
    workers = st.get("workers") or []
    if workers:
        lines.append("")
        lines.append(f"{'instance':<12}{'state':<10}{'pid':>8}{'threads':>9}  {'cpus':<12}{'share':>6}{'tasks':>8}{'busy':>9}")
        for w in workers:
            lines.append(f"{w.get('name', '?'):<12}{w.get('state', '?'):<10}{w.get('pid', '?'):>8}{w.get('threads', '?'):>9}  "
                         f"{_cpus(w.get('cpus')):<12}{w.get('share', '?'):>6}{w.get('tasks', 0):>8}{w.get('busy_s', 0.0):>8.1f}s")
    lines.append("")
    lat = st.get("latency_ms") or {}
    lines.append(f"requests   {st.get('requests', 0)} ({st.get('rows', 0)} rows in {st.get('batches', 0)} batches), "
                 f"queue {st.get('queue_rows', 0)} rows, {st.get('inflight_batches', 0)} batch(es) in flight")
    lines.append("latency    " + (", ".join(f"{k} {v:.1f} ms" for k, v in lat.items()) if lat else "no requests yet"))
    if st.get("errors"):
        lines.append("errors     " + ", ".join(f"{k} {v}" for k, v in sorted(st["errors"].items())))
    if st.get("worker_deaths"):
        lines.append(f"faults     {st['worker_deaths']} worker death(s), {st.get('slices_resent', 0)} slice(s) re-sent")
    if st.get("batch_histogram"):
        lines.append("batches    " + ", ".join(f"{k} rows x{v}" for k, v in st["batch_histogram"].items()) + " (monitor window)")
    if st.get("monitor"):
        lines.append(f"monitor    {st['monitor'].get('reason', '?')}")
    last = st.get("last_reconfiguration")
    if last:
        if last.get("switch"):
            sw = last["switch"]
            lines.append(f"last switch generation {last.get('generation')} -> {sw.get('to')}: green ready after "
                         f"{sw.get('green_ready_s', 0):.1f}s, old gone after {sw.get('blue_gone_s', 0):.1f}s ({sw.get('reason')})")
        else:
            lines.append(f"last reconfiguration: {last.get('reason')}: {last.get('error') or last.get('result') or last.get('state')}")
    if st.get("cpus_out_of_service"):
        lines.append(f"out of service: cpus {_cpus(st['cpus_out_of_service'])} (instance failed repeatedly)")
    return "\n".join(lines)


def render_plan(r: dict) -> str:
    """``packratctl plan``: the solver's choice and runners-up in the plan notation, with predictions."""
    def one(plan, ms, fits):
        return f"{plan}  predicted {ms:.1f} ms" + ("" if fits else "  (does not fit the NUMA layout)")
    lines = [f"batch {r['batch_size']}: " + one(r["best"], r["predicted_ms"], r.get("fits_numa", True))]
    for ru in r.get("runners_up") or []:
        lines.append("  runner-up " + one(ru["plan"], ru["predicted_ms"], ru.get("fits_numa", True)))
    return "\n".join(lines)


def render_profile(r: dict) -> str:
    bs = r["batches"]
    lines = [f"profile {r['key']}" + (f" on {r['runtime']}" if r.get("runtime") else "")
             + f": measured in {r.get('wall_s') or 0:.0f}s, latency in ms (rows: threads, columns: batch)"]
    if r.get("runtimes"):
        lines.append(f"runtimes: {render_runtimes(r.get('runtime'), r['runtimes'])}")
    lines.append("threads " + "".join(f"{b:>9}" for b in bs))
    for t, row in zip(r["threads"], r["lat_ms"]):
        lines.append(f"{t:>7} " + "".join(f"{v:>9.2f}" if v == v else f"{'-':>9}" for v in row))
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options accepted before and after the subcommand.  On the subcommands their default is
    SUPPRESS, so a value given before the subcommand is not overwritten by the subparser's default."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    parser.add_argument("--json", action="store_true", default=d(False), help="print the reply as JSON")
    parser.add_argument("--runtime-dir", default=d(os.environ.get("PACKRATD_RUNTIME_DIR", DEFAULT_RUNTIME_DIR)),
                        help="where packratd keeps its sockets (default: $PACKRATD_RUNTIME_DIR or /run/packratd)")
    parser.add_argument("--timeout", type=float, default=d(10.0), help="seconds to wait for the daemon (default 10)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="packratctl", description="Inspect and control a running packratd.")
    _global_options(p, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", parents=[common], help="topology, plan, workers, traffic")
    s = sub.add_parser("profile", parents=[common], help="show the latency table, or measure it again with --refresh")
    s.add_argument("--refresh", action="store_true", help="re-profile now (the running plan keeps serving meanwhile)")
    s = sub.add_parser("plan", parents=[common], help="what the solver would choose for a batch size, without switching")
    s.add_argument("--batch-size", "-b", type=int, required=True)
    s = sub.add_parser("reconfigure", parents=[common], help="start a new worker generation (blue-green, no request lost)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--batch-size", "-b", type=int, help="re-solve for this batch size")
    g.add_argument("--plan", help='run this plan, e.g. "2x1:4"')
    sub.add_parser("reload", parents=[common], help="reload the config file and re-solve (same as SIGHUP / systemctl reload)")
    sub.add_parser("drain", parents=[common], help="stop taking requests, finish those in flight, then exit")
    return p


def _print_json(r: dict) -> None:
    r = dict(r)
    r.pop("ok", None)
    print(json.dumps(r, indent=2, default=str))


def run(args: argparse.Namespace) -> int:
    client = ControlClient(control_endpoint(args.runtime_dir), timeout=args.timeout)
    cmd = args.command
    if cmd == "status":
        st = client.call("status")
        _print_json(st) if args.json else print(render_status(st))
    elif cmd == "profile":
        r = client.call("profile", refresh=args.refresh)
        if args.json:
            _print_json(r)
        elif args.refresh:
            print("re-profiling queued; watch progress with: packratctl status")
        else:
            print(render_profile(r))
    elif cmd == "plan":
        r = client.call("plan", batch_size=args.batch_size)
        if args.json:
            _print_json(r)
        else:
            print(render_plan(r))
    elif cmd == "reconfigure":
        r = client.call("reconfigure", batch_size=args.batch_size, plan=args.plan)
        if args.json:
            _print_json(r)
        else:
            print("reconfiguration queued" + (" (replaced one already waiting)" if r.get("coalesced") else "")
                  + "; watch it with: packratctl status")
    elif cmd == "reload":
        r = client.call("reload")
        if args.json:
            _print_json(r)
        if not r.get("reloaded"):
            print(f"packratctl: config not reloaded: {r.get('error')}", file=sys.stderr)
            return 1
        if not args.json:
            print("config reloaded; re-solving" + (f" (restart needed for: {', '.join(r['restart_only_kept'])})"
                                                  if r.get("restart_only_kept") else ""))
    elif cmd == "drain":
        r = client.call("drain")
        if args.json:
            _print_json(r)
        else:
            print("draining: new requests get DRAINING, the daemon exits when in-flight work is done")
    return 0


def _stdout_to_devnull() -> None:
    """After EPIPE: point fd 1 at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = run(args)
        sys.stdout.flush()          # a closed pipe shows here, not in the interpreter's exit
        return rc
    except BrokenPipeError:
        # The reader went away (`packratctl status | head -1`): stop quietly, as a program killed
        # by SIGPIPE would (the shell reports 141).  Not SIG_DFL for SIGPIPE itself: that would also
        # apply to the ZeroMQ sockets' own writes.
        _stdout_to_devnull()
        return EXIT_SIGPIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ControlError as e:
        print(f"packratctl: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

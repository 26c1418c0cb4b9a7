"""The control commands (packratctl): one function per command, outside the daemon's loop object.

Each handler validates its arguments against the running config before anything happens, never
blocks the loop (the solver runs in the planner process; ``plan`` answers when it is done), and
returns the reply's fields.  ``status`` is also what the metrics are rendered from.
"""
from __future__ import annotations

import os
import time

from . import __version__
from .control import Deferred
from .generations import ACTIVE, DRAINING, STARTING
from .plan import Plan
from .planner import total_threads


class Commands:
    def __init__(self, daemon):
        self.d = daemon

    def handlers(self) -> dict:
        return {"status": self.status, "plan": self.plan, "profile": self.profile, "reconfigure": self.reconfigure,
                "reload": self.reload, "drain": self.drain}

    # ---- read ----------------------------------------------------------------------------
    def status(self) -> dict:
        d = self.d
        disp, sup, ro, pl = d.dispatcher, d.supervisor, d.rollout, d.planner
        now = time.monotonic()
        st = disp.stats
        workers = []
        for w in sorted(disp.workers.values(), key=lambda w: (w.generation, w.index)):
            slot = sup.slots.get((w.generation, w.index))
            workers.append({"name": w.name, "generation": w.generation, "index": w.index, "state": w.state,
                            "pid": w.proc.pid, "threads": w.threads, "cpus": list(w.cpus), "share": w.share,
                            "torch_threads": w.info.get("threads"), "runtime": w.info.get("runtime"),
                            "boot_s": w.info.get("boot_s"), "load_s": w.info.get("load_s"), "forked": w.info.get("forked"), "busy_s": round(w.busy_s, 3),
                            "compute_s": round(w.compute_s, 3), "tasks": w.tasks_done, "busy": w.task is not None,
                            "restarts": slot.restarts if slot else 0})
        a = ro.active
        if d.tuner is not None:
            prof = d.tuner.progress.snapshot()
        elif pl.profile is not None:
            prof = {"state": "ready", "key": pl.profile.get("key"),
                    "age_s": time.time() - pl.profile.get("created", time.time()), "wall_s": pl.profile.get("wall_s")}
        else:
            prof = {"state": "none"}
        hist = d.monitor.histogram(now)
        history = list(ro.history)
        return {
            "version": __version__, "pid": os.getpid(), "uptime_s": now - d.started, "state": d.state,
            "failed_reason": d.failed_reason, "health": d.health(),
            "model": d.cfg["model.path"], "model_digest": d.digest, "listen": d.cfg.listen,
            "topology": d.topology.to_dict() if d.topology else None,
            "plan": a.plan_text if a else None, "runtime": a.runtime if a else None, "runtimes": d.runtimes_info,
            "runtime_artifact": a.artifact if a else None,
            "generation": ro.next_number - 1, "active_generation": a.number if a else None,
            "generations": [g.timeline() for g in ro.gens.values() if g.state in (STARTING, ACTIVE, DRAINING)],
            "instances": [{"index": p.index, "threads": p.spec.threads, "batch_share": p.spec.batch, "cpus": list(p.cpus),
                           "node": p.node} for p in (a.placements if a else [])],
            "slots": [s.to_dict() for s in sorted(sup.slots.values(), key=lambda s: s.key)],
            "predicted_ms": a.predicted_ms if a else None, "measured_ms": a.measured_ms if a else None,
            "autotune": d.autotune_info, "profile": prof,
            "workers": workers, "queue_rows": disp.queued_rows, "queue_bytes": disp.queued_bytes,
            "inflight_batches": len(disp.batches),
            "requests": st.requests, "rows": st.rows, "batches": st.batches, "errors": dict(st.errors),
            "request_rate": st.requests / max(1e-9, now - st.started),
            "worker_deaths": st.worker_deaths, "worker_deaths_by": dict(sup.deaths_by), "worker_restarts": sup.restarts_total, "spawn_failures": sup.spawn_failures, "slices_resent": st.slices_resent,
            "result_mismatches": st.result_mismatches, "deduplicated": st.deduplicated,
            "failed_instances": list(d.failed_instances), "cpus_out_of_service": sorted(pl.out_of_service),
            "latency_ms": st.percentiles(), "spec": disp.spec, "outputs": disp.output_spec,
            "max_batch_size": disp.max_batch, "max_delay_ms": disp.max_delay * 1000.0,
            "batch_histogram": {str(k): v for k, v in sorted(hist.items())},
            "monitor": d.monitor.last.to_dict() if d.monitor.last else None,
            "reconfigurations": ro.reconfigurations, "reconfig_coalesced": d.reconfig.coalesced,
            "reconfig_pending": d.reconfig.pending is not None,
            "last_reconfiguration": history[-1] if history else None, "history": history,
            "loop_errors": dict(d.loop_errors), "planner_restarts": d.offload.restarts, "gateway": d.gateway.status(),
            "fork_servers": [z.status() for z in d.zygotes.values()],
        }

    def plan(self, batch_size: int) -> Deferred:
        return Deferred(self.d.planner.explain(batch_size))

    def profile(self, refresh: bool = False) -> dict:
        d = self.d
        if refresh:
            if d.busy_reconfiguring():
                raise ValueError("a reconfiguration or profile is already in progress")
            d.request_reconfigure({"refresh_profile": True, "reason": "packratctl profile --refresh"})
            return {"queued": True}
        r = d.planner.profile
        if r is None:
            raise ValueError("no profile (a configured plan without a cached profile, or profiling not finished)")
        return {"key": r["key"], "created": r["created"], "wall_s": r.get("wall_s"), "threads": r["threads"],
                "batches": r["batches"], "lat_ms": r["lat_ms"], "p10_ms": r.get("p10_ms"), "p90_ms": r.get("p90_ms"),
                "runtime": (r.get("ident") or {}).get("runtime", d.runtime), "runtimes": d.runtimes_info}

    # ---- change --------------------------------------------------------------------------
    def reconfigure(self, batch_size: int | None = None, plan: str | None = None) -> dict:
        d = self.d
        if plan is not None and batch_size is not None:
            raise ValueError("give a plan or a batch size, not both")
        if plan is not None:
            if not isinstance(plan, str):
                raise ValueError("plan must be a string such as '2x1:4'")
            p = Plan.parse(plan)                       # ValueError -> error reply
            T = total_threads(d.topology, d.cfg["workers.use_smt"])   # every core: the command puts them back
            if p.total_threads > T:
                raise ValueError(f"plan {p} needs {p.total_threads} threads; {T} usable")
        if batch_size is not None:
            d.planner.check_batch_size(batch_size)
            if d.planner.table is None:
                raise ValueError("no profile to solve with; give a plan (--plan) or profile first")
        back = d.planner.restore_cores()               # an operator's reconfigure puts quarantined cores back
        coalesced = d.request_reconfigure({"plan": plan, "batch_size": batch_size, "force": True,
                                           "reason": "packratctl reconfigure" + (f" --plan {plan}" if plan else "")
                                           + (f" --batch-size {batch_size}" if batch_size else "")})
        return {"queued": True, "coalesced": coalesced, "cpus_back_in_service": back}

    def reload(self) -> dict:
        return self.d.reload("packratctl reload")

    def drain(self) -> dict:
        if not self.d.stopping:
            self.d.begin_stop("packratctl drain")
        return {"draining": True}

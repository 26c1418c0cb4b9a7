"""Metrics: a real HTTP scrape of packratd.metrics.Metrics, parsed with prometheus_client's own parser."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from packratd.metrics import Metrics
from tests.conftest import free_port


def scrape(port: int) -> dict:
    """{(sample name, frozenset(labels)): value} from http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(samples: dict, name: str, **labels):
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def series(samples: dict, name: str) -> list[dict]:
    return [dict(lab) for (n, lab) in samples if n == name]


def status(plan="2x1:4", gen=1, workers=None, **kw) -> dict:
    """A dict shaped like Daemon.cmd_status()'s (only the keys Metrics reads, plus some it must ignore)."""
    st = {
        "version": "0.1.0", "pid": 1, "uptime_s": 12.5, "state": "serving", "model": "m.pt2", "listen": "ipc:///x",
        "plan": plan, "generation": gen, "active_generation": gen,
        "generations": [{"generation": gen, "state": "active", "plan": plan}],
        "instances": [{"index": 0, "threads": 1}, {"index": 1, "threads": 1}],
        "predicted_ms": 2.5, "measured_ms": 3.0, "autotune": {},
        "profile": {"state": "ready", "key": "k", "age_s": 42.0, "wall_s": 9.0},
        "workers": workers if workers is not None else [
            {"name": f"g{gen}.i0.r0", "generation": gen, "index": 0, "state": "ready", "pid": 10, "threads": 1,
             "cpus": [0], "share": 4, "torch_threads": 1, "busy_s": 1.25, "tasks": 10},
            {"name": f"g{gen}.i1.r2", "generation": gen, "index": 1, "state": "ready", "pid": 11, "threads": 1,
             "cpus": [1], "share": 4, "torch_threads": 1, "busy_s": 0.5, "tasks": 4}],
        "queue_rows": 7, "inflight_batches": 1, "requests": 3, "rows": 9, "batches": 2, "errors": {},
        "request_rate": 1.0, "worker_deaths": 2, "worker_restarts": 2, "slices_resent": 1, "latency_ms": {}, "spec": None,
        "runtime": "onnxruntime", "runtimes": {
            "eager": {"available": True, "ms": {"1": 2.0, "32": 40.0}},
            "onnxruntime": {"available": True, "chosen": True, "build_s": 3.5, "ms": {"1": 1.0, "32": 30.0}},
            "openvino": {"available": False, "reason": "refused: NaN"}},
        "max_batch_size": 32, "batch_histogram": {}, "monitor": None, "reconfigurations": 0,
        "reconfig_coalesced": 0, "reconfig_pending": False, "last_reconfiguration": None, "history": [],
    }
    st.update(kw)
    return st


@pytest.fixture
def metrics():
    m = Metrics()
    m.serve("127.0.0.1", 0)
    yield m
    m.stop()


def test_observers_move_counters_and_histograms(metrics):
    s0 = scrape(metrics.port)
    assert val(s0, "packratd_up") == 1
    assert val(s0, "packratd_requests_total") == 0
    assert val(s0, "packratd_errors_total", code="TOO_LARGE") == 0      # pre-created, so rate() works at once
    assert val(s0, "packratd_build_info", **dict(next(iter(series(s0, "packratd_build_info"))))) == 1

    for lat in (0.0004, 0.003, 0.003, 0.2):
        metrics.on_request(lat)
    metrics.on_batch(3, 0.002, 1)
    metrics.on_batch(16, 0.004, 1)
    metrics.on_batch(600, 0.05, 1)
    metrics.on_error("TOO_LARGE")
    metrics.on_error("TOO_LARGE")
    metrics.on_error("OVERLOADED")
    s1 = scrape(metrics.port)

    assert val(s1, "packratd_requests_total") == 4
    assert val(s1, "packratd_request_duration_seconds_count") == 4
    assert val(s1, "packratd_request_duration_seconds_sum") == pytest.approx(0.2064)
    assert val(s1, "packratd_request_duration_seconds_bucket", le="0.0005") == 1
    assert val(s1, "packratd_request_duration_seconds_bucket", le="0.005") == 3
    assert val(s1, "packratd_request_duration_seconds_bucket", le="+Inf") == 4
    # batch size buckets: powers of two up to 1024
    assert [b["le"] for b in series(s1, "packratd_batch_size_rows_bucket")] == \
        ["1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0", "512.0", "1024.0", "+Inf"]
    assert val(s1, "packratd_batch_size_rows_bucket", le="2.0") == 0
    assert val(s1, "packratd_batch_size_rows_bucket", le="4.0") == 1
    assert val(s1, "packratd_batch_size_rows_bucket", le="16.0") == 2
    assert val(s1, "packratd_batch_size_rows_bucket", le="512.0") == 2
    assert val(s1, "packratd_batch_size_rows_bucket", le="1024.0") == 3
    assert val(s1, "packratd_batch_size_rows_sum") == 619
    assert val(s1, "packratd_rows_total") == 619
    assert val(s1, "packratd_batch_duration_seconds_count") == 3
    assert val(s1, "packratd_errors_total", code="TOO_LARGE") == 2
    assert val(s1, "packratd_errors_total", code="OVERLOADED") == 1
    assert val(s1, "packratd_errors_total", code="TIMEOUT") == 0


def test_status_gauges_follow_the_snapshot(metrics):
    s0 = scrape(metrics.port)
    assert series(s0, "packratd_plan_info") == []           # nothing before the first update
    assert val(s0, "packratd_queue_rows") is None

    metrics.update(status())
    s1 = scrape(metrics.port)
    assert val(s1, "packratd_queue_rows") == 7
    assert val(s1, "packratd_inflight_batches") == 1
    assert val(s1, "packratd_plan_info", plan="2x1:4", generation=1) == 1
    assert val(s1, "packratd_generation") == 1
    assert val(s1, "packratd_active_generation") == 1
    assert val(s1, "packratd_instances") == 2
    assert val(s1, "packratd_profile_age_seconds") == 42
    assert val(s1, "packratd_plan_predicted_latency_seconds") == pytest.approx(0.0025)
    assert val(s1, "packratd_plan_measured_latency_seconds") == pytest.approx(0.003)
    assert val(s1, "packratd_worker_deaths_total") == 2
    assert val(s1, "packratd_slices_resent_total") == 1
    assert val(s1, "packratd_worker_restarts_total") == 2          # the supervisor's count (instance 1 replaced twice)
    assert val(s1, "packratd_runtime_info", runtime="onnxruntime") == 1
    assert val(s1, "packratd_runtime_available", runtime="openvino") == 0
    assert val(s1, "packratd_runtime_available", runtime="eager") == 1
    assert val(s1, "packratd_runtime_build_seconds", runtime="onnxruntime") == 3.5
    assert val(s1, "packratd_runtime_latency_seconds", runtime="eager", batch="32") == pytest.approx(0.04)
    assert val(s1, "packratd_state", state="serving") == 1
    assert val(s1, "packratd_state", state="starting") == 0
    assert val(s1, "packratd_workers", state="ready") == 2
    assert val(s1, "packratd_worker_busy_seconds_total", worker="g1.i0.r0", generation=1, instance=0, threads=1) == 1.25
    assert val(s1, "packratd_worker_tasks_total", worker="g1.i1.r2", generation=1, instance=1, threads=1) == 4

    # A reconfiguration: generation 2 with another plan.  The old plan and workers disappear.
    w2 = [{"name": "g2.i0.r0", "generation": 2, "index": 0, "state": "ready", "threads": 2, "busy_s": 0.75, "tasks": 3}]
    metrics.update(status(plan="1x2:8", gen=2, workers=w2, queue_rows=0, inflight_batches=0, reconfigurations=1,
                          measured_ms=None, profile={"state": "ready", "age_s": 50.0}, worker_restarts=2))
    s2 = scrape(metrics.port)
    assert series(s2, "packratd_plan_info") == [{"plan": "1x2:8", "generation": "2"}]
    assert val(s2, "packratd_generation") == 2
    assert val(s2, "packratd_queue_rows") == 0
    assert val(s2, "packratd_plan_measured_latency_seconds") is None   # not measured: absent, not a stale value
    assert [w["worker"] for w in series(s2, "packratd_worker_busy_seconds_total")] == ["g2.i0.r0"]
    assert val(s2, "packratd_worker_restarts_total") == 2              # the old slot's restarts stay counted
    assert val(s2, "packratd_reconfigurations_total") == 1             # caught up from status
    assert val(s2, "packratd_profile_age_seconds") == 50


def test_reconfiguration_counted_once(metrics):
    metrics.on_reconfiguration(1.5)
    metrics.update(status(reconfigurations=1))          # the daemon counted the same one: no double count
    s = scrape(metrics.port)
    assert val(s, "packratd_reconfigurations_total") == 1
    assert val(s, "packratd_reconfiguration_duration_seconds_count") == 1
    assert val(s, "packratd_reconfiguration_duration_seconds_sum") == 1.5
    assert val(s, "packratd_reconfiguration_duration_seconds_bucket", le="2.5") == 1
    assert val(s, "packratd_reconfiguration_duration_seconds_bucket", le="1.0") == 0
    metrics.on_reconfiguration(0.3)
    metrics.update(status(reconfigurations=3))          # one the hook did not see
    s = scrape(metrics.port)
    assert val(s, "packratd_reconfigurations_total") == 3
    assert val(s, "packratd_reconfiguration_duration_seconds_count") == 2


def test_starting_status_without_plan_or_profile(metrics):
    metrics.update({"state": "profiling", "plan": None, "generation": 0, "active_generation": None,
                    "profile": {"state": "profiling", "done": 3, "total": 40}, "workers": [], "queue_rows": 0,
                    "inflight_batches": 0, "predicted_ms": None, "measured_ms": None, "reconfigurations": 0})
    s = scrape(metrics.port)
    assert series(s, "packratd_plan_info") == []
    assert val(s, "packratd_active_generation") is None
    assert val(s, "packratd_profile_age_seconds") is None
    assert val(s, "packratd_profiling") == 1
    assert val(s, "packratd_state", state="profiling") == 1
    metrics.update({})                                  # even an empty dict must not break the scrape
    assert val(scrape(metrics.port), "packratd_queue_rows") == 0


def test_port_zero_is_disabled_and_stop_closes_the_port():
    m = Metrics()
    assert m.start("127.0.0.1", 0) is None and m.port is None
    port = m.start("127.0.0.1", free_port())
    assert port == m.port and val(scrape(port), "packratd_up") == 1
    m.stop()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(port)
    m.stop()                                            # idempotent


def test_each_metrics_has_its_own_registry():
    a, b = Metrics(), Metrics()                         # no "Duplicated timeseries" from a shared global registry
    a.on_request(0.01)
    pa, pb = a.serve("127.0.0.1", 0), b.serve("127.0.0.1", 0)
    try:
        assert val(scrape(pa), "packratd_requests_total") == 1
        assert val(scrape(pb), "packratd_requests_total") == 0
    finally:
        a.stop()
        b.stop()


# ---- end to end: the real daemon ------------------------------------------------------------------

@pytest.mark.slow
def test_daemon_serves_metrics(daemon, tiny_model):
    from packratd.client import Client, ReplyError

    port = free_port()
    extra = ["--set", f"metrics.port={port}", "--set", "metrics.address=127.0.0.1"]
    d = daemon(tiny_model, plan="2x1:4", extra=extra)
    c = Client(d.endpoint, timeout=30)
    try:
        for n in (1, 3, 5, 8):
            c.infer(np.ones((n, 64), np.float32))
        with pytest.raises(ReplyError):
            c.infer(np.ones((10_000, 64), np.float32))   # > server.max_batch_size: TOO_LARGE
    finally:
        c.close()
    deadline = time.monotonic() + 15
    while True:                                        # gauges follow the ~1 s status update
        s = scrape(port)
        if series(s, "packratd_plan_info") and val(s, "packratd_workers", state="ready") == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    st = d.control()
    assert val(s, "packratd_up") == 1
    assert val(s, "packratd_requests_total") == 4
    assert val(s, "packratd_request_duration_seconds_count") == 4
    assert val(s, "packratd_rows_total") == 17
    assert val(s, "packratd_batch_size_rows_sum") == 17
    assert val(s, "packratd_errors_total", code="TOO_LARGE") == 1
    assert series(s, "packratd_plan_info") == [{"plan": st["plan"], "generation": str(st["active_generation"])}]
    assert val(s, "packratd_generation") == st["generation"]
    assert val(s, "packratd_workers", state="ready") == 2
    busy = series(s, "packratd_worker_busy_seconds_total")
    assert sorted(b["worker"] for b in busy) == sorted(w["name"] for w in st["workers"])
    assert sum(val(s, "packratd_worker_tasks_total", **b) for b in busy) >= 4
    assert val(s, "packratd_queue_rows") == 0
    assert val(s, "packratd_state", state="serving") == 1
    assert get(port, "/healthz")[0] == 200 and get(port, "/readyz") == (200, "ready\n")
    d.stop()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(port)


def test_grafana_dashboard_uses_only_exposed_metrics():
    """Every packratd_* series the shipped dashboard queries exists (catches renames on either side)."""
    import json
    import os
    import re
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "packratd", "grafana-dashboard.json")
    dash = json.load(open(path))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]] + [a["expr"] for a in dash["annotations"]["list"]]
    used = {n for e in exprs for n in re.findall(r"\bpackratd_[a-z_]+", e)}
    m = Metrics()
    m.on_request(0.001)
    m.on_batch(2, 0.001, 1)
    m.on_reconfiguration(1.0)
    m.update(status())
    exposed = {s.name for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples}
    assert used and used <= exposed, sorted(used - exposed)


# ---- probes: /healthz, /readyz, and nothing but /metrics has metrics ------------------------------

def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_only_metrics_path_serves_metrics(metrics):
    code, text = get(metrics.port, "/metrics")
    assert code == 200 and "packratd_up 1.0" in text
    for path in ("/", "/metric", "/metrics/x", "/favicon.ico", "/healthz/x"):
        code, text = get(metrics.port, path)
        assert code == 404, (path, code)
        assert "packratd_" not in text, path


def test_healthz_and_readyz_follow_the_status_updates():
    m = Metrics()
    m.live_timeout_s = 0.5
    m.serve("127.0.0.1", 0)
    try:
        assert get(m.port, "/healthz")[0] == 200            # the grace before the first snapshot
        assert get(m.port, "/readyz")[0] == 503
        m.update(status(state="profiling"))
        assert get(m.port, "/healthz")[0] == 200
        code, text = get(m.port, "/readyz")
        assert code == 503 and "profiling" in text
        m.update(status(state="serving"))
        assert get(m.port, "/readyz") == (200, "ready\n")
        # The main loop stops pushing snapshots: live (and so ready) goes false after live_timeout_s.
        deadline = time.monotonic() + 10
        while get(m.port, "/healthz")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        code, text = get(m.port, "/healthz")
        assert code == 503 and "not live" in text
        assert get(m.port, "/readyz")[0] == 503
        m.update(status(state="serving"))                    # it turns again
        assert get(m.port, "/healthz")[0] == 200 and get(m.port, "/readyz")[0] == 200
        m.update(status(state="stopping"))
        assert get(m.port, "/readyz")[0] == 503
    finally:
        m.stop()

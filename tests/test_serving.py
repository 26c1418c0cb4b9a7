"""End to end: the real daemon, real pinned workers, real sockets, answers checked against the model in-process."""
from __future__ import annotations

import threading

import numpy as np
import psutil
import pytest
import torch

from packratd.client import Client
from tests.conftest import load_module

SIZES = (1, 2, 3, 8, 13)


def _reference(module, *arrays):
    with torch.inference_mode():
        out = module(*[torch.from_numpy(a) for a in arrays])
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.numpy() for o in out]


def _run_clients(endpoint, make_inputs, module, n_clients=4, rounds=2):
    errors = []

    def client(k):
        c = Client(endpoint, timeout=60)
        rng = np.random.default_rng(k)
        try:
            for _ in range(rounds):
                for n in SIZES:
                    xs = make_inputs(rng, n)
                    got = c.infer(*xs)
                    want = _reference(module, *xs)
                    assert len(got) == len(want)
                    for g, w in zip(got, want):
                        assert g.shape == w.shape, (g.shape, w.shape)
                        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
        except BaseException as e:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]


def test_two_instances_concurrent_clients(daemon, tiny_model):
    d = daemon(tiny_model, plan="2x1:4")
    module = load_module(tiny_model)
    _run_clients(d.endpoint, lambda rng, n: [rng.standard_normal((n, 64)).astype(np.float32)], module)
    st = d.control()
    assert st["requests"] == 4 * 2 * len(SIZES)
    # Concurrent clients were really batched together at least once, and both instances worked.
    assert st["batches"] < st["requests"]
    assert all(w["tasks"] > 0 for w in st["workers"]), st["workers"]
    assert d.stop() == 0


def test_two_input_two_output_model(daemon, two_input_model):
    d = daemon(two_input_model, plan="2x1:4")
    module = load_module(two_input_model)

    def make(rng, n):
        return [rng.standard_normal((n, 16)).astype(np.float32), rng.integers(0, 100, (n, 8)).astype(np.int64)]

    _run_clients(d.endpoint, make, module, n_clients=3)
    spec = Client(d.endpoint).spec()
    assert [s["name"] for s in spec["inputs"]] == ["x", "ids"]
    assert len(spec["outputs"]) == 2


def test_torch_tensor_input_and_asyncio(daemon, tiny_model):
    import asyncio
    from packratd.client import AsyncClient
    d = daemon(tiny_model, plan="2x1:4")
    module = load_module(tiny_model)
    x = torch.randn(5, 64)
    (y,) = Client(d.endpoint).infer(x)
    np.testing.assert_allclose(y, _reference(module, x.numpy())[0], rtol=1e-4, atol=1e-5)

    async def many():
        c = AsyncClient(d.endpoint, timeout=30)
        xs = [np.random.default_rng(i).standard_normal((i + 1, 64)).astype(np.float32) for i in range(6)]
        try:
            outs = await asyncio.gather(*[c.infer(x) for x in xs])
        finally:
            c.close()
        for x, (y,) in zip(xs, outs):
            np.testing.assert_allclose(y, _reference(module, x)[0], rtol=1e-4, atol=1e-5)

    asyncio.run(many())


def _affinity(pid):
    return set(psutil.Process(pid).cpu_affinity())


def _task_affinities(pid):
    out = {}
    for t in psutil.Process(pid).threads():
        with open(f"/proc/{pid}/task/{t.id}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    from packratd.topology import parse_cpulist
                    out[t.id] = parse_cpulist(line.split(":", 1)[1].strip())
    return out


def _environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)


def test_workers_pinned_to_disjoint_cores(daemon, tiny_model):
    d = daemon(tiny_model, plan="2x1:4")
    Client(d.endpoint).infer(np.zeros((4, 64), np.float32))
    st = d.control()
    seen = set()
    for w in st["workers"]:
        cpus = set(w["cpus"])
        assert len(cpus) == w["threads"] == 1
        assert not cpus & seen, "two instances share a core"
        seen |= cpus
        # Every thread of the worker process, not only the main one, is confined to its cores.
        for tid, aff in _task_affinities(w["pid"]).items():
            assert aff <= cpus, (w["name"], tid, aff, cpus)
        assert _environ(w["pid"])[b"OMP_NUM_THREADS"] == b"1"
        assert w["torch_threads"] == 1


@pytest.mark.skipif(len(psutil.Process().cpu_affinity()) < 2, reason="needs 2 usable CPUs")
def test_fat_instance_threads_pinned_one_per_core(daemon, tiny_model):
    d = daemon(tiny_model, plan="1x2:8")
    Client(d.endpoint).infer(np.zeros((8, 64), np.float32))
    (w,) = d.control()["workers"]
    assert w["threads"] == 2 and w["torch_threads"] == 2
    cpus = set(w["cpus"])
    assert len(cpus) == 2
    aff = _task_affinities(w["pid"])
    assert all(a <= cpus for a in aff.values())
    # With per-thread pinning the OpenMP team sits one thread per core: both single-CPU masks exist.
    singles = {frozenset(a) for a in aff.values() if len(a) == 1}
    assert singles == {frozenset({c}) for c in cpus}, aff
    env = _environ(w["pid"])
    assert env[b"OMP_NUM_THREADS"] == b"2" and env[b"OMP_PROC_BIND"] == b"close"


def test_plan_that_does_not_fit_is_refused(daemon, tiny_model):
    n = len(psutil.Process().cpu_affinity())
    d = daemon(tiny_model, plan=f"{n + 1}x1:1", wait=False)
    rc = d.proc.wait(timeout=60)
    assert rc == 2
    assert "cannot be placed" in d.logs()
    assert not d.children()


def test_worker_killed_is_replaced_on_its_cores(daemon, tiny_model):
    d = daemon(tiny_model, plan="2x1:4")
    c = Client(d.endpoint, timeout=60)
    before = {w["index"]: w for w in d.control()["workers"]}
    psutil.Process(before[1]["pid"]).kill()
    # Requests keep being answered while the instance is replaced.
    module = load_module(tiny_model)
    for n in (1, 3, 8):
        x = np.random.default_rng(n).standard_normal((n, 64)).astype(np.float32)
        np.testing.assert_allclose(c.infer(x)[0], _reference(module, x)[0], rtol=1e-4, atol=1e-5)
    import time
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = {w["index"]: w for w in d.control()["workers"]}
        if 1 in after and after[1]["state"] == "ready" and after[1]["pid"] != before[1]["pid"]:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"instance 1 not replaced: {d.control()['workers']}\n{d.logs()}")
    assert after[1]["cpus"] == before[1]["cpus"]
    assert after[0]["pid"] == before[0]["pid"]
    assert d.control()["worker_deaths"] == 1
    assert "lost (exit status -9)" in d.logs()
    assert d.stop() == 0


def test_sigint_stops_cleanly(daemon, tiny_model):
    import signal
    d = daemon(tiny_model, plan="2x1:4")
    pids = d.worker_pids()
    assert d.stop(signal.SIGINT) == 0
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_bad_model_file_fails_fast(daemon, tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"this is not a model")
    d = daemon(str(bad), plan="2x1:4", wait=False)
    rc = d.proc.wait(timeout=120)
    assert rc == 3, d.logs()
    assert "failed to start" in d.logs() and "not a zip file" in d.logs()

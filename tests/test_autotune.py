"""packratd chooses its own plan: real profile, interference check, status, cache reuse on restart."""
from __future__ import annotations

import numpy as np

from packratd.client import Client
from packratd.topology import read_topology
from tests.conftest import load_module

SMALL = ["--set", "server.max_batch_size=4", "--set", "profile.min_reps=2", "--set", "profile.max_reps=3",
         "--set", "autotune.candidates=2"]


def test_daemon_profiles_solves_checks_and_serves(daemon, tiny_model):
    d = daemon(tiny_model, extra=SMALL)
    st = d.control()
    assert st["state"] == "serving"
    plan = st["plan"]
    assert plan, st
    n_cores = read_topology().n_cores
    assert sum(i["threads"] for i in st["instances"]) <= n_cores
    assert st["predicted_ms"] > 0
    assert st["measured_ms"] is not None and st["measured_ms"] > 0   # the interference check ran
    cands = st["autotune"]["candidates"]
    assert len(cands) == 2 and all(c[2] is not None for c in cands)
    measured = [c[2] for c in cands]
    assert st["measured_ms"] in measured
    if st["measured_ms"] != min(measured):
        # a near tie goes to the single fat instance (autotune.split_margin)
        assert len(st["instances"]) == 1 and min(measured) > st["measured_ms"] * (1 - 0.05), (st["instances"], cands)
    assert st["profile"]["state"] == "ready" and st["profile"]["age_s"] >= 0
    assert "profiling tiny_mlp.pt2" in d.logs()
    module = load_module(tiny_model)
    import torch
    for n in (1, 3, 4):
        x = np.random.default_rng(n).standard_normal((n, 64)).astype(np.float32)
        want = module(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(Client(d.endpoint).infer(x)[0], want, rtol=1e-4, atol=1e-5)
    assert d.stop() == 0

    # Restart on the same state dir: the cached profile is used, not measured again.
    from tests.conftest import DaemonProc
    d2 = DaemonProc(d.dir, tiny_model, extra=SMALL)
    d2.wait_serving()
    assert "using cached profile" in d2.logs() and "profiling tiny_mlp.pt2" not in d2.logs()
    assert d2.control()["profile"]["key"] == st["profile"]["key"]
    assert d2.stop() == 0


def test_configured_plan_overrides_autotune(daemon, tiny_model):
    d = daemon(tiny_model, plan="2x1:2", extra=SMALL)
    st = d.control()
    assert st["plan"] == "2x1:2" and "profiling" not in d.logs()

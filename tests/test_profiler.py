"""Profiler: real pinned workers measure a tiny model; the cache key and atomic cache file."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
import zmq

from packratd import config as config_mod, profiler
from packratd.topology import read_topology


def _cfg(tmp_path, model, **kv):
    over = {"model.path": model, "server.runtime_dir": str(tmp_path / "run"), "server.state_dir": str(tmp_path / "state"),
            "server.max_batch_size": 4, "profile.min_reps": 2, "profile.max_reps": 3, "workers.warmup_batches": 1,
            "autotune.interference_check": False, "workers.runtime": "eager"}
    over.update(kv)
    os.makedirs(over["server.runtime_dir"], exist_ok=True)
    return config_mod.load(None, over)


def _autotune(cfg, refresh=False):
    progress = profiler.Progress()
    ctx = zmq.Context()
    try:
        r = profiler.autotune(cfg, read_topology(), ctx, cfg["server.runtime_dir"], progress, threading.Event(), refresh=refresh)
    finally:
        ctx.term()
    return r, progress


def test_grids():
    assert profiler.batch_grid(32) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert profiler.batch_grid(100)[-2:] == [96, 100]
    assert profiler.batch_grid(3000)[-1] == 3000 and all(b < c for b, c in zip(profiler.batch_grid(3000), profiler.batch_grid(3000)[1:]))
    assert profiler.thread_grid(2) == [1, 2]
    g = profiler.thread_grid(64)
    assert g[:16] == list(range(1, 17)) and 64 in g and 20 in g and 21 not in g


def test_profile_is_cached_and_refreshed_when_the_model_changes(tmp_path, models_dir):
    model = str(tmp_path / "m.pt2")
    shutil.copy(models_dir / "tiny_mlp.pt2", model)
    cfg = _cfg(tmp_path, model)
    r1, p1 = _autotune(cfg)
    assert p1.state == "done"
    key = r1.profile["key"]
    path = os.path.join(profiler.profile_dir(cfg), f"{key}.json")
    rec = json.load(open(path))
    lat = np.array(rec["lat_ms"])
    assert lat.shape == (len(rec["threads"]), len(rec["batches"])) and np.isfinite(lat).all() and (lat > 0).all()
    assert rec["threads"] == list(range(1, read_topology().n_cores + 1)) and rec["batches"] == [1, 2, 3, 4]
    assert not [f for f in os.listdir(profiler.profile_dir(cfg)) if f.startswith(".tmp-")]

    # Nothing changed: the cached table is reused, not measured again.
    t0 = time.monotonic()
    r2, p2 = _autotune(cfg)
    assert p2.state == "done" and r2.profile["created"] == rec["created"] and r2.profile["key"] == key
    assert time.monotonic() - t0 < r1.profile["wall_s"] + 30

    # A different model file behind the same path: new digest, new key, new profile.
    shutil.copy(models_dir / "tiny_two_input.pt2", model)
    r3, _ = _autotune(cfg)
    assert r3.profile["key"] != key
    assert r3.profile["created"] > rec["created"]
    assert len(os.listdir(profiler.profile_dir(cfg))) == 2


def test_cache_key_covers_host_and_settings(tmp_path, tiny_model):
    topo = read_topology()
    base, ident = profiler.cache_key(_cfg(tmp_path, tiny_model), topo, tiny_model)
    assert ident["torch"] and ident["topology"] == topo.shape_fingerprint() and ident["cpu_model"] == topo.cpu_model
    assert profiler.cache_key(_cfg(tmp_path, tiny_model, **{"workers.allocator": "glibc"}), topo, tiny_model)[0] != base
    assert profiler.cache_key(_cfg(tmp_path, tiny_model, **{"server.max_batch_size": 8}), topo, tiny_model)[0] != base
    other = read_topology(os.path.join(os.path.dirname(__file__), "fixtures", "sysfs", "xeon2s"), allowed=set(range(64)),
                          cpuinfo_path=os.path.join(os.path.dirname(__file__), "fixtures", "cpuinfo", "xeon2s"))
    assert profiler.cache_key(_cfg(tmp_path, tiny_model), other, tiny_model)[0] != base
    # a pod rescheduled onto other cores of the same machine type reuses the profile: the key has the
    # topology's shape (cores per node, SMT, NUMA layout, CPU model and flags), not the CPU ids
    fx = os.path.join(os.path.dirname(__file__), "fixtures")
    same = [read_topology(os.path.join(fx, "sysfs", "xeon2s"), allowed=cpus, cpuinfo_path=os.path.join(fx, "cpuinfo", "xeon2s"))
            for cpus in ({0, 1, 2, 3}, {4, 5, 6, 7})]
    keys = [profiler.cache_key(_cfg(tmp_path, tiny_model), t, tiny_model)[0] for t in same]
    assert keys[0] == keys[1] and same[0].fingerprint() != same[1].fingerprint()


def test_corrupt_or_mismatched_cache_is_ignored(tmp_path, tiny_model):
    cfg = _cfg(tmp_path, tiny_model)
    key, _ = profiler.cache_key(cfg, read_topology(), tiny_model)
    d = profiler.profile_dir(cfg)
    os.makedirs(d)
    path = os.path.join(d, f"{key}.json")
    with open(path, "w") as f:
        f.write('{"format": 1, "key": "')        # a half-written file
    assert profiler.load_cached(cfg, key) is None
    with open(path, "w") as f:
        json.dump({"format": 1, "key": "someone-else", "threads": [1], "batches": [1], "lat_ms": [[1.0]]}, f)
    assert profiler.load_cached(cfg, key) is None
    with open(path, "w") as f:
        json.dump({"format": 1, "key": key, "threads": [1], "batches": [1, 2], "lat_ms": [[1.0]]}, f)   # wrong shape
    assert profiler.load_cached(cfg, key) is None


def test_write_atomic_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "x.json"
    profiler.write_atomic(str(p), b"old")

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        profiler.write_atomic(str(p), b"new")
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_prefer_fat_keeps_one_instance_on_a_near_tie():
    from packratd import planner
    from packratd.plan import Plan
    fat = Plan(((2, 8),), 100.0)
    split = Plan(((1, 4), (1, 4)), 97.0)
    far = Plan(((1, 4), (1, 4)), 80.0)
    assert planner.prefer_fat([(split, 97.0), (fat, 100.0)], fat, 0.05)[0] is fat      # 3% better: not enough
    assert planner.prefer_fat([(far, 80.0), (fat, 100.0)], fat, 0.05)[0] is far        # 20% better: split
    assert planner.prefer_fat([(split, 97.0), (fat, 100.0)], fat, 0.0)[0] is split     # margin off: plain minimum
    assert planner.prefer_fat([(split, 97.0)], fat, 0.05)[0] is split                  # fat not measured: minimum


def test_candidate_plans_always_include_the_fat_instance(tmp_path, tiny_model):
    from packratd.solver import LatencyTable, solve
    # 4 cores, a table where splitting wins clearly: the fat plan is the solver's last runner-up
    tab = LatencyTable([1, 2, 3, 4], [1, 2, 4, 8], [[1, 2, 4, 8], [0.9, 1.8, 3.6, 7.2], [0.85, 1.7, 3.4, 6.8], [0.8, 1.6, 3.2, 6.4]])
    topo = read_topology(os.path.join(os.path.dirname(__file__), "fixtures", "sysfs", "snc2"), allowed=set(range(8)),
                         cpuinfo_path=os.path.join(os.path.dirname(__file__), "fixtures", "cpuinfo", "snc2"))
    from packratd import planner
    sol = solve(tab, 4, 8, top_k=3)
    plans = planner.candidate_plans(sol, topo, False, 2)
    assert len(plans) == 2 and plans[0] == sol.best and plans[1].shape == sol.fat.shape

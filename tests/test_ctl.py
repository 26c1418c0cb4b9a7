"""packratctl: the status view, the command-line conventions, and a closed pipe, against a real daemon.

tests/data/status/*.json are status replies recorded from a real packratd (tiny_mlp, autotuning on
a 2-core VM: while profiling, during the interference check, and serving; only the paths were
rewritten).  The 16-core view below is that serving reply with its plan replaced by a realistic
four-instance one on a 2-socket SMT host.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from packratd import ctl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "status")


def recorded(name: str) -> dict:
    with open(os.path.join(DATA, f"{name}.json")) as f:
        return json.load(f)


def big_host_status() -> dict:
    """The recorded serving reply, as a 2-socket 16-core SMT host serving 4 instances of 4 threads would give it."""
    st = recorded("serving")
    st["plan"] = "4x4:8"
    cpus = [list(range(4 * i, 4 * i + 4)) for i in range(4)]
    cpus[3] = [12, 13, 44, 45]                         # one instance on two cores and their SMT siblings
    st["instances"] = [{"index": i, "threads": 4, "batch_share": 8, "cpus": c, "node": i // 2} for i, c in enumerate(cpus)]
    w0 = st["workers"][0]
    st["workers"] = [dict(w0, name=f"g1.i{i}.r0", index=i, pid=4000 + i, threads=4, cpus=c, share=8, tasks=10 + i)
                     for i, c in enumerate(cpus)]
    st["cpus_out_of_service"] = [14, 15, 46, 47]
    return st


# ---- the status view -----------------------------------------------------------------------------


def test_serving_status_view():
    text = ctl.render_status(recorded("serving"))
    lines = text.splitlines()
    assert lines[0].startswith("packratd 0.1.0  pid 12130  serving  up 14s"), lines[0]
    assert "plan       2:32  = 1 instance: 2t x 32 rows on cpus 0-1" in text, text
    row = next(line for line in lines if line.startswith("g1.i0.r0"))
    assert row.split()[:5] == ["g1.i0.r0", "ready", "12360", "2", "0-1"], row
    assert "requests   40 (180 rows in 40 batches)" in text
    assert "profile    ready (key 881ec21448f59cd1c38de21d), measured in 4s" in text
    assert "autotune " not in text                       # nothing being tuned now
    assert "0,1" not in text                             # cpus are cpulists, never comma lists of single cpus


def test_cpus_column_uses_cpulist_ranges():
    text = ctl.render_status(big_host_status())
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("g1.i")}
    assert [rows[f"g1.i{i}.r0"][4] for i in range(4)] == ["0-3", "4-7", "8-11", "12-13,44-45"]
    assert "4t x 8 rows on cpus 0-3, 4t x 8 rows on cpus 4-7" in text
    assert "out of service: cpus 14-15,46-47" in text


def test_profiling_is_told_apart_from_the_interference_check():
    prof = ctl.render_status(recorded("profiling"))
    assert "autotune   profiling 10/20 points, about 1s left" in prof, prof
    assert "plan       none yet" in prof
    assert "checking" not in prof

    chk = recorded("checking")
    text = ctl.render_status(chk)
    line = next(x for x in text.splitlines() if x.startswith("autotune"))
    assert line.startswith("autotune   checking candidate plans concurrently"), line
    assert "points" not in line                          # not mistaken for profiling
    # with the candidate count as a field (the daemon's progress snapshot may carry it)
    chk["profile"].update(candidates=3, checked=1)
    line = next(x for x in ctl.render_status(chk).splitlines() if x.startswith("autotune"))
    assert line.startswith("autotune   checking 3 candidate plans concurrently, 1/3 measured"), line


@pytest.mark.parametrize("p,want", [
    ({"state": "profiling", "done": 12, "total": 40, "eta_s": 29.6}, "profiling 12/40 points, about 30s left"),
    ({"state": "profiling", "done": 0, "total": 40, "eta_s": None}, "profiling 0/40 points"),
    ({"state": "checking", "candidates": 1}, "checking 1 candidate plan concurrently"),
    ({"state": "failed", "message": "ProfileError: worker exited"}, "failed: ProfileError: worker exited"),
    ({"state": "cached", "message": "cached profile abc"}, "cached: cached profile abc"),
    ({"state": "none"}, "none (the plan was given, nothing profiled)"),
])
def test_progress_lines(p, want):
    assert ctl.render_progress(p) == want


@pytest.mark.parametrize("state", ["starting", "profiling", "checking", "serving", "failed", "stopping"])
def test_sparse_status_renders(state):
    """A reply with only a few fields (an older or newer daemon, or one that is just starting) still renders."""
    text = ctl.render_status({"state": state, "version": "0.2.0", "pid": 1})
    assert text.splitlines()[0] == f"packratd 0.2.0  pid 1  {state}"
    assert "plan       none yet" in text


# ---- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,command,json_,runtime_dir", [
    (["status"], "status", False, None),
    (["--json", "status"], "status", True, None),
    (["status", "--json"], "status", True, None),
    (["--json", "status", "--json"], "status", True, None),
    (["--runtime-dir", "/a", "status"], "status", False, "/a"),
    (["status", "--runtime-dir", "/b"], "status", False, "/b"),
    (["--runtime-dir", "/a", "--json", "status", "--runtime-dir", "/b"], "status", True, "/b"),
    (["--json", "plan", "-b", "8"], "plan", True, None),
    (["plan", "--batch-size", "8", "--json"], "plan", True, None),
    (["profile", "--json", "--refresh"], "profile", True, None),
    (["--json", "reload"], "reload", True, None),
    (["drain", "--json"], "drain", True, None),
])
def test_global_options_before_or_after_the_subcommand(argv, command, json_, runtime_dir, monkeypatch):
    monkeypatch.delenv("PACKRATD_RUNTIME_DIR", raising=False)
    a = ctl.build_parser().parse_args(argv)
    assert a.command == command and a.json is json_
    assert a.runtime_dir == (runtime_dir or ctl.DEFAULT_RUNTIME_DIR)
    assert a.timeout == 10.0


def test_timeout_after_subcommand_and_env_runtime_dir(monkeypatch):
    monkeypatch.setenv("PACKRATD_RUNTIME_DIR", "/env/run")
    a = ctl.build_parser().parse_args(["status", "--timeout", "2.5"])
    assert a.timeout == 2.5 and a.runtime_dir == "/env/run"


@pytest.mark.parametrize("argv", [[], ["--json"], ["plan"], ["reconfigure", "--plan", "2x1:4", "-b", "3"], ["nosuch"]])
def test_bad_command_lines_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        ctl.build_parser().parse_args(argv)
    assert ei.value.code == 2
    assert "usage: packratctl" in capsys.readouterr().err


def test_no_daemon_is_a_clear_error(tmp_path, capsys):
    assert ctl.main(["--runtime-dir", str(tmp_path), "status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("packratctl: no control socket at ") and "Traceback" not in err


# ---- against a real daemon, through the installed command -----------------------------------------


def packratctl_argv() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "packratctl")     # the venv's console script
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "packratd.ctl"]


@pytest.mark.slow
def test_packratctl_against_a_real_daemon(daemon, tiny_model):
    d = daemon(tiny_model, plan="2x1:4")
    env = dict(os.environ, PYTHONPATH=ROOT)
    base = packratctl_argv() + ["--runtime-dir", d.runtime_dir]

    def run(*args, **kw):
        return subprocess.run(base + list(args), capture_output=True, text=True, env=env, timeout=60, **kw)

    r = run("status")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "  serving  " in r.stdout.splitlines()[0] and "plan       2x1:4" in r.stdout, r.stdout
    # the cpus column holds cpulists of the workers' cpus
    st = d.control()
    for w in st["workers"]:
        row = next(x.split() for x in r.stdout.splitlines() if x.startswith(w["name"]))
        assert row[4] == ctl.format_cpulist(w["cpus"]), (row, w)

    before, after = run("--json", "status"), run("status", "--json")
    assert before.returncode == after.returncode == 0
    a, b = json.loads(before.stdout), json.loads(after.stdout)
    assert a["state"] == b["state"] == "serving" and a["plan"] == b["plan"] == "2x1:4"
    assert a.keys() == b.keys() and "ok" not in a

    # `packratctl status | head -1`: the first line, no traceback, the status a shell gives a
    # program ended by SIGPIPE (141) or 0 when the whole reply fit in the pipe before head left
    cmd = " ".join(f"'{x}'" for x in base) + " status | head -1; echo \"rc=${PIPESTATUS[0]}\" >&2"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.startswith("packratd ") and r.stdout.count("\n") == 1, r.stdout
    assert r.stderr.strip() in ("rc=0", "rc=141"), r.stderr

    # A pipe whose reader is already gone: the write certainly fails with EPIPE.
    rfd, wfd = os.pipe()
    os.close(rfd)
    try:
        for args in (["status"], ["status", "--json"], ["--json", "status"]):
            p = subprocess.run(base + args, stdout=wfd, stderr=subprocess.PIPE, text=True, env=env, timeout=60)
            assert p.returncode == ctl.EXIT_SIGPIPE == 141, (args, p.returncode, p.stderr)
            assert p.stderr == "", p.stderr                  # no traceback, no "Exception ignored"
    finally:
        os.close(wfd)

    r = run("plan", "-b", "4")           # an error reply (a given plan: no profile to solve on): stderr, status 1
    assert r.returncode == 1 and r.stderr.startswith("packratctl: ") and "Traceback" not in r.stderr, r.stderr
    assert d.stop() == 0


def test_render_plan_uses_the_plan_notation():
    from packratd.ctl import render_plan
    r = {"batch_size": 16, "best": "2x1:8", "predicted_ms": 12.34, "fits_numa": True,
         "runners_up": [{"plan": "2:16", "predicted_ms": 14.0, "fits_numa": True},
                        {"plan": "4x1:4", "predicted_ms": 15.5, "fits_numa": False}]}
    assert render_plan(r).splitlines() == [
        "batch 16: 2x1:8  predicted 12.3 ms",
        "  runner-up 2:16  predicted 14.0 ms",
        "  runner-up 4x1:4  predicted 15.5 ms  (does not fit the NUMA layout)",
    ]


def test_render_runtimes_shows_the_choice_timings_and_reasons():
    from packratd.ctl import render_runtimes
    info = {"eager": {"available": True, "ms": {"1": 2.04, "32": 40.0}},
            "onnxruntime": {"available": True, "chosen": True, "build_s": 3.4, "ms": {"32": 1234.4, "1": 0.039}},
            "openvino": {"available": False, "reason": "openvino does not propagate NaN/Inf like eager"}}
    assert render_runtimes("onnxruntime", info) == (
        "onnxruntime  (eager 2.04/40.0 ms; onnxruntime 0.039/1234 ms (built in 3s); "
        "openvino skipped: openvino does not propagate NaN/Inf like eager)  at batch 1/32")
    assert render_runtimes("eager", {}) == "eager"

"""Config: one definition per option, the shipped file in step with it, clear refusals, safe reload."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from packratd import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "etc", "packratd", "packratd.toml")


def test_shipped_config_lists_every_option_with_its_default():
    text = open(SHIPPED).read()
    assert text == C.dump_defaults(), "etc/packratd/packratd.toml is stale: run `make config`"
    # uncommenting every line gives a valid file whose values are exactly the defaults
    uncommented = "\n".join(l[1:] if l.startswith("#") and "=" in l and not l.startswith("# ") else l
                            for l in text.splitlines())
    doc = tomllib.loads(uncommented)
    flat = {f"{s}.{k}": v for s, t in doc.items() for k, v in t.items()}
    assert flat == {o.key: o.default for o in C.OPTIONS}


def test_option_keys_are_unique_and_documented():
    keys = [o.key for o in C.OPTIONS]
    assert len(keys) == len(set(keys))
    assert all(o.doc and o.section and o.name for o in C.OPTIONS)
    for o in C.OPTIONS:
        if o.check is not None:
            assert o.check(o.default) is None, f"default of {o.key} fails its own check"


def _write(tmp_path, text):
    p = tmp_path / "p.toml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, expect", [
    ('[model]\npath = "m.pt2"\n[server]\nmax_batch = 3\n', "unknown key server.max_batch"),
    ('[model]\npath = "m.pt2"\n[serve]\nx = 1\n', "unknown key serve.x"),
    ('[model]\npath = "m.pt2"\n[server]\nmax_batch_size = "32"\n', "expected int, got str"),
    ('[model]\npath = "m.pt2"\n[server]\nmax_batch_size = 0\n', "must be > 0"),
    ('[model]\npath = "m.pt2"\n[workers]\nuse_smt = 1\n', "expected bool"),
    ('[model]\npath = "m.pt2"\n[workers]\nallocator = "dlmalloc"\n', "must be one of"),
    ('[model]\npath = "m.pt2"\n[workers]\nplan = "2x0:4"\n', "workers.plan"),
    ('[model]\npath = "m.pt2"\n[server]\nlisten = "udp://x"\n', "ipc:// or tcp://"),
    ('server = 3\n[model]\npath = "m.pt2"\n', "expected a [section] table"),
    ('[model]\npath = "m.pt2"\nserver = 3\n', "unknown key model.server"),
    ('[model\npath = 1', "not valid TOML"),
    ('[server]\nmax_batch_size = 8\n', "model.path is not set"),
])
def test_bad_config_is_refused_with_file_key_and_reason(tmp_path, text, expect):
    path = _write(tmp_path, text)
    with pytest.raises(C.ConfigError) as e:
        C.load(path)
    assert expect in str(e.value)
    assert path in str(e.value) or "model.path" in str(e.value)


def test_overrides_and_types(tmp_path):
    path = _write(tmp_path, '[model]\npath = "m.pt2"\n[server]\nmax_delay_ms = 3\n')
    cfg = C.load(path, {"server.max_batch_size": "64", "workers.use_smt": "true"})
    assert cfg["server.max_delay_ms"] == 3.0 and isinstance(cfg["server.max_delay_ms"], float)
    assert cfg["server.max_batch_size"] == 64 and cfg["workers.use_smt"] is True
    assert cfg.listen == "ipc:///run/packratd/packratd.sock"
    with pytest.raises(C.ConfigError, match="unknown key"):
        C.load(path, {"server.nope": "1"})
    with pytest.raises(C.ConfigError, match="expected int"):
        C.load(path, {"server.max_batch_size": "lots"})


def test_daemon_refuses_bad_config_at_start(tmp_path):
    path = _write(tmp_path, '[model]\npath = "m.pt2"\n[server]\nmax_batch_size = -1\n')
    r = subprocess.run([sys.executable, "-m", "packratd.daemon", "--config", path], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 2
    assert path in r.stderr and "server.max_batch_size" in r.stderr and "must be > 0" in r.stderr


def test_reload_keeps_running_config_when_new_one_is_bad(daemon, tiny_model, tmp_path):
    cfg = tmp_path / "packratd.toml"
    cfg.write_text(f'[model]\npath = "{tiny_model}"\n[server]\nmax_batch_size = 16\n[workers]\nplan = "2x1:8"\n')
    d = daemon(tiny_model, config=str(cfg))
    assert d.control()["max_batch_size"] == 16
    cfg.write_text(f'[model]\npath = "{tiny_model}"\n[server]\nmax_batch_size = "many"\n')
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "config not reloaded" not in d.logs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "config not reloaded, keeping the running one" in d.logs() and "expected int" in d.logs()
    st = d.control()
    assert st["max_batch_size"] == 16 and st["plan"] == "2x1:8" and st["state"] == "serving"
    # a good edit is applied on the next reload
    cfg.write_text(f'[model]\npath = "{tiny_model}"\n[server]\nmax_batch_size = 24\n[workers]\nplan = "2x1:8"\n')
    r = d.control("reload")
    assert r["reloaded"] is True
    assert d.control()["max_batch_size"] == 24

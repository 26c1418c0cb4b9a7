"""Tests for tools/models.py and tools/export_model.py (fast: tiny models are
exported; the big architectures are only built and run eagerly at batch 1)."""

import stat
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import export_model as E  # noqa: E402
from tools import models as M  # noqa: E402

TINY = ["tiny_mlp", "tiny_two_input"]

EXPECTED_SPEC = {
    "tiny_mlp": [{"name": "x", "dtype": "float32", "shape": [None, 64]}],
    "tiny_two_input": [
        {"name": "x", "dtype": "float32", "shape": [None, 16]},
        {"name": "ids", "dtype": "int64", "shape": [None, 8]},
    ],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (path, summary) for the tiny models, exported once per module."""
    d = tmp_path_factory.mktemp("models")
    out = {}
    for name in TINY:
        path = d / f"{name}.pt2"
        out[name] = (path, E.export(name, str(path)))
    return out


def _as_tuple(y):
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


@pytest.mark.parametrize("name", TINY)
def test_export_roundtrip_matches_eager(exported, name):
    path, summary = exported[name]
    assert summary["name"] == name and summary["bytes"] == path.stat().st_size > 0
    mod = torch.export.load(str(path)).module()
    eager = M.build(name)
    for b in (1, 3, 13):
        x = M.example_inputs(name, b, seed=b)
        with torch.no_grad():
            want, got = _as_tuple(eager(*x)), _as_tuple(mod(*x))
        assert len(want) == len(got)
        for w, g in zip(want, got):
            assert g.shape == w.shape and g.shape[0] == b
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_two_input_output_shapes(exported):
    mod = torch.export.load(str(exported["tiny_two_input"][0])).module()
    out, score = mod(*M.example_inputs("tiny_two_input", 5))
    assert out.shape == (5, 4) and score.shape == (5,)


@pytest.mark.parametrize("name", TINY)
def test_placeholder_meta_has_symbolic_batch(exported, name):
    ep = torch.export.load(str(exported[name][0]))
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    users = list(ep.graph_signature.user_inputs)
    assert len(users) == len(EXPECTED_SPEC[name])
    batch_syms = set()
    for u in users:
        val = nodes[u].meta["val"]
        assert isinstance(val.shape[0], torch.SymInt), (u, val.shape)
        assert all(isinstance(d, int) for d in val.shape[1:]), (u, val.shape)
        batch_syms.add(str(val.shape[0]))
    assert len(batch_syms) == 1  # all inputs share one batch symbol
    # The recorded range admits batch 1 (not the [2, inf) Dim.DYNAMIC gives).
    (vr,) = ep.range_constraints.values()
    assert int(vr.lower) == 1 and int(vr.upper) == E.DEFAULT_MAX_BATCH


@pytest.mark.parametrize("name", TINY)
def test_input_spec(exported, name):
    ep = torch.export.load(str(exported[name][0]))
    assert M.input_spec(ep) == EXPECTED_SPEC[name]


def test_input_spec_in_memory_program():
    ep, _ = E.export_program("tiny_two_input")
    assert M.input_spec(ep) == EXPECTED_SPEC["tiny_two_input"]


def test_max_batch_guard(tmp_path):
    path = tmp_path / "m.pt2"
    E.export("tiny_mlp", str(path), max_batch=16)
    mod = torch.export.load(str(path)).module()
    assert mod(*M.example_inputs("tiny_mlp", 16)).shape == (16, 10)
    with pytest.raises(Exception):
        mod(*M.example_inputs("tiny_mlp", 17))


def test_save_is_atomic_and_readable(tmp_path, exported):
    path = tmp_path / "sub" / "m.pt2"
    E.export("tiny_mlp", str(path))
    E.export("tiny_mlp", str(path))  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt2"]  # no temp files left
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & stat.S_IRUSR and mode & stat.S_IRGRP  # not mkstemp's 0600 (umask permitting)


def test_cli_single(tmp_path, capsys):
    assert E.main(["tiny_two_input", str(tmp_path / "a.pt2"), "--verify"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("tiny_two_input ") and "verified" in line and "\n" not in line
    assert (tmp_path / "a.pt2").exists()
    with pytest.raises(SystemExit):
        E.main(["tiny_mlp"])  # missing OUT


def test_seeded_weights_are_deterministic():
    state = torch.random.get_rng_state()
    a, b = M.tiny_mlp(), M.tiny_mlp()
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(M.tiny_mlp(seed=1).parameters()), next(a.parameters()))


def test_example_inputs_are_valid():
    ids, mask = M.example_inputs("bert", 6, seq_len=16)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (6, 16)
    assert 0 <= ids.min() and ids.max() < 30522
    assert set(mask.unique().tolist()) <= {0, 1} and (mask.sum(1) >= 1).all()
    (g,) = M.example_inputs("gpt2", 2, seq_len=16)
    assert g.dtype == torch.int64 and g.max() < 50257
    x, t = M.example_inputs("tiny_two_input", 4)
    assert t.dtype == torch.int64 and t.max() < 100 and x.dtype == torch.float32
    assert set(M.MODELS) == {"resnet50", "bert", "gpt2", "tiny_mlp", "tiny_two_input", "slow_mlp"}


# --- big architectures: eager only, batch 1, short sequences ---------------


def test_resnet50_eager_batch1():
    m = M.resnet50()
    assert sum(p.numel() for p in m.parameters()) == 25_557_032  # torchvision's count
    with torch.no_grad():
        y = m(*M.example_inputs("resnet50", 1))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


def test_bert_eager_batch1_and_padding_mask():
    m = M.bert_base(seq_len=16)
    ids, mask = M.example_inputs("bert", 1, seq_len=16)
    mask[:, :10], mask[:, 10:] = 1, 0
    with torch.no_grad():
        y = m(ids, mask)
        ids2 = ids.clone()
        ids2[:, 10:] = (ids2[:, 10:] + 1) % 30522  # change only padded tokens
        y2 = m(ids2, mask)
    assert y.shape == (1, 16, 768) and y.dtype == torch.float32
    # Kept positions must not see padded ones (additive mask works).
    torch.testing.assert_close(y[:, :10], y2[:, :10], atol=1e-5, rtol=1e-5)


def test_gpt2_eager_batch1():
    m = M.gpt2_small(seq_len=16)
    (ids,) = M.example_inputs("gpt2", 1, seq_len=16)
    with torch.no_grad():
        y = m(ids)
    assert y.shape == (1, 50257) and torch.isfinite(y).all()
    assert sum(p.numel() for p in m.parameters()) == 124_439_808

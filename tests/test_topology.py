import json
import os

import pytest
from hypothesis import given, strategies as st

from packratd.topology import (
    Core,
    Topology,
    TopologyError,
    format_cpulist,
    parse_cpulist,
    read_topology,
)

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures", "sysfs")
CPUINFO = os.path.join(HERE, "fixtures", "cpuinfo")
ALL = set(range(1024))


from tests.fixtures import make_sysfs  # noqa: E402  (the fixture generator, for variants)

pytestmark = pytest.mark.fast


def topo(name, allowed=ALL):
    return read_topology(os.path.join(FIX, name), allowed=allowed, cpuinfo_path=os.path.join(CPUINFO, name))


# ---------------------------------------------------------------- cpulist


@pytest.mark.parametrize(
    "text,expected",
    [
        ("0-3,8,10-11", {0, 1, 2, 3, 8, 10, 11}),
        ("0-3,8,10-11\n", {0, 1, 2, 3, 8, 10, 11}),
        ("  5 ", {5}),
        ("", set()),
        ("\n", set()),
        ("0", {0}),
        ("3-3", {3}),
        ("0 - 1".replace(" ", ""), {0, 1}),
        ("0-7:2/4", {0, 1, 4, 5}),
        ("1,1,1", {1}),
        ("0-1, 4-5", {0, 1, 4, 5}),
    ],
)
def test_parse_cpulist(text, expected):
    assert parse_cpulist(text) == expected


@pytest.mark.parametrize("bad", ["a", "1-", "-1", "3-1", "1-2-3", "0x1", "1.5", "0-7:0/4", "0-7:5/4", "1;2"])
def test_parse_cpulist_rejects_junk(bad):
    with pytest.raises(ValueError):
        parse_cpulist(bad)


def test_format_cpulist_examples():
    assert format_cpulist([11, 10, 8, 3, 2, 1, 0]) == "0-3,8,10-11"
    assert format_cpulist([]) == ""
    assert format_cpulist({7}) == "7"
    assert format_cpulist([1, 3, 5]) == "1,3,5"
    assert format_cpulist(range(64)) == "0-63"
    with pytest.raises(ValueError):
        format_cpulist([-1])


@given(st.sets(st.integers(min_value=0, max_value=4096), max_size=200))
def test_cpulist_round_trip(cpus):
    text = format_cpulist(cpus)
    assert parse_cpulist(text) == cpus
    # canonical: formatting the parse gives the same text back
    assert format_cpulist(parse_cpulist(text)) == text
    # no run is written as a range of length 1, and no two items are adjacent
    vals = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        vals.append((int(lo), int(hi or lo)))
        if hi:
            assert int(hi) > int(lo)
    for (a_lo, a_hi), (b_lo, b_hi) in zip(vals, vals[1:]):
        assert b_lo > a_hi + 1


# ---------------------------------------------------------------- fixtures


@pytest.mark.parametrize(
    "name,sockets,nodes,cores,smt,cpus",
    [
        ("vm2", (0,), (0,), 2, 1, 2),
        ("xeon2s", (0, 1), (0, 1), 32, 2, 64),
        ("snc2", (0,), (0, 1), 8, 1, 8),
        ("snc2x2", (0, 1), (0, 1, 2, 3), 16, 1, 16),
        ("offline", (0,), (0,), 3, 2, 5),
        ("nonode", (0,), (0,), 2, 2, 4),
        ("missing_topology", (0,), (0,), 4, 1, 4),
        ("orphan", (0,), (0, 1), 8, 1, 8),
    ],
)
def test_fixture_counts(name, sockets, nodes, cores, smt, cpus):
    t = topo(name)
    assert t.sockets == sockets
    assert t.nodes == nodes
    assert t.n_cores == cores
    assert t.smt == smt
    assert t.n_cpus == cpus
    # every usable cpu is in exactly one core
    seen = [c for core in t.cores for c in core.cpus]
    assert len(seen) == len(set(seen))
    assert set(seen) == t.allowed_cpus
    # cores sorted as documented, cpus sorted within a core
    assert list(t.cores) == sorted(t.cores, key=lambda k: (k.node, k.socket, k.core_id, k.cpus))
    assert all(list(c.cpus) == sorted(c.cpus) for c in t.cores)


def test_vm2_matches_the_real_layout_here():
    t = topo("vm2")
    assert t.cores == (Core(0, 0, 0, (0,)), Core(0, 0, 1, (1,)))
    assert t.cpu_model == "Intel(R) Xeon(R) Processor"
    assert t.warnings == ()
    assert t.offline_cpus == frozenset() and t.excluded_cpus == frozenset()


def test_xeon2s_siblings_and_nodes():
    t = topo("xeon2s")
    by_node = t.cores_by_node()
    assert sorted(by_node) == [0, 1]
    assert len(by_node[0]) == len(by_node[1]) == 16
    for core in t.cores:
        a, b = core.cpus
        assert b == a + 32, core
        assert core.node == core.socket == (0 if a < 16 else 1)
    # core_id repeats across packages: identity must not collapse the two sockets' cores
    ids0 = sorted(c.core_id for c in by_node[0])
    ids1 = sorted(c.core_id for c in by_node[1])
    assert ids0 == ids1 == make_sysfs.XEON_CORE_IDS
    assert t.cpu_model.startswith("Intel(R) Xeon(R) Gold")
    assert t.warnings == ()
    assert "2 sockets" in t.describe() and "2 NUMA nodes" in t.describe()


def test_snc2_one_socket_two_nodes():
    t = topo("snc2")
    assert [c.cpus for c in t.cores_by_node()[0]] == [(0,), (1,), (2,), (3,)]
    assert [c.cpus for c in t.cores_by_node()[1]] == [(4,), (5,), (6,), (7,)]
    assert t.node_sockets() == {0: (0,), 1: (0,)}


def test_offline_cpus_skipped_and_noted():
    t = topo("offline")
    assert t.offline_cpus == frozenset({3, 5, 7})
    assert t.allowed_cpus == frozenset({0, 1, 2, 4, 6})
    assert [c.cpus for c in t.cores] == [(0, 4), (1,), (2, 6)]
    assert any("3,5,7" in w and "offline" in w for w in t.warnings)
    assert "offline: cpus 3,5,7" in t.describe()


def test_nonode_treated_as_node0_with_warning():
    t = topo("nonode")
    assert t.nodes == (0,)
    assert [c.cpus for c in t.cores] == [(0, 1), (2, 3)]
    assert any("node" in w and "node 0" in w for w in t.warnings)


def test_missing_topology_falls_back_to_core_per_cpu():
    t = topo("missing_topology")
    assert [c.cpus for c in t.cores] == [(0,), (1,), (2,), (3,)]
    w = [w for w in t.warnings if "topology" in w]
    assert w and "3" in w[0] and "own core" in w[0]
    # the made-up core_id does not collide with a real one
    assert len({c.core_id for c in t.cores}) == 4


def test_cpu_in_no_node_gets_a_guess_and_a_warning():
    t = topo("orphan")
    c5 = t.core_of(5)
    assert c5 is not None and c5.node == 1  # like its neighbours 4 and 6
    assert any("cpu5" in w and "no NUMA node" in w for w in t.warnings)


def test_node_links_are_an_alternative(tmp_path):
    spec = make_sysfs.fixtures()["orphan"]
    spec.node_links = True
    make_sysfs.write_tree(str(tmp_path), spec)
    # cpu5 now has cpu5/node1 but is still missing from node1/cpulist
    t = read_topology(str(tmp_path), allowed=ALL, cpuinfo_path=str(tmp_path / "nope"))
    assert t.core_of(5).node == 1
    assert not any("cpu5" in w for w in t.warnings)
    assert t.cpu_model == "unknown"


# ---------------------------------------------------------------- affinity


def test_affinity_excludes_whole_cores():
    t = topo("xeon2s", allowed=set(range(0, 8)) | set(range(32, 40)))
    assert t.n_cores == 8
    assert t.nodes == (0,) and t.sockets == (0,)
    assert t.excluded_cpus == frozenset(range(64)) - t.allowed_cpus
    assert t.smt == 2
    assert any("excluded" in w for w in t.warnings)


def test_affinity_splitting_a_core_keeps_only_allowed_sibling():
    t = topo("xeon2s", allowed={0, 1, 33})  # core 0 whole, core 1 only cpu 33
    assert [c.cpus for c in t.cores] == [(0,), (1, 33)]
    assert t.n_cores == 2 and t.smt == 2


def test_affinity_partial_core_is_noted():
    t = topo("xeon2s", allowed={0, 32, 1, 2, 34})
    cores = {c.cpus[0]: c for c in t.cores}
    assert cores[0].cpus == (0, 32)
    assert cores[1].cpus == (1,)
    assert cores[2].cpus == (2, 34)
    notes = [w for w in t.warnings if "sibling" in w]
    assert len(notes) == 1 and "33" in notes[0] and "using only cpus 1" in notes[0]
    assert t.smt == 2


def test_affinity_only_second_threads():
    t = topo("xeon2s", allowed=set(range(32, 64)))
    assert t.n_cores == 32
    assert all(len(c.cpus) == 1 and c.cpus[0] >= 32 for c in t.cores)
    assert t.smt == 1


def test_no_usable_cpu_names_mask_and_online():
    with pytest.raises(TopologyError) as ei:
        topo("offline", allowed={3, 5, 7, 100})
    msg = str(ei.value)
    assert "3,5,7,100" in msg
    assert "0-2,4,6" in msg


def test_empty_mask_error():
    with pytest.raises(TopologyError, match=r"\(empty\)"):
        topo("vm2", allowed=set())


def test_missing_cpu_dir_is_a_topology_error(tmp_path):
    with pytest.raises(TopologyError, match="not a directory"):
        read_topology(str(tmp_path), allowed=ALL)


def test_no_online_file_falls_back_to_per_cpu_flags(tmp_path):
    make_sysfs.write_tree(str(tmp_path), make_sysfs.fixtures()["offline"])
    os.remove(tmp_path / "devices/system/cpu/online")
    t = read_topology(str(tmp_path), allowed=ALL, cpuinfo_path="/nonexistent")
    assert t.allowed_cpus == frozenset({0, 1, 2, 4, 6})
    assert t.offline_cpus == frozenset({3, 5, 7})
    assert any("unreadable" in w for w in t.warnings)


def test_per_cpu_online_zero_overrides_online_list(tmp_path):
    make_sysfs.write_tree(str(tmp_path), make_sysfs.fixtures()["snc2"])
    (tmp_path / "devices/system/cpu/cpu6/online").write_text("0\n")
    t = read_topology(str(tmp_path), allowed=ALL)
    assert 6 not in t.allowed_cpus and 6 in t.offline_cpus
    assert any("cpu6" in w for w in t.warnings)


def test_garbage_sibling_file_falls_back(tmp_path):
    make_sysfs.write_tree(str(tmp_path), make_sysfs.fixtures()["nonode"])
    for c in range(4):
        for f in ("core_cpus_list", "thread_siblings_list"):
            (tmp_path / f"devices/system/cpu/cpu{c}/topology/{f}").write_text("garbage\n")
    t = read_topology(str(tmp_path), allowed=ALL)
    # grouped by (package, core_id) instead
    assert [c.cpus for c in t.cores] == [(0, 1), (2, 3)]
    assert any("physical_package_id, core_id" in w for w in t.warnings)


# ---------------------------------------------------------------- output


def test_to_dict_is_json_and_fingerprint_stable():
    a = topo("xeon2s")
    b = topo("xeon2s")
    d = json.loads(json.dumps(a.to_dict()))
    assert d["n_cores"] == 32 and d["smt"] == 2 and d["nodes"] == [0, 1]
    assert d["allowed_cpus"] == "0-63"
    assert a.fingerprint() == b.fingerprint() == d["fingerprint"]
    assert d["shape"] == [[[2] * 16], [[2] * 16]] and d["shape_fingerprint"] == a.shape_fingerprint()
    assert a.fingerprint() != topo("snc2").fingerprint()
    assert a.fingerprint() != topo("xeon2s", allowed=set(range(63))).fingerprint()
    # the cpu model is part of the key
    c = Topology(cores=a.cores, allowed_cpus=a.allowed_cpus, cpu_model="other")
    assert c.fingerprint() != a.fingerprint()
    # warnings are not
    e = Topology(cores=a.cores, allowed_cpus=a.allowed_cpus, cpu_model=a.cpu_model, warnings=("x",))
    assert e.fingerprint() == a.fingerprint()


# ---------------------------------------------------------------- shape (the profile cache key)


def _pairs(first_threads, offset=32):
    """xeon2s cpus of these cores, both SMT threads (cpu i and i+32 are siblings)."""
    return set(first_threads) | {c + offset for c in first_threads}


def test_shape_fingerprint_ignores_which_cpus():
    """Four SMT-2 cores of one node: wherever they are on the host, the same shape and key."""
    sets = [_pairs(range(0, 4)), _pairs(range(4, 8)), _pairs(range(16, 20)), _pairs([1, 5, 9, 14])]
    tops = [topo("xeon2s", allowed=a) for a in sets]
    assert {t.shape_fingerprint() for t in tops} == {tops[0].shape_fingerprint()}
    assert all(t.shape() == [[[2, 2, 2, 2]]] for t in tops)
    assert len({t.fingerprint() for t in tops}) == len(tops)      # the exact-id key still tells them apart
    assert tops[0].cpu_flags == tops[2].cpu_flags and "avx512f" in tops[0].cpu_flags


def test_shape_fingerprint_sees_smt_numa_and_size():
    base = topo("xeon2s", allowed=_pairs(range(0, 4)))
    differ = {
        "no SMT sibling": topo("xeon2s", allowed=set(range(0, 4))),
        "one sibling missing": topo("xeon2s", allowed=_pairs(range(0, 4)) - {35}),
        "two nodes of two cores": topo("xeon2s", allowed=_pairs([0, 1, 16, 17])),
        "five cores": topo("xeon2s", allowed=_pairs(range(0, 5))),
    }
    for why, t in differ.items():
        assert t.shape_fingerprint() != base.shape_fingerprint(), why
    # eight cores on two nodes: one socket with two nodes (SNC) is not two sockets with one node each
    one_socket = topo("snc2x2", allowed=set(range(0, 8)))
    two_sockets = topo("snc2x2", allowed=set(range(0, 4)) | set(range(8, 12)))
    assert one_socket.shape() == [[[1, 1, 1, 1], [1, 1, 1, 1]]]
    assert two_sockets.shape() == [[[1, 1, 1, 1]], [[1, 1, 1, 1]]]
    assert one_socket.shape_fingerprint() != two_sockets.shape_fingerprint()
    # node ids do not matter, the uneven split does: 3+1 cores == 1+3 cores != 2+2 cores
    a, b, c = (topo("snc2", allowed=x) for x in ({0, 1, 2, 4}, {0, 4, 5, 6}, {0, 1, 4, 5}))
    assert a.shape() == b.shape() == [[[1], [1, 1, 1]]]
    assert a.shape_fingerprint() == b.shape_fingerprint() != c.shape_fingerprint()


def test_shape_fingerprint_sees_cpu_model_and_flags(tmp_path):
    import dataclasses
    base = topo("snc2x2", allowed=set(range(0, 8)))
    same_shape = topo("snc2")                    # one socket, two nodes of four cores, another CPU model
    assert same_shape.shape() == base.shape()
    assert same_shape.shape_fingerprint() != base.shape_fingerprint()
    assert dataclasses.replace(same_shape, cpu_model=base.cpu_model).shape_fingerprint() == base.shape_fingerprint()
    # the flags: one more ISA extension is another machine type; their order and repeats are not
    info = tmp_path / "cpuinfo"
    sysfs = os.path.join(FIX, "snc2x2")
    for flags, same in (("fpu vme de pse", True), ("pse de vme fpu fpu", True), ("fpu vme de pse avx512f", False),
                        ("fpu vme de", False)):
        info.write_text(make_sysfs.cpuinfo_text("Intel(R) Xeon(R) Platinum 8480+", flags))
        t = read_topology(sysfs, allowed=set(range(0, 8)), cpuinfo_path=str(info))
        assert (t.shape_fingerprint() == base.shape_fingerprint()) is same, flags


def test_read_cpu_flags_variants(tmp_path):
    from packratd.topology import read_cpu_flags
    p = tmp_path / "ci"
    p.write_text("processor\t: 0\nflags\t\t: sse avx avx2\n\nprocessor\t: 1\nflags\t\t: avx2 sse avx hypervisor\n")
    assert read_cpu_flags(str(p)) == ("avx", "avx2", "sse")        # what every processor has
    p.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes\nCPU implementer\t: 0x41\n")
    assert read_cpu_flags(str(p)) == ("aes", "asimd", "evtstrm", "fp")
    p.write_text("processor : 0\ncpu : POWER9 (raw), altivec supported\n")
    assert read_cpu_flags(str(p)) == ()
    assert read_cpu_flags(str(tmp_path / "missing")) == ()
    assert topo("nonode").cpu_flags == tuple(sorted(make_sysfs.ZEN2_FLAGS.split()))
    assert "avx512f" not in topo("nonode").cpu_flags


def _relabelled(t: Topology, perm_cpu, perm_node, perm_socket) -> Topology:
    cores = tuple(Core(socket=perm_socket[c.socket], node=perm_node[c.node], core_id=c.core_id + 100,
                       cpus=tuple(sorted(perm_cpu[x] for x in c.cpus))) for c in t.cores)
    return Topology(cores=cores, allowed_cpus=frozenset(perm_cpu[x] for x in t.allowed_cpus),
                    cpu_model=t.cpu_model, cpu_flags=t.cpu_flags)


@given(st.sampled_from(["xeon2s", "snc2x2", "offline", "nonode", "snc2"]), st.randoms(use_true_random=False),
       st.sets(st.integers(0, 63), min_size=1))
def test_shape_fingerprint_is_invariant_under_renaming(name, rnd, allowed):
    full = topo(name)
    mask = allowed & full.allowed_cpus or set(full.allowed_cpus)
    t = topo(name, allowed=mask)
    cpus = sorted(full.allowed_cpus)
    perm_cpu = dict(zip(cpus, rnd.sample(range(1000), len(cpus))))
    nodes, sockets = list(full.nodes), list(full.sockets)
    perm_node = dict(zip(nodes, rnd.sample(range(50), len(nodes))))
    perm_socket = dict(zip(sockets, rnd.sample(range(50), len(sockets))))
    r = _relabelled(t, perm_cpu, perm_node, perm_socket)
    assert r.shape() == t.shape() and r.shape_fingerprint() == t.shape_fingerprint()
    assert sum(len(n) for s in t.shape() for n in s) == t.n_cores
    assert sum(x for s in t.shape() for n in s for x in n) == t.n_cpus


def test_describe_mentions_nodes_and_warnings():
    text = topo("nonode").describe()
    assert text.splitlines()[0].startswith("AMD EPYC 7B12: 1 socket, 1 NUMA node, 2 usable cores, 4 usable cpus")
    assert "warning:" in text


def test_cpu_model_variants(tmp_path):
    from packratd.topology import read_cpu_model

    p = tmp_path / "ci"
    p.write_text("processor : 0\ncpu : POWER9 (raw), altivec supported\n")
    assert read_cpu_model(str(p)) == "POWER9 (raw), altivec supported"
    p.write_text("processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n")
    assert read_cpu_model(str(p)) == "arm implementer 0x41 part 0xd0c"
    assert read_cpu_model(str(tmp_path / "missing")) == "unknown"


def test_fixture_generator_is_reproducible(tmp_path):
    """The committed trees are exactly what make_sysfs.py writes."""
    for name, spec in make_sysfs.fixtures().items():
        out = tmp_path / name
        make_sysfs.write_tree(str(out), spec)
        committed = os.path.join(FIX, name)
        want = {}
        for d, _, files in os.walk(out):
            for f in files:
                p = os.path.join(d, f)
                want[os.path.relpath(p, out)] = open(p).read()
        have = {}
        for d, _, files in os.walk(committed):
            for f in files:
                p = os.path.join(d, f)
                have[os.path.relpath(p, committed)] = open(p).read()
        assert have == want, name
        with open(os.path.join(CPUINFO, name)) as f:
            assert f.read() == make_sysfs.cpuinfo_text(spec.model, spec.flags), name


# ---------------------------------------------------------------- the real host


def test_real_sysfs_of_this_machine():
    t = read_topology()
    assert t.n_cores >= 1
    online = parse_cpulist(open("/sys/devices/system/cpu/online").read())
    assert t.allowed_cpus == frozenset(os.sched_getaffinity(0)) & online
    assert {c for core in t.cores for c in core.cpus} == t.allowed_cpus
    assert t.smt >= 1
    assert t.describe()
    json.dumps(t.to_dict())

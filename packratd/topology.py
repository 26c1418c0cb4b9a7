"""CPU topology of the host, read from sysfs.

packratd owns the host's cores and pins one worker process per model
instance, so it needs to know which logical CPUs belong to which physical
core, socket and NUMA node, and which of them this process may use.

Everything is read from a sysfs tree (``sysfs_root``, normally ``/sys``) so
that tests can point it at a fake tree::

    <root>/devices/system/cpu/online              "0-3,8,10-11"
    <root>/devices/system/cpu/present             (optional)
    <root>/devices/system/cpu/cpuN/online         "0"/"1" (absent for cpu0 on many hosts)
    <root>/devices/system/cpu/cpuN/topology/physical_package_id
    <root>/devices/system/cpu/cpuN/topology/core_id
    <root>/devices/system/cpu/cpuN/topology/core_cpus_list      (newer name)
    <root>/devices/system/cpu/cpuN/topology/thread_siblings_list (older name)
    <root>/devices/system/cpu/cpuN/nodeM          (link, alternative node source)
    <root>/devices/system/node/nodeM/cpulist

Physical cores are identified by their sibling sets (``core_cpus_list`` /
``thread_siblings_list``), not by ``core_id``: ``core_id`` is only unique
within a package (and not even contiguous).

Pure standard library; no torch import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

__all__ = [
    "Core",
    "Topology",
    "TopologyError",
    "read_topology",
    "read_cpu_flags",
    "parse_cpulist",
    "format_cpulist",
]


class TopologyError(Exception):
    """The CPU layout could not be read, or leaves no CPU to run on."""


# --------------------------------------------------------------------------
# cpulist syntax
# --------------------------------------------------------------------------

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+)/(\d+))?)?$")


def parse_cpulist(s: str) -> set[int]:
    """Parse the kernel's cpulist syntax: ``"0-3,8,10-11"`` -> {0,1,2,3,8,10,11}.

    Accepts surrounding whitespace/newlines, an empty string (empty set),
    blanks around items, and the kernel's strided form ``"0-15:2/4"``
    (in each group of 4 starting at 0, take the first 2).  Raises
    ValueError on anything else.
    """
    if s is None:
        raise ValueError("cpulist is None")
    text = s.strip()
    out: set[int] = set()
    if not text:
        return out
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            # "0-3,,5" or a trailing comma: tolerate, the kernel never writes it
            continue
        m = _RANGE_RE.match(item)
        if not m:
            raise ValueError(f"bad cpulist item {item!r} in {s.strip()!r}")
        lo = int(m.group(1))
        if m.group(2) is None:
            out.add(lo)
            continue
        hi = int(m.group(2))
        if hi < lo:
            raise ValueError(f"bad cpulist range {item!r} in {s.strip()!r}: end < start")
        if m.group(3) is None:
            out.update(range(lo, hi + 1))
            continue
        used, group = int(m.group(3)), int(m.group(4))
        if group == 0 or used == 0 or used > group:
            raise ValueError(f"bad cpulist stride {item!r} in {s.strip()!r}")
        for base in range(lo, hi + 1, group):
            out.update(c for c in range(base, min(base + used, hi + 1)))
    return out


def format_cpulist(cpus: Iterable[int]) -> str:
    """Inverse of :func:`parse_cpulist`: {0,1,2,3,8,10,11} -> ``"0-3,8,10-11"``."""
    vals = sorted(set(int(c) for c in cpus))
    if any(v < 0 for v in vals):
        raise ValueError(f"negative cpu number in {vals}")
    parts: list[str] = []
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(parts)


# --------------------------------------------------------------------------
# data model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Core:
    """One physical core.

    ``cpus`` are its logical CPUs that are online AND allowed by the affinity
    mask, sorted; ``cpus[0]`` is the primary one.
    """

    socket: int
    node: int
    core_id: int
    cpus: tuple[int, ...]

    @property
    def primary(self) -> int:
        return self.cpus[0]

    def to_dict(self) -> dict:
        return {
            "socket": self.socket,
            "node": self.node,
            "core_id": self.core_id,
            "cpus": list(self.cpus),
        }


@dataclass(frozen=True)
class Topology:
    cores: tuple[Core, ...]
    allowed_cpus: frozenset[int]
    offline_cpus: frozenset[int] = frozenset()
    excluded_cpus: frozenset[int] = frozenset()
    cpu_model: str = "unknown"
    warnings: tuple[str, ...] = ()
    cpu_flags: tuple[str, ...] = ()     # /proc/cpuinfo "flags" (x86) / "Features" (ARM), sorted; () = unknown

    # -- derived views -------------------------------------------------------

    @property
    def sockets(self) -> tuple[int, ...]:
        return tuple(sorted({c.socket for c in self.cores}))

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(sorted({c.node for c in self.cores}))

    def cores_by_node(self) -> dict[int, tuple[Core, ...]]:
        groups: dict[int, list[Core]] = defaultdict(list)
        for c in self.cores:
            groups[c.node].append(c)
        return {n: tuple(groups[n]) for n in sorted(groups)}

    def cores_by_socket(self) -> dict[int, tuple[Core, ...]]:
        groups: dict[int, list[Core]] = defaultdict(list)
        for c in self.cores:
            groups[c.socket].append(c)
        return {s: tuple(groups[s]) for s in sorted(groups)}

    def node_sockets(self) -> dict[int, tuple[int, ...]]:
        """node -> sorted sockets its usable cores sit on (normally one)."""
        m: dict[int, set[int]] = defaultdict(set)
        for c in self.cores:
            m[c.node].add(c.socket)
        return {n: tuple(sorted(m[n])) for n in sorted(m)}

    @property
    def n_cores(self) -> int:
        return len(self.cores)

    @property
    def n_cpus(self) -> int:
        """Usable logical CPUs (sum over usable cores)."""
        return sum(len(c.cpus) for c in self.cores)

    @property
    def smt(self) -> int:
        """Max usable logical CPUs per core (1 = no SMT / SMT not usable)."""
        return max((len(c.cpus) for c in self.cores), default=0)

    def core_of(self, cpu: int) -> Core | None:
        for c in self.cores:
            if cpu in c.cpus:
                return c
        return None

    # -- output --------------------------------------------------------------

    def describe(self) -> str:
        ns = len(self.sockets)
        nn = len(self.nodes)
        lines = [
            f"{self.cpu_model}: {ns} socket{'s' if ns != 1 else ''}, "
            f"{nn} NUMA node{'s' if nn != 1 else ''}, {self.n_cores} usable core"
            f"{'s' if self.n_cores != 1 else ''}, {self.n_cpus} usable cpu"
            f"{'s' if self.n_cpus != 1 else ''} (SMT {self.smt})"
        ]
        for node, cores in self.cores_by_node().items():
            socks = sorted({c.socket for c in cores})
            cpus = [x for c in cores for x in c.cpus]
            lines.append(
                f"  node {node} (socket {','.join(map(str, socks))}): "
                f"{len(cores)} cores, cpus {format_cpulist(cpus)}"
            )
        if self.excluded_cpus:
            lines.append(f"  excluded by affinity mask: cpus {format_cpulist(self.excluded_cpus)}")
        if self.offline_cpus:
            lines.append(f"  offline: cpus {format_cpulist(self.offline_cpus)}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "cpu_model": self.cpu_model,
            "sockets": list(self.sockets),
            "nodes": list(self.nodes),
            "n_cores": self.n_cores,
            "n_cpus": self.n_cpus,
            "smt": self.smt,
            "cores": [c.to_dict() for c in self.cores],
            "allowed_cpus": format_cpulist(self.allowed_cpus),
            "offline_cpus": format_cpulist(self.offline_cpus),
            "excluded_cpus": format_cpulist(self.excluded_cpus),
            "warnings": list(self.warnings),
            "fingerprint": self.fingerprint(),
            "shape": self.shape(),
            "shape_fingerprint": self.shape_fingerprint(),
        }

    def fingerprint(self) -> str:
        """Stable hash of the usable layout (model, sockets, nodes, cores, cpus).

        Two hosts (or two runs) with the same CPU model and the same usable
        cores get the same fingerprint; it changes when cores go offline or
        the affinity mask changes.  Suitable for cache keys.
        """
        canon = {
            "cpu_model": self.cpu_model,
            "cores": [[c.socket, c.node, c.core_id, list(c.cpus)] for c in self.cores],
        }
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def shape(self) -> list[list[list[int]]]:
        """The usable layout up to renaming CPUs, cores, nodes and sockets: for each socket, for each
        of its NUMA nodes, the number of usable logical CPUs (SMT siblings) of each core, all sorted.

        Two CPU sets with the same shape offer the same placements: ``placement`` keeps an instance
        inside one node and gives it whole cores, so what a plan can use is exactly how many cores each
        node has, how many threads each core runs, and which nodes share a socket.  Which CPU ids they
        carry does not matter.  ``[[[2, 2], [2, 2, 2]]]``: one socket with two nodes, of two and of
        three cores, each core with two usable SMT threads."""
        per_socket: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for c in self.cores:
            per_socket[c.socket][c.node].append(len(c.cpus))
        return sorted(sorted(sorted(cores) for cores in nodes.values()) for nodes in per_socket.values())

    def shape_fingerprint(self) -> str:
        """Stable hash of the layout's :meth:`shape`, the CPU model and the CPU flags, but not of the
        CPU ids: a profile measured on cpus 0-3 holds on cpus 8-11 of the same node layout on the same
        machine type (a pod rescheduled onto other cores, another host of the same node pool), and it
        does not hold when the SMT, the NUMA layout, the CPU model or its instruction set differ.
        Suitable for the profile cache key.  :meth:`fingerprint` is the exact-id variant."""
        canon = {"shape": self.shape(), "cpu_model": self.cpu_model, "cpu_flags": list(self.cpu_flags)}
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------
# reading sysfs
# --------------------------------------------------------------------------

_CPU_DIR_RE = re.compile(r"^cpu(\d+)$")
_NODE_DIR_RE = re.compile(r"^node(\d+)$")


def _read(path: str) -> str | None:
    try:
        with open(path, "r", encoding="ascii", errors="replace") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _read_int(path: str) -> int | None:
    s = _read(path)
    if s is None:
        return None
    try:
        return int(s.strip())
    except ValueError:
        return None


def _read_cpulist(path: str) -> set[int] | None:
    s = _read(path)
    if s is None:
        return None
    try:
        return parse_cpulist(s)
    except ValueError:
        return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def read_cpu_model(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """CPU model name from /proc/cpuinfo, or "unknown"."""
    text = _read(cpuinfo_path)
    if not text:
        return "unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        k, _, v = line.partition(":")
        k, v = k.strip().lower(), v.strip()
        if k and v and k not in fields:
            fields[k] = v
    # x86: "model name"; POWER: "cpu"; some ARM: "Processor"/"Hardware"; RISC-V: "uarch"
    for key in ("model name", "cpu", "processor name", "hardware", "uarch", "cpu model"):
        if key in fields:
            return fields[key]
    if "cpu implementer" in fields and "cpu part" in fields:
        return f"arm implementer {fields['cpu implementer']} part {fields['cpu part']}"
    return "unknown"


def read_cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The CPU's feature flags from /proc/cpuinfo, sorted: x86 "flags", ARM "Features", RISC-V "isa".

    Only the flags every listed processor has (they agree on real hosts; a VM may differ per vCPU),
    so the set does not depend on which CPUs this process may use.  () when none are listed."""
    text = _read(cpuinfo_path)
    if not text:
        return ()
    common: set[str] | None = None
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip().lower() in ("flags", "features", "isa"):
            flags = set(v.split())
            common = flags if common is None else common & flags
    return tuple(sorted(common)) if common else ()


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra


def read_topology(
    sysfs_root: str = "/sys",
    allowed: set[int] | frozenset[int] | None = None,
    cpuinfo_path: str = "/proc/cpuinfo",
) -> Topology:
    """Read the usable CPU layout.

    ``allowed`` is the affinity mask to respect; None means this process's
    own mask (``os.sched_getaffinity(0)``).  Raises TopologyError when the
    tree is unreadable or no CPU is both online and allowed.
    """
    warnings: list[str] = []
    cpu_root = os.path.join(sysfs_root, "devices", "system", "cpu")
    node_root = os.path.join(sysfs_root, "devices", "system", "node")
    if not os.path.isdir(cpu_root):
        raise TopologyError(f"cannot read CPU layout: {cpu_root} is not a directory")

    cpu_dirs = {
        int(m.group(1))
        for name in _listdir(cpu_root)
        if (m := _CPU_DIR_RE.match(name)) and os.path.isdir(os.path.join(cpu_root, name))
    }

    # ---- online set ---------------------------------------------------------
    online = _read_cpulist(os.path.join(cpu_root, "online"))
    if online is None:
        # fall back to per-cpu online files; a cpu without one (cpu0) counts as online
        base = _read_cpulist(os.path.join(cpu_root, "present")) or set(cpu_dirs)
        online = set()
        for c in base:
            flag = _read(os.path.join(cpu_root, f"cpu{c}", "online"))
            if flag is None or flag.strip() != "0":
                online.add(c)
        warnings.append(
            f"{os.path.join(cpu_root, 'online')} unreadable; derived online cpus "
            f"{format_cpulist(online) or '(none)'} from per-cpu online files"
        )
    else:
        # cross-check per-cpu flags: a cpu whose own online file says 0 is offline
        for c in sorted(online):
            flag = _read(os.path.join(cpu_root, f"cpu{c}", "online"))
            if flag is not None and flag.strip() == "0":
                online.discard(c)
                warnings.append(f"cpu{c} is listed online but cpu{c}/online says 0; treating it as offline")

    present = _read_cpulist(os.path.join(cpu_root, "present"))
    known = (present if present is not None else set()) | cpu_dirs | online
    offline = known - online
    if offline:
        warnings.append(f"cpu(s) {format_cpulist(offline)} offline and skipped")

    # ---- affinity -----------------------------------------------------------
    if allowed is None:
        try:
            mask = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - non-Linux
            mask = set(online)
    else:
        mask = {int(c) for c in allowed}
    allowed_cpus = online & mask
    excluded = online - mask
    if not allowed_cpus:
        raise TopologyError(
            f"no usable CPU: affinity mask {format_cpulist(mask) or '(empty)'} "
            f"has no overlap with online cpus {format_cpulist(online) or '(none)'}"
        )
    if excluded:
        warnings.append(f"cpu(s) {format_cpulist(excluded)} online but excluded by the affinity mask")

    # ---- per-cpu topology ---------------------------------------------------
    package: dict[int, int] = {}
    core_ids: dict[int, int] = {}
    uf = _UnionFind()
    no_topo: list[int] = []
    no_siblings: list[int] = []
    for c in sorted(online):
        uf.find(c)
        tdir = os.path.join(cpu_root, f"cpu{c}", "topology")
        pkg = _read_int(os.path.join(tdir, "physical_package_id"))
        cid = _read_int(os.path.join(tdir, "core_id"))
        sib = _read_cpulist(os.path.join(tdir, "core_cpus_list"))
        if sib is None:
            sib = _read_cpulist(os.path.join(tdir, "thread_siblings_list"))
        if pkg is None and cid is None and sib is None:
            no_topo.append(c)
            continue
        if pkg is not None and pkg >= 0:
            package[c] = pkg
        if cid is not None and cid >= 0:
            core_ids[c] = cid
        if sib is None:
            no_siblings.append(c)
        else:
            for s in sib & online:
                uf.union(c, s)
    if no_topo:
        warnings.append(
            f"cpu(s) {format_cpulist(no_topo)} have no topology files under "
            f"{cpu_root}/cpuN/topology; treating each as its own core"
        )
    if no_siblings:
        # group these by (package, core_id) when both are known
        by_key: dict[tuple[int, int], list[int]] = defaultdict(list)
        for c in no_siblings:
            if c in package and c in core_ids:
                by_key[(package[c], core_ids[c])].append(c)
        for members in by_key.values():
            for m in members[1:]:
                uf.union(members[0], m)
        warnings.append(
            f"cpu(s) {format_cpulist(no_siblings)} have no core_cpus_list/thread_siblings_list; "
            f"grouped into cores by (physical_package_id, core_id)"
        )

    # ---- NUMA nodes ---------------------------------------------------------
    node_of: dict[int, int] = {}
    node_dirs: list[int] = []
    if os.path.isdir(node_root):
        node_dirs = sorted(
            int(m.group(1)) for name in _listdir(node_root) if (m := _NODE_DIR_RE.match(name))
        )
    if not node_dirs:
        warnings.append(f"no NUMA node information ({node_root} missing or empty); treating all cpus as node 0")
        node_of = {c: 0 for c in online}
    else:
        for n in node_dirs:
            cl = _read_cpulist(os.path.join(node_root, f"node{n}", "cpulist"))
            if cl is None:
                warnings.append(f"{node_root}/node{n}/cpulist unreadable")
                continue
            for c in cl:
                if c in node_of and node_of[c] != n:
                    warnings.append(f"cpu{c} is listed in node{node_of[c]} and node{n}; using node{node_of[c]}")
                    continue
                node_of[c] = n
        orphans = sorted(c for c in online if c not in node_of)
        for c in orphans:
            # alternative source: cpuN/nodeM links
            links = sorted(
                int(m.group(1))
                for name in _listdir(os.path.join(cpu_root, f"cpu{c}"))
                if (m := _NODE_DIR_RE.match(name))
            )
            if links:
                node_of[c] = links[0]
                continue
            # otherwise borrow the node of a sibling, then of the package, else node 0
            root = uf.find(c)
            guess = next((node_of[o] for o in sorted(online) if o in node_of and uf.find(o) == root), None)
            how = "its core's siblings"
            if guess is None and c in package:
                # nearest-numbered cpu of the same package with a known node
                same = [o for o in online if o in node_of and package.get(o) == package[c]]
                if same:
                    near = min(same, key=lambda o: (abs(o - c), o))
                    guess = node_of[near]
                    how = f"like cpu{near}, the nearest cpu of package {package[c]}"
            if guess is None:
                guess, how = min(node_dirs), "default"
            node_of[c] = guess
            warnings.append(f"cpu{c} is in no NUMA node's cpulist; assuming node {guess} ({how})")

    # ---- assemble cores -----------------------------------------------------
    groups: dict[int, list[int]] = defaultdict(list)
    for c in sorted(online):
        groups[uf.find(c)].append(c)

    raw: list[tuple[list[int], list[int]]] = []  # (all online cpus, allowed cpus)
    for members in groups.values():
        members.sort()
        ok = [c for c in members if c in allowed_cpus]
        raw.append((members, ok))

    used_ids: dict[int, set[int]] = defaultdict(set)
    for members, _ in raw:
        for c in members:
            if c in core_ids and c in package:
                used_ids[package[c]].add(core_ids[c])

    cores: list[Core] = []
    for members, ok in sorted(raw, key=lambda r: r[0]):
        first = members[0]
        pkgs = {package[c] for c in members if c in package}
        sock = min(pkgs) if pkgs else 0
        if len(pkgs) > 1:
            warnings.append(f"core with cpus {format_cpulist(members)} spans packages {sorted(pkgs)}; using {sock}")
        ids = {core_ids[c] for c in members if c in core_ids}
        if ids:
            cid = min(ids)
        else:
            cid = first
            while cid in used_ids[sock]:
                cid += 1
            used_ids[sock].add(cid)
        if not ok:
            continue  # every cpu of this core is excluded
        nodes = {node_of.get(c, 0) for c in ok}
        node = node_of.get(ok[0], 0)
        if len(nodes) > 1:
            warnings.append(f"core with cpus {format_cpulist(ok)} spans nodes {sorted(nodes)}; using node {node}")
        if len(ok) < len(members):
            warnings.append(
                f"core {cid} on socket {sock} (cpus {format_cpulist(members)}): sibling cpus "
                f"{format_cpulist(set(members) - set(ok))} excluded by the affinity mask; "
                f"using only cpus {format_cpulist(ok)}"
            )
        cores.append(Core(socket=sock, node=node, core_id=cid, cpus=tuple(ok)))

    cores.sort(key=lambda k: (k.node, k.socket, k.core_id, k.cpus))

    return Topology(
        cores=tuple(cores),
        allowed_cpus=frozenset(allowed_cpus),
        offline_cpus=frozenset(offline),
        excluded_cpus=frozenset(excluded),
        cpu_model=read_cpu_model(cpuinfo_path),
        warnings=tuple(warnings),
        cpu_flags=read_cpu_flags(cpuinfo_path),
    )

"""Place model instances on physical cores.

A *plan* (packratd.plan) is a sequence of :class:`InstanceSpec` (threads, batch share).  ``place``
gives every instance its own disjoint set of physical cores -- two instances
never share a core, not even through SMT siblings -- and keeps each instance
inside one NUMA node whenever its size fits in a node.

Sizes: by default one thread per physical core (``threads`` cores, pinned to
each core's primary cpu).  With ``use_smt=True`` an instance of ``t`` threads
takes ``ceil(t / siblings)`` whole cores and uses ``t`` of their logical cpus
(primaries first, then second threads, ...).

Packing: instances that fit in a node are packed into nodes best-fit
decreasing; when the greedy pass fails, a memoised backtracking search over
node assignments finds a packing whenever one exists (exact when all usable
cores have the same number of cpus, which is the normal case).  Instances
larger than every node then span nodes, using the fewest nodes and
preferring contiguous nodes of one socket.  Within a node, cores of one
instance are taken as a contiguous run where possible.

Pure standard library; no torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

from .plan import InstanceSpec, format_plan, parse_plan  # noqa: F401  (re-exported)
from .topology import Core, Topology, format_cpulist

__all__ = [
    "InstanceSpec",
    "Placement",
    "PlacementError",
    "place",
    "parse_plan",
    "format_plan",
]

SEARCH_LIMIT = 200_000  # backtracking steps before giving up


class PlacementError(ValueError):
    """The plan cannot be placed on the usable cores."""


@dataclass(frozen=True)
class Placement:
    index: int  # position in the plan
    spec: InstanceSpec
    cpus: tuple[int, ...]  # sorted logical cpus to pin the worker to
    cores: tuple[Core, ...]  # the physical cores it owns, in topology order
    node: int  # the NUMA node, or -1 if it spans nodes

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "threads": self.spec.threads,
            "batch": self.spec.batch,
            "cpus": format_cpulist(self.cpus),
            "node": self.node,
            "cores": [c.to_dict() for c in self.cores],
        }


# --------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------


class _Node:
    """Free-core bookkeeping for one NUMA node."""

    def __init__(self, node: int, cores: tuple[Core, ...], use_smt: bool):
        self.node = node
        self.cores = cores
        self.cap = [len(c.cpus) if use_smt else 1 for c in cores]
        self.free: set[int] = set(range(len(cores)))

    def free_cap(self) -> int:
        return sum(self.cap[i] for i in self.free)

    def runs(self) -> list[list[int]]:
        out: list[list[int]] = []
        for i in range(len(self.cores)):
            if i in self.free:
                if out and out[-1][-1] == i - 1:
                    out[-1].append(i)
                else:
                    out.append([i])
        return out

    def choose(self, need: int) -> list[int]:
        """Free core indices with capacity >= need (all free ones if need is
        more than what is free), using as few cores as possible: a contiguous
        window inside the smallest run of free cores that holds it, else the
        biggest cores of the largest runs first."""
        if need >= self.free_cap():
            return sorted(self.free)
        runs = self.runs()
        # fewest cores that can hold `need` (biggest cores first)
        k = len(_prefix(sorted(self.free, key=lambda i: -self.cap[i]), self.cap, need))
        best = None
        for r in runs:
            run_cap = sum(self.cap[i] for i in r)
            for s in range(len(r) - k + 1):
                w = r[s : s + k]
                if sum(self.cap[i] for i in w) >= need:
                    rank = (run_cap, w[0])
                    if best is None or rank < best[0]:
                        best = (rank, w)
                    break  # the first window of a run is the one to take
        if best is not None:
            return best[1]
        order = [i for r in sorted(runs, key=lambda r: (-len(r), r[0])) for i in r]
        order.sort(key=lambda i: -self.cap[i])  # stable: keeps run order among equals
        return sorted(_prefix(order, self.cap, need))


def _prefix(idxs: list[int], cap: list[int], need: int) -> list[int]:
    out, got = [], 0
    for i in idxs:
        if got >= need:
            break
        out.append(i)
        got += cap[i]
    return out


def _pick_cpus(cores: Sequence[Core], threads: int, use_smt: bool) -> tuple[int, ...]:
    if not use_smt:
        return tuple(sorted(c.cpus[0] for c in cores[:threads]))
    order: list[int] = []
    level = 0
    while len(order) < threads:
        row = [c.cpus[level] for c in cores if len(c.cpus) > level]
        if not row:
            break
        order.extend(row)
        level += 1
    return tuple(sorted(order[:threads]))


def place(plan: Sequence[InstanceSpec], topo: Topology, use_smt: bool = False) -> list[Placement]:
    """Give each instance of ``plan`` its own physical cores; see the module doc.

    Returns one :class:`Placement` per instance, in plan order.  Raises
    :class:`PlacementError` with the reason when the plan does not fit.
    """
    plan = list(plan)
    if not plan:
        raise PlacementError("plan is empty: nothing to place")
    for i, spec in enumerate(plan):
        if not isinstance(spec, InstanceSpec):
            try:
                plan[i] = InstanceSpec(*spec)
            except (TypeError, ValueError) as e:
                raise PlacementError(f"instance {i}: expected (threads, batch) ints >= 1, got {spec!r} ({e})") from None
    if not topo.cores:
        raise PlacementError("no usable cores in the topology")

    smt = topo.smt if use_smt else 1
    by_node = topo.cores_by_node()
    nodes = {n: _Node(n, cores, use_smt) for n, cores in by_node.items()}
    node_ids = list(topo.nodes)
    node_total = {n: nodes[n].free_cap() for n in node_ids}
    uniform = len({c for nd in nodes.values() for c in nd.cap}) == 1
    allowed = format_cpulist(c for core in topo.cores for c in core.cpus)

    # ---- global size check ----------------------------------------------------
    # (with uneven cores -- an affinity mask that splits SMT siblings -- this
    # is a lower bound, and the cpu count is checked as well)
    need_cores = sum(math.ceil(s.threads / smt) for s in plan)
    if need_cores > topo.n_cores:
        if use_smt and smt > 1:
            msg = (
                f"plan needs {need_cores} cores ({sum(s.threads for s in plan)} threads at up to "
                f"{smt} per core, whole cores per instance), only {topo.n_cores} usable (cpus {allowed})"
            )
        else:
            msg = f"plan needs {need_cores} cores, only {topo.n_cores} usable (cpus {allowed})"
            if topo.smt > 1:
                msg += f"; one thread per core -- use_smt=True would also use the {topo.smt}-way SMT siblings"
        raise PlacementError(msg)
    if not uniform:
        total_cap = sum(node_total.values())
        need_cap = sum(s.threads for s in plan)
        if need_cap > total_cap:
            raise PlacementError(
                f"plan needs {need_cap} cpus, only {total_cap} usable on {topo.n_cores} cores (cpus {allowed})"
            )

    max_node = max(node_total.values())
    local = [i for i, s in enumerate(plan) if s.threads <= max_node]
    spanning = [i for i, s in enumerate(plan) if s.threads > max_node]
    local.sort(key=lambda i: (-plan[i].threads, i))
    spanning.sort(key=lambda i: (-plan[i].threads, i))

    chosen: dict[int, list[Core]] = {}

    # ---- node-local instances: best-fit decreasing + backtracking ----------------
    first_fail: list[str] = []
    failed: set = set()
    steps = [0]

    def state_key(k: int):
        if uniform:
            return (k, tuple(sorted(len(nodes[n].free) for n in node_ids)))
        return (k, tuple(frozenset(nodes[n].free) for n in node_ids))

    def dfs(k: int) -> bool:
        if k == len(local):
            return True
        key = state_key(k)
        if key in failed:
            return False
        steps[0] += 1
        if steps[0] > SEARCH_LIMIT:
            raise _GaveUp()
        i = local[k]
        t = plan[i].threads
        cands = sorted((n for n in node_ids if nodes[n].free_cap() >= t), key=lambda n: (nodes[n].free_cap(), n))
        if not cands and not first_fail:
            free = {n: len(nodes[n].free) for n in node_ids}
            first_fail.append(
                f"instance {i} ({t} thread{'s' if t != 1 else ''}) does not fit in any NUMA node: "
                f"free cores per node {free}"
            )
        tried_caps: set[int] = set()
        for n in cands:
            fc = nodes[n].free_cap()
            if uniform and fc in tried_caps:
                continue  # same free size as a node already tried: same outcome
            tried_caps.add(fc)
            idx = nodes[n].choose(t)
            nodes[n].free.difference_update(idx)
            chosen[i] = [nodes[n].cores[j] for j in idx]
            if dfs(k + 1):
                return True
            nodes[n].free.update(idx)
            del chosen[i]
        failed.add(key)
        return False

    try:
        ok = dfs(0)
    except _GaveUp:
        raise PlacementError(
            f"gave up looking for a packing of {len(local)} instances into NUMA nodes "
            f"{ {n: len(by_node[n]) for n in node_ids} } after {SEARCH_LIMIT} steps; "
            f"use fewer or more equal-sized instances"
        ) from None
    if not ok:
        sizes = {n: len(by_node[n]) for n in node_ids}
        msg = first_fail[0] if first_fail else "no packing found"
        raise PlacementError(
            f"{msg}; no way to fit the {len(local)} instance(s) that must stay within one node "
            f"into nodes of {sizes} usable cores"
        )

    # ---- instances bigger than every node: span the fewest nodes ---------------
    sockets_of = topo.node_sockets()
    pos = {n: p for p, n in enumerate(node_ids)}
    for i in spanning:
        t = plan[i].threads
        avail = [n for n in node_ids if nodes[n].free]
        combo = _choose_nodes(avail, t, nodes, sockets_of, pos)
        if combo is None:
            free = {n: len(nodes[n].free) for n in node_ids}
            raise PlacementError(
                f"instance {i} ({t} threads) is larger than every NUMA node "
                f"(node sizes {node_total}) and the free cores left across nodes {free} "
                f"do not hold it"
            )
        remaining = t
        picked: list[Core] = []
        for n in sorted(combo, key=lambda n: (-nodes[n].free_cap(), pos[n])):
            if remaining <= 0:
                break
            idx = nodes[n].choose(min(remaining, nodes[n].free_cap()))
            remaining -= sum(nodes[n].cap[j] for j in idx)
            nodes[n].free.difference_update(idx)
            picked.extend(nodes[n].cores[j] for j in idx)
        chosen[i] = picked

    # ---- assemble ------------------------------------------------------------------
    order = {id(c): p for p, c in enumerate(topo.cores)}
    out: list[Placement] = []
    for i, spec in enumerate(plan):
        cores = sorted(chosen[i], key=lambda c: order[id(c)])
        cpus = _pick_cpus(cores, spec.threads, use_smt)
        if len(cpus) != spec.threads:  # pragma: no cover - internal invariant
            raise PlacementError(f"internal error: instance {i} got cpus {cpus} for {spec.threads} threads")
        node_set = {c.node for c in cores}
        out.append(
            Placement(
                index=i,
                spec=spec,
                cpus=cpus,
                cores=tuple(cores),
                node=node_set.pop() if len(node_set) == 1 else -1,
            )
        )
    return out


class _GaveUp(Exception):
    pass


def _choose_nodes(avail, need, nodes, sockets_of, pos):
    """Fewest nodes whose free capacity holds ``need``; among those prefer one
    socket + contiguous node ids, then contiguous, then one socket, then the
    tightest fit."""
    if len(avail) > 12:  # too many to enumerate: greedy, largest free first
        got, combo = 0, []
        for n in sorted(avail, key=lambda n: (-nodes[n].free_cap(), pos[n])):
            combo.append(n)
            got += nodes[n].free_cap()
            if got >= need:
                return tuple(combo)
        return None
    for m in range(1, len(avail) + 1):
        best = None
        for combo in combinations(avail, m):
            cap = sum(nodes[n].free_cap() for n in combo)
            if cap < need:
                continue
            ps = sorted(pos[n] for n in combo)
            contiguous = ps[-1] - ps[0] == len(ps) - 1
            socks = {s for n in combo for s in sockets_of.get(n, ())}
            one_socket = len(socks) == 1
            rank = (not (one_socket and contiguous), not contiguous, not one_socket, cap - need, ps)
            if best is None or rank < best[0]:
                best = (rank, combo)
        if best is not None:
            return best[1]
    return None

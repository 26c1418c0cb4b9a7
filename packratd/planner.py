"""Plan choice: which instances to run, and how to split each batch across the live ones.

Pure functions over a latency table and a topology (no processes, no sockets):

* :func:`choose` solves for a batch size (packratd.solver), keeps the plans that fit the NUMA layout
  (packratd.placement), always offers the single fat instance among the candidates and keeps it on a
  near tie (``autotune.split_margin``).  The autotuner measures those candidates concurrently before
  it commits (profiler.check_candidates); a reconfiguration for another batch size takes the
  prediction.
* :class:`Splitter` splits every batch optimally across whatever instances are live
  (solver.split_table, one pass for every batch size), falling back to the plan's shares
  (:func:`proportional_split`) when there is no profile.

The heavy calls (solving, the monitor's scoring) run in a child process (packratd.offload) so the
daemon's main loop never waits on them; :class:`Choice` and everything here pickles.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

from .placement import PlacementError, place
from .plan import Plan
from .solver import LatencyTable, Solution, solve, split_batch, split_table

log = logging.getLogger("packratd.planner")


def total_threads(topo, use_smt: bool) -> int:
    """Threads a plan may use on this topology: one per physical core, or every SMT sibling."""
    return topo.n_cores * (max(1, topo.smt) if use_smt else 1)


def placeable(plans: Sequence[Plan], topo, use_smt: bool) -> list[Plan]:
    ok = []
    for p in plans:
        try:
            place(p.instances, topo, use_smt=use_smt)
            ok.append(p)
        except PlacementError:
            continue
    return ok


def prefer_fat(scored: list[tuple[Plan, float]], fat: Plan | None, margin: float) -> tuple[Plan, float]:
    """The lowest-latency (plan, ms), except that the single fat instance is kept unless another plan
    beats it by more than ``margin``: co-location interference and gathering slices from several
    workers cost something no isolated profile shows, so a near tie goes to one instance."""
    best = min(scored, key=lambda pm: pm[1])
    if fat is None or best[0].shape == fat.shape:
        return best
    fat_entry = next((pm for pm in scored if pm[0].shape == fat.shape), None)
    if fat_entry is not None and best[1] > fat_entry[1] * (1 - margin):
        return fat_entry
    return best


def candidate_plans(sol: Solution, topo, use_smt: bool, n: int) -> list[Plan]:
    """The solver's best plans that fit the NUMA layout, best first, the fat instance always among them."""
    plans = placeable([sol.best, *sol.runners_up], topo, use_smt)
    n = max(1, n)
    fat = [p for p in plans if sol.fat is not None and p.shape == sol.fat.shape]
    rest = [p for p in plans if p not in fat]
    return (rest[:n - 1] + fat + rest[n - 1:])[:n] if fat and n > 1 else plans[:n]


@dataclass(frozen=True)
class Choice:
    best: Plan                    # the plan to run (prediction in best.latency_ms)
    candidates: tuple[Plan, ...]  # what the interference check should measure, best first
    fat: Plan | None              # the single fat instance, when usable


def choose(table: LatencyTable, topo, batch_size: int, use_smt: bool, candidates: int, split_margin: float) -> Choice:
    """Best placeable plan for ``batch_size`` by prediction.  Raises ValueError when none fits."""
    T = total_threads(topo, use_smt)
    if T < 1:
        raise ValueError("no usable cores")
    sol = solve(table, T, int(batch_size), top_k=max(2, candidates))
    plans = candidate_plans(sol, topo, use_smt, candidates)
    if not plans:
        raise ValueError(f"no plan for batch {batch_size} fits the cores' NUMA layout")
    best, _ = prefer_fat([(p, p.latency_ms) for p in plans], sol.fat, split_margin)
    return Choice(best, tuple(plans), sol.fat)


def explain(table: LatencyTable, topo, batch_size: int, use_smt: bool, top_k: int = 4) -> dict:
    """What ``packratctl plan`` shows: the solver's best plan and runners-up for a batch size."""
    sol = solve(table, total_threads(topo, use_smt), int(batch_size), top_k=top_k)
    fits = {p.instances for p in placeable(sol.plans, topo, use_smt)}
    return {"batch_size": int(batch_size), "best": str(sol.best), "predicted_ms": sol.best.latency_ms,
            "best_instances": [list(i) for i in sol.best.instances], "fits_numa": sol.best.instances in fits,
            "runners_up": [{"plan": str(p), "predicted_ms": p.latency_ms, "fits_numa": p.instances in fits}
                           for p in sol.runners_up]}


def predict(table: LatencyTable | None, plan: Plan, batch_size: int) -> float | None:
    """Predicted latency of a batch split optimally over the plan's instances (None without a profile)."""
    if table is None:
        return None
    try:
        return split_batch(table, list(plan.threads), batch_size)[1]
    except ValueError:
        return None


def proportional_split(n: int, workers: Sequence) -> list[int]:
    """Split n rows across workers in proportion to their planned shares (largest remainder).

    With fewer rows than workers, the workers with the largest shares (then most threads) get one row each."""
    k = len(workers)
    if n <= 0 or k == 0:
        return [0] * k
    order = sorted(range(k), key=lambda i: (-workers[i].share, -workers[i].threads, i))
    if n < k:
        out = [0] * k
        for i in order[:n]:
            out[i] = 1
        return out
    total = sum(max(1, w.share) for w in workers)
    exact = [n * max(1, w.share) / total for w in workers]
    out = [int(x) for x in exact]
    rest = n - sum(out)
    rank = {i: r for r, i in enumerate(order)}
    for i in sorted(range(k), key=lambda i: (-(exact[i] - out[i]), rank[i]))[:rest]:
        out[i] += 1
    return out


class Splitter:
    """Per-batch optimal split for whatever set of instances is live (their thread counts).

    The split table for a set of thread counts is computed once (every batch size up to
    ``max_batch`` in one pass) and cached; without a profile, or when the profile cannot split over
    these instances, batches are split by the plan's shares."""

    def __init__(self, table: LatencyTable | None, max_batch: int):
        self.table = table
        self.max_batch = max_batch
        self.cache: dict[tuple, list | None] = {}

    def __call__(self, n: int, workers: Sequence) -> list[int]:
        if self.table is None:
            return proportional_split(n, workers)
        key = tuple(w.threads for w in workers)
        tab = self.cache.get(key, False)
        if tab is False:
            try:
                tab = split_table(self.table, list(key), self.max_batch)
            except ValueError as e:
                log.warning("profile cannot split batches over %s (%s); splitting by plan shares", key, e)
                tab = None
            self.cache[key] = tab
        if tab is None or n >= len(tab):
            return proportional_split(n, workers)
        return list(tab[n])


class Planner:
    """The daemon's plan state: the profile in use, the cores in service, and the solver off the loop.

    Heavy calls return an offload.Job the main loop polls; the cheap ones (the per-batch split table
    for the live instances, a prediction) run inline."""

    def __init__(self, cfg, topology, offloader):
        self.cfg = cfg
        self.topology = topology
        self.offloader = offloader
        self.table: LatencyTable | None = None
        self.profile: dict | None = None
        self.out_of_service: set[int] = set()

    def set_profile(self, rec: dict | None, table: LatencyTable | None) -> None:
        self.profile, self.table = rec, table

    # ---- cores ---------------------------------------------------------------------------
    def topo(self):
        """The topology without the cores taken out of service (a core goes whole, SMT siblings included)."""
        if not self.out_of_service:
            return self.topology
        bad = self.out_of_service
        cores = tuple(c for c in self.topology.cores if not set(c.cpus) & bad)
        return dataclasses.replace(self.topology, cores=cores,
                                   allowed_cpus=frozenset(self.topology.allowed_cpus) - bad)

    def take_out_of_service(self, cpus) -> None:
        self.out_of_service |= set(cpus)

    def restore_cores(self) -> list[int]:
        back = sorted(self.out_of_service)
        self.out_of_service = set()
        return back

    @property
    def T(self) -> int:
        return total_threads(self.topo(), self.cfg["workers.use_smt"])

    # ---- plans ---------------------------------------------------------------------------
    def check_batch_size(self, batch_size) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError("batch size must be a positive integer")
        mb = self.cfg["server.max_batch_size"]
        if batch_size > mb:
            raise ValueError(f"batch size {batch_size} is larger than server.max_batch_size ({mb}); "
                             "no batch that large is ever formed")
        return batch_size

    def choose(self, batch_size: int, what: str = "solve"):
        """Job whose result is a :class:`Choice` for the batch size (on the cores in service)."""
        if self.table is None:
            raise ValueError("no profile to solve with; give a plan or profile first (packratctl profile --refresh)")
        c = self.cfg
        return self.offloader.submit("packratd.planner:choose", self.table, self.topo(), self.check_batch_size(batch_size),
                                     c["workers.use_smt"], c["autotune.candidates"], c["autotune.split_margin"],
                                     timeout_s=c["autotune.solver_timeout_s"], what=what)

    def explain(self, batch_size: int):
        if self.table is None:
            raise ValueError("no profile yet; run packratctl profile --refresh or wait for profiling to finish")
        return self.offloader.submit("packratd.planner:explain", self.table, self.topo(), self.check_batch_size(batch_size),
                                     self.cfg["workers.use_smt"], timeout_s=self.cfg["autotune.solver_timeout_s"],
                                     what=f"plan for batch {batch_size}")

    def score(self, current: tuple, hist: dict, kind: str):
        """Job whose result is the monitor's monitor.Score for the histogram."""
        return self.offloader.submit("packratd.monitor:score", self.table, self.T, tuple(current), dict(hist), kind,
                                     timeout_s=self.cfg["autotune.solver_timeout_s"], what="monitor evaluation")

    def placeable_on_cores(self, plan: Plan) -> bool:
        return bool(placeable([plan], self.topo(), self.cfg["workers.use_smt"]))

    def splitter(self) -> Splitter:
        return Splitter(self.table, self.cfg["server.max_batch_size"])

    def predict(self, plan: Plan, batch_size: int) -> float | None:
        return predict(self.table, plan, batch_size)

    def warmup_sizes(self, plan: Plan, observed: list[int]) -> dict[int, tuple[int, ...]]:
        """Per instance: the batch sizes it will see -- its share, and its slice of each observed batch size
        (at most 4 sizes, the most common first), so a new generation warms up only where it will run."""
        out = {i: {spec.batch} for i, spec in enumerate(plan.instances)}
        if self.table is not None and observed:
            try:
                tab = split_table(self.table, list(plan.threads), max(observed))
                for b in observed[:4]:
                    for i, r in enumerate(tab[b]):
                        if r > 0:
                            out[i].add(int(r))
            except ValueError:
                pass
        return {i: tuple(sorted(v))[:6] for i, v in out.items()}

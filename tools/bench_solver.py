#!/usr/bin/env python3
"""Time packratd.solver on synthetic, realistic latency tables.

    python tools/bench_solver.py [--out benchmarks/solver.json] [--repeats 3] [--seed 0]

For every T in {16, 64, 256} and B in {64, 256, 1024} it builds a profiled
LatencyTable with threads 1..T and a geometric batch grid 1,2,3,4,6,8,12,...
(up to B), filled with ``L[t][b] = a + c*b/t^0.7`` plus ~3% multiplicative
noise (so rows are not exactly monotone), and times ``solve(table, T, B)``
(including the table's densification).  It also times
``split_table`` with max_batch 1024 for 16 live instances (16 identical
4-thread instances, and 16 distinct thread counts 1..16) and for 64 live
instances with distinct thread counts 1..64.

Prints a table of the median of ``--repeats`` runs and writes a JSON list of
``{"op", "T", "B", "seconds", ...}`` records to ``--out``.  Timing is
informational only; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from packratd.solver import LatencyTable, solve, split_table  # noqa: E402

TS = (16, 64, 256)
BS = (64, 256, 1024)


def batch_grid(B: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x them), plus B."""
    grid = {B}
    x = 1
    while x <= B:
        grid.add(x)
        if 3 * x // 2 <= B and x >= 2:
            grid.add(3 * x // 2)
        x *= 2
    return sorted(grid)


def synthetic_table(T: int, B: int, seed: int) -> LatencyTable:
    rng = np.random.default_rng(seed)
    threads = list(range(1, T + 1))
    batches = batch_grid(B)
    t = np.array(threads, dtype=float)[:, None]
    b = np.array(batches, dtype=float)[None, :]
    a, c = 1.5, 0.9
    lat = (a + c * b / t**0.7) * (1 + 0.03 * rng.standard_normal((len(threads), len(batches))))
    return LatencyTable(threads, batches, np.maximum(lat, 0.01))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/solver.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    records = []
    print(f"{'op':<12}{'T':>5}{'B':>6}{'seconds':>10}  best plan")
    for T in TS:
        for B in BS:
            tab = synthetic_table(T, B, args.seed + T * 7919 + B)
            sec, sol = timed(lambda: solve(tab, T, B), args.repeats)
            records.append({"op": "solve", "T": T, "B": B, "seconds": sec})
            print(f"{'solve':<12}{T:>5}{B:>6}{sec:>10.4f}  {sol.best}")

    N = 1024
    tab = synthetic_table(64, N, args.seed + 1)
    cases = (("16x4t", [4] * 16), ("1..16t", list(range(1, 17))), ("1..64t", list(range(1, 65))))
    for name, threads in cases:
        sec, rows = timed(lambda: split_table(tab, threads, N), args.repeats)
        assert len(rows) == N + 1
        records.append(
            {
                "op": "split_table",
                "T": sum(threads),
                "B": N,
                "seconds": sec,
                "instances": len(threads),
                "threads": name,
            }
        )
        print(
            f"{'split_table':<12}{sum(threads):>5}{N:>6}{sec:>10.4f}  "
            f"{len(threads)} instances ({name}), max_batch {N}"
        )

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The one plan type and the one plan notation packratd uses everywhere.

A *plan* is a multiset of instances, each ``threads:batch`` (intra-op threads, and the instance's
planned share of a batch).  The notation is the same in the config (``workers.plan``), on the
command line (``packratd --plan``, ``packratctl reconfigure --plan``), in ``packratctl status`` and in
the log:

* ``"2x1:4"``     two instances of 1 thread, batch share 4 each;
* ``"4:16,2:8"``  one instance of 4 threads (share 16) and one of 2 threads (share 8);
* ``"2x1"``       two instances of 1 thread, share 1 each.

Identical consecutive instances are grouped when a plan is written (:func:`format_plan`), and
``parse_plan(format_plan(p)) == p``.  :class:`Plan` carries the instances (sorted as given) and,
when the solver produced it, its predicted batch latency; ``str(plan)`` is the notation and
:meth:`Plan.describe` adds the prediction.  Pure standard library.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

__all__ = ["InstanceSpec", "Plan", "parse_plan", "format_plan"]

MAX_INSTANCES = 4096


class _Spec(NamedTuple):
    threads: int
    batch: int


class InstanceSpec(_Spec):
    """One instance of a plan: ``threads`` intra-op threads, ``batch`` its planned share of a batch.

    A tuple, so ``InstanceSpec(2, 8) == (2, 8)``; both fields must be ints >= 1."""
    __slots__ = ()

    def __new__(cls, threads, batch):
        for name, v in (("threads", threads), ("batch", batch)):
            if isinstance(v, bool) or not isinstance(v, int):
                try:
                    import numpy as np  # solver results carry numpy ints
                    ok = isinstance(v, np.integer)
                except ImportError:  # pragma: no cover
                    ok = False
                if not ok:
                    raise ValueError(f"{name} must be an int, got {v!r}")
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        return super().__new__(cls, int(threads), int(batch))

    def __str__(self) -> str:
        return f"{self.threads}:{self.batch}"


@dataclass(frozen=True)
class Plan:
    """A multiset of instances; ``latency_ms`` is the solver's prediction (None when not predicted)."""

    instances: tuple[InstanceSpec, ...]
    latency_ms: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "instances", tuple(
            i if isinstance(i, InstanceSpec) else InstanceSpec(*i) for i in self.instances))

    @classmethod
    def of(cls, instances: Iterable, latency_ms: float | None = None) -> "Plan":
        return cls(tuple(instances), latency_ms)

    @classmethod
    def parse(cls, text: str) -> "Plan":
        return cls(tuple(parse_plan(text)))

    @property
    def n_instances(self) -> int:
        return len(self.instances)

    @property
    def threads(self) -> tuple[int, ...]:
        return tuple(i.threads for i in self.instances)

    @property
    def total_threads(self) -> int:
        return sum(self.threads)

    @property
    def total_batch(self) -> int:
        return sum(i.batch for i in self.instances)

    @property
    def shape(self) -> tuple[int, ...]:
        """The multiset of thread counts, descending: what a reconfiguration changes."""
        return tuple(sorted(self.threads, reverse=True))

    def same_instances(self, other: "Plan") -> bool:
        return sorted(self.instances) == sorted(other.instances)

    def __iter__(self):
        return iter(self.instances)

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, i):
        return self.instances[i]

    def __str__(self) -> str:
        return format_plan(self.instances) if self.instances else "<empty>"

    def describe(self) -> str:
        """The notation plus the prediction, e.g. ``2x1:4 (predicted 3.1 ms)``."""
        return str(self) + ("" if self.latency_ms is None else f" (predicted {self.latency_ms:.1f} ms)")


_ITEM_RE = re.compile(r"^(?:(\d+)\s*[xX]\s*)?(\d+)(?:\s*:\s*(\d+))?$")


def parse_plan(text: str) -> list[InstanceSpec]:
    """Parse the plan notation into instances.  Raises ValueError naming the bad item."""
    if not isinstance(text, str):
        raise ValueError(f"plan must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("empty plan")
    out: list[InstanceSpec] = []
    for pos, raw in enumerate(text.split(",")):
        item = raw.strip()
        m = _ITEM_RE.match(item)
        if not m:
            raise ValueError(
                f"bad plan item {item!r} (item {pos} of {text.strip()!r}); "
                f"expected THREADS[:BATCH] or COUNTxTHREADS[:BATCH], e.g. '2x1:4' or '1:8,2:8'"
            )
        count = int(m.group(1)) if m.group(1) is not None else 1
        threads = int(m.group(2))
        batch = int(m.group(3)) if m.group(3) is not None else 1
        if count < 1:
            raise ValueError(f"bad plan item {item!r}: instance count must be >= 1")
        if threads < 1:
            raise ValueError(f"bad plan item {item!r}: threads must be >= 1")
        if batch < 1:
            raise ValueError(f"bad plan item {item!r}: batch share must be >= 1")
        if count > MAX_INSTANCES or len(out) + count > MAX_INSTANCES:
            raise ValueError(f"bad plan item {item!r}: more than {MAX_INSTANCES} instances is not a sensible plan")
        out.extend(InstanceSpec(threads, batch) for _ in range(count))
    return out


def format_plan(plan: Sequence) -> str:
    """The notation for a sequence of instances (or a Plan); consecutive equal instances are grouped."""
    items = [i if isinstance(i, InstanceSpec) else InstanceSpec(*i) for i in plan]
    parts: list[str] = []
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[i]:
            j += 1
        n = j - i + 1
        parts.append(str(items[i]) if n == 1 else f"{n}x{items[i]}")
        i = j + 1
    return ",".join(parts)

"""Functions the planner-process tests run in packratd.offload's child (importable as tests.offload_jobs)."""
import time


def nap(seconds: float) -> float:
    if seconds < 0:
        raise ValueError("negative nap")
    time.sleep(seconds)
    return seconds

"""Timing shared by the benchmark scripts (run them from the repository root)."""
from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, args, runs: int) -> float:
    """Median seconds of `runs` calls of fn(*args) after one warm-up (compile) call, blocking
    on the results of every call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

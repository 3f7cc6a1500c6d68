"""Timing shared by the benchmark scripts (run them from the repository root).

Comparisons are interleaved: the candidates run in turn, A, B, A, B, ..., burst by burst, and a
row reports the median over bursts of the per-burst ratio. On a shared machine the load changes
from second to second; two candidates measured one after the other would each get a different
machine, while a burst of A and the next burst of B get nearly the same one. Every table prints
the CPU (train/hardware.py) and the load average before and after.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import statistics
import time
from typing import Any, Callable

from train.hardware import cpu_info, tune_host_allocator

# Benchmarks run with the host allocator the training CLI sets (train/hardware.py), before jax
# starts its threads: every script imports this module first.
tune_host_allocator()

import jax  # noqa: E402


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


def interleaved(calls: dict[str, Callable[[], Any]], bursts: int, per_burst: int) -> dict[str, list[float]]:
    """{name: fastest seconds of each burst}; the callables run in turn, burst by burst, after
    one warm-up call each. Every call blocks on its result."""
    for fn in calls.values():
        jax.block_until_ready(fn())
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(bursts):
        for name, fn in calls.items():
            best = math.inf
            for _ in range(per_burst):
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                best = min(best, time.perf_counter() - t0)
            out[name].append(best)
    return out


def ratio(times: dict[str, list[float]], num: str, den: str, scale: float = 1.0) -> float:
    """Median over bursts of scale * times[num] / times[den]."""
    return statistics.median(scale * a / b for a, b in zip(times[num], times[den]))


def ms(times: dict[str, list[float]], name: str) -> float:
    return 1e3 * statistics.median(times[name])


def cpu_model() -> str:
    """The CPU's model name, vector extensions, CPU and core count and clock."""
    info = cpu_info()
    return info.describe() if info else f"unknown CPU ({os.cpu_count()} CPUs)"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextlib.contextmanager
def table(title: str, bursts: int, calls: int):
    """Prints the title, CPU, jax version, time and load before the block, the load after."""
    print(f"\n## {title}\n{cpu_model()}; jax {jax.__version__}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"{bursts} bursts x {calls} calls; before: {load()}", flush=True)
    yield
    print(f"after: {load()}", flush=True)


def print_rows(head: list[str], body: list[list[str]]) -> None:
    """A markdown table, right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    row = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    print(row(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in body:
        print(row(r), flush=True)

"""Throughput accounting: model FLOPs per token and MFU against a peak-FLOPs table.

On accelerators the peak is the datasheet dense figure for the compute dtype. On CPU it is the
hardware's peak derived from the CPU's description (cores x clock x FMA width, train/hardware.py),
not a matmul measured at start-up: that measurement is as slow as the moment it is taken on a
shared machine. `measure_matmul_peak` stays for the benchmarks, which print XLA's own matmul
figure beside the hardware's.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from train.hardware import cpu_peak_flops

# Dense peak FLOP/s per device, by (device_kind substring, dtype). bf16 entries are the
# tensor-core / MXU figures without sparsity; float32 on GPUs uses TF32 tensor cores.
PEAK_FLOPS = {
    ("H200", "bfloat16"): 989e12, ("H100", "bfloat16"): 989e12, ("H100", "float32"): 494e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 156e12,
    ("L4", "bfloat16"): 121e12, ("A10", "bfloat16"): 125e12,
    ("TPU v6", "bfloat16"): 918e12, ("TPU v5p", "bfloat16"): 459e12,
    ("TPU v5 lite", "bfloat16"): 197e12, ("TPU v5e", "bfloat16"): 197e12,
    ("TPU v4", "bfloat16"): 275e12,
}


def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n x n matmul on the default device (blocking on every call)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def peak_flops(dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    dev = jax.devices()[0]
    name = jnp.dtype(dtype).name
    if dev.platform != "cpu":
        for (kind, dt), flops in PEAK_FLOPS.items():
            if kind.lower() in dev.device_kind.lower() and dt == name:
                return flops, f"table: {kind} {dt}"
    try:
        return cpu_peak_flops(name)
    except RuntimeError as err:  # not Linux: no CPU description to derive the peak from
        return measure_matmul_peak(dtype), f"measured {name} matmul on {dev.device_kind} ({err})"


class Throughput:
    """Tokens/s and MFU over the steps between two `report` calls."""

    def __init__(self, flops_per_token: float, peak: float, num_devices: int = 1):
        self.flops_per_token = flops_per_token
        self.peak = peak * num_devices
        self._t = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        tps = self._tokens / dt
        self._t, self._tokens = now, 0
        return {"tokens_per_s": tps, "mfu": tps * self.flops_per_token / self.peak}

    def restart(self) -> None:
        """Forget time spent outside training steps (eval, checkpoint waits, compilation)."""
        self._t, self._tokens = time.perf_counter(), 0

"""Time the attention implementations: forward and forward+backward, jit'd, median of a few runs.

    python benchmarks/attention.py [--runs 5] [--dtype float32] [--block-q 128] [--block-k 128]
                                   [--impls reference,xla] [--lengths 256,1024,2048,4096]

Prints one row per (shape, window) with the seconds of each implementation and the ratio
reference / xla (> 1: xla is faster). Reference runs whose [B, H, T, T] float32 scores would
exceed --max-dense-gib are left out ("-"). No asserts: this is for reading, not for CI.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention.api import attention
from timing import median_seconds  # benchmarks/timing.py

SHAPES = ((8, 4, 64), (1, 8, 64))  # (B, H, D); kv heads = H
WINDOWS = (None, 256)


def _functions(impl: str, window, block_q: int, block_k: int):
    """jit'd forward and forward+backward (value_and_grad of sum(out * w) w.r.t. q, k, v)."""
    def fwd(q, k, v, seg, pos):
        return attention(q, k, v, segment_ids=seg, positions=pos, window=window,
                         implementation=impl, block_q=block_q, block_k=block_k)

    def loss(q, k, v, seg, pos, w):
        return (fwd(q, k, v, seg, pos).astype(jnp.float32) * w).sum()

    return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _inputs(b: int, t: int, h: int, d: int, dtype):
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=(b, t, h, d)), dtype) for _ in range(4))
    seg = jnp.ones((b, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return q, k, v, seg, pos, w.astype(jnp.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-k", type=int, default=128)
    parser.add_argument("--impls", default="reference,xla")
    parser.add_argument("--lengths", default="256,1024,2048,4096")
    parser.add_argument("--max-dense-gib", type=float, default=1.0)
    args = parser.parse_args()
    impls = args.impls.split(",")
    lengths = [int(t) for t in args.lengths.split(",")]
    dtype = jnp.dtype(args.dtype)

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {args.dtype}, "
          f"blocks q={args.block_q} k={args.block_k}, median of {args.runs} (seconds)")
    cols = [f"{i} {m}" for m in ("fwd", "fwd+bwd") for i in impls]
    ratio = len(impls) == 2
    header = f"{'B':>2} {'H':>2} {'D':>3} {'T':>5} {'window':>6} | " + " | ".join(f"{c:>15}" for c in cols)
    if ratio:
        header += f" | {'fwd x':>6} | {'f+b x':>6}"
    print(header)
    print("-" * len(header))
    for b, h, d in SHAPES:
        for t in lengths:
            for window in WINDOWS:
                if window is not None and window >= t:
                    continue
                xs = _inputs(b, t, h, d, dtype)
                dense_gib = b * h * t * t * 4 / 2**30
                res = {}
                for impl in impls:
                    if impl == "reference" and dense_gib > args.max_dense_gib:
                        res[impl] = (float("nan"), float("nan"))
                        continue
                    fwd, fwd_bwd = _functions(impl, window, args.block_q, args.block_k)
                    res[impl] = (median_seconds(fwd, xs[:5], args.runs), median_seconds(fwd_bwd, xs, args.runs))
                cells = [res[i][m] for m in (0, 1) for i in impls]
                row = f"{b:>2} {h:>2} {d:>3} {t:>5} {str(window):>6} | " + " | ".join(
                    f"{c:>15.4f}" if c == c else f"{'-':>15}" for c in cells)
                if ratio:
                    a, z = impls
                    row += " | " + " | ".join(
                        f"{res[a][m] / res[z][m]:>6.2f}" if res[a][m] == res[a][m] else f"{'-':>6}"
                        for m in (0, 1))
                print(row, flush=True)


if __name__ == "__main__":
    main()

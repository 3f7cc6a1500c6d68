"""Time the chunked linear attention implementations: forward and forward+backward.

    python benchmarks/linear_attention.py [--impls reference,xla] [--shapes 2x4x64,4x16x128]
        [--lengths 1024,2048,4096,8192,16384] [--decays scalar,vector] [--dtype float32]
        [--runs 3] [--max-ref-gib 4] [--baselines]

One row per (B, H, D, decay, T): milliseconds of each implementation, forward and
forward+backward (value_and_grad of sum(o * w) + sum(state) w.r.t. q, k, v, log_decay), the
ratio reference / xla, and for every implementation the time ratio of doubling T ("2T x": the
geometric mean over the lengths, with its scaling exponent log2 of it, 1.0 = linear; and the
worst single doubling, which cache effects and a shared machine make noisy). jit'd, blocking on every call, median of runs.

The reference's backward keeps one [K, V] state per token and head; runs whose states would
exceed --max-ref-gib are left out ("-"). Pallas implementations ("gpu", "tpu") run only on their
platform. --baselines (GPU only) adds, at the same shapes, fla's Triton chunk kernels
(`fla.ops.simple_gla.chunk_simple_gla` for scalar decay, `fla.ops.gla.chunk_gla` for vector decay,
through torch; needs fla-core) and a FlashAttention-class causal softmax kernel
(`jax.nn.dot_product_attention(implementation="cudnn")`). No asserts: for reading, not CI.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from pallas_kernels.chunked_linear_attention.api import OP, chunked_linear_attention
from timing import median_seconds  # benchmarks/timing.py


def _functions(impl: str, chunk: int):
    def fwd(q, k, v, g):
        return chunked_linear_attention(q, k, v, g, implementation=impl, chunk_size=chunk)

    def loss(q, k, v, g, w):
        o, s = fwd(q, k, v, g)
        return (o.astype(jnp.float32) * w).sum() + s.sum()

    return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def _inputs(b, t, h, d, decay, dtype):
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=(b, t, h, d)), dtype) for _ in range(4))
    k = k / math.sqrt(d)
    shape = (b, t, h, d) if decay == "vector" else (b, t, h)
    # Gates as trained models have them: log_sigmoid of a positive-biased logit.
    g = jax.nn.log_sigmoid(jnp.asarray(rng.normal(size=shape) + 3.0, jnp.float32))
    return q, k, v, g, w.astype(jnp.float32)


# ----------------------------------------------------------------------------- GPU baselines

def _baseline_times(b, t, h, d, decay, runs) -> dict[str, tuple[float, float]]:
    """{name: (fwd s, fwd+bwd s)} of fla's Triton kernel and cuDNN flash attention, bf16."""
    out = {}
    try:
        import torch
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as e:
        print(f"  (fla baseline unavailable: {e})")
    else:
        dev = "cuda"
        q, k, v = (torch.randn(b, t, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        gshape = (b, t, h, d) if decay == "vector" else (b, t, h)
        g = torch.nn.functional.logsigmoid(torch.randn(*gshape, device=dev) + 3).requires_grad_()
        op = chunk_gla if decay == "vector" else chunk_simple_gla
        call = lambda: op(q, k, v, g, output_final_state=True)[0]  # noqa: E731

        def bench(fn):
            fn(); torch.cuda.synchronize()  # noqa: E702
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter(); fn(); torch.cuda.synchronize()  # noqa: E702
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        out["fla"] = (bench(call), bench(lambda: call().float().sum().backward()))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.bfloat16) for _ in range(3))
    attn = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, implementation="cudnn")
    try:
        fb = jax.jit(jax.grad(lambda q, k, v: attn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        out["flash(cudnn)"] = (median_seconds(jax.jit(attn), (q, k, v), runs), median_seconds(fb, (q, k, v), runs))
    except Exception as e:  # noqa: BLE001 - report and go on: a baseline is optional
        print(f"  (cudnn flash attention unavailable: {type(e).__name__}: {e})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", default=None, help="default: every registered one that runs here")
    parser.add_argument("--shapes", default="2x4x64,4x16x128", help="BxHxD list")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--decays", default="scalar,vector")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-ref-gib", type=float, default=4.0)
    parser.add_argument("--baselines", action="store_true")
    args = parser.parse_args()
    platform = jax.default_backend()
    impls = args.impls.split(",") if args.impls else [
        i for i in dispatch.implementations(OP)
        if i in ("reference", "xla") or {"gpu": "gpu", "tpu": "tpu"}.get(i) == platform]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    lengths = [int(t) for t in args.lengths.split(",")]
    dtype = jnp.dtype(args.dtype)

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {args.dtype}, chunk {args.chunk}, "
          f"median of {args.runs}, milliseconds")
    cols = [f"{i} {m}" for i in impls for m in ("fwd", "f+b")]
    header = f"{'B':>2} {'H':>2} {'D':>3} {'decay':>6} {'T':>5} | " + " | ".join(f"{c:>13}" for c in cols)
    ratio = "reference" in impls and "xla" in impls
    if ratio:
        header += f" | {'ref/xla fwd':>11} | {'ref/xla f+b':>11}"
    print(header)
    print("-" * len(header))
    scaling = {}
    for b, h, d in shapes:
        for decay in args.decays.split(","):
            prev = None
            for t in lengths:
                xs = _inputs(b, t, h, d, decay, dtype)
                res = {}
                for impl in impls:
                    if impl == "reference" and t * b * h * d * d * 4 / 2**30 > args.max_ref_gib:
                        res[impl] = (math.nan, math.nan)
                        continue
                    fwd, fwd_bwd = _functions(impl, args.chunk)
                    res[impl] = (median_seconds(fwd, xs[:4], args.runs), median_seconds(fwd_bwd, xs, args.runs))
                if args.baselines and platform == "gpu":
                    res.update(_baseline_times(b, t, h, d, decay, args.runs))
                cells = [res[i][m] * 1e3 for i in impls for m in (0, 1)]
                row = f"{b:>2} {h:>2} {d:>3} {decay:>6} {t:>5} | " + " | ".join(
                    f"{c:>13.1f}" if c == c else f"{'-':>13}" for c in cells)
                if ratio:
                    row += " | " + " | ".join(f"{res['reference'][m] / res['xla'][m]:>11.1f}"
                                              if res["reference"][m] == res["reference"][m]
                                              else f"{'-':>11}" for m in (0, 1))
                extra = {k: v for k, v in res.items() if k not in impls}
                for name, (f, fb) in extra.items():
                    row += f" | {name} {f * 1e3:.1f} / {fb * 1e3:.1f}"
                print(row, flush=True)
                if prev is not None and t == 2 * prev[0]:
                    for impl in impls:
                        for m, label in ((0, "fwd"), (1, "f+b")):
                            old, new = prev[1][impl][m], res[impl][m]
                            if old == old and new == new:
                                scaling.setdefault((b, h, d, decay, impl, label), []).append(new / old)
                prev = (t, res)
    print("\nDoubling T: time ratio per doubling over the whole range (geometric mean, i.e. the "
          "fitted exponent log2 of it; 1.0 = linear), the worst single doubling, and each one")
    for (b, h, d, decay, impl, label), ratios in scaling.items():
        mean = math.prod(ratios) ** (1 / len(ratios))
        print(f"  B{b} H{h} D{d} {decay:>6} {impl:>9} {label}: 2T x = {mean:.2f} (exponent "
              f"{math.log2(mean):.2f}), worst {max(ratios):.2f}; all: " + ", ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()

"""Time the implementations of chunked linear attention or of the delta rule: forward and
forward+backward.

    python benchmarks/linear_attention.py [--op linear|delta] [--impls reference,xla]
        [--shapes 2x4x64,4x16x128] [--lengths 1024,2048,4096,8192,16384]
        [--decays scalar,vector] [--dtype float32] [--runs 3] [--max-ref-gib 4] [--baselines]

--op linear (default): `chunked_linear_attention`, decays none / scalar (per head) / vector
(per key channel). --op delta: `delta_rule` with beta = sigmoid(N(0, 1)), decays none
(DeltaNet) / scalar (Gated DeltaNet); default --decays none,scalar.

One row per (B, H, D, decay, T): milliseconds of each implementation, forward and
forward+backward (value_and_grad of sum(o * w) + sum(state) w.r.t. q, k, v, log_decay and,
for the delta rule, beta), the ratio reference / xla, and for every implementation the time ratio of doubling T ("2T x": the
geometric mean over the lengths, with its scaling exponent log2 of it, 1.0 = linear; and the
worst single doubling, which cache effects and a shared machine make noisy). jit'd, blocking on every call, median of runs.

The reference's backward keeps one [K, V] state per token and head; runs whose states would
exceed --max-ref-gib are left out ("-"). Pallas implementations ("gpu", "tpu") run only on their
platform. --baselines (GPU only) adds, at the same shapes, fla's Triton chunk kernels
(`fla.ops.simple_gla.chunk_simple_gla` for scalar decay, `fla.ops.gla.chunk_gla` for vector
decay, `fla.ops.gated_delta_rule.chunk_gated_delta_rule` / `fla.ops.delta_rule.chunk_delta_rule`
for the delta rule, through torch; needs fla-core) and a FlashAttention-class causal softmax kernel
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
from pallas_kernels.chunked_linear_attention import api as linear_api
from pallas_kernels.delta_rule import api as delta_api
from timing import median_seconds  # benchmarks/timing.py

OPS = {"linear": linear_api.OP, "delta": delta_api.OP}


def _functions(op: str, impl: str, chunk: int):
    """jit'd forward(*inputs) and value_and_grad(loss)(*inputs, w) of one implementation; the
    inputs are (q, k, v, g) for linear attention and (q, k, v, g, beta) for the delta rule."""
    def fwd(q, k, v, g, *beta):
        if op == "delta":
            return delta_api.delta_rule(q, k, v, *beta, g, implementation=impl, chunk_size=chunk)
        return linear_api.chunked_linear_attention(q, k, v, g, implementation=impl, chunk_size=chunk)

    def loss(*args):
        o, s = fwd(*args[:-1])
        return (o.astype(jnp.float32) * args[-1]).sum() + s.sum()

    n_in = 5 if op == "delta" else 4
    return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=tuple(range(n_in))))


def _inputs(op, b, t, h, d, decay, dtype):
    """(q, k, v, g[, beta], w): g is None for decay "none"."""
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=(b, t, h, d)), dtype) for _ in range(4))
    k = k / math.sqrt(d)
    shape = (b, t, h, d) if decay == "vector" else (b, t, h)
    # Gates as trained models have them: log_sigmoid of a positive-biased logit.
    g = None if decay == "none" else jax.nn.log_sigmoid(jnp.asarray(rng.normal(size=shape) + 3.0, jnp.float32))
    beta = (jax.nn.sigmoid(jnp.asarray(rng.normal(size=(b, t, h)), jnp.float32)),) if op == "delta" else ()
    return (q, k, v, g, *beta, w.astype(jnp.float32))


# ----------------------------------------------------------------------------- GPU baselines

def _fla_call(op, q, k, v, g, beta):
    """The fla kernel matching our op and decay, called on torch tensors; returns o."""
    if op == "delta":
        if g is None:
            from fla.ops.delta_rule import chunk_delta_rule
            return chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True, output_final_state=True)[0]
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, output_final_state=True)[0]
    if g is not None and g.ndim == 4:
        from fla.ops.gla import chunk_gla
        return chunk_gla(q, k, v, g, output_final_state=True)[0]
    from fla.ops.simple_gla import chunk_simple_gla
    return chunk_simple_gla(q, k, v, g, output_final_state=True)[0]


def _baseline_times(op, b, t, h, d, decay, runs) -> dict[str, tuple[float, float]]:
    """{name: (fwd s, fwd+bwd s)} of fla's Triton kernel and cuDNN flash attention, bf16."""
    out = {}
    try:
        import torch
        import fla  # noqa: F401
    except ImportError as e:
        print(f"  (fla baseline unavailable: {e})")
    else:
        dev = "cuda"
        q, k, v = (torch.randn(b, t, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        gshape = (b, t, h, d) if decay == "vector" else (b, t, h)
        g = (None if decay == "none" else
             torch.nn.functional.logsigmoid(torch.randn(*gshape, device=dev) + 3).requires_grad_())
        beta = torch.sigmoid(torch.randn(b, t, h, device=dev)).requires_grad_() if op == "delta" else None
        call = lambda: _fla_call(op, q, k, v, g, beta)  # noqa: E731

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
    parser.add_argument("--op", default="linear", choices=tuple(OPS))
    parser.add_argument("--impls", default=None, help="default: every registered one that runs here")
    parser.add_argument("--shapes", default="2x4x64,4x16x128", help="BxHxD list")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--decays", default=None, help="default: scalar,vector (linear), none,scalar (delta)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-ref-gib", type=float, default=4.0)
    parser.add_argument("--baselines", action="store_true")
    args = parser.parse_args()
    op = args.op
    decays = (args.decays or {"linear": "scalar,vector", "delta": "none,scalar"}[op]).split(",")
    if op == "delta" and "vector" in decays:
        parser.error("--decays: the delta rule takes none or scalar (per-head) decay")
    platform = jax.default_backend()
    impls = args.impls.split(",") if args.impls else [
        i for i in dispatch.implementations(OPS[op])
        if i in ("reference", "xla") or {"gpu": "gpu", "tpu": "tpu"}.get(i) == platform]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    lengths = [int(t) for t in args.lengths.split(",")]
    dtype = jnp.dtype(args.dtype)

    print(f"{OPS[op]}: jax {jax.__version__} on {jax.devices()[0].device_kind}, {args.dtype}, chunk {args.chunk}, "
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
        for decay in decays:
            prev = None
            for t in lengths:
                xs = _inputs(op, b, t, h, d, decay, dtype)
                res = {}
                for impl in impls:
                    if impl == "reference" and t * b * h * d * d * 4 / 2**30 > args.max_ref_gib:
                        res[impl] = (math.nan, math.nan)
                        continue
                    fwd, fwd_bwd = _functions(op, impl, args.chunk)
                    res[impl] = (median_seconds(fwd, xs[:-1], args.runs), median_seconds(fwd_bwd, xs, args.runs))
                if args.baselines and platform == "gpu":
                    res.update(_baseline_times(op, b, t, h, d, decay, args.runs))
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

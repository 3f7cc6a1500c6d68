"""The attention op's implementations against each other and against cuDNN flash attention:
forward, and forward + backward, per score option, interleaved in one run.

    python benchmarks/attention.py                                   # CPU: xla (and reference)
    python benchmarks/attention.py --lengths 2048,8192,16384 --window 1024   # on a GPU

Candidates per row: every implementation of `pallas_kernels.attention` that serves the call on
this platform ("gpu" Pallas Triton or "tpu" Pallas Mosaic, "xla"; "reference" only up to
--reference-max tokens: it builds T x T arrays), and on a GPU `jax.nn.dot_product_attention(
implementation="cudnn")` where cuDNN computes the same function (plain causal softmax, and a
sliding window through local_window_size; it has no sinks or sigmoid scores). Inputs are one
document per row (positions 0..T-1), B x T x H query heads over K kv heads of D.

Columns: ms (median over bursts of each burst's fastest call), TFLOP/s from the causal FLOPs
(4 B H D x visible pairs forward; forward + backward counted as 3x forward, this repository's
convention) and `/ first`, the median per-burst time ratio against the row's first candidate
(> 1: slower). No asserts: for reading, not CI.
"""
from __future__ import annotations

import argparse

from timing import interleaved, ms, print_rows, ratio, table  # noqa: I001 (sets the allocator first)

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from pallas_kernels.attention.api import OP, attention

OPTIONS = {   # the score options of each row ("window" takes --window)
    "plain": {},
    "window": {"window": None},
    "sinks": {"sinks": True},
    "sigmoid": {"score": "sigmoid", "sigmoid_bias": -8.0},
}


def visible_pairs(t: int, window: int | None) -> float:
    w = t if window is None else min(window, t)
    return w * (w + 1) / 2 + (t - w) * w


def candidates(opts: dict, t: int, reference_max: int) -> list[str]:
    platform = dispatch.target_platform()
    names = [n for n in ("gpu", "tpu") if n == platform and n in dispatch.implementations(OP)]
    names.append("xla")
    if t <= reference_max:
        names.append("reference")
    if platform == "gpu" and set(opts) <= {"window"}:
        names.append("cudnn")
    return names


def make_call(name: str, opts: dict, q, k, v, sinks, backward: bool):
    """A jitted callable of one candidate: the output, or the gradients of q, k, v (and the
    sinks) of sum(o * o)."""
    b, t = q.shape[:2]
    seg = jnp.ones((b, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if name == "cudnn":
        window = opts.get("window")

        def fwd(q, k, v, s):
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn",
                local_window_size=None if window is None else (window - 1, 0))
    else:
        kw = dict(opts)
        use_sinks = kw.pop("sinks", False)

        def fwd(q, k, v, s):
            return attention(q, k, v, segment_ids=seg, positions=pos,
                             sinks=s if use_sinks else None, implementation=name, **kw)
    if not backward:
        f = jax.jit(fwd)
    else:
        f = jax.jit(jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32) ** 2),
                             argnums=(0, 1, 2, 3)))
    return lambda: f(q, k, v, sinks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = dispatch.target_platform() == "gpu"
    ap.add_argument("--lengths", default="2048,8192" if gpu else "1024,2048")
    ap.add_argument("--batch", type=int, default=4 if gpu else 1)
    ap.add_argument("--heads", type=int, default=16 if gpu else 4)
    ap.add_argument("--kv-heads", type=int, default=8 if gpu else 2)
    ap.add_argument("--dim", type=int, default=128 if gpu else 64)
    ap.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    ap.add_argument("--options", default=",".join(OPTIONS))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--reference-max", type=int, default=0 if gpu else 1024)
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    b, h, kvh, d = args.batch, args.heads, args.kv_heads, args.dim
    dtype = jnp.dtype(args.dtype)
    for backward in (False, True):
        what = "forward + backward" if backward else "forward"
        title = (f"attention op, {what}: B={b}, H={h}, K={kvh}, D={d}, {dtype.name}, one "
                 f"document per row")
        with table(title, args.bursts, args.calls):
            rows = []
            for t in (int(x) for x in args.lengths.split(",")):
                rng = np.random.default_rng(0)
                q = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
                k = jnp.asarray(rng.normal(size=(b, t, kvh, d)), dtype)
                v = jnp.asarray(rng.normal(size=(b, t, kvh, d)), dtype)
                sinks = jnp.zeros((h,), jnp.float32)
                for opt in args.options.split(","):
                    opts = {**OPTIONS[opt], **({"window": args.window} if opt == "window" else {})}
                    calls = {}
                    for name in candidates(opts, t, args.reference_max):
                        try:
                            calls[name] = make_call(name, opts, q, k, v, sinks, backward)
                            jax.block_until_ready(calls[name]())
                        except Exception as e:  # noqa: BLE001 - a candidate may not serve
                            print(f"  T={t} {opt} {name}: skipped ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120]})")
                            calls.pop(name, None)
                    if not calls:
                        continue
                    times = interleaved(calls, args.bursts, args.calls)
                    flops = 4 * b * h * d * visible_pairs(t, opts.get("window")) * (
                        3 if backward else 1)
                    first = next(iter(calls))
                    for name in calls:
                        rows.append([f"T={t}", opt, name, f"{ms(times, name):.2f}",
                                     f"{flops / (ms(times, name) * 1e-3) / 1e12:.3f}",
                                     f"{ratio(times, name, first):.2f}"])
            print_rows(["length", "option", "impl", "ms", "TFLOP/s", "/ first"], rows)


if __name__ == "__main__":
    main()

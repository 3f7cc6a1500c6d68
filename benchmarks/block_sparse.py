"""Time block-sparse attention against the number of listed blocks: density sweep and T sweep.

    python benchmarks/block_sparse.py [--impls xla] [--runs 3] [--dtype float32]
        [--density-t 4096] [--lengths 1024,2048,4096,8192,16384] [--block 64]
        [--shape 1x4x64] [--window 512] [--topk 8] [--token-lengths 512,1024,2048,4096]
    python benchmarks/block_sparse.py --tables mixer [--route-blocks 16,32,64]
        [--mixer-shapes 8x256,1x2048] [--bursts 7] [--calls 2]

Table 1 (density): one T, the same shape, layouts listing all, 1/4, 1/8 and 1/16 of the
(query block, key block) pairs: every query block keeps the same number of key blocks, chosen at
random (non-causal, so every listed block is full and the count is exact). Times are relative to
the all-blocks layout of the same implementation (the dense blocked path); the CPU target is
`fraction of dense <= 1.5 x density`.

Table 2 (length): T doubling at fixed work per query: a sliding window of --window keys
(host-built layout) and a causal top-k of --topk blocks per query block chosen at random on
device (`layout.from_topk`, the MoBA/NSA path). The CPU target is time x2.3 at most per doubling.
A third layout, `token top-k` (--token-lengths), is the routing the `moba` and `nsa` mixers
actually use: block_q = 1, one list of top-k key blocks per query token and head.
`blocks` is the number of listed (query block, key block) pairs, which grows a little faster than
T while T is within a few windows (early query blocks list fewer); `f+b us/block` is the
forward+backward time per listed block, flat when time follows the listed blocks.

Forward and forward+backward (value_and_grad of sum(o * w) w.r.t. q, k, v), jit'd, median of
--runs after a compile run. No asserts: this is for reading, not for CI.

Table 3 (mixer, `--tables mixer`): the moba and nsa MIXERS (projections, routing and the op, in
the default implementation for the platform), fwd+bwd (grads of the params and x of
sum(y * y)), per routing mode: token routing (route_block_q = 1, the default) and block routing
with route_block_q in --route-blocks, against full causal attention ("attn") at the same width
(d = 256, 4 heads of 64, MHA; moba / nsa at their default block 64, top_k 3 / num_selected 4,
window 64), shapes --mixer-shapes (B x T). Candidates run interleaved, A, B, C, A, B, C, ...
for --bursts bursts of --calls calls each (the fastest call of a burst kept); a row gives the
median time and the medians over bursts of per-burst ratios: GFLOP/s relative to attention
(FLOPs of each mixer's `flops_per_token`: the keys it actually reads, so the sparse mixers'
FLOPs are a fraction of attention's) and the speed-up of block routing over token routing of
the same mixer. CPU model and load average printed before and after.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import layout as layout_lib
from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.api import block_sparse_attention
from mixers import mixer_grad  # benchmarks/mixers.py
from timing import interleaved, median_seconds, ms, print_rows, ratio, table  # benchmarks/timing.py
from train.config import AttentionConfig
from layers.sparse_attention.config import MoBAConfig, NSAConfig


def _functions(impl: str):
    """jit'd forward and forward+backward of the op for a layout passed as an argument."""
    def fwd(q, k, v, lay):
        return block_sparse_attention(q, k, v, lay, implementation=impl)[0]

    def loss(q, k, v, lay, w):
        return (fwd(q, k, v, lay).astype(jnp.float32) * w).sum()

    return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _inputs(b: int, t: int, h: int, d: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v, w = (jnp.asarray(rng.normal(size=(b, t, h, d)), dtype) for _ in range(4))
    return q, k, v, w.astype(jnp.float32)


def _random_blocks(nq: int, nk: int, per_row: int, seed: int = 0) -> np.ndarray:
    """bool [nq, nk] with exactly `per_row` random True per query block."""
    rng = np.random.default_rng(seed)
    out = np.zeros((nq, nk), bool)
    for i in range(nq):
        out[i, rng.choice(nk, size=per_row, replace=False)] = True
    return out


def _density_layout(t: int, block: int, fraction: float):
    """A layout keeping `fraction` of the key blocks of every query block (non-causal)."""
    n = t // block
    per_row = max(1, round(n * fraction))
    blocks = _random_blocks(n, n, per_row)
    mask = masks.NumpyMask(np.repeat(np.repeat(blocks, block, 0), block, 1))
    return masks.build_layout(mask, t, t, block, block), per_row / n


def _topk_layout(t: int, block: int, topk: int, seed: int = 0):
    """Causal layout of `topk` random earlier key blocks per query block (own block included),
    built on device by `from_topk` as the MoBA / NSA mixers do."""
    n = t // block
    rng = np.random.default_rng(seed)
    picks = np.full((1, 1, n, topk), -1, np.int32)
    for i in range(n):
        earlier = rng.permutation(i)[:topk - 1]
        picks[0, 0, i, :len(earlier) + 1] = np.concatenate([[i], earlier])
    return layout_lib.from_topk(jnp.asarray(picks), block_q=block, block_k=block, q_len=t,
                                kv_len=t, causal=True)


def _token_topk_layout(t: int, block: int, topk: int, heads: int, seed: int = 0):
    """Token-granular causal top-k (block_q = 1, one list per token and head), as `moba` and
    `nsa` route: token i keeps its own key block and topk - 1 random earlier ones."""
    rng = np.random.default_rng(seed)
    own = np.arange(t) // block
    earlier = np.floor(rng.random((heads, t, topk - 1)) * own[None, :, None]).astype(np.int32)
    picks = np.concatenate([np.broadcast_to(own[None, :, None], (heads, t, 1)),
                            np.where(own[None, :, None] > 0, earlier, -1)], axis=-1)
    return layout_lib.from_topk(jnp.asarray(picks[None], jnp.int32), block_q=1, block_k=block,
                                q_len=t, kv_len=t, causal=True)


def _time(impl: str, xs, lay, runs: int) -> tuple[float, float]:
    fwd, fwd_bwd = _functions(impl)
    q, k, v, w = xs
    return (median_seconds(fwd, (q, k, v, lay), runs) * 1e3,
            median_seconds(fwd_bwd, (q, k, v, lay, w), runs) * 1e3)


def density_table(impl: str, shape, t: int, block: int, dtype, runs: int) -> None:
    b, h, d = shape
    xs = _inputs(b, t, h, d, dtype)
    print(f"\n[{impl}] time vs density: B={b} H={h} D={d} T={t} block={block} "
          f"(ms; 'x dense' = time / all-blocks time; target x dense <= 1.5 x density)")
    header = (f"{'density':>8} | {'fwd':>9} | {'fwd+bwd':>9} | {'fwd x dense':>11} | "
              f"{'f+b x dense':>11} | {'1.5 x density':>13} | target")
    print(header)
    print("-" * len(header))
    dense = None
    for fraction in (1.0, 1 / 4, 1 / 8, 1 / 16):
        lay, density = _density_layout(t, block, fraction)
        f, fb = _time(impl, xs, lay, runs)
        dense = dense or (f, fb)
        rf, rfb = f / dense[0], fb / dense[1]
        ok = "met" if max(rf, rfb) <= 1.5 * density else "missed"
        print(f"{'1/%d' % round(1 / density) if density < 1 else 'all':>8} | {f:9.1f} | "
              f"{fb:9.1f} | {rf:11.3f} | {rfb:11.3f} | {1.5 * density:13.3f} | {ok}")


def length_table(impl: str, shape, lengths, block: int, window: int, topk: int, dtype,
                 runs: int, token_lengths=()) -> None:
    b, h, d = shape
    print(f"\n[{impl}] time vs T: B={b} H={h} D={d} block={block} (ms; 'x' = time / time at "
          f"T/2; target x <= 2.3)")
    header = (f"{'layout':>12} {'T':>6} | {'fwd':>9} | {'fwd+bwd':>9} | {'fwd x':>6} | "
              f"{'f+b x':>6} | {'blocks':>6} | {'blocks x':>8} | {'f+b us/block':>12}")
    print(header)
    print("-" * len(header))
    kinds = {f"window {window}": lambda t: masks.build_layout(masks.SlidingWindow(window), t, t,
                                                               block, block),
             f"top-{topk}": lambda t: _topk_layout(t, block, topk)}
    if token_lengths:
        kinds[f"token top-{topk}"] = lambda t: _token_topk_layout(t, block, topk, h)
    for name, make in kinds.items():
        prev = first = None
        sweep = token_lengths if name.startswith("token") else lengths
        for t in sweep:
            lay = make(t)
            f, fb = _time(impl, _inputs(b, t, h, d, dtype), lay, runs)
            blocks = int(np.asarray(lay.kv_counts).sum())  # listed (query block, key block) pairs
            rat = ("{:6.2f} | {:6.2f} | {:6d} | {:8.2f}".format(
                f / prev[0], fb / prev[1], blocks, blocks / prev[2]) if prev
                   else f"{'-':>6} | {'-':>6} | {blocks:6d} | {'-':>8}")
            print(f"{name:>12} {t:>6} | {f:9.1f} | {fb:9.1f} | {rat} | {fb * 1e3 / blocks:12.1f}")
            prev = (f, fb, blocks)
            first = first or prev
        doublings = math.log2(sweep[-1] / sweep[0])
        if doublings > 0:
            per = [(prev[i] / first[i]) ** (1 / doublings) for i in range(3)]
            print(f"{name:>12} {'mean':>6} | per doubling (geometric): fwd x{per[0]:.2f}, "
                  f"f+b x{per[1]:.2f}, blocks x{per[2]:.2f}")


def mixer_table(shapes, route_blocks, bursts: int, calls: int) -> None:
    d, heads = 256, 4
    variants = {"attn": AttentionConfig(num_heads=heads)}
    for kind, base in (("moba", MoBAConfig(num_heads=heads)), ("nsa", NSAConfig(num_heads=heads))):
        for n in (1, *route_blocks):
            variants[f"{kind} {'token' if n == 1 else f'block {n}'}"] = dataclasses.replace(base, route_block_q=n)
    title = (f"mixer: moba / nsa fwd+bwd (grads of params and x) per FLOP relative to attention, "
             f"by routing mode, d={d}, {heads} heads of {d // heads}, default implementations")
    with table(title, bursts, calls):
        body = []
        for b, t in shapes:
            thunks, flops = {}, {}
            for name, cfg in variants.items():
                thunks[name], flops[name] = mixer_grad(cfg, b, t, d)
            times = interleaved(thunks, bursts, calls)
            for name in variants:
                kind = name.split()[0]
                vs_token = "-" if kind == "attn" or name.endswith("token") else \
                    f"{ratio(times, f'{kind} token', name):.2f}"
                body.append([f"B{b}xT{t}", name, f"{flops[name] / 1e6:.2f}", f"{ms(times, name):.1f}",
                             f"{b * t * flops[name] / statistics.median(times[name]) / 1e9:.1f}",
                             f"{ratio(times, 'attn', name, flops[name] / flops['attn']):.2f}", vs_token])
        print_rows(["shape", "mixer", "MFLOP/token", "ms", "GFLOP/s", "GFLOP/s / attn", "time token / block"],
                   body)
    print("GFLOP/s / attn: median over bursts of (mixer FLOPs / mixer time) / (attn FLOPs / attn time); "
          "time token / block: median over bursts of the token-routing time / this row's time.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", default="xla")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--shape", default="1x4x64", help="BxHxD")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--density-t", type=int, default=4096)
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--token-lengths", default="512,1024,2048,4096",
                        help="T of the token-granular top-k rows (block_q = 1); empty: none")
    parser.add_argument("--tables", default="density,length", help="of density,length,mixer")
    parser.add_argument("--route-blocks", default="16,32,64", help="route_block_q of the mixer rows")
    parser.add_argument("--mixer-shapes", default="8x256,1x2048", help="BxT of the mixer rows")
    parser.add_argument("--bursts", type=int, default=7, help="mixer table: interleaved bursts")
    parser.add_argument("--calls", type=int, default=2, help="mixer table: calls per burst (fastest kept)")
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split("x"))
    if len(shape) != 3:
        parser.error(f"--shape must be BxHxD, got {args.shape!r}")
    lengths = [int(t) for t in args.lengths.split(",")]
    token_lengths = [int(t) for t in args.token_lengths.split(",") if t]
    for t in [args.density_t, *lengths]:
        if t % args.block:
            parser.error(f"lengths must be multiples of --block, got T={t}, block={args.block}")
    dtype = jnp.dtype(args.dtype)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {args.dtype}, median of "
          f"{args.runs}")
    for impl in args.impls.split(","):
        if "density" in args.tables:
            density_table(impl, shape, args.density_t, args.block, dtype, args.runs)
        if "length" in args.tables:
            length_table(impl, shape, lengths, args.block, args.window, args.topk, dtype,
                         args.runs, token_lengths)
    if "mixer" in args.tables:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.mixer_shapes.split(",")]
        mixer_table(shapes, [int(n) for n in args.route_blocks.split(",")], args.bursts, args.calls)


if __name__ == "__main__":
    main()

"""Softmax-attention variants on CPU: what each option costs in training, and MLA against GQA
in decode.

    python benchmarks/attention_variants.py                                  # both tables
    python benchmarks/attention_variants.py --tables cost --lengths 2048,8192 --reps 7
    python benchmarks/attention_variants.py --tables decode --lengths 2048,8192 --batches 1,8
    python benchmarks/attention_variants.py --lengths 256 --reps 1           # smoke test

Tables (--tables):
  cost    one mixer layer alone, forward + backward (gradients of its parameters and of x,
          benchmarks/mixers.py's `mixer_grad`), B1 x T for T in --lengths, d_model 256, fp32,
          runtime.attention_impl left at its default (xla on CPU). The baseline `plain` is
          softmax attention with 4 query / 2 kv heads of 64 (configs/tiny.py's `attn`); each
          row changes one option of it:
            gate=headwise / gate=elementwise   Gated Attention's output gate (G1)
            sinks                              a learned sink logit per head (gpt-oss)
            score=sigmoid                      FlashSigmoid, b = -ln T
            head_windows=(0,512)               kv head 0 global, kv head 1 a window of 512
            knock_heads=v / knock_heads=qkv    Knocking-Heads' shared D x D head matrices
          and two other kinds at the same width:
            diff_attention   2 differential heads of 2 x 64 (q width 256), 1 kv head (k and
                             v 128 wide, as plain's 2 kv heads of 64)
            mla              4 heads, MLAConfig's defaults (nope 64, rope 32, v 64, rank 256)
          All rows run interleaved (A, B, C, ..., A, B, C, ...: --reps bursts of --calls calls,
          the fastest call of a burst kept). Columns: params of the layer, MFLOP/token by the
          mixer's own `flops_per_token`, median ms, `/ plain` the median over bursts of the
          per-burst time ratio to plain (above 1: slower), GFLOP/s by those FLOPs, and the
          attention op's implementation that served the row (dispatch; a fallback is named).
  decode  MLA against GQA at about equal parameters: one decode step (one new token) of a
          single mixer layer against a cache of S tokens, S in --lengths, B in --batches. GQA is
          4 query heads of 64 with --kv-heads kv heads; MLA has 4 heads and the kv_lora_rank
          (a multiple of 8) whose parameter count is nearest GQA's; the header prints both
          counts and their difference. The caches come from each mixer's `init_cache(B, S)`,
          filled with random contents (every slot valid: segment 1, positions 0 .. S-1); the
          step is jitted with the cache donated (as train/generate.py does) and carried from
          call to call: the new token's position is the cache's index, it overwrites the oldest
          slot (ring order), so every step attends to S + 1 keys and does the same work.
          Columns: cache bytes per token per layer (all bytes of the cache pytree / (B x S),
          segment ids and positions included; the formula is printed above the table), the
          cache's MiB, ms per step (GQA and MLA interleaved), tokens/s (B / step time) and
          MLA / GQA (median of per-burst ratios). Both steps include the cache append of
          layers/kv_cache.py, which concatenates the cache with the new token.

Every table prints the CPU, jax version, date and the load average before and after. No
asserts: this is for reading (benchmarks/README.md's tables are made by hand from these).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from timing import interleaved, ms, print_rows, ratio, table  # noqa: E402  (benchmarks/timing.py; first)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from layers.attention.config import AttentionConfig, DiffAttentionConfig, MLAConfig  # noqa: E402
from layers.config import RuntimeConfig  # noqa: E402
from layers.registry import LayerContext, build_mixer  # noqa: E402
from mixers import D_MODEL, F32, mixer_grad  # noqa: E402  (benchmarks/mixers.py)
from pallas_kernels import dispatch  # noqa: E402

TABLES = ("cost", "decode")
HEADS, KV_HEADS = 4, 2  # the plain baseline: configs/tiny.py's attn, head dim 256 / 4 = 64
LOCAL_WINDOW = 512


def cost_configs(t: int) -> dict:
    """{row name: mixer config} of the cost table at sequence length t."""
    plain = AttentionConfig(num_heads=HEADS, num_kv_heads=KV_HEADS)
    opt = lambda **kw: dataclasses.replace(plain, **kw)
    return {
        "plain softmax": plain,
        "gate=headwise": opt(gate="headwise"),
        "gate=elementwise": opt(gate="elementwise"),
        "sinks": opt(sinks=True),
        "score=sigmoid": opt(score="sigmoid", sigmoid_length=t),
        f"head_windows=(0,{LOCAL_WINDOW})": opt(head_windows=(0, LOCAL_WINDOW)),
        "knock_heads=v": opt(knock_heads="v"),
        "knock_heads=qkv": opt(knock_heads="qkv"),
        # 2 differential heads: q 2 x 2 x 64 = 256 wide as plain's; 1 kv head: k and v
        # 2 x 64 = 128 wide, as plain's 2 kv heads of 64.
        "diff_attention": DiffAttentionConfig(num_heads=2, num_kv_heads=1),
        "mla": MLAConfig(num_heads=HEADS),
    }


def context(d: int = D_MODEL) -> LayerContext:
    """The layer context of mixers.mixer_grad (fp32, default runtime)."""
    return LayerContext(d_model=d, dtype=F32, runtime=RuntimeConfig(), init_std=0.02, out_std=0.02)


def param_count(cfg, d: int = D_MODEL) -> int:
    """Parameters of the mixer `cfg` at width d (shapes only, nothing allocated)."""
    abstract = nnx.eval_shape(lambda: build_mixer(cfg, context(d), rngs=nnx.Rngs(params=0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def served_by() -> str:
    """The implementation of the attention op's latest call (the row just traced)."""
    choice = dispatch.last("attention")
    if choice is None:
        return "-"
    return choice.implementation + (" (fallback)" if choice.skipped else "")


def cost_table(args) -> None:
    with table(f"cost: one mixer layer fwd+bwd, B1, d={D_MODEL}, fp32, attention_impl default, "
               f"relative to plain softmax attention ({HEADS} q / {KV_HEADS} kv heads of "
               f"{D_MODEL // HEADS})", args.reps, args.calls):
        body = []
        for t in args.lengths:
            configs = cost_configs(t)
            if args.rows:
                configs = {k: v for k, v in configs.items()
                           if k == "plain softmax" or any(k.startswith(r) for r in args.rows)}
            calls, flops, params, impl = {}, {}, {}, {}
            for name, cfg in configs.items():
                calls[name], flops[name] = mixer_grad(cfg, 1, t, D_MODEL)
                impl[name] = served_by()
                params[name] = param_count(cfg)
            times = interleaved(calls, args.reps, args.calls)
            for name in calls:
                gflops = t * flops[name] / (ms(times, name) / 1e3) / 1e9
                body.append([f"T={t}", name, f"{params[name] / 1e3:.1f}k", f"{flops[name] / 1e6:.2f}",
                             f"{ms(times, name):.1f}", f"{ratio(times, name, 'plain softmax'):.2f}",
                             f"{gflops:.1f}", impl[name]])
            print(f"  T={t} done", flush=True)
        print_rows(["length", "mixer", "params", "MFLOP/token", "ms", "/ plain", "GFLOP/s", "impl"], body)


# ----------------------------------------------------------------------------- decode

def decode_pair(kv_heads: int, d: int = D_MODEL):
    """(GQA config, its params, MLA config, its params): MLA's kv_lora_rank (a multiple of 8)
    is the one whose parameter count is nearest GQA's."""
    gqa = AttentionConfig(num_heads=HEADS, num_kv_heads=kv_heads)
    target = param_count(gqa, d)
    best = None
    for rank in range(8, 4 * d + 1, 8):
        mla = MLAConfig(num_heads=HEADS, kv_lora_rank=rank)
        n = param_count(mla, d)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (mla, n)
        if n > target:  # parameters grow with the rank: nothing further is nearer
            break
    return gqa, target, best[0], best[1]


def random_cache(mixer, b: int, s: int, rng: np.random.Generator) -> dict:
    """mixer.init_cache(b, s) with random contents in every float leaf and every slot valid:
    segment id 1, positions 0 .. s-1, index s (the next write goes to the oldest slot)."""
    def fill(path, leaf):
        key = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        if key == "segment_ids":
            return jnp.ones_like(leaf)
        if key == "positions":
            return jnp.broadcast_to(jnp.arange(leaf.shape[1], dtype=leaf.dtype), leaf.shape)
        if key == "index":
            return jnp.full_like(leaf, leaf.dtype.type(s))
        return jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, mixer.init_cache(b, s, F32))


def cache_bytes(cache: dict) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def decode_call(cfg, b: int, s: int, d: int = D_MODEL):
    """(a call of one jitted decode step [B, 1] of mixer `cfg` against a full cache of s tokens,
    the cache's bytes). The cache is donated and carried from call to call."""
    mixer = build_mixer(cfg, context(d), rngs=nnx.Rngs(params=0))
    rng = np.random.default_rng(0)
    cache = random_cache(mixer, b, s, rng)
    nbytes = cache_bytes(cache)
    graphdef, state = nnx.split(mixer)
    x = jnp.asarray(rng.normal(size=(b, 1, d)), F32)
    seg = jnp.ones((b, 1), jnp.int32)

    def step(state, cache, x):
        pos = jnp.broadcast_to(cache["index"], (b, 1)).astype(jnp.int32)
        return nnx.merge(graphdef, state)(x, positions=pos, segment_ids=seg, cache=cache)

    compiled = jax.jit(step, donate_argnums=(1,)).lower(state, cache, x).compile()
    holder = {"cache": cache}

    def call():
        y, holder["cache"] = compiled(state, holder["cache"], x)
        return y
    return call, nbytes


def decode_table(args) -> None:
    itemsize = jnp.dtype(F32).itemsize
    for kv_heads in args.kv_heads:
        gqa, n_gqa, mla, n_mla = decode_pair(kv_heads)
        hd = gqa.dim_per_head(D_MODEL)
        nope, rope, v, rank = mla.dims(D_MODEL)
        title = (f"decode: one token against a cache of S tokens, one mixer layer, d={D_MODEL}, fp32; "
                 f"GQA {HEADS} q / {kv_heads} kv heads of {hd}: {n_gqa:,} params; MLA {HEADS} heads, "
                 f"kv_lora_rank {rank}, nope {nope}, rope {rope}, v {v}: {n_mla:,} params "
                 f"({(n_mla - n_gqa) / n_gqa:+.1%} vs GQA)")
        with table(title, args.reps, args.calls):
            if abs(n_mla - n_gqa) > 0.1 * n_gqa:
                print("note: no kv_lora_rank brings MLA within 10% of GQA's parameters here")
            print(f"cache bytes per token per layer: GQA 2 (k, v) x {kv_heads} kv heads x {hd} x "
                  f"{itemsize} B + 8 B (segment id, position) = {2 * kv_heads * hd * itemsize + 8} B; "
                  f"MLA (kv_lora_rank {rank} + rope {rope}) x {itemsize} B + 8 B = "
                  f"{(rank + rope) * itemsize + 8} B (each plus a 4 B index per cache / S)")
            print(f"MLA decodes absorbed (one shared latent kv head of {rank} + {rope}), "
                  f"GQA through the KV cache; both append through layers/kv_cache.py")
            body = []
            for b in args.batches:
                for s in args.lengths:
                    calls, nbytes = {}, {}
                    for name, cfg in (("GQA", gqa), ("MLA", mla)):
                        calls[name], nbytes[name] = decode_call(cfg, b, s)
                    times = interleaved(calls, args.reps, args.calls)
                    for name in calls:
                        body.append([f"B={b}", f"S={s}", name, f"{nbytes[name] / b / s:.1f}",
                                     f"{nbytes[name] / 2 ** 20:.1f}", f"{ms(times, name):.3f}",
                                     f"{b / (ms(times, name) / 1e3):.0f}",
                                     f"{ratio(times, 'MLA', 'GQA'):.2f}" if name == "MLA" else ""])
                    print(f"  B={b} S={s} done", flush=True)
            print_rows(["batch", "cache", "mixer", "B/token/layer", "cache MiB", "ms/step", "tok/s",
                        "MLA / GQA"], body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tables", default=",".join(TABLES), help=f"comma separated, of {TABLES}")
    ap.add_argument("--lengths", default="2048,8192",
                    help="cost: sequence lengths T; decode: cache lengths S")
    ap.add_argument("--reps", type=int, default=7, help="bursts of the interleaved timing")
    ap.add_argument("--calls", type=int, default=2, help="calls per burst; the fastest is kept")
    ap.add_argument("--rows", default="",
                    help="cost: only the rows starting with these (comma separated, e.g. "
                         "gate,sinks,head_windows,mla) beside plain")
    ap.add_argument("--batches", default="1,8", help="decode: batch sizes")
    ap.add_argument("--kv-heads", default=str(KV_HEADS),
                    help="decode: GQA kv heads (comma separated: one table each)")
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.kv_heads = [int(x) for x in args.kv_heads.split(",")]
    args.rows = [r for r in args.rows.split(",") if r]
    known_rows = list(cost_configs(2048))
    for name in args.rows:
        if not any(k.startswith(name) for k in known_rows):
            raise SystemExit(f"--rows: unknown {name!r}; known: {known_rows}")
    chosen = args.tables.split(",")
    for name in chosen:
        if name not in TABLES:
            raise SystemExit(f"--tables: unknown {name!r}; known: {list(TABLES)}")
    for name in chosen:
        globals()[f"{name}_table"](args)


if __name__ == "__main__":
    main()

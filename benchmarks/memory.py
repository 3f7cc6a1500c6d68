"""Speed of the test-time memory (pallas_kernels/neural_memory), four tables:

  (a) the op's forward+backward time vs sequence length T, linear and MLP memory, xla
      implementation with its default path ("auto": `dual=None`, the dual form wherever the
      op has one, which is both memories here since the MLP dual form landed), with the time ratio
      per doubling of T (2.0 = linear in T);
  (b) the paths of the op at a few T: the closed (dual) form `xla.neural_memory(dual=True)`, the
      materialised per-token weights of `vmap(grad)` (`dual=False`), and the token-by-token
      `reference`; forward and forward+backward. "n/a" where a path refuses the memory (the MLP
      dual form until it lands in xla.py);
  (c) the memory mixer (layers/memory: projections, gates, the op, output norm and gate) against
      titans-pytorch's `NeuralMemory` at the same dim, heads, head dim, MLP depth 2, expansion 4
      and chunk, forward+backward of the module alone, on the same CPU (the torch side runs
      benchmarks/memory_torch_peer.py under .venv-torch/bin/python, after the JAX side, never
      at the same time);
  (d) per FLOP against attention, interleaved: the memory mixer (the titans presets' mixer:
      MemoryConfig defaults, 4 heads of 64 at d_model 256) against full causal attention at the
      same width, fwd+bwd w.r.t. params and x, GFLOP/s by each mixer's own `flops_per_token`;
      also the op alone (xla path, fwd+bwd) and the mixer with the op as it was at commit
      OLD_COMMIT (loaded from git; n/a without git), B8xT256 and B1xT2048. Runs A, B, C, A, B,
      C, ... in --bursts bursts of --calls calls (fastest kept); ratios are medians of the
      per-burst ratios (benchmarks/delta_solve.py's method). Prints the CPU (lscpu) and
      `uptime` before and after.

    .venv/bin/python benchmarks/memory.py                       # all four, ~8 min on 2 cores
    .venv/bin/python benchmarks/memory.py --tables a --lengths 256,512,1024
    .venv/bin/python benchmarks/memory.py --tables c --torch-omp-passive
    .venv/bin/python benchmarks/memory.py --tables d --bursts 7

Every timed function is jitted and blocks on its result (benchmarks/timing.py); medians of
`--runs` calls after one warm-up. Forward+backward is `value_and_grad` of sum(o * w) (fixed
random w) with respect to q, k, v, the gates and W0. Memory: l2 bias, per-token decay, GD with
momentum (Titans' LMM), chunk 16, read after write; MLP depth 2, expansion 4, GELU, residual +
LayerNorm readout (TTT / titans-pytorch's ResidualNorm); linear: plain x W.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)
from pallas_kernels.neural_memory import common, reference, xla  # noqa: E402
from pallas_kernels.neural_memory.common import MemorySpec  # noqa: E402

CHUNK = 16
# The xla path before the W0-free chunk body (table d's "old"): the op as of this commit.
OLD_COMMIT = "bbe9381c6b14461db020d1c7aae845dd1ca47407"


def spec_for(arch: str, chunk: int = CHUNK) -> MemorySpec:
    mlp = arch == "mlp"
    return MemorySpec(arch=arch, depth=2, expansion=4, activation="gelu", residual=mlp, layernorm=mlp,
                      bias="l2", retention="decay", algorithm="gd_momentum", chunk_size=chunk)


def inputs(spec: MemorySpec, b: int, t: int, h: int, d: int, seed: int = 0):
    """q, k unit [B, T, H, D], v [B, T, H, D], theta, alpha, eta [B, T, H], W0, w (the loss weights)."""
    ks = jax.random.split(jax.random.key(seed), 8)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k = (unit(jax.random.normal(kk, (b, t, h, d))) for kk in ks[:2])
    v = jax.random.normal(ks[2], (b, t, h, d))
    u = lambda kk, lo, hi: jax.random.uniform(kk, (b, t, h), minval=lo, maxval=hi)
    gates = (u(ks[3], 0.0, 0.1), u(ks[4], 0.0, 0.05), u(ks[5], 0.5, 0.95))  # theta, alpha, eta
    w0 = common.init_weights(spec, ks[6], h, d, d, std=1.0)
    w0 = tuple(x / math.sqrt(x.shape[1]) for x in w0)
    return (q, k, v) + gates, w0, jax.random.normal(ks[7], (b, t, h, d))


def op_fns(spec: MemorySpec, path: str):
    """(forward, forward+backward) jitted: path "auto" (xla default), "dual", "vmap_grad", "reference"."""
    def call(args, w0):
        q, k, v, th, al, et = args
        if path == "reference":
            return reference.neural_memory(spec, q, k, v, th, al, et, initial_weights=w0)[0]
        dual = {"auto": None, "dual": True, "vmap_grad": False}[path]
        return xla.neural_memory(spec, q, k, v, th, al, et, initial_weights=w0, dual=dual)[0]

    def loss(args, w0, w):
        return jnp.sum(call(args, w0) * w)

    return jax.jit(call), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def try_time(fn, args, runs):
    """Median seconds, or None where the path refuses the memory (ValueError/NotImplementedError)."""
    try:
        return median_seconds(fn, args, runs)
    except (ValueError, NotImplementedError) as e:
        print(f"    (n/a: {str(e).splitlines()[0][:100]})", flush=True)
        return None


def fmt(x, scale=1e3, width=10, prec=1):
    return f"{'n/a':>{width}}" if x is None else f"{x * scale:>{width}.{prec}f}"


def table_a(args):
    b, h, d = args.shape
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"\n(a) op fwd+bwd vs T: xla default path, B{b} H{h} K=V={d}, chunk {CHUNK}, ms, median of {args.runs}")
    print(f"{'memory':>8} {'path':>9} | " + " | ".join(f"{t:>7}" for t in lengths) + " | per doubling (geo mean)")
    for arch in ("linear", "mlp"):
        spec = spec_for(arch)
        _, fb = op_fns(spec, "auto")
        times = []
        for t in lengths:
            a, w0, w = inputs(spec, b, t, h, d)
            times.append(median_seconds(fb, (a, w0, w), args.runs))
        ratios = [y / x for x, y in zip(times, times[1:])]
        steps = [math.log2(y / x) for x, y in zip(lengths, lengths[1:])]
        geo = math.exp(sum(math.log(r) / s for r, s in zip(ratios, steps)) / len(ratios)) if ratios else math.nan
        print(f"{arch:>8} {'auto':>9} | " + " | ".join(f"{x * 1e3:>7.1f}" for x in times)
              + f" | x{geo:.2f} (" + ", ".join(f"{r:.2f}" for r in ratios) + ")", flush=True)


def table_b(args):
    b, h, d = args.shape
    lengths = [int(x) for x in args.path_lengths.split(",")]
    paths = ("dual", "vmap_grad", "reference")
    print(f"\n(b) paths of the op: B{b} H{h} K=V={d}, chunk {CHUNK}, ms, median of {args.runs}")
    head = f"{'memory':>8} {'T':>6} | " + " | ".join(f"{p + ' fwd':>14} | {p + ' f+b':>14}" for p in paths)
    print(head + " | vmap_grad/dual f+b | reference/dual f+b")
    for arch in ("linear", "mlp"):
        spec = spec_for(arch)
        for t in lengths:
            a, w0, w = inputs(spec, b, t, h, d)
            res = {}
            for p in paths:
                if p == "reference" and t > args.max_ref_t:
                    res[p] = (None, None)
                    continue
                f, fb = op_fns(spec, p)
                res[p] = (try_time(f, (a, w0), args.runs), try_time(fb, (a, w0, w), args.runs))
            ratio = lambda p: ("n/a" if res[p][1] is None or res["dual"][1] is None
                               else f"{res[p][1] / res['dual'][1]:.1f}")
            print(f"{arch:>8} {t:>6} | " + " | ".join(f"{fmt(res[p][0], width=14)} | {fmt(res[p][1], width=14)}"
                                                    for p in paths)
                  + f" | {ratio('vmap_grad'):>18} | {ratio('reference'):>18}", flush=True)


def jax_mixer_seconds(dim, heads, dim_head, chunk, b, t, runs) -> tuple[float, int]:
    """The memory mixer at titans-pytorch's sizes: forward+backward (params and x) of sum(y)."""
    from layers.registry import LayerContext, build_mixer
    from train.config import RuntimeConfig
    from layers.memory.config import MemoryConfig
    cfg = MemoryConfig(num_heads=heads, head_dim=dim_head, arch="mlp", depth=2, expansion=4,
                       residual=True, layernorm=True, chunk_size=chunk, conv_size=0,
                       output_gate="sigmoid")
    ctx = LayerContext(d_model=dim, dtype=jnp.float32, runtime=RuntimeConfig(mesh_data=1),
                       init_std=0.02, out_std=0.02)
    mixer = build_mixer(cfg, ctx, rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(mixer)
    x = jax.random.normal(jax.random.key(1), (b, t, dim))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.ones((b, t), jnp.int32)

    @jax.jit
    def fb(params, x):
        def loss(params, x):
            y, _ = nnx.merge(graphdef, params)(x, positions=pos, segment_ids=seg)
            return jnp.sum(y)
        return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return median_seconds(fb, (params, x), runs), n_params


def torch_seconds(spec: dict, python: Path, passive: bool) -> dict:
    env = dict(os.environ)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        proc = subprocess.run([str(python), str(ROOT / "benchmarks" / "memory_torch_peer.py"), "--spec",
                               json.dumps(spec)], capture_output=True, text=True, timeout=1200, env=env)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 1200 s"}
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table_c(args):
    dim, heads, dh = args.torch_shape
    b = args.torch_batch
    lengths = [int(x) for x in args.torch_lengths.split(",")]
    python = Path(args.torch_python)
    have_torch = python.exists()
    print(f"\n(c) memory module fwd+bwd vs titans-pytorch: dim {dim}, {heads} heads of {dh}, MLP depth 2 x4, "
          f"chunk {CHUNK}, batch {b}, ms, median of {args.runs}")
    if not have_torch:
        print(f"    no {python}: run scripts/setup_torch.sh, then `.venv-torch/bin/pip install titans-pytorch`")
    print(f"{'T':>6} | {'chimera mixer':>13} | {'torch anchor=chunk':>18} | {'torch anchor=seq':>16} | "
          f"{'torch chunk / chimera':>21} | params chimera / torch")
    for t in lengths:
        jt, jp = jax_mixer_seconds(dim, heads, dh, CHUNK, b, t, args.runs)
        res = {}
        for anchor in ("chunk", "sequence"):
            spec = dict(dim=dim, heads=heads, dim_head=dh, depth=2, expansion=4, chunk=CHUNK, batch=b,
                        seq_len=t, anchor=anchor, runs=args.runs, warmup=1)
            res[anchor] = torch_seconds(spec, python, args.torch_omp_passive) if have_torch else {"error": "no torch"}
        cell = lambda r, w: f"{r['median_s'] * 1e3:>{w}.1f}" if "median_s" in r else f"{'n/a':>{w}}"
        ratio = f"{res['chunk']['median_s'] / jt:.2f}" if "median_s" in res["chunk"] else "n/a"
        tp = res["chunk"].get("params", "n/a")
        print(f"{t:>6} | {jt * 1e3:>13.1f} | {cell(res['chunk'], 18)} | {cell(res['sequence'], 16)} | "
              f"{ratio:>21} | {jp} / {tp}", flush=True)
        for anchor, r in res.items():
            if "error" in r:
                print(f"    torch anchor={anchor}: {r['error']}")
    versions = [r for r in res.values() if "version" in r]
    if versions:
        print(f"    titans-pytorch {versions[0]['version']}, torch {versions[0]['torch']}, "
              f"{versions[0]['threads']} threads")


def old_xla():
    """pallas_kernels/neural_memory/xla.py as of OLD_COMMIT, as a module, or None without git."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:pallas_kernels/neural_memory/xla.py"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        print(f"    (old op n/a: {e})")
        return None
    module = types.ModuleType("neural_memory_xla_old")
    exec(compile(src, f"{OLD_COMMIT[:7]}:pallas_kernels/neural_memory/xla.py", "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def op_implementation(fn):
    """While active, the op's "xla" implementation is `fn` (None: unchanged); trace inside."""
    from pallas_kernels import dispatch
    from pallas_kernels.neural_memory import api
    saved = dispatch.get(api.OP, "xla")
    if fn is not None:
        dispatch.register(api.OP, "xla", fn)
    try:
        yield
    finally:
        dispatch.register(api.OP, "xla", saved)


def op_call(module, spec, b, t, h, dh):
    """The op's fwd+bwd (grads of q, k, v, gates, W0) through `module`'s neural_memory, the
    mixer's segment_ids (all ones), compiled."""
    a, w0, w = inputs(spec, b, t, h, dh)
    seg = jnp.ones((b, t), jnp.int32)

    def loss(a, w0):
        return jnp.sum(module.neural_memory(spec, *a, initial_weights=w0, segment_ids=seg)[0] * w)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(a, w0).compile()
    return lambda: compiled(a, w0)


def table_d(args):
    from mixers import mixer_grad  # benchmarks/mixers.py
    from timing import cpu_model, interleaved, load, print_rows, ratio
    from train.config import AttentionConfig
    from layers.memory.config import MemoryConfig
    d, heads = 256, 4
    memory, attn = MemoryConfig(num_heads=heads), AttentionConfig(num_heads=heads)
    old = old_xla()
    print(f"\n(d) memory mixer per FLOP vs full attention, d={d}, {heads} heads of {d // heads}, fwd+bwd (grads "
          f"of params and x), float32; {args.bursts} bursts x {args.calls} calls\n    {cpu_model()}; jax "
          f"{jax.__version__}\n    before: {load()}", flush=True)
    body = []
    for b, t in ((8, 256), (1, 2048)):
        calls, flops = {}, {}
        calls["attn"], flops["attn"] = mixer_grad(attn, b, t, d)
        calls["memory"], flops["memory"] = mixer_grad(memory, b, t, d)
        calls["op"] = op_call(xla, memory.spec(), b, t, heads, d // heads)
        if old is not None:
            with op_implementation(old.neural_memory):
                calls["memory old op"], flops["memory old op"] = mixer_grad(memory, b, t, d)
            calls["op old"] = op_call(old, memory.spec(), b, t, heads, d // heads)
        times = interleaved(calls, args.bursts, args.calls)
        med = lambda n: 1e3 * statistics.median(times[n])
        for name in ("attn", "memory", "memory old op"):
            if name not in times:
                continue
            gflops = flops[name] * b * t / statistics.median(times[name]) / 1e9
            per_flop = ratio(times, "attn", name, flops[name] / flops["attn"])
            body.append([f"B{b}xT{t}", f"{name} mixer" if name == "attn" else name, f"{flops[name] / 1e6:.2f}",
                         f"{med(name):.1f}", f"{gflops:.1f}", f"{per_flop:.2f}", ""])
        speedup = f"{ratio(times, 'op old', 'op'):.2f}" if "op old" in times else "n/a"
        body.append([f"B{b}xT{t}", "op (xla)", "", f"{med('op'):.1f}", "", "", speedup])
        if "op old" in times:
            body.append([f"B{b}xT{t}", "op old (xla)", "", f"{med('op old'):.1f}", "", "", "1.00"])
    print_rows(["shape", "run", "MFLOP/token", "ms", "GFLOP/s", "GFLOP/s / attn", "op old / op"], body)
    print(f"    after: {load()}")
    print(f"    'memory old op': the same mixer with the op of {OLD_COMMIT[:7]}; 'op': the op alone on the "
          f"mixer's q/k/v/gate shapes (MemorySpec defaults, segment_ids all ones).")


def main(argv=None) -> int:
    triple = lambda s: tuple(int(x) for x in s.lower().split("x"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", default="abcd", help="any of a, b, c, d")
    ap.add_argument("--shape", type=triple, default=(2, 4, 32), help="BxHxD of tables a and b")
    ap.add_argument("--lengths", default="256,512,1024,2048,4096", help="table a")
    ap.add_argument("--path-lengths", default="256,1024", help="table b")
    ap.add_argument("--max-ref-t", type=int, default=1024, help="table b: skip the reference above this T")
    ap.add_argument("--torch-shape", type=triple, default=(128, 4, 32), help="dim x heads x dim_head of table c")
    ap.add_argument("--torch-batch", type=int, default=2)
    ap.add_argument("--torch-lengths", default="256,1024")
    ap.add_argument("--torch-python", default=str(ROOT / ".venv-torch" / "bin" / "python"))
    ap.add_argument("--torch-omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE for torch")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bursts", type=int, default=5, help="table d: interleaved bursts")
    ap.add_argument("--calls", type=int, default=2, help="table d: calls per burst (fastest kept)")
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, float32, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, fn in (("a", table_a), ("b", table_b), ("c", table_c), ("d", table_d)):
        if name in args.tables:
            fn(args)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

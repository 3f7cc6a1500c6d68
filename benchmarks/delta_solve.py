"""The delta rule's speed on CPU (pallas_kernels/delta_rule, xla path), as ratios of runs
interleaved in one process.

    python benchmarks/delta_solve.py                          # every table (~25 min on 2 busy cores)
    python benchmarks/delta_solve.py --tables inverse,op --bursts 5 --calls 2

Tables (--tables, comma separated):
  inverse  the unit-lower-triangular inverse (I + A)^-1 of the WY/UT form, forward, at
           [8, 4, 4, 64, 64] (B8 H4 T256 chunk 64) and [8, 4, 32, 64, 64] (T2048): the old
           batched `lax.linalg.triangular_solve` (kept in this script only, `solve_inverse`)
           against the blocked substitution `xla.unit_lower_inverse`, with both errors against
           a float64 numpy inverse. The "old" columns of the other tables run the xla path as
           it was: that solve, and autodiff through T @ rhs with T's own two-matmul VJP
           (`old_unit_lower_solve`), where the new path has `xla.unit_lower_solve`'s VJP.
  op       fwd+bwd of the delta rule's xla path against chunked linear attention's xla path
           (per-head scalar decay) at equal shapes, B = 1..8, T = 2048, H = 4, D = K = V = 64
           and 128: the time ratio and the speed per FLOP (FLOPs of
           layers/linear_attention/common.py: delta_chunk_flops against chunk_flops), and the
           delta rule with the old solve against the new one.
  ref      the delta rule's xla path against its token-scan reference, fwd and fwd+bwd, B = 2,
           T = 2048, H = 4, D = 64 and 128.
  mixer    fwd+bwd of the gdn mixer (configs/gdn_hybrid.py's settings, d = 256) against gla's
           (configs/gla_hybrid.py's), speed per FLOP (`flops_per_token` of each mixer); also gdn
           with the old solve, gdn without its short conv and gla with one (conv_size 4), to
           show what the conv costs.
  train    train-step tokens/s of the gdn_hybrid preset against tiny's, gla_hybrid's and
           gdn_hybrid's with the old solve, one step of each in turn (B8 x T256, fp32, AdamW).

Method: the candidates of a row run in turn, A, B, C, A, B, C, ... for --bursts bursts; a burst
is --calls calls and keeps its fastest (the least disturbed by other processes). A row reports
the median over bursts of the per-burst ratio, and the median times. Every table prints the CPU
model and os.getloadavg() before and after it: the machine may be shared, so only ratios of
interleaved runs carry from one run to another. jit'd, blocking on every call. No asserts.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import layers.catalog  # noqa: E402,F401  (registers the mixers)
import models  # noqa: E402
from layers.linear_attention.common import chunk_flops, delta_chunk_flops  # noqa: E402
from linear_attention import _functions, _inputs  # noqa: E402  (benchmarks/linear_attention.py)
from pallas_kernels.delta_rule import xla as delta_xla  # noqa: E402
from train.optim import make_optimizer  # noqa: E402
from train.step import init_state, make_train_step  # noqa: E402
from train_step import OPTIMIZER, VOCAB, make_batch  # noqa: E402  (benchmarks/train_step.py)
from timing import cpu_model, interleaved, ms, print_rows, ratio, table  # noqa: E402  (benchmarks/timing.py)
from mixers import mixer_grad  # noqa: E402  (benchmarks/mixers.py)

F32 = jnp.float32
TABLES = ("inverse", "op", "ref", "mixer", "train")


# ----------------------------------------------------------------------------- the old solve

@jax.custom_vjp
def solve_inverse(a: jax.Array) -> jax.Array:
    """The xla path's inverse before this change: (I + a)^-1 for strictly lower a [..., C, C]
    by one batched `lax.linalg.triangular_solve` against the identity, with the same two-matmul
    VJP as `xla.unit_lower_inverse`."""
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    return lax.linalg.triangular_solve(eye + a, eye, left_side=True, lower=True, unit_diagonal=True)


def _solve_fwd(a):
    t = solve_inverse(a)
    return t, t


def _solve_bwd(t, dt):
    tt = jnp.swapaxes(t, -1, -2)
    return (jnp.tril(-jnp.einsum("...ij,...jk,...kl->...il", tt, dt, tt), -1),)


solve_inverse.defvjp(_solve_fwd, _solve_bwd)


def old_unit_lower_solve(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """(I + a)^-1 rhs as the xla path computed it before: T by `solve_inverse`, then autodiff
    through T @ rhs (so the backward forms dT and -T^T dT T^T)."""
    return jnp.einsum("...ij,...jd->...id", solve_inverse(a), rhs)


@contextlib.contextmanager
def old_solve(enabled: bool = True):
    """While active, the delta rule's xla path traces with the old solve and its old backward
    (`old_unit_lower_solve`); compile inside."""
    saved = delta_xla.unit_lower_solve
    if enabled:
        delta_xla.unit_lower_solve = old_unit_lower_solve
    try:
        yield
    finally:
        delta_xla.unit_lower_solve = saved


# ----------------------------------------------------------------------------- tables

def _table(title: str, args):
    return table(title, args.bursts, args.calls)


def wy_matrix(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A [..., C, C] as the xla path builds it (float64): strictly lower
    beta_i exp(G_i - G_j) k_i . k_j with unit keys, beta = sigmoid(N(0, 1)), trained-like gates."""
    rng = np.random.default_rng(seed)
    *lead, c, _ = shape
    k = rng.normal(size=(*lead, c, 64))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = 1 / (1 + np.exp(-rng.normal(size=(*lead, c))))
    g = np.cumsum(-np.log1p(np.exp(-(rng.normal(size=(*lead, c)) + 3.0))), axis=-1)
    decay = np.exp(np.minimum(g[..., :, None] - g[..., None, :], 0.0))
    return np.tril(beta[..., None] * (k @ np.swapaxes(k, -1, -2)) * decay, -1)


def inverse_table(args) -> None:
    with _table("inverse: old triangular_solve / new blocked substitution (forward)", args):
        body = []
        for shape in ((8, 4, 4, 64, 64), (8, 4, 32, 64, 64)):
            a64 = wy_matrix(shape)
            exact = np.linalg.inv(np.eye(shape[-1]) + a64)
            a = jnp.asarray(a64, F32)
            fns = {"old": jax.jit(solve_inverse), "new": jax.jit(delta_xla.unit_lower_inverse)}
            err = {n: np.abs(np.asarray(f(a), np.float64) - exact).max() / np.abs(exact).max()
                   for n, f in fns.items()}
            times = interleaved({n: (lambda f=f: f(a)) for n, f in fns.items()}, args.bursts, args.calls)
            body.append(["x".join(map(str, shape)), f"{ms(times, 'old'):.2f}", f"{ms(times, 'new'):.2f}",
                         f"{ratio(times, 'old', 'new'):.1f}", f"{err['old']:.1e}", f"{err['new']:.1e}"])
        print_rows(["shape", "old ms", "new ms", "old/new", "old rel err", "new rel err"], body)


def op_table(args) -> None:
    t, h = 2048, 4
    with _table(f"op: delta rule xla vs chunked linear attention xla, fwd+bwd, T={t} H={h}, "
               "scalar decay, chunk 64", args):
        body = []
        for d in (64, 128):
            for b in (1, 2, 4, 8):
                calls = {}
                for name, op, old in (("delta", "delta", False), ("linear", "linear", False),
                                      ("delta_old", "delta", True)):
                    xs = _inputs(op, b, t, h, d, "scalar", F32)
                    with old_solve(old):
                        compiled = _functions(op, "xla", 64)[1].lower(*xs).compile()
                    calls[name] = lambda c=compiled, xs=xs: c(*xs)
                times = interleaved(calls, args.bursts, args.calls)
                flops = delta_chunk_flops(h, d, d, t) / chunk_flops(h, d, d, t)
                body.append([str(b), str(d), f"{ms(times, 'delta'):.0f}", f"{ms(times, 'linear'):.0f}",
                             f"{ms(times, 'delta_old'):.0f}", f"{ratio(times, 'delta', 'linear'):.2f}",
                             f"{flops:.2f}", f"{ratio(times, 'linear', 'delta', flops):.2f}",
                             f"{ratio(times, 'delta_old', 'delta'):.2f}"])
        print_rows(["B", "D", "delta ms", "linear ms", "delta old ms", "delta/linear time",
                    "FLOP ratio", "delta/linear per FLOP", "old/new delta"], body)
    print("per FLOP: (delta FLOPs / delta time) / (linear FLOPs / linear time), 1.00 = equally "
          "efficient; old = the xla path as it was (`old_unit_lower_solve`).")


def ref_table(args) -> None:
    b, t, h = 2, 2048, 4
    with _table(f"ref: delta rule reference (token scan) / xla, B={b} T={t} H={h}, scalar decay", args):
        body = []
        for d in (64, 128):
            xs = _inputs("delta", b, t, h, d, "scalar", F32)
            calls = {}
            for impl in ("reference", "xla"):
                fwd, fwd_bwd = _functions("delta", impl, 64)
                calls[f"{impl} fwd"] = lambda f=fwd: f(*xs[:-1])
                calls[f"{impl} f+b"] = lambda f=fwd_bwd: f(*xs)
            times = interleaved(calls, args.bursts, args.calls)
            body.append([str(d)] + [f"{ms(times, n):.0f}" for n in calls]
                        + [f"{ratio(times, f'reference {m}', f'xla {m}'):.2f}" for m in ("fwd", "f+b")])
        print_rows(["D", "ref fwd ms", "ref f+b ms", "xla fwd ms", "xla f+b ms", "ref/xla fwd",
                    "ref/xla f+b"], body)


def _preset_mixer(preset: str, kind: str):
    return importlib.import_module(f"configs.{preset}").config().model.mixers[kind]


def mixer_table(args) -> None:
    d = 256
    gdn, gla = _preset_mixer("gdn_hybrid", "gdn"), _preset_mixer("gla_hybrid", "gla")
    variants = {"gla": (gla, False), "gdn": (gdn, False), "gdn old": (gdn, True),
                "gdn conv 0": (dataclasses.replace(gdn, conv_size=0), False),
                "gla conv 4": (dataclasses.replace(gla, conv_size=4), False)}
    with _table(f"mixer: fwd+bwd (grads of params and x) per FLOP, relative to gla, d={d}", args):
        body = []
        for b, t in ((8, 256), (1, 2048)):
            calls, flops = {}, {}
            for name, (cfg, old) in variants.items():
                with old_solve(old):
                    calls[name], flops[name] = mixer_grad(cfg, b, t, d)
            times = interleaved(calls, args.bursts, args.calls)
            for name in variants:
                per_flop = ratio(times, "gla", name, flops[name] / flops["gla"])
                body.append([f"B{b}xT{t}", name, f"{flops[name] / 1e6:.2f}", f"{ms(times, name):.1f}",
                             f"{per_flop:.2f}"])
        print_rows(["shape", "mixer", "MFLOP/token", "ms", "speed per FLOP / gla"], body)
    print("gdn old: gdn with `old_unit_lower_solve`; conv 0 / conv 4: the short causal conv removed / added "
          "(layers/conv.py).")


def train_table(args) -> None:
    b, t = 8, 256
    runs = {"tiny": ("tiny", False), "gdn_hybrid": ("gdn_hybrid", False),
            "gla_hybrid": ("gla_hybrid", False), "gdn_hybrid old": ("gdn_hybrid", True)}
    batch = make_batch(b, t, 0)
    with _table(f"train: train-step tokens/s, B{b} x T{t}, fp32", args):
        calls, flops = {}, {}
        for name, (preset, old) in runs.items():
            cfg = importlib.import_module(f"configs.{preset}").config()
            mc = dataclasses.replace(cfg.model, vocab_size=VOCAB)
            tx, schedule = make_optimizer(OPTIMIZER, 10_000)
            graphdef, state = init_state(models.build(mc, cfg.runtime, seed=0), tx, 0)
            step = make_train_step(graphdef, tx, schedule, z_loss=mc.z_loss)
            with old_solve(old):
                compiled = step.lower(state, batch).compile()
            holder = {"state": state}

            def call(compiled=compiled, holder=holder):
                holder["state"], metrics = compiled(holder["state"], batch)  # the state is donated
                return metrics

            calls[name] = call
            flops[name] = sum(models.flops_per_token(mc, t).values())
        times = interleaved(calls, args.bursts, args.calls)
        body = [[name, f"{flops[name] / 1e6:.1f}", f"{b * t / statistics.median(times[name]):.0f}",
                 f"{ratio(times, 'tiny', name):.2f}",
                 f"{ratio(times, 'tiny', name, flops[name] / flops['tiny']):.2f}"] for name in runs]
        print_rows(["preset", "MFLOP/token", "tokens/s", "tokens/s / tiny", "FLOP/s / tiny"], body)
    print("gdn_hybrid old: with `old_unit_lower_solve`. tokens/s from the median step time.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tables", default=",".join(TABLES), help=f"comma separated, of {TABLES}")
    ap.add_argument("--bursts", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2, help="calls per burst; the fastest is kept")
    args = ap.parse_args()
    chosen = args.tables.split(",")
    for name in chosen:
        if name not in TABLES:
            raise SystemExit(f"--tables: unknown table {name!r}; known: {TABLES}")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {cpu_model()}; float32")
    for name in chosen:
        globals()[f"{name}_table"](args)


if __name__ == "__main__":
    main()

"""The layer stack: repeated periods of the pattern, scanned, plus a remainder.

With num_layers = n * P + r for a pattern of length P, the n full periods are created with
stacked params (`nnx.vmap`) and applied with one `lax.scan` whose carry is only the activations
(params and caches are scanned inputs/outputs, never carried); the first r names of the pattern
follow as a plain Period. With `ModelConfig.scan=False` all periods are a plain Python loop.
Either way each period runs under the remat policy of `RuntimeConfig.remat`.

Compile time (measured on XLA:CPU, benchmarks/mixers.py --tables compile): differentiating the
scan makes the forward loop write every residual of a period into a stacked buffer and the
backward loop read it back, one dynamic-update-slice / dynamic-slice kernel per residual shape.
Attention's residuals (blocked q/k/v, output, statistics) are 5- and 6-D, and LLVM took 0.2-0.4 s
to compile each such kernel (loop-strength reduction over the nested loops; 2-4-D ones take
~0.02-0.04 s), which made the scanned train step compile slower than a loop of 12 layers.
`_flat_residuals` hands the scan those residuals as 1-D arrays instead: a reshape behind an
optimization barrier, the same values and gradients bit for bit, no extra copy; the stacked
buffers become 2-D [periods, size] and their kernels cheap. Only >= 5-D residuals are
flattened: flattening all of them as well saved a little more compile time but cost ~5% of
step time (the barriers stop XLA fusing smaller residuals into their consumers).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.registry import LayerContext
from layers.sharding import active_mesh
from models.block import Period
from models.config import ModelConfig

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


FLATTEN_NDIM = 5  # residuals with this many dims or more are stacked flat (module docstring)


def _barrier(a):
    """A no-op that XLA may not fuse through: keeps a reshape out of the stacking kernels,
    which would otherwise index the n-D shape again (and be one kernel per shape, not per size).
    One barrier per array, so a residual that does not change over the periods stays
    loop-invariant and the scan still hoists it."""
    return jax.lax.optimization_barrier(a)


def _flat_residuals(fn):
    """fn(state, x, positions, segment_ids) -> y, unchanged in value and gradient, whose VJP
    keeps its >= FLATTEN_NDIM-D residuals as 1-D arrays (module docstring: cheap stacking in
    a scan). A residual that is an input itself (a param, x) stays as it is, so the scan still
    passes stacked params through without copying them. Reverse mode only (a custom_vjp), so
    the Stack uses it for the scanned periods without a cache and without a mesh (there,
    flattening would merge a sharded dim with its neighbours).
    """
    shapes = {}

    @jax.custom_vjp
    def f(state, x, positions, segment_ids):
        return fn(state, x, positions, segment_ids)

    def f_fwd(state, x, positions, segment_ids):
        y, vjp_fn = jax.vjp(lambda s, x: fn(s, x, positions, segment_ids), state, x)
        leaves, shapes["tree"] = jax.tree.flatten(vjp_fn)
        inputs = {id(a) for a in jax.tree.leaves((state, x, positions, segment_ids))}
        shapes["leaves"] = [r.shape if r.ndim >= FLATTEN_NDIM and id(r) not in inputs else None for r in leaves]
        return y, [r if s is None else _barrier(r.reshape(-1)) for r, s in zip(leaves, shapes["leaves"])]

    def f_bwd(res, dy):
        leaves = [r if s is None else _barrier(r).reshape(s) for r, s in zip(res, shapes["leaves"])]
        dstate, dx = jax.tree.unflatten(shapes["tree"], leaves)(dy)
        return dstate, dx, None, None

    f.defvjp(f_fwd, f_bwd)
    return f


class Stack(nnx.Module):
    def __init__(self, cfg: ModelConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        p = cfg.pattern
        n, r = divmod(cfg.num_layers, len(p))
        self.remat = ctx.runtime.remat
        self.num_scanned = n if cfg.scan else 0
        if self.num_scanned:
            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Period(p, cfg, ctx, rngs=rngs)
            self.scanned = make(rngs)
            loop = []
        else:
            self.scanned = None
            loop = [p] * n
        if r:
            loop.append(p[:r])
        self.loop = nnx.List([Period(names, cfg, ctx, rngs=rngs) for names in loop])

    def _apply(self, period_def, state, x, cache, positions, segment_ids, *, flat=False):
        def run(state, x, cache, positions, segment_ids):
            return nnx.merge(period_def, state)(x, positions=positions, segment_ids=segment_ids, cache=cache)
        if self.remat != "none":
            run = jax.checkpoint(run, policy=REMAT_POLICIES[self.remat])
        if flat and cache is None and active_mesh() is None:
            y = _flat_residuals(lambda s, x, p, g: run(s, x, None, p, g)[0])(state, x, positions, segment_ids)
            return y, None
        return run(state, x, cache, positions, segment_ids)

    def __call__(self, x, *, positions, segment_ids, cache=None):
        """x [B, T, d] -> (x, cache). cache: None or the structure from `init_cache`."""
        new_cache = {"scanned": None, "loop": []}
        if self.scanned is not None:
            period_def, stacked = nnx.split(self.scanned)

            def body(x, xs):
                state, c = xs
                return self._apply(period_def, state, x, c, positions, segment_ids, flat=True)

            xs = (stacked, None if cache is None else cache["scanned"])
            x, new_cache["scanned"] = jax.lax.scan(body, x, xs)
        for i, period in enumerate(self.loop):
            period_def, state = nnx.split(period)
            x, c = self._apply(period_def, state, x, None if cache is None else cache["loop"][i],
                               positions, segment_ids)
            new_cache["loop"].append(c)
        return x, (None if cache is None else new_cache)

    def _first_scanned_period(self) -> Period:
        """One period of the scanned stack (its params sliced at index 0): all periods share
        the same structure, so it stands for each of them in cache shapes and descriptions.
        Works on abstract models (nnx.eval_shape) too."""
        def first(a):
            return jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a[0]
        period_def, stacked = nnx.split(self.scanned)
        return nnx.merge(period_def, jax.tree.map(first, stacked))

    def init_cache(self, batch: int, max_len: int, dtype) -> dict:
        scanned = None
        if self.scanned is not None:
            scanned = jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_scanned, *a.shape)),
                                   self._first_scanned_period().init_cache(batch, max_len, dtype))
        return {"scanned": scanned, "loop": [p.init_cache(batch, max_len, dtype) for p in self.loop]}

    def periods(self):
        """(names, block modules) for every layer in order, for logging."""
        out = []
        if self.scanned is not None:
            out += [list(self._first_scanned_period().blocks)] * self.num_scanned
        out += [list(p.blocks) for p in self.loop]
        return [b for blocks in out for b in blocks]

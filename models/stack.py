"""The layer stack: repeated periods of the pattern, scanned, plus a remainder.

With num_layers = n * P + r for a pattern of length P, the n full periods are created with
stacked params (`nnx.vmap`) and applied with one `lax.scan` whose carry is only the activations
(params and caches are scanned inputs/outputs, never carried); the first r names of the pattern
follow as a plain Period. With `ModelConfig.scan=False` all periods are a plain Python loop.
Either way each period runs under the remat policy of `RuntimeConfig.remat`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.registry import LayerContext
from models.block import Period
from train.config import ModelConfig

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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

    def _apply(self, period_def, state, x, cache, positions, segment_ids):
        def run(state, x, cache):
            return nnx.merge(period_def, state)(x, positions=positions, segment_ids=segment_ids, cache=cache)
        if self.remat != "none":
            run = jax.checkpoint(run, policy=REMAT_POLICIES[self.remat])
        return run(state, x, cache)

    def __call__(self, x, *, positions, segment_ids, cache=None):
        """x [B, T, d] -> (x, cache). cache: None or the structure from `init_cache`."""
        new_cache = {"scanned": None, "loop": []}
        if self.scanned is not None:
            period_def, stacked = nnx.split(self.scanned)

            def body(x, xs):
                state, c = xs
                return self._apply(period_def, state, x, c, positions, segment_ids)

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

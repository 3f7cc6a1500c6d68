"""The plumbing moba and nsa share: projections, RoPE, the full-length KV cache, dense masked
attention for the decode path, and the one-line description.

Shapes: B batch, T new tokens, S cache slots, H query heads, K kv heads (H % K == 0), D head
dim, d model width.

Decode cache (`init_cache`): layers/kv_cache.py's arrays (k, v [B, S, K, D], segment_ids,
positions [B, S], index) used as a FULL-LENGTH cache, never a ring: slot j holds the token of
index j of the row, because the routing of both mixers needs the whole history in index order
(MoBA's block means, NSA's compressed tokens). `write` stores T new tokens at slots
index .. index + T - 1 and returns the whole cache; `init_cache`'s max_len must cover every
token the row will hold (train/generate.py sizes it as prompt + new tokens): writing past the
end is not detected inside jit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from layers.attention.mixer import init_head_projections, project_heads
from layers.kv_cache import init_kv_cache
from layers.registry import LayerContext

F32 = jnp.float32


def mean_visible(length: int, fn) -> float:
    """Mean over query indices t in [0, length) of fn(t) (numpy, for FLOP counts)."""
    return float(np.mean(fn(np.arange(length))))


class SparseAttentionBase(nnx.Module):
    """q/k/v/o projections, optional qk_norm and RoPE, the cache; subclasses add the routing."""

    def __init__(self, cfg, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.runtime = ctx.runtime
        init_head_projections(self, cfg, ctx, rngs)

    def key_transform(self, k: jax.Array, segment_ids: jax.Array, cache: dict | None):
        """Hook on the projected keys [B, T, K*D] before qk_norm / RoPE: (k, cache)."""
        return k, cache

    def project(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: dict | None = None):
        """x [B, T, d] -> (q [B, T, H, D], k, v [B, T, K, D], cache): normed and rotated as the
        attention sees them (the routing scores rotated q and k too, as MoBA's)."""
        k, cache = self.key_transform(self.k_proj(x), segment_ids, cache)
        q, k, v = project_heads(self, x, positions, k)
        return q, k, v, cache

    def output(self, o: jax.Array) -> jax.Array:
        b, t = o.shape[:2]
        return self.o_proj(o.reshape(b, t, self.heads * self.head_dim))

    # ------------------------------------------------------------------------- cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """A full-length KV cache of max_len slots (see the module docstring)."""
        return init_kv_cache(batch, max_len, self.kv_heads, self.head_dim, dtype)

    @staticmethod
    def write(cache: dict, k, v, segment_ids, positions):
        """Store T new tokens at slots index .. index + T - 1. Returns (k_all, v_all [B, S, K, D],
        seg_all [B, S], q_idx int32 [T] (the new tokens' indices), new cache)."""
        start = cache["index"]
        new = dict(cache)
        for name, val in (("k", k), ("v", v), ("segment_ids", segment_ids), ("positions", positions)):
            val = val.astype(cache[name].dtype)
            new[name] = lax.dynamic_update_slice_in_dim(cache[name], val, start, axis=1)
        new["index"] = start + k.shape[1]
        q_idx = start + jnp.arange(k.shape[1], dtype=jnp.int32)
        return new["k"], new["v"], new["segment_ids"], q_idx, new

    # ------------------------------------------------------------------------- describe

    def describe_heads(self) -> str:
        text = f"H={self.heads} KV={self.kv_heads} D={self.head_dim}"
        return text + (", qk_norm" if self.cfg.qk_norm else "")

    def describe_impl(self) -> str:
        return f"block-sparse impl={self.runtime.sparse_attention_impl or 'auto'}"


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     return_probs: bool = False):
    """Dense softmax attention of q [B, Tq, H, D] over k, v [B, L, K, D] (GQA) where mask
    [B, Hx, Tq, L] (Hx in {1, H}) is True, scale 1/sqrt(D), float32 scores and statistics.
    A row with nothing visible gives 0. Returns o [B, Tq, H, D] in q.dtype (and the
    probabilities [B, H, Tq, L] float32 when return_probs)."""
    b, tq, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qf = q.astype(F32).reshape(b, tq, kvh, g, d)
    s = jnp.einsum("btkgd,blkd->bkgtl", qf, k.astype(F32)).reshape(b, h, tq, k.shape[1]) / np.sqrt(d)
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bkgtl,blkd->btkgd", p.reshape(b, kvh, g, tq, -1), v.astype(F32)).reshape(b, tq, h, d)
    o = o.astype(q.dtype)
    return (o, p) if return_probs else o

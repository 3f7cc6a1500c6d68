"""Dense masked block-sparse attention: the definition every other implementation is tested
against.

The layout is expanded to a dense [Bl, Hl, Tq, Tk] mask (`layout.dense_mask`), combined with the
segment ids, and attention is computed over the whole [B, H, Tq, Tk] score matrix in float32.
O(Tq Tk) time and memory: for tests, short sequences and as the last fallback. Differentiated
by JAX's autodiff; the few `where`s below exist so that rows without any visible key give
o = 0, lse = -inf and finite (zero) gradients instead of NaN.
Dimension letters as in common.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import common
from pallas_kernels.block_sparse_attention.layout import dense_mask

F32 = common.F32


def visibility(layout, q_seg, kv_seg) -> jax.Array:
    """bool [B, Hl, Tq, Tk]: the layout's mask AND same nonzero segment."""
    same = (q_seg[:, None, :, None] == kv_seg[:, None, None, :]) & (q_seg != 0)[:, None, :, None]
    return dense_mask(layout) & same


def block_sparse_attention(q, k, v, layout, q_seg, kv_seg, sinks, *, score: str,
                           sigmoid_bias: float, logit_softcap: float | None, scale: float):
    """q [B,Tq,H,D], k [B,Tk,K,D], v [B,Tk,K,Dv], q_seg [B,Tq], kv_seg [B,Tk], sinks None | fp32
    [H] -> (o [B,Tq,H,Dv] in q.dtype, lse fp32 [B,H,Tq]; zeros for score="sigmoid")."""
    h, kv_heads = q.shape[2], k.shape[2]
    # Query head h reads kv head h // (H // K): repeating each kv head H // K times in place.
    kh = jnp.repeat(k, h // kv_heads, axis=2).astype(F32)
    vh = jnp.repeat(v, h // kv_heads, axis=2).astype(F32)
    s = scale * jnp.einsum("bqhd,bkhd->bhqk", q.astype(F32), kh)
    s = common.softcap(s, logit_softcap)
    vis = visibility(layout, q_seg, kv_seg)  # broadcasts over H when Hl == 1
    if vis.shape[1] not in (1, h):  # Hl = K: kv head j's lists serve its query heads
        vis = jnp.repeat(vis, h // vis.shape[1], axis=1)
    if score == "sigmoid":
        p = jnp.where(vis, jax.nn.sigmoid(s + sigmoid_bias), 0.0)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, vh)
        return o.astype(q.dtype), jnp.zeros(p.shape[:3], F32)

    s = jnp.where(vis, s, -jnp.inf)
    m = jnp.max(s, axis=-1)  # [B, H, Tq], -inf on empty rows
    if sinks is not None:
        m = jnp.maximum(m, sinks[None, :, None])
    # Any finite shift gives the same result; stop_gradient keeps max's gradient out of it.
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.exp(s - m[..., None])  # exp(-inf) = 0 exactly at invisible pairs
    l = jnp.sum(e, axis=-1)
    if sinks is not None:
        l = l + jnp.exp(sinks[None, :, None] - m)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o = jnp.einsum("bhqk,bkhd->bqhd", e / l_safe[..., None], vh)
    lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
    return o.astype(q.dtype), lse

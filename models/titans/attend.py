"""The attention math of the Titans blocks, as pure functions.

Every Titans attention sees N_p persistent tokens besides the sequence (Titans sec. 3.3): keys
that every non-padding query sees, whatever its document and position. They cannot be given a
segment id (a row packs several documents), so the attention is computed in branches over
disjoint key sets, each returning its log-sum-exp, and merged exactly
(`pallas_kernels.block_sparse_attention.api.merge`):

    persistent branch   dense, [Tq, N_p] scores (N_p is a handful)
    window branch       the block-sparse op with a sliding-window layout (MAG / MAL training
                        and prefill: cost O(T window), never T x T)
    cache branch        dense over the ring-buffer KV cache (MAG / MAL decode)

MAC attends inside one segment, over [persistent | retrieved | tokens], with one dense masked
call (C x (N_p + 2 C) scores per segment).

Shapes: B batch, Tq queries, Tk keys, H query heads, K kv heads (H % K == 0; query head h reads
kv head h // (H // K)), D head dim.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.attention import masking
from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.api import block_sparse_attention, merge

F32 = jnp.float32

__all__ = ["cache_branch", "dense_attention", "merge", "persistent_branch", "window_branch"]


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Softmax attention with an explicit mask.

    q [B, Tq, H, D]; k, v [B, Tk, K, D]; mask bool [B, Tq, Tk] (key j visible to query i).
    Returns (o [B, Tq, H, D] in q.dtype, zero where nothing is visible; lse [B, H, Tq] float32,
    -inf where nothing is visible). Scores, softmax and accumulation in float32; a finite fill
    and a `where` on p keep empty rows free of inf - inf in value and gradient.
    """
    b, tq, h, d = q.shape
    kh = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.astype(F32).reshape(b, tq, kh, h // kh, d)
    s = jnp.einsum("bqkgd,btkd->bkgqt", qg, k.astype(F32)) * scale  # [B, K, G, Tq, Tk]
    m = mask[:, None, None]
    s = jnp.where(m, s, jnp.finfo(F32).min)
    mx = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(m, jnp.exp(s - mx), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    seen = den > 0
    den = jnp.where(seen, den, 1.0)
    o = jnp.einsum("bkgqt,btkd->bqkgd", p / den, v.astype(F32))
    lse = jnp.where(seen, mx + jnp.log(den), -jnp.inf)[..., 0]  # [B, K, G, Tq]
    return o.reshape(b, tq, h, v.shape[-1]).astype(q.dtype), lse.reshape(b, h, tq)


def persistent_branch(q: jax.Array, pk: jax.Array, pv: jax.Array, segment_ids: jax.Array):
    """Attention over the N_p persistent tokens: q [B, Tq, H, D], pk, pv [N_p, K, D],
    segment_ids [B, Tq] (padding queries see nothing) -> (o, lse) as dense_attention."""
    b, tq = q.shape[:2]
    n = pk.shape[0]
    kb = jnp.broadcast_to(pk[None], (b, *pk.shape))
    vb = jnp.broadcast_to(pv[None], (b, *pv.shape))
    mask = jnp.broadcast_to((segment_ids != 0)[:, :, None], (b, tq, n))
    return dense_attention(q, kb, vb, mask)


def window_branch(q, k, v, segment_ids, *, window: int, block_q: int, block_k: int,
                  implementation: str | None):
    """Sliding-window causal self-attention by token index (i - window < j <= i, same
    document) through the block-sparse op: q [B, T, H, D], k, v [B, T, K, D] ->
    (o [B, T, H, D], lse [B, H, T]). Positions are assumed to increase by one along each
    document (as the attention mixer's block-sparse path assumes)."""
    t = q.shape[1]
    layout = masks.causal_layout(t, window, block_q, block_k)
    return block_sparse_attention(q, k, v, layout, segment_ids=segment_ids,
                                  implementation=implementation)


def cache_branch(q, keys: dict, segment_ids, positions, *, window: int):
    """New queries over the tokens already in a ring-buffer KV cache (layers/kv_cache.py):
    q [B, Tq, H, D]; keys {"k", "v": [B, S, K, D], "segment_ids", "positions": [B, S]};
    visibility by `masking.visible` (same document, earlier position, within the window)
    -> (o, lse) as dense_attention."""
    mask = masking.visible(segment_ids[:, :, None], positions[:, :, None],
                           keys["segment_ids"][:, None, :], keys["positions"][:, None, :], window)
    return dense_attention(q, keys["k"], keys["v"], mask)

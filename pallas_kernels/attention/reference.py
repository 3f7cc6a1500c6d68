"""Dense masked softmax attention: the definition the other implementations are tested against.

It materialises the [Tq, Tk] scores per (batch, head), so it is only for tests, short sequences
and decode with a short cache. Everything is computed in float32 and differentiated by JAX's
autodiff. Dimension letters: B batch, T time (Tq queries, Tk keys), H query heads, K kv heads,
G = H // K query heads per kv head, D head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention import masking


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              q_segment_ids: jax.Array, q_positions: jax.Array,
              kv_segment_ids: jax.Array, kv_positions: jax.Array, *,
              window: int | None, logit_softcap: float | None, scale: float,
              index_causal: bool = False, block_q: int | None = None,
              block_k: int | None = None) -> jax.Array:
    """Softmax attention with the mask of `masking.visible`.

    q: [B, Tq, H, D]; k, v: [B, Tk, K, D]; ids and positions: int [B, Tq] / [B, Tk].
    Query head h uses kv head h // G. Returns [B, Tq, H, D] in q.dtype; a query that sees no
    key returns zeros (and zero, finite gradients).
    index_causal, block_q, block_k: scheduling hints of the blocked implementations, unused.
    """
    del index_causal, block_q, block_k
    return _attention(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions,
                      window=window, logit_softcap=logit_softcap, scale=scale)[0]


def attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array,
                       q_segment_ids: jax.Array, q_positions: jax.Array,
                       kv_segment_ids: jax.Array, kv_positions: jax.Array, *,
                       window: int | None, logit_softcap: float | None, scale: float,
                       index_causal: bool = False, block_q: int | None = None,
                       block_k: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`attention` plus each query's log-sum-exp over its visible (scaled, soft-capped) logits:
    lse float32 [B, Tq, H], 0 for a query that sees no key."""
    del index_causal, block_q, block_k
    return _attention(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions,
                      window=window, logit_softcap=logit_softcap, scale=scale)


def _attention(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions, *,
               window, logit_softcap, scale) -> tuple[jax.Array, jax.Array]:
    """(out [B, Tq, H, D] in q.dtype, lse float32 [B, Tq, H])."""
    b, tq, h, d = q.shape
    kv_heads = k.shape[2]
    f32 = jnp.float32
    qg = q.astype(f32).reshape(b, tq, kv_heads, h // kv_heads, d)
    s = jnp.einsum("bqkgd,btkd->bkgqt", qg, k.astype(f32)) * scale  # [B, K, G, Tq, Tk]
    s = masking.softcap(s, logit_softcap)
    mask = masking.visible(q_segment_ids[:, :, None], q_positions[:, :, None],
                           kv_segment_ids[:, None, :], kv_positions[:, None, :], window)
    mask = mask[:, None, None]  # [B, 1, 1, Tq, Tk]
    # A finite fill and a `where` on p (not -inf in s) keep rows without any visible key free
    # of inf - inf, in the forward pass and in the gradient.
    s = jnp.where(mask, s, jnp.finfo(f32).min)
    m = jax.lax.stop_gradient(s.max(axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    seen = denom > 0
    p = p / jnp.where(seen, denom, 1.0)
    out = jnp.einsum("bkgqt,btkd->bqkgd", p, v.astype(f32))
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), 0.0)[..., 0]  # [B, K, G, Tq]
    lse = lse.transpose(0, 3, 1, 2).reshape(b, tq, h)
    return out.reshape(b, tq, h, v.shape[-1]).astype(q.dtype), lse

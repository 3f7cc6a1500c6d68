"""Dense masked attention: the definition the other implementations are tested against.

It materialises the [Tq, Tk] scores per (batch, head), so it is only for tests, short sequences
and decode with a short cache. Everything is computed in float32 and differentiated by JAX's
autodiff (sinks included). Dimension letters: B batch, T time (Tq queries, Tk keys), H query
heads, K kv heads, G = H // K query heads per kv head, D q/k head dim, Dv value head dim.

For query i of head h, with s_ij the scaled, soft-capped logit and j over the visible keys:

    softmax: o_i = sum_j exp(s_ij - lse_i) v_j,  lse_i = log(sum_j exp(s_ij) + exp(sink_h))
             (no sinks: no sink term; nothing visible and no sink: o_i = 0, lse_i = 0)
    sigmoid: o_i = sum_j sigmoid(s_ij + bias) v_j,  lse_i = log(sum_j sigmoid(s_ij + bias))
             (nothing visible: o_i = 0, lse_i = 0)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention import masking


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              q_segment_ids: jax.Array, q_positions: jax.Array,
              kv_segment_ids: jax.Array, kv_positions: jax.Array, *,
              window: int | None, logit_softcap: float | None, scale: float,
              sinks: jax.Array | None = None, score: str = "softmax",
              sigmoid_bias: float = 0.0, index_causal: bool = False,
              block_q: int | None = None, block_k: int | None = None) -> jax.Array:
    """Attention with the mask of `masking.visible` and the score of the module docstring.

    q: [B, Tq, H, D]; k: [B, Tk, K, D]; v: [B, Tk, K, Dv]; ids and positions: int [B, Tq] /
    [B, Tk]; sinks: None or float [H] (softmax only). Query head h uses kv head h // G.
    Returns [B, Tq, H, Dv] in q.dtype; a query that sees no key returns zeros (and zero, finite
    gradients).
    index_causal, block_q, block_k: scheduling hints of the blocked implementations, unused.
    """
    del index_causal, block_q, block_k
    return _attention(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions,
                      window=window, logit_softcap=logit_softcap, scale=scale, sinks=sinks,
                      score=score, sigmoid_bias=sigmoid_bias)[0]


def attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array,
                       q_segment_ids: jax.Array, q_positions: jax.Array,
                       kv_segment_ids: jax.Array, kv_positions: jax.Array, *,
                       window: int | None, logit_softcap: float | None, scale: float,
                       sinks: jax.Array | None = None, score: str = "softmax",
                       sigmoid_bias: float = 0.0, index_causal: bool = False,
                       block_q: int | None = None,
                       block_k: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`attention` plus each query's lse float32 [B, Tq, H] (module docstring; 0 for a query
    that sees no key and has no sink)."""
    del index_causal, block_q, block_k
    return _attention(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions,
                      window=window, logit_softcap=logit_softcap, scale=scale, sinks=sinks,
                      score=score, sigmoid_bias=sigmoid_bias)


def _attention(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions, *,
               window, logit_softcap, scale, sinks, score,
               sigmoid_bias) -> tuple[jax.Array, jax.Array]:
    """(out [B, Tq, H, Dv] in q.dtype, lse float32 [B, Tq, H])."""
    b, tq, h, d = q.shape
    kv_heads, dv = k.shape[2], v.shape[3]
    g = h // kv_heads
    f32 = jnp.float32
    qg = q.astype(f32).reshape(b, tq, kv_heads, g, d)
    s = jnp.einsum("bqkgd,btkd->bkgqt", qg, k.astype(f32)) * scale  # [B, K, G, Tq, Tk]
    s = masking.softcap(s, logit_softcap)
    mask = masking.visible(q_segment_ids[:, :, None], q_positions[:, :, None],
                           kv_segment_ids[:, None, :], kv_positions[:, None, :], window)
    mask = mask[:, None, None]  # [B, 1, 1, Tq, Tk]
    if score == "sigmoid":
        x = s + sigmoid_bias
        p = jnp.where(mask, jax.nn.sigmoid(x), 0.0)
        # log sum_j sigmoid(x_j) as a log-sum-exp of log-sigmoids: weights far below 1e-38
        # (x < -87) would underflow to a sum of 0 and a log of -inf.
        _, _, lse = _log_sum_exp(jax.nn.log_sigmoid(x), mask, None)
    else:
        sink = None if sinks is None else sinks.astype(f32).reshape(1, kv_heads, g, 1, 1)
        e, denom, lse = _log_sum_exp(s, mask, sink)
        p = e / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgqt,btkd->bqkgd", p, v.astype(f32))
    lse = lse[..., 0].transpose(0, 3, 1, 2).reshape(b, tq, h)  # [B, K, G, Tq] -> [B, Tq, H]
    return out.reshape(b, tq, h, dv).astype(q.dtype), lse


def _log_sum_exp(s, mask, sink):
    """(e, l, lse) over the visible logits s [B, K, G, Tq, Tk] and an optional sink logit
    [1, K, G, 1, 1] that joins the sum with no value: e = exp(s - m) at visible keys (0
    elsewhere), l = sum_j e + exp(sink - m), lse = m + log l ([..., 1]; 0 where l == 0), with m a
    stop-gradient shift. A finite fill and a `where` on e (not -inf in s) keep rows without
    any visible key free of inf - inf, in the forward pass and in the gradient."""
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    m = s.max(axis=-1, keepdims=True)
    if sink is not None:
        m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(m)
    e = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = e.sum(axis=-1, keepdims=True)
    if sink is not None:
        l = l + jnp.exp(sink - m)
    seen = l > 0
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return e, l, lse

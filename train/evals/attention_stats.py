"""Attention statistics per query and head, from q, k and the log-sum-exp, without T x T arrays.

For query i of a packed row (documents delimited by segment ids, `masking.visible` deciding
which keys it sees) and query head h, s_ij is the logit attention uses (scale * q_i . k_j,
soft-capped when the layer caps) and w_ij its weight: exp(s_ij) for softmax, sigmoid(s_ij + b)
for sigmoid scores. With L_i = log(sum_j w_ij + exp(sink_h)) over the visible keys (the learned
sink logit of the head, when the layer has sinks; none otherwise), the op's log-sum-exp:

  p_ij       = w_ij / exp(L_i), the share of key j in what query i spends: softmax's
             probability, and for sigmoid scores (whose weights are not normalised) the weight
             over the query's total weight, so that the layers' numbers compare.
  sink mass  p_i,f(i), the share of f(i), the first token of i's document in the row; 0 when a
             sliding window no longer covers f(i).
  learned    p_i,sink = exp(sink_h - L_i), the share of the learned sink (layers with sinks).
  entropy    H_i = -sum_j p_ij log p_ij (- p_sink log p_sink) = L_i - E_p[log w] (- p_sink sink_h),
             in nats, the sink counted as one more outcome.

`attention_with_lse(q, k, v=k)` gives L_i and sum_j p_ij k_j in one call, and for softmax
without a soft-cap E_p[log w] = E_p[s_ij] = scale * q_i . (sum_j p_ij k_j). A soft-cap or the
sigmoid makes log w non-linear in k: then E_p[log w] comes from `_expected_log_weight_blocked`,
a second pass over (query block, key block) pairs with L known, never larger than one block pair.

Queries at the first token of their document (sink mass 1 and entropy 0 for any model: they
see only themselves) and padding queries (segment 0) are left out of every mean: `query_mask`.

`dense_attention_stats` is the definition (dense [Tq, Tk] probabilities) for tests and short
rows. Shapes: B batch, T time, H query heads, K kv heads (H % K == 0, head h uses kv head
h // G with G = H // K), D head dim. Everything is computed in float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention import masking
from pallas_kernels.attention.api import attention_with_lse

_F32 = jnp.float32


def document_first(segment_ids: jax.Array) -> jax.Array:
    """int32 [B, T]: the index of the first token of each token's document in its row.

    A document starts at index 0 and wherever the segment id changes (DESIGN.md, Layout)."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    start = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return lax.cummax(jnp.where(start, idx, 0), axis=1)


def query_mask(segment_ids: jax.Array) -> jax.Array:
    """bool [B, T]: the queries the statistics average over (not padding, not a document's first token)."""
    t = segment_ids.shape[1]
    return (segment_ids != 0) & (jnp.arange(t) != document_first(segment_ids))


def _groups(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, H, D] -> [B, T, K, G, D]."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d)


def _log_weight(s: jax.Array, score: str, sigmoid_bias: float) -> jax.Array:
    """log w for logits s: s itself (softmax) or log sigmoid(s + b) (sigmoid scores)."""
    return s if score == "softmax" else jax.nn.log_sigmoid(s + sigmoid_bias)


def sink_mass(q: jax.Array, k: jax.Array, lse: jax.Array, segment_ids: jax.Array,
              positions: jax.Array, *, window: int | None, logit_softcap: float | None,
              scale: float, score: str = "softmax", sigmoid_bias: float = 0.0) -> jax.Array:
    """float32 [B, T, H]: the share of each query's attention on its document's first token.

    q [B, T, H, D], k [B, T, K, D], lse float32 [B, T, H] (from `attention_with_lse` with the
    same window, soft-cap, scale, score and sinks); ids and positions int [B, T]."""
    b, t, h, _ = q.shape
    first = document_first(segment_ids)
    k_first = jnp.take_along_axis(k, first[:, :, None, None], axis=1)  # [B, T, K, D]
    s = jnp.einsum("btkgd,btkd->btkg", _groups(q, k.shape[2]).astype(_F32), k_first.astype(_F32))
    s = masking.softcap(s.reshape(b, t, h) * scale, logit_softcap)
    seen = masking.visible(segment_ids, positions, jnp.take_along_axis(segment_ids, first, axis=1),
                           jnp.take_along_axis(positions, first, axis=1), window)
    # log w <= lse up to rounding; the clamp keeps a share from exceeding 1.
    logw = _log_weight(s, score, sigmoid_bias)
    return jnp.where(seen[..., None], jnp.exp(jnp.minimum(logw - lse, 0.0)), 0.0)


def _expected_log_weight_blocked(q: jax.Array, k: jax.Array, lse: jax.Array, segment_ids: jax.Array,
                                 positions: jax.Array, *, window: int | None,
                                 logit_softcap: float | None, scale: float, block: int,
                                 score: str = "softmax", sigmoid_bias: float = 0.0) -> jax.Array:
    """E_p[log w_ij] = sum_j p_ij log w_ij, float32 [B, T, H], one (query block, key block) pair
    at a time.

    No array exceeds [B, block, K, G, block]. Key blocks after the query block, or (with a
    window) wholly before its reach, are skipped by index, which assumes what the blocked
    attention path assumes: positions increase along each document of a row.
    """
    b, t, h, d = q.shape
    kv_heads, bs = k.shape[2], min(block, t)
    n = -(-t // bs)
    pad = n * bs - t

    def blocks(x):  # [B, T, ...] -> [n, B, bs, ...]; padding gets segment 0 (never visible)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, bs, *x.shape[2:]), 1, 0)

    qb = blocks(_groups(q, kv_heads).astype(_F32))                  # [n, B, bs, K, G, D]
    kb = blocks(k.astype(_F32))                                     # [n, B, bs, K, D]
    lb = blocks(lse.reshape(b, t, kv_heads, h // kv_heads))         # [n, B, bs, K, G]
    sb, pb = blocks(segment_ids), blocks(positions)                 # [n, B, bs]

    def q_block(i):
        lo = 0 if window is None else jnp.maximum(0, i * bs - window + 1) // bs

        def step(j, acc):
            s = masking.softcap(jnp.einsum("bqkgd,btkd->bqkgt", qb[i], kb[j]) * scale, logit_softcap)
            logw = _log_weight(s, score, sigmoid_bias)
            seen = masking.visible(sb[i][:, :, None], pb[i][:, :, None], sb[j][:, None, :],
                                   pb[j][:, None, :], window)[:, :, None, None, :]
            p = jnp.where(seen, jnp.exp(jnp.minimum(logw - lb[i][..., None], 0.0)), 0.0)
            return acc + (p * jnp.where(seen, logw, 0.0)).sum(-1)

        return lax.fori_loop(lo, i + 1, step, jnp.zeros(lb.shape[1:], _F32))

    out = lax.map(q_block, jnp.arange(n))  # [n, B, bs, K, G]
    return jnp.moveaxis(out, 0, 1).reshape(b, n * bs, h)[:, :t]


def attention_stats(q: jax.Array, k: jax.Array, segment_ids: jax.Array, positions: jax.Array, *,
                    window: int | None = None, logit_softcap: float | None = None,
                    scale: float | None = None, score: str = "softmax", sigmoid_bias: float = 0.0,
                    sinks: jax.Array | None = None, implementation: str | None = None,
                    block: int = 128) -> dict[str, jax.Array]:
    """Sink mass and entropy of causal self-attention over packed documents, blocked.

    q [B, T, H, D] and k [B, T, K, D] as the attention op sees them (after qk-norm and RoPE);
    ids and positions int [B, T]; window / logit_softcap / scale / score / sigmoid_bias /
    sinks (float [H] or None) as for `attention` (scale default 1 / sqrt(D)).
    implementation: of `attention_with_lse` (None: the best available).
    Returns {"sink": float32 [B, T, H], "entropy": float32 [B, T, H] (nats),
    "mask": bool [B, T] (`query_mask`: the queries to average over)}, and with sinks
    "learned_sink": float32 [B, T, H], the share of the learned sink.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k = q.astype(_F32), k.astype(_F32)  # float32 E_p[k]: bf16 would cost ~1% of each logit
    ids = dict(segment_ids=segment_ids, positions=positions)
    opts = dict(window=window, logit_softcap=logit_softcap, scale=scale)
    scores = dict(score=score, sigmoid_bias=float(sigmoid_bias))
    ek, lse = attention_with_lse(q, k, k, **ids, **opts, **scores, sinks=sinks,
                                 implementation=implementation, block_q=block, block_k=block)
    if logit_softcap is None and score == "softmax":
        e_logw = scale * jnp.einsum("bthd,bthd->bth", q, ek)
    else:
        e_logw = _expected_log_weight_blocked(q, k, lse, **ids, **opts, **scores, block=block)
    out = {"sink": sink_mass(q, k, lse, **ids, **opts, **scores), "mask": query_mask(segment_ids)}
    if sinks is not None:
        sink_logit = sinks.astype(_F32)[None, None, :]
        out["learned_sink"] = jnp.exp(jnp.minimum(sink_logit - lse, 0.0))
        e_logw = e_logw + out["learned_sink"] * sink_logit
    out["entropy"] = jnp.maximum(lse - e_logw, 0.0)  # >= 0 exactly; rounding can dip below
    return out


def dense_attention_stats(q: jax.Array, k: jax.Array, segment_ids: jax.Array, positions: jax.Array, *,
                          window: int | None = None, logit_softcap: float | None = None,
                          scale: float | None = None, score: str = "softmax",
                          sigmoid_bias: float = 0.0,
                          sinks: jax.Array | None = None) -> dict[str, jax.Array]:
    """`attention_stats` by definition, from the dense [T, T] shares per (batch, head):
    p = w / (sum_j w + exp(sink)), sink = p[i, first(i)], entropy = -sum p log p over the keys
    and the learned sink. For tests and short rows only."""
    b, t, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    s = jnp.einsum("bqkgd,btkd->bkgqt", _groups(q, k.shape[2]).astype(_F32), k.astype(_F32)) * scale
    s = masking.softcap(s, logit_softcap)
    seen = masking.visible(segment_ids[:, :, None], positions[:, :, None],
                           segment_ids[:, None, :], positions[:, None, :], window)[:, None, None]
    w = jnp.where(seen, jnp.exp(s) if score == "softmax" else jax.nn.sigmoid(s + sigmoid_bias), 0.0)
    total = w.sum(-1, keepdims=True)
    p_sink = None
    if sinks is not None:
        e_sink = jnp.exp(sinks.astype(_F32)).reshape(1, k.shape[2], h // k.shape[2], 1, 1)
        total = total + e_sink
        p_sink = (e_sink / total)[..., 0]  # [B, K, G, T]
    p = w / jnp.where(total > 0, total, 1.0)  # rows with no visible key (padding): all 0
    xlogx = lambda x: jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, x, 1.0)), 0.0)
    entropy = -xlogx(p).sum(-1) - (0.0 if p_sink is None else xlogx(p_sink))
    first = document_first(segment_ids)[:, None, None, :, None]  # [B, 1, 1, T, 1]
    sink = jnp.take_along_axis(p, jnp.broadcast_to(first, p.shape[:-1] + (1,)), axis=-1)[..., 0]
    to_bth = lambda x: jnp.moveaxis(x.reshape(b, h, t), 1, 2)  # [B, K, G, T] -> [B, T, H]
    out = {"sink": to_bth(sink), "entropy": to_bth(entropy), "mask": query_mask(segment_ids)}
    if p_sink is not None:
        out["learned_sink"] = to_bth(p_sink)
    return out


def head_sums(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums over the masked queries, to add up across batches and divide at the end:
    {"sink_sum": [H], "entropy_sum": [H], "queries": scalar float32}, and "learned_sink_sum"
    [H] when the stats have a learned sink."""
    m = stats["mask"].astype(_F32)[..., None]  # [B, T, 1]
    out = {"sink_sum": (stats["sink"] * m).sum((0, 1)), "entropy_sum": (stats["entropy"] * m).sum((0, 1)),
           "queries": m.sum()}
    if "learned_sink" in stats:
        out["learned_sink_sum"] = (stats["learned_sink"] * m).sum((0, 1))
    return out

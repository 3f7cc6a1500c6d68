"""Blocked (flash-attention style) softmax or sigmoid attention in pure JAX, for any XLA backend.

No [Tq, Tk] array exists at any point, forward or backward: the forward pass runs an online
softmax over KV blocks (query blocks outside, KV blocks inside) and saves only the output and the
log-sum-exp of each query; the backward pass (`jax.custom_vjp`) recomputes the probabilities block
by block in one sweep (KV blocks outside, query blocks inside) that produces dk/dv per KV block
and accumulates dq in place. No score block exceeds block_q x block_k per (batch, head).

Dimension letters: B batch, T time, H query heads, K kv heads, G = H // K query heads per kv
head, D q/k head dim, Dv value head dim, nq/nk number of query/KV blocks, bq/bk block sizes,
R = G * bq rows of one query block (the G heads sharing a kv head are stacked as rows of one
matmul, so GQA/MQA never repeat k or v in memory).

Scores (the function is reference.py's; s_ij is the scaled, soft-capped logit of a visible key):
  softmax: online softmax. Sinks start it as one extra key of logit sink_h and value 0
    (m = sink_h, l = 1), so lse_i includes exp(sink_h) and a row that sees nothing but its sink
    ends with out 0, lse sink_h. Backward: Delta_i = sum_d dO_i O_i, ds_ij = p_ij (dp_ij -
    Delta_i) with p_ij = exp(s_ij - lse_i), and for the sink, whose probability is
    exp(sink_h - lse_i) and whose value is 0, d sink_h = -sum_i exp(sink_h - lse_i) Delta_i.
  sigmoid: p_ij = sigmoid(s_ij + bias), out_i = sum_j p_ij v_j: no running statistics, no
    rescaling. Backward: ds_ij = dp_ij p_ij (1 - p_ij), no Delta. Only `attention_with_lse`
    keeps an lse_i = log sum_j p_ij, as an online log-sum-exp of log-sigmoid(s_ij + bias) (a
    plain sum would underflow to log 0 for weights below 1e-38); training does not pay for it.
In both, with a soft-cap c, ds is further multiplied by 1 - tanh^2(s / c) and by the scale.

Layout (perf_anchor.md section 3: transposes of big tensors dominated XLA:CPU): q/k/v are
transposed once, outside the loops, to block-major [nq, B, K, R, D] / [nk, B, K, bk, D] so that a
block is a contiguous leading-axis slice and every matmul in the loops has its batch dims (B, K)
leading and contracts D or a block axis in place. The backward pass computes the scores directly
transposed (keys as rows) for the same reason, instead of transposing probability blocks.

Block skipping: for self-attention (`index_causal=True`) a query block visits only the KV blocks
that can hold visible keys by *index*: none after its last query, and with a window W none ending
W or more indices before its first query. This is valid because inside a packed row positions
strictly increase with the index within each document (so position gaps are at least index gaps)
and other documents are masked anyway. With explicit KV ids (decode, ring-buffer caches) index
order means nothing, so every KV block is visited and the mask alone decides; there, when the
queries fit in one block (decode: bq = Tq = 1), KV blocks grow to keep bq x bk <= block_q x block_k
so that a decode step over a cache of up to 16k slots is one iteration instead of Tk / block_k.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention import masking

_F32 = jnp.float32
# Floor of the running max: finite, so exp(m_old - m_new) stays finite while every key seen so
# far was masked (masked logits are -inf, and exp(-inf - floor) = 0 exactly).
_M_FLOOR = -1e30
_SUPPORTED = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Decode calls with at most this many query rows per kv head (Tq * G) take `_decode_forward`.
_DECODE_ROWS = 8


class _Static(NamedTuple):
    """Hashable options of one call (a nondiff argument of the custom_vjp)."""
    block_q: int
    block_k: int
    groups: int
    index_causal: bool
    window: int | None
    logit_softcap: float | None
    scale: float
    sigmoid: bool  # score == "sigmoid"
    sigmoid_bias: float
    has_sinks: bool
    # Sigmoid only: also compute lse_i = log sum_j p_ij (softmax always has it).
    sigmoid_lse: bool


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              q_segment_ids: jax.Array, q_positions: jax.Array,
              kv_segment_ids: jax.Array, kv_positions: jax.Array, *,
              window: int | None, logit_softcap: float | None, scale: float,
              index_causal: bool, block_q: int, block_k: int,
              sinks: jax.Array | None = None, score: str = "softmax",
              sigmoid_bias: float = 0.0) -> jax.Array:
    """Blocked attention, same contract as `reference.attention`.

    q: [B, Tq, H, D]; k: [B, Tk, K, D]; v: [B, Tk, K, Dv]; ids/positions int [B, Tq] and
    [B, Tk]; sinks None or float [H] (softmax only).
    index_causal: k/v are the query tokens themselves (Tk == Tq), so blocks can be skipped by
    index (see the module docstring). Returns [B, Tq, H, Dv] in q.dtype.
    """
    return _attention(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions,
                      window=window, logit_softcap=logit_softcap, scale=scale, sinks=sinks,
                      score=score, sigmoid_bias=sigmoid_bias, index_causal=index_causal,
                      block_q=block_q, block_k=block_k, with_lse=False)


def attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array,
                       q_segment_ids: jax.Array, q_positions: jax.Array,
                       kv_segment_ids: jax.Array, kv_positions: jax.Array, *,
                       window: int | None, logit_softcap: float | None, scale: float,
                       index_causal: bool, block_q: int, block_k: int,
                       sinks: jax.Array | None = None, score: str = "softmax",
                       sigmoid_bias: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """`attention` plus the log-sum-exp the forward pass keeps per query: (out [B, Tq, H, Dv],
    lse float32 [B, Tq, H]; the sink is in it; sigmoid: log of the total weight; 0 for a query
    that sees no key and has no sink). Forward only: it runs the forward passes directly,
    outside the custom_vjp (nothing here is differentiated)."""
    return _attention(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions,
                      window=window, logit_softcap=logit_softcap, scale=scale, sinks=sinks,
                      score=score, sigmoid_bias=sigmoid_bias, index_causal=index_causal,
                      block_q=block_q, block_k=block_k, with_lse=True)


def _attention(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions, *,
               window, logit_softcap, scale, sinks, score, sigmoid_bias, index_causal, block_q,
               block_k, with_lse: bool):
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype not in _SUPPORTED:
        raise NotImplementedError(f"dtype {dtype} (supported: float32, bfloat16, float16)")
    b, tq, h, d = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    bq, bk = _block_sizes(tq, tk, block_q, block_k, index_causal)
    if score not in ("softmax", "sigmoid"):
        raise NotImplementedError(f"score {score!r} (supported: softmax, sigmoid)")
    sigmoid = score == "sigmoid"
    cfg = _Static(bq, bk, h // kv_heads, bool(index_causal), window, logit_softcap, float(scale),
                  sigmoid, float(sigmoid_bias), sinks is not None, sigmoid and with_lse)
    # Sink logits per (kv head, group): the layout of the statistics. Zeros without sinks (a
    # differentiable argument of the custom_vjp either way; unused when has_sinks is False).
    sinks = (jnp.zeros((kv_heads, h // kv_heads), _F32) if sinks is None
             else sinks.astype(_F32).reshape(kv_heads, h // kv_heads))

    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    qs, qp = _id_blocks(q_segment_ids, bq), _id_blocks(q_positions, bq)
    ks, kp = _id_blocks(kv_segment_ids, bk), _id_blocks(kv_positions, bk)
    if not index_causal and bq == tq and tq * cfg.groups <= _DECODE_ROWS:
        args = (cfg, q, _pad_time(k, bk), _pad_time(v, bk), sinks, qs, qp, ks, kp)
        if not with_lse:
            return _decode(*args).astype(q.dtype)
        out, lse = _decode_forward(*args)
        return out.astype(q.dtype), _lse_from_blocks(lse, tq, h)
    args = (cfg, _q_blocks(q, kv_heads, bq), _kv_blocks(k, bk), _kv_blocks(v, bk), sinks,
            qs, qp, ks, kp)
    if not with_lse:
        return _from_q_blocks(_flash(*args), tq, h).astype(q.dtype)
    out, lse = _forward(*args)
    return _from_q_blocks(out, tq, h).astype(q.dtype), _lse_from_blocks(lse, tq, h)


def _lse_from_blocks(lse: jax.Array, tq: int, h: int) -> jax.Array:
    """[nq, B, K, G, bq] -> [B, Tq, H] (head h = kv head h // G, group h % G)."""
    nq, b, kv_heads, g, bq = lse.shape
    return lse.transpose(1, 0, 4, 2, 3).reshape(b, nq * bq, h)[:, :tq]


def _block_sizes(tq: int, tk: int, block_q: int, block_k: int, index_causal: bool):
    """Blocks shrink to the sequence when it is shorter. Without index skipping and with all
    queries in one block, KV blocks grow to the same score-block budget (few, short loops)."""
    bq, bk = min(block_q, tq), min(block_k, tk)
    if not index_causal and bq == tq:
        bk = min(tk, max(block_k, (block_q * block_k) // bq))
    return bq, bk


# ----------------------------------------------------------------------------- layout

def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_time(x: jax.Array, block: int) -> jax.Array:
    """Pad axis 1 with zeros to a multiple of `block` (segment id 0 = padding)."""
    pad = _round_up(x.shape[1], block) - x.shape[1]
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _q_blocks(q: jax.Array, kv_heads: int, bq: int) -> jax.Array:
    """[B, Tq, H, D] -> [nq, B, K, G*bq, D]: one transpose, rows ordered (g, t)."""
    q = _pad_time(q, bq)
    b, t, h, d = q.shape
    g = h // kv_heads
    q = q.reshape(b, t // bq, bq, kv_heads, g, d).transpose(1, 0, 3, 4, 2, 5)
    return q.reshape(t // bq, b, kv_heads, g * bq, d)


def _from_q_blocks(o: jax.Array, tq: int, h: int) -> jax.Array:
    """[nq, B, K, G*bq, Dv] -> [B, Tq, H, Dv] (inverse of `_q_blocks`, padding dropped)."""
    nq, b, kv_heads, r, d = o.shape
    g = h // kv_heads
    o = o.reshape(nq, b, kv_heads, g, r // g, d).transpose(1, 0, 4, 2, 3, 5)
    return o.reshape(b, nq * (r // g), h, d)[:, :tq]


def _kv_blocks(x: jax.Array, bk: int) -> jax.Array:
    """[B, Tk, K, D] -> [nk, B, K, bk, D]."""
    x = _pad_time(x, bk)
    b, t, kv_heads, d = x.shape
    return x.reshape(b, t // bk, bk, kv_heads, d).transpose(1, 0, 3, 2, 4)


def _from_kv_blocks(x: jax.Array, tk: int) -> jax.Array:
    """[nk, B, K, bk, D] -> [B, Tk, K, D] (inverse of `_kv_blocks`, padding dropped)."""
    nk, b, kv_heads, bk, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nk * bk, kv_heads, d)[:, :tk]


def _id_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, T] -> int32 [n, B, block]."""
    x = _pad_time(x.astype(jnp.int32), block)
    b, t = x.shape
    return x.reshape(b, t // block, block).transpose(1, 0, 2)


# ----------------------------------------------------------------------------- block math

def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """Batched matmul over the leading (B, K) dims, float32 result, inputs in their dtype."""
    dims = (((contract[0],), (contract[1],)), ((0, 1), (0, 1)))
    return lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _logits(cfg: _Static, s: jax.Array, mask: jax.Array):
    """Scale, soft-cap and mask raw q.k scores. Returns (masked logits, tanh or None).

    The tanh is returned for the backward pass: d(c*tanh(x/c))/dx = 1 - tanh^2.
    """
    s = s * cfg.scale
    t = None
    if cfg.logit_softcap is not None:
        t = jnp.tanh(s / cfg.logit_softcap)
        s = cfg.logit_softcap * t
    return jnp.where(mask, s, -jnp.inf), t


def _mask(cfg: _Static, seg_q, pos_q, seg_k, pos_k) -> jax.Array:
    """Query-major block mask: [B, bq] x [B, bk] ids -> bool [B, 1, 1, bq, bk]."""
    m = masking.visible(seg_q[:, :, None], pos_q[:, :, None],
                        seg_k[:, None, :], pos_k[:, None, :], cfg.window)
    return m[:, None, None]


def _mask_t(cfg: _Static, seg_q, pos_q, seg_k, pos_k) -> jax.Array:
    """Key-major block mask: -> bool [B, 1, bk, 1, bq]."""
    m = masking.visible(seg_q[:, None, :], pos_q[:, None, :],
                        seg_k[:, :, None], pos_k[:, :, None], cfg.window)
    return m[:, None, :, None]


def _kv_range(cfg: _Static, i, nk: int):
    """KV blocks [lo, hi) that query block i must visit."""
    if not cfg.index_causal:
        return 0, nk
    hi = jnp.minimum(nk, ((i + 1) * cfg.block_q - 1) // cfg.block_k + 1)
    lo = 0
    if cfg.window is not None:
        lo = jnp.maximum(0, i * cfg.block_q - cfg.window + 1) // cfg.block_k
    return lo, hi


def _q_range(cfg: _Static, j, nq: int):
    """Query blocks [lo, hi) that can see some key of KV block j (transpose of `_kv_range`)."""
    if not cfg.index_causal:
        return 0, nq
    lo = (j * cfg.block_k) // cfg.block_q
    hi = nq
    if cfg.window is not None:
        hi = jnp.minimum(nq, ((j + 1) * cfg.block_k - 1 + cfg.window - 1) // cfg.block_q + 1)
    return lo, hi


def _init_stats(cfg: _Static, sinks: jax.Array, shape: tuple[int, ...]):
    """Initial (m, l) of the online pass, each of `shape`: with sinks, the row's sink as a key
    of value 0 already seen (m = sink, l = 1; `sinks` broadcasts to `shape`); else empty."""
    if cfg.has_sinks:
        return jnp.broadcast_to(sinks, shape), jnp.ones(shape, _F32)
    return jnp.full(shape, _M_FLOOR, _F32), jnp.zeros(shape, _F32)


def _online(cfg: _Static, s: jax.Array, m: jax.Array, l: jax.Array, axis: int):
    """One KV block of the online pass.

    s: masked logits (-inf where invisible) with the block's keys on `axis`; m, l: running
    statistics, s's shape without that axis. Returns (p, alpha, m, l): the block's weights
    (float32, s's shape) and the factor that rescales the accumulator before p.v is added
    (None: no rescaling, the sigmoid weights are final).
    """
    if cfg.sigmoid:
        x = s + cfg.sigmoid_bias
        if not cfg.sigmoid_lse:
            return jax.nn.sigmoid(x), None, m, l
        ls = jax.nn.log_sigmoid(x)  # log p <= 0, -inf where masked
        m_new = jnp.maximum(m, ls.max(axis=axis))
        e = jnp.exp(ls - jnp.expand_dims(m_new, axis))
        l = jnp.exp(m - m_new) * l + e.sum(axis=axis)
        # p = e * exp(m_new) is the sigmoid itself: m_new <= 0 once a key was seen (and the
        # floor while none was, where e = 0), so nothing overflows.
        return e * jnp.expand_dims(jnp.exp(m_new), axis), None, m_new, l
    m_new = jnp.maximum(m, s.max(axis=axis))
    p = jnp.exp(s - jnp.expand_dims(m_new, axis))
    alpha = jnp.exp(m - m_new)
    return p, alpha, m_new, alpha * l + p.sum(axis=axis)


def _finish(cfg: _Static, m: jax.Array, l: jax.Array):
    """(inv, lse) from the final statistics: the accumulator's factor (softmax 1 / l, 0 for a row
    that saw nothing, not even a sink; sigmoid 1) and lse = m + log l (0 where l == 0)."""
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    lse = jnp.where(seen, m + jnp.log(l_safe), 0.0)
    inv = jnp.ones_like(l) if cfg.sigmoid else jnp.where(seen, 1.0 / l_safe, 0.0)
    return inv, lse


# ----------------------------------------------------------------------------- passes

def _forward(cfg: _Static, qb, kb, vb, sinks, qs, qp, ks, kp):
    """Online pass. qb [nq, B, K, R, D], kb [nk, B, K, bk, D], vb [nk, B, K, bk, Dv], sinks
    float32 [K, G]. Returns out [nq, B, K, R, Dv] (input dtype) and lse [nq, B, K, G, bq]."""
    nq, b, kv_heads, r, _ = qb.shape
    nk, bk, dv = kb.shape[0], kb.shape[3], vb.shape[4]
    g, bq = cfg.groups, cfg.block_q

    def q_block(i):
        q_i, seg_i, pos_i = qb[i], qs[i], qp[i]
        lo, hi = _kv_range(cfg, i, nk)

        def step(j, carry):
            m, l, acc = carry
            mask = _mask(cfg, seg_i, pos_i, ks[j], kp[j])
            s = _dot(q_i, kb[j], (3, 3)).reshape(b, kv_heads, g, bq, bk)
            s, _ = _logits(cfg, s, mask)
            p, alpha, m, l = _online(cfg, s, m, l, axis=-1)
            pv = _dot(p.reshape(b, kv_heads, r, bk).astype(vb.dtype), vb[j], (3, 2))
            if alpha is not None:
                acc = acc * alpha.reshape(b, kv_heads, r, 1)
            return m, l, acc + pv

        m0, l0 = _init_stats(cfg, sinks[None, :, :, None], (b, kv_heads, g, bq))
        m, l, acc = lax.fori_loop(lo, hi, step, (m0, l0, jnp.zeros((b, kv_heads, r, dv), _F32)))
        inv, lse = _finish(cfg, m, l)
        # Rows without any visible key (padding) get 0; their lse (0, or the sink) is finite and
        # their logits are -inf, so p = 0 for them in the backward pass.
        out = (acc * inv.reshape(b, kv_heads, r, 1)).astype(qb.dtype)
        return out, lse

    return lax.map(q_block, jnp.arange(nq))


def _backward(cfg: _Static, qb, kb, vb, qs, qp, ks, kp, dob, lse, delta):
    """dq [nq, B, K, R, D], dk [nk, B, K, bk, D], dv [nk, B, K, bk, Dv] in one sweep over the
    visited block pairs (delta is None for the sigmoid score, which has no Delta term).

    KV blocks outside (dk, dv of block j accumulate in registers of the loop), the query blocks
    that see them inside; dq accumulates in place in a [nq, ...] float32 carry. One sweep
    computes each probability block once: a dq pass plus a separate dk/dv pass would redo the
    q.k^T and dO.v^T matmuls and the exp, which measured ~20-25% slower fwd+bwd on XLA:CPU.
    Scores are key-major ([B, K, bk, R], keys as rows) so that p^T.dO and ds^T.q are plain
    matmuls without transposing probability blocks.
    """
    nq, b, kv_heads, r, d = qb.shape
    nk, bk, dv_dim = kb.shape[0], kb.shape[3], vb.shape[4]
    g, bq = cfg.groups, cfg.block_q

    def kv_block(dq, j):
        k_j, v_j, seg_j, pos_j = kb[j], vb[j], ks[j], kp[j]
        lo, hi = _q_range(cfg, j, nq)

        def step(i, carry):
            dq, dk, dv = carry
            q_i, do_i = qb[i], dob[i]
            mask = _mask_t(cfg, qs[i], qp[i], seg_j, pos_j)
            s = _dot(k_j, q_i, (3, 3)).reshape(b, kv_heads, bk, g, bq)
            s, t = _logits(cfg, s, mask)
            if cfg.sigmoid:
                p = jax.nn.sigmoid(s + cfg.sigmoid_bias)  # 0 where masked (s = -inf)
            else:
                p = jnp.exp(s - lse[i][:, :, None])  # lse [B, K, G, bq] -> [B, K, 1, G, bq]
            dv = dv + _dot(p.reshape(b, kv_heads, bk, r).astype(dob.dtype), do_i, (3, 2))
            dp = _dot(v_j, do_i, (3, 3)).reshape(b, kv_heads, bk, g, bq)
            if cfg.sigmoid:
                ds = dp * p * (1.0 - p)  # sigmoid' = p (1 - p); weights are not normalised
            else:
                ds = p * (dp - delta[i][:, :, None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            ds = (ds * cfg.scale).reshape(b, kv_heads, bk, r)  # d(logits)/d(q.k) = scale
            dk = dk + _dot(ds.astype(qb.dtype), q_i, (3, 2))
            dq = dq.at[i].add(_dot(ds.astype(kb.dtype), k_j, (2, 2)))
            return dq, dk, dv

        init = (dq, jnp.zeros((b, kv_heads, bk, d), _F32),
                jnp.zeros((b, kv_heads, bk, dv_dim), _F32))
        dq, dk, dv = lax.fori_loop(lo, hi, step, init)
        return dq, (dk.astype(kb.dtype), dv.astype(vb.dtype))

    dq, (dk, dv) = lax.scan(kv_block, jnp.zeros(qb.shape, _F32), jnp.arange(nk))
    return dq.astype(qb.dtype), dk, dv


def _decode_forward(cfg: _Static, q, k, v, sinks, qs, qp, ks, kp):
    """Online pass for a few queries against a KV cache, without transposing the cache.

    q [B, Tq, H, D] (one query block: qs/qp [1, B, Tq]); k [B, nk * bk, K, D] and
    v [B, nk * bk, K, Dv] in cache layout; sinks float32 [K, G]; ks/kp [nk, B, bk]. Returns
    out [B, Tq, H, Dv] and lse [1, B, K, G, Tq].

    Why a second forward: for Tq * G <= _DECODE_ROWS the matmuls are matrix-vector products,
    so the cost is one read of the cache, and on XLA:CPU the [B, Tk, K, D] -> [B, K, Tk, D]
    transposes a dot_general needs cost ~7x that read (measured: 23 ms vs 3.5 ms per step at
    B=8, K=4, Tk=2048, D=64). Multiply-and-reduce over D (and over keys for p.v) reads the cache
    in place; XLA fuses the products into the reductions.
    """
    b, tq, h, d = q.shape
    kv_heads, dv, g, bk, nk = k.shape[2], v.shape[3], cfg.groups, cfg.block_k, ks.shape[0]
    qg = q.reshape(b, tq, 1, kv_heads, g, d).astype(_F32)  # [B, Tq, 1, K, G, D]
    seg_q, pos_q = qs[0][:, :, None], qp[0][:, :, None]

    def step(j, carry):
        m, l, acc = carry  # m, l [B, Tq, K, G]; acc [B, Tq, K, G, Dv]
        k_j = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)[:, None, :, :, None, :]
        v_j = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)[:, None, :, :, None, :]
        s = (qg * k_j.astype(_F32)).sum(-1)  # [B, Tq, bk, K, G]
        mask = masking.visible(seg_q, pos_q, ks[j][:, None, :], kp[j][:, None, :], cfg.window)
        s, _ = _logits(cfg, s, mask[..., None, None])
        p, alpha, m, l = _online(cfg, s, m, l, axis=2)
        if alpha is not None:
            acc = acc * alpha[..., None]
        return m, l, acc + (p[..., None] * v_j.astype(_F32)).sum(axis=2)

    m0, l0 = _init_stats(cfg, sinks, (b, tq, kv_heads, g))
    init = (m0, l0, jnp.zeros((b, tq, kv_heads, g, dv), _F32))
    m, l, acc = lax.fori_loop(0, nk, step, init)
    inv, lse = _finish(cfg, m, l)
    out = (acc * inv[..., None]).reshape(b, tq, h, dv).astype(q.dtype)
    return out, lse.transpose(0, 2, 3, 1)[None]


# ----------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, qb, kb, vb, sinks, qs, qp, ks, kp):
    return _forward(cfg, qb, kb, vb, sinks, qs, qp, ks, kp)[0]


def _flash_fwd(cfg, qb, kb, vb, sinks, qs, qp, ks, kp):
    out, lse = _forward(cfg, qb, kb, vb, sinks, qs, qp, ks, kp)
    return out, (qb, kb, vb, sinks, qs, qp, ks, kp, out, lse)


def _flash_bwd(cfg, res, dout):
    qb, kb, vb, sinks, qs, qp, ks, kp, out, lse = res
    return _backward_blocks(cfg, qb, kb, vb, sinks, qs, qp, ks, kp, out, lse, dout) + (None,) * 4


def _backward_blocks(cfg: _Static, qb, kb, vb, sinks, qs, qp, ks, kp, out, lse, dout):
    """(dq, dk, dv, dsinks) in block layout from the saved output, lse and the output cotangent
    (dsinks float32 [K, G], or None without sinks)."""
    nq, b, kv_heads, r, _ = qb.shape
    delta = dsinks = None
    if not cfg.sigmoid:
        # delta_i = sum_d dO_i * O_i = sum_j p_ij dp_ij: the softmax Jacobian's rank-one term.
        delta = (dout.astype(_F32) * out.astype(_F32)).sum(-1)
        delta = delta.reshape(nq, b, kv_heads, cfg.groups, cfg.block_q)
        if cfg.has_sinks:
            # The sink is a key of probability exp(sink - lse_i) and value 0: its dp is 0, so
            # its ds is -exp(sink - lse_i) Delta_i. Padded rows have O = dO = 0, so Delta = 0.
            w = jnp.exp(sinks[None, None, :, :, None] - lse)
            dsinks = -(w * delta).sum(axis=(0, 1, 4))
    dq, dk, dv = _backward(cfg, qb, kb, vb, qs, qp, ks, kp, dout.astype(qb.dtype), lse, delta)
    return dq, dk, dv, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(cfg, q, k, v, sinks, qs, qp, ks, kp):
    return _decode_forward(cfg, q, k, v, sinks, qs, qp, ks, kp)[0]


def _decode_fwd(cfg, q, k, v, sinks, qs, qp, ks, kp):
    out, lse = _decode_forward(cfg, q, k, v, sinks, qs, qp, ks, kp)
    return out, (q, k, v, sinks, qs, qp, ks, kp, out, lse)


def _decode_bwd(cfg, res, dout):
    """Gradients of a decode-form call (rare: e.g. fine-tuning through a cache) via the blocked
    backward pass; the transposes it needs are paid only here."""
    q, k, v, sinks, qs, qp, ks, kp, out, lse = res
    tq, h = q.shape[1], q.shape[2]
    kv_heads, tk = k.shape[2], k.shape[1]
    to_q = functools.partial(_q_blocks, kv_heads=kv_heads, bq=cfg.block_q)
    kb, vb = _kv_blocks(k, cfg.block_k), _kv_blocks(v, cfg.block_k)
    dq, dk, dv, dsinks = _backward_blocks(cfg, to_q(q), kb, vb, sinks, qs, qp, ks, kp, to_q(out),
                                          lse, to_q(dout))
    return (_from_q_blocks(dq, tq, h), _from_kv_blocks(dk, tk), _from_kv_blocks(dv, tk),
            dsinks) + (None,) * 4


_decode.defvjp(_decode_fwd, _decode_bwd)

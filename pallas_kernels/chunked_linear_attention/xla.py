"""Chunked linear attention in pure JAX, for any XLA backend (the CPU default).

The sequence is cut into chunks of C tokens. Within a chunk, outputs come from a masked C x C
"attention" matrix (intra part); across chunks, from a [K, V] state carried from the chunk
before (inter part):

    o_i = scale * [ sum_{j<=i in chunk, same doc} (q_i . (k_j * exp(G_i - G_j))) v_j
                    + (q_i * exp(G_i)) S_prev               (if no reset since the chunk start) ]
    S_next = exp(G_last) * S_prev  (if no reset in the chunk)
             + sum_{j in the last document of the chunk} (k_j * exp(G_last - G_j))^T v_j

G is the *chunk-local* inclusive cumulative sum of the log decays, so every exponent above is
<= 0 (anchors_kernels.md 1.4: global cumsums and exclusive cumsums are what overflow).
The per-chunk state increments are computed for all chunks at once as batched matmuls; the only
sequential part is an elementwise `lax.scan` over chunks that decays and accumulates them; the
outputs are again one batched matmul. Everything is float32 (on AVX2 CPUs bf16 matmuls are
emulated, and the state must be fp32 anyway); outputs are cast back to q.dtype.

Per-channel decay ([B, T, H, K]) cannot use one C x C decay matrix: exp(G_i - G_j) differs per
key channel. Two forms, chosen at run time by `lax.cond` over the whole call:
  * factored (the usual case, every chunk's gates span <= FACTOR_RANGE nats in every channel):
    exp(G_i - G_j) = exp(G_i - M) exp(M - G_j) at the chunk's midpoint M, exponents within
    +-30, so one matmul does the intra part, as for per-head decay;
  * exact (any gates): as in fla's GLA kernels, the chunk is split into sub-chunks of c tokens.
    For a query sub-chunk a and keys j before it, a reference point r_a (the cumulative gate at
    a's first token) factors the decay as exp(G_i - r_a) * exp(r_a - G_j), both exponents <= 0,
    so a matmul still does the work; pairs inside one sub-chunk use the exact elementwise form
    over [c, c, K].

Gradients come from JAX's autodiff; masked exponents are set to -inf *before* exp, so the
unused branch of every `where` carries no inf/NaN into the backward pass. The whole op is
rematerialised (`remat_states`): the backward pass keeps only the op's inputs and the state
entering each chunk ([B, H, n, K, V], named STATES), and recomputes the rest (the C x C scores,
exponentials, the f32 chunk-major copies of q, k, v). Without it autodiff keeps about three
times as many bytes per token as the inputs, and a linear layer needed more activation memory
than a flash-attention layer (benchmarks/mixers.py --tables memory).

Dimension letters: B batch, H heads, n chunks, C chunk length, m = C / c sub-chunks, K key dim,
V value dim. Working layout: head-major chunks [B, H, n, C, D].
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.chunked_linear_attention import common

F32 = common.F32
SUB_CHUNK = 16  # c: sub-chunk length of the exact per-channel-decay intra part
FACTOR_RANGE = 60.0  # nats a chunk's cumulative gate may span for the one-matmul intra part


STATES = "chunk_states"  # checkpoint_name of the per-chunk states, the only saved intermediate


def remat_states(fn):
    """fn rematerialised so that its backward pass saves only its arguments and the values
    named STATES (the delta rule uses it too)."""
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(STATES))


def chunked_linear_attention(q, k, v, log_decay, initial_state, segment_ids, *, scale: float,
                             chunk_size: int):
    """Same contract as `reference.chunked_linear_attention` (see api.py)."""
    core = functools.partial(_forward, scale=scale, chunk_size=chunk_size)
    return remat_states(core)(q, k, v, log_decay, initial_state, segment_ids)


def _forward(q, k, v, log_decay, initial_state, segment_ids, *, scale: float, chunk_size: int):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, max(16, 1 << (t - 1).bit_length()))  # no 64-chunk for a 5-token call
    p = common.prepare(q, k, v, log_decay, segment_ids, c)
    n = p.q.shape[1] // c

    def chunks(x):  # [B, Tp, H, D] -> [B, H, n, C, D] float32
        x = x.astype(F32).reshape(b, n, c, h, -1)
        return jnp.transpose(x, (0, 3, 1, 2, 4))

    qc = chunks(p.q) * scale
    kc, vc = chunks(common.expand_kv(p.k, h)), chunks(common.expand_kv(p.v, h))
    vector = p.g.ndim == 4
    g = chunks(p.g if vector else p.g[..., None])  # [B, H, n, C, K or 1]
    gc = chunk_cumsum(g)  # chunk-local inclusive cumsum, <= 0

    masks = doc_masks(p.doc.reshape(b, n, c))
    s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
    args = (qc, kc, vc, gc, masks, s0)
    if not vector:
        o, s_final = _chunked(*args, intra=_intra_scalar)
    else:
        # When every chunk's cumulative gate spans at most FACTOR_RANGE nats in every channel
        # (the common case: trained gates decay by far less than 60 nats per chunk) the intra
        # part is one matmul (`_intra_vector_factored`); otherwise (one chunk anywhere is
        # enough) the exact sub-chunked form runs. `lax.cond` executes one of the two; the
        # whole computation sits inside it because a cond boundary stops XLA fusing the
        # exponentials into the matmuls. Under autodiff a cond saves the residuals of both
        # branches (zeros for the one not taken): remat keeps the exact branch's large ones out.
        span = jnp.max(gc[:, :, :, 0] - gc[:, :, :, -1])  # gc decreases along the chunk
        o, s_final = lax.cond(
            span <= FACTOR_RANGE,
            functools.partial(_chunked, intra=_intra_vector_factored),
            jax.checkpoint(functools.partial(_chunked, intra=_intra_vector_exact)), *args)
    o = jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(b, n * c, h, dv)
    return common.finish(o.astype(q.dtype), p.valid), s_final


def chunk_cumsum(g: jax.Array) -> jax.Array:
    """Inclusive cumsum over axis 3 (the chunk) of [B, H, n, C, K] as a matmul with a triangle
    of ones: XLA:CPU lowers jnp.cumsum to a reduce-window that costs C adds per element (3x
    slower here). HIGHEST precision: TPU/GPU would otherwise round the gates to bf16/tf32."""
    c = g.shape[3]
    return jnp.einsum("ij,bhnjk->bhnik", jnp.tril(jnp.ones((c, c), F32)), g,
                      precision=lax.Precision.HIGHEST)


def _chunked(qc, kc, vc, gc, masks, s0, *, intra):
    """Outputs [B, H, n, C, V] and the final state [B, H, K, V] from the chunked inputs:
    qc (scale applied), kc [B, H, n, C, K], vc [B, H, n, C, V], gc [B, H, n, C, K or 1] chunk-local
    cumulative log decays, `masks`, s0 [B, H, K, V]; `intra` gives the intra-chunk scores."""
    g_last = gc[:, :, :, -1:]  # [B, H, n, 1, K or 1]
    # Inter-chunk part: state increments, the carried-state recurrence, outputs.
    k_end = kc * jnp.exp(g_last - gc) * masks.to_end[:, None, :, :, None]
    ds = jnp.einsum("bhnjk,bhnjv->bhnkv", k_end, vc)  # [B, H, n, K, V]
    decay = jnp.exp(g_last[:, :, :, 0]) * masks.carry[:, None, :, None]  # [B, H, n, K or 1]

    def step(s, xs):
        a, d = xs
        s = checkpoint_name(s, STATES)
        return a[..., None] * s + d, s  # carry S_next, emit S_prev

    to_scan = lambda x: jnp.moveaxis(x, 2, 0)
    s_final, s_prev = lax.scan(step, s0, (to_scan(decay), to_scan(ds)))
    s_prev = jnp.moveaxis(s_prev, 0, 2)  # [B, H, n, K, V]
    q_inter = qc * jnp.exp(gc) * masks.reach[:, None, :, :, None]
    o = jnp.einsum("bhnik,bhnkv->bhniv", q_inter, s_prev)
    # Intra-chunk part.
    scores = intra(qc, kc, gc, masks.same)
    return o + jnp.einsum("bhnij,bhnjv->bhniv", scores, vc), s_final


class DocMasks(NamedTuple):
    """Document masks of the chunks; `doc` [B, n, C] (see common.prepare).

    same  [B, n, C, C]: j <= i and tokens i, j in the same document;
    reach [B, n, C]:    the state carried into the chunk reaches token i (no reset before it);
    to_end [B, n, C]:   token j is in the chunk's last document (it enters the carried state);
    carry [B, n]:       the carried state survives the whole chunk.
    """

    same: jax.Array
    reach: jax.Array
    to_end: jax.Array
    carry: jax.Array


def doc_masks(doc: jax.Array) -> DocMasks:
    b, n, c = doc.shape
    # Document of the state entering chunk n: that of the token before it (0 before the row:
    # a row's first token never resets, so the initial state belongs to document 0).
    prev = jnp.concatenate([jnp.zeros((b, 1), doc.dtype), doc[:, :-1, -1]], axis=1)
    causal = jnp.tril(jnp.ones((c, c), bool))
    same = (doc[..., :, None] == doc[..., None, :]) & causal
    last = doc[:, :, -1]
    return DocMasks(same=same, reach=(doc == prev[..., None]).astype(F32),
                  to_end=(doc == last[..., None]).astype(F32), carry=(last == prev).astype(F32))


def _intra_scalar(qc, kc, gc, same):
    """Scores [B, H, n, C, C] = (q k^T) * exp(G_i - G_j), masked; gc [B, H, n, C, 1]."""
    diff = gc[..., :, None, 0] - gc[..., None, :, 0]  # [B, H, n, C, C]
    decay = jnp.exp(jnp.where(same[:, None], diff, -jnp.inf))
    return jnp.einsum("bhnik,bhnjk->bhnij", qc, kc) * decay


def _intra_vector_factored(qc, kc, gc, same):
    """Per-channel-decay scores [B, H, n, C, C] as one matmul, factored at each chunk's
    midpoint M: (q * exp(G - M)) (k * exp(M - G))^T. Only for chunks whose gates span at most
    FACTOR_RANGE nats: all exponents then lie in [-30, 30] and nothing overflows in float32."""
    mid = 0.5 * (gc[:, :, :, :1] + gc[:, :, :, -1:])  # [B, H, n, 1, K]
    scores = jnp.einsum("bhnik,bhnjk->bhnij", qc * jnp.exp(gc - mid), kc * jnp.exp(mid - gc))
    return jnp.where(same[:, None], scores, 0.0)  # `where`, not a product: future pairs may be large


def _intra_vector_exact(qc, kc, gc, same):
    """Scores [B, H, n, C, C] = sum_k q_ik k_jk exp(G_ik - G_jk), masked, for any gates: the
    sub-chunked form of the module docstring."""
    b, h, n, c, dk = qc.shape
    sc = min(SUB_CHUNK, c)
    m = c // sc
    sub = lambda x: x.reshape(b, h, n, m, sc, dk)
    qs, ks, gs = sub(qc), sub(kc), sub(gc)
    # Pairs across sub-chunks (j before query sub-chunk a): factor at r_a = G at a's first token.
    r = gs[:, :, :, :, :1]  # [B, H, n, m, 1, K]
    q_hat = qs * jnp.exp(gs - r)  # exponent <= 0 for i >= a's first token
    before = jnp.arange(c)[None, :] < (jnp.arange(m) * sc)[:, None]  # [m, C]: j < a's first token
    expo = r - gc[:, :, :, None]  # [B, H, n, m, C, K]
    k_hat = kc[:, :, :, None] * jnp.exp(jnp.where(before[:, :, None], expo, -jnp.inf))
    cross = jnp.einsum("bhnaik,bhnajk->bhnaij", q_hat, k_hat)  # [B, H, n, m, c, C]
    # Pairs inside a sub-chunk: exact elementwise decay, i >= j.
    causal = jnp.tril(jnp.ones((sc, sc), bool))[..., None]
    dg = jnp.where(causal, gs[..., :, None, :] - gs[..., None, :, :], -jnp.inf)  # [.., c, c, K]
    inner = jnp.sum(qs[..., :, None, :] * ks[..., None, :, :] * jnp.exp(dg), axis=-1)
    inner = inner[..., None, :] * jnp.eye(m, dtype=F32)[:, None, :, None]  # onto the block diagonal
    scores = cross + inner.reshape(b, h, n, m, sc, c)
    return scores.reshape(b, h, n, c, c) * same[:, None]

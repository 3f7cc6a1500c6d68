"""Argument checks and input preparation shared by every chunked-linear-attention implementation.

The op (see api.py for the full contract):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        S_t: [K, V] per (batch, query head)
    o_t = scale * q_t S_t

Dimension letters: B batch, T time, H query heads, G kv heads (H % G == 0; query head h reads kv
head h // (H // G)), K key/query head dim, V value head dim, C chunk length.

Documents. `segment_ids` [B, T] (0 = padding) splits a row into documents: at t > 0 a nonzero id
different from the previous token's id starts a new document and the state is reset to zero
before that token is added. Padding tokens (id 0) neither write nor decay the state, and their
outputs are zero. Row starts always begin from `initial_state`.

`prepare` turns this into what chunked implementations need, so none of them handles padding
itself: k, v and g are zeroed at padding tokens (a zero write and no decay), and `doc` [B, T]
int32 numbers the documents of a row (0, 1, 2, ...; incremented at each reset). Two tokens
interact iff they have the same `doc`; the carried state reaches token t iff no reset happened
between the state's position and t. Outputs at padding tokens are zeroed by `finish`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import pallas_wrappers as pw

F32 = jnp.float32
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check(q, k, v, log_decay, initial_state, segment_ids, scale, chunk_size) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or options are impossible."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, T, heads, dim]; got shape {x.shape}")
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} not supported; accepted: float32, bfloat16, float16")
    b, t, h, dk = q.shape
    if t == 0:
        raise ValueError(f"empty sequence: q {q.shape}")
    if k.shape[:2] != (b, t) or k.shape[3] != dk:
        raise ValueError(f"k {k.shape} must be [B, T, G, K] matching q {q.shape} in B, T and K")
    g = k.shape[2]
    if g < 1 or h % g:
        raise ValueError(f"kv heads of k ({g}) must divide the query heads of q ({h})")
    if v.shape[:3] != (b, t, g):
        raise ValueError(f"v {v.shape} must be [B, T, G, V] with k's B, T, G = {(b, t, g)}")
    if log_decay is not None:
        if log_decay.shape not in ((b, t, h), (b, t, h, dk)):
            raise ValueError(
                f"log_decay must be None, [B, T, H] = {[b, t, h]} (one decay per head) or "
                f"[B, T, H, K] = {[b, t, h, dk]} (per key channel); got {list(log_decay.shape)}")
        if not jnp.issubdtype(log_decay.dtype, jnp.floating):
            raise ValueError(f"log_decay must be floating point, got {log_decay.dtype}")
    if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[3]):
        raise ValueError(f"initial_state must be [B, H, K, V] = {[b, h, dk, v.shape[3]]}; "
                         f"got {list(initial_state.shape)}")
    pw.check_segment_ids(segment_ids, b, t)
    if scale is not None and not float(scale) > 0:
        raise ValueError(f"scale must be > 0 or None (1/sqrt(K)), got {scale}")
    if int(chunk_size) != chunk_size or chunk_size < 1 or int(chunk_size) & (int(chunk_size) - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")


def resets(segment_ids: jax.Array) -> jax.Array:
    """bool [B, T]: token t starts a new document (state reset before it is added)."""
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return (segment_ids != prev) & (segment_ids != 0)


class Prepared(NamedTuple):
    """Inputs with padding folded in, T padded up to a multiple of the chunk (Tp).

    q [B, Tp, H, K], k [B, Tp, G, K], v [B, Tp, G, V]: input dtype, zero at padding.
    g: fp32 [B, Tp, H] or [B, Tp, H, K], zero at padding (no decay).
    doc: int32 [B, Tp], document number of each token within its row.
    valid: bool [B, T] (unpadded length), False at padding tokens.
    """
    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    doc: jax.Array
    valid: jax.Array


def prepare(q, k, v, log_decay, segment_ids, chunk_size: int) -> Prepared:
    """Fold padding and documents into zeroed inputs plus `doc` ids; pad T to the chunk."""
    b, t, h, dk = q.shape
    g = jnp.zeros((b, t, h), F32) if log_decay is None else log_decay.astype(F32)
    if segment_ids is None:
        valid = jnp.ones((b, t), bool)
        doc = jnp.zeros((b, t), jnp.int32)
    else:
        valid = segment_ids != 0
        doc = jnp.cumsum(resets(segment_ids).astype(jnp.int32), axis=1)
        k = jnp.where(valid[:, :, None, None], k, 0).astype(k.dtype)
        v = jnp.where(valid[:, :, None, None], v, 0).astype(v.dtype)
        g = jnp.where(valid.reshape(b, t, *([1] * (g.ndim - 2))), g, 0.0)
    pad = -t % chunk_size
    if pad:
        # Padding at the end: zero writes, no decay, same document as the last token, so the
        # final state is the state after token T - 1.
        widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        q, k, v, g = (jnp.pad(x, widths(x)) for x in (q, k, v, g))
        doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
    return Prepared(q, k, v, g, doc, valid)


def finish(out: jax.Array, valid: jax.Array) -> jax.Array:
    """Drop the chunk padding of `out` [B, Tp, H, V] and zero the outputs of padding tokens."""
    t = valid.shape[1]
    return jnp.where(valid[:, :, None, None], out[:, :t], 0).astype(out.dtype)


def expand_kv(x: jax.Array, heads: int) -> jax.Array:
    """[B, T, G, D] -> [B, T, H, D]: kv head h // (H // G) for query head h."""
    g = x.shape[2]
    return x if g == heads else jnp.repeat(x, heads // g, axis=2)

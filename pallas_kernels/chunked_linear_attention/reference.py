"""Token-by-token recurrence: the definition every other implementation is tested against.

    if token t starts a new document:  S = 0
    if token t is padding (segment 0): o_t = 0, S unchanged
    else:                              S = diag(exp(g_t)) S + k_t v_t^T;  o_t = scale * q_t S

One `lax.scan` step per token, all in float32, differentiated by JAX's autodiff. Only for tests,
short sequences and as the last fallback: its cost is T sequential [K, V] updates.
Dimension letters as in common.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.chunked_linear_attention import common

F32 = common.F32


def chunked_linear_attention(q, k, v, log_decay, initial_state, segment_ids, *, scale: float,
                             chunk_size: int):
    """q [B,T,H,K], k [B,T,G,K], v [B,T,G,V], log_decay None | [B,T,H] | [B,T,H,K],
    initial_state None | [B,H,K,V], segment_ids None | [B,T] -> (o [B,T,H,V] in q.dtype,
    final state [B,H,K,V] fp32). chunk_size is a hint of the chunked implementations, unused."""
    del chunk_size
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    kh = common.expand_kv(k, h).astype(F32)
    vh = common.expand_kv(v, h).astype(F32)
    g = jnp.zeros((b, t, h), F32) if log_decay is None else log_decay.astype(F32)
    decay = jnp.exp(g)
    if decay.ndim == 3:
        decay = decay[..., None]  # a scalar per head decays every key row alike
    decay = jnp.broadcast_to(decay, (b, t, h, dk))
    if segment_ids is None:
        valid = jnp.ones((b, t), bool)
        reset = jnp.zeros((b, t), bool)
    else:
        valid = segment_ids != 0
        reset = common.resets(segment_ids)
    s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)

    def step(s, xs):
        q_t, k_t, v_t, a_t, valid_t, reset_t = xs  # [B,H,K], [B,H,K], [B,H,V], [B,H,K], [B], [B]
        s = jnp.where(reset_t[:, None, None, None], 0.0, s)
        new = a_t[..., None] * s + k_t[..., None] * v_t[..., None, :]
        s = jnp.where(valid_t[:, None, None, None], new, s)
        o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, s)
        return s, jnp.where(valid_t[:, None, None], o_t, 0.0)

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    xs = tuple(map(time_major, (q.astype(F32), kh, vh, decay, valid, reset)))
    s, o = jax.lax.scan(step, s0, xs)
    return time_major(o).astype(q.dtype), s


def step(q, k, v, log_decay, state, *, scale: float):
    """One decode token: q [B,H,K], k [B,G,K], v [B,G,V], log_decay None | [B,H] | [B,H,K],
    state [B,H,K,V] fp32 -> (o [B,H,V] in q.dtype, new state fp32). No document handling: the
    caller resets `state` where a new document starts."""
    h = q.shape[1]
    kh = common.expand_kv(k[:, None], h)[:, 0].astype(F32)
    vh = common.expand_kv(v[:, None], h)[:, 0].astype(F32)
    s = state.astype(F32)
    if log_decay is not None:
        a = jnp.exp(log_decay.astype(F32))
        s = (a[..., None, None] if a.ndim == 2 else a[..., None]) * s
    s = s + kh[..., None] * vh[..., None, :]
    o = scale * jnp.einsum("bhk,bhkv->bhv", q.astype(F32), s)
    return o.astype(q.dtype), s

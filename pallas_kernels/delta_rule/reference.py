"""Token-by-token delta rule: the definition every other implementation is tested against.

    if token t starts a new document:  S = 0
    if token t is padding (segment 0): o_t = 0, S unchanged
    else:  S~ = exp(g_t) S;  S = S~ + beta_t k_t (v_t - S~^T k_t)^T;  o_t = scale * q_t S

One `lax.scan` step per token, all in float32, differentiated by JAX's autodiff (which stores
one [K, V] state per token: only for tests, short sequences and as the last fallback).
q and k arrive already L2-normalised when the caller asked for it (api.py).
Dimension letters as in common.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.delta_rule import common

F32 = common.F32


def delta_rule(q, k, v, beta, log_decay, initial_state, segment_ids, *, scale: float,
               chunk_size: int):
    """q [B,T,H,K], k [B,T,G,K], v [B,T,G,V], beta [B,T,H], log_decay None | [B,T,H],
    initial_state None | [B,H,K,V], segment_ids None | [B,T] -> (o [B,T,H,V] in q.dtype,
    final state [B,H,K,V] fp32). chunk_size is a hint of the chunked implementations, unused."""
    del chunk_size
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    kh = common.expand_kv(k, h).astype(F32)
    vh = common.expand_kv(v, h).astype(F32)
    g = jnp.zeros((b, t, h), F32) if log_decay is None else log_decay.astype(F32)
    if segment_ids is None:
        valid = jnp.ones((b, t), bool)
        reset = jnp.zeros((b, t), bool)
    else:
        valid = segment_ids != 0
        reset = common.resets(segment_ids)
    s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)

    def scan_step(s, xs):
        q_t, k_t, v_t, beta_t, g_t, valid_t, reset_t = xs  # [B,H,K] x2, [B,H,V], [B,H] x2, [B] x2
        s = jnp.where(reset_t[:, None, None, None], 0.0, s)
        new = _update(s, k_t, v_t, beta_t, g_t)
        s = jnp.where(valid_t[:, None, None, None], new, s)
        o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, s)
        return s, jnp.where(valid_t[:, None, None], o_t, 0.0)

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    xs = tuple(map(time_major, (q.astype(F32), kh, vh, beta.astype(F32), g, valid, reset)))
    s, o = jax.lax.scan(scan_step, s0, xs)
    return time_major(o).astype(q.dtype), s


def _update(s, k, v, beta, g):
    """One step on fp32 s [B,H,K,V] with k [B,H,K], v [B,H,V], beta, g [B,H]."""
    s = jnp.exp(g)[..., None, None] * s
    u = beta[..., None] * (v - jnp.einsum("bhk,bhkv->bhv", k, s))
    return s + k[..., None] * u[..., None, :]


def step(q, k, v, beta, log_decay, state, *, scale: float):
    """One decode token: q [B,H,K], k [B,G,K], v [B,G,V], beta [B,H], log_decay None | [B,H],
    state [B,H,K,V] fp32 -> (o [B,H,V] in q.dtype, new state fp32). q and k as the op receives
    them (normalised by the caller when asked). No document handling: the caller resets
    `state` where a new document starts."""
    h = q.shape[1]
    kh = common.expand_kv(k[:, None], h)[:, 0].astype(F32)
    vh = common.expand_kv(v[:, None], h)[:, 0].astype(F32)
    g = jnp.zeros(beta.shape, F32) if log_decay is None else log_decay.astype(F32)
    s = _update(state.astype(F32), kh, vh, beta.astype(F32), g)
    o = scale * jnp.einsum("bhk,bhkv->bhv", q.astype(F32), s)
    return o.astype(q.dtype), s

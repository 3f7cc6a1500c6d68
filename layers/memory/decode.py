"""One token of the test-time memory, for decoding: the per-token equations of
pallas_kernels/neural_memory/reference.py with the chunking of training kept in the state.

The op's chunks lie on the row's grid (tokens [n b, (n + 1) b) share the gradient anchor, the
weights entering the chunk), so a decode step that reproduces training must know where in the
grid it is and what the anchor was. The state (`MemoryCache`, per row; leaves float32
[B, H, d_in, d_out] unless said):

    weights   M, the memory after the last token seen
    momentum  S (() for plain GD)
    anchor    A, the weights at the start of the current chunk (or of the current document, if
              it started mid-chunk)
    lam       [B, H], prod (1 - alpha_j) over the chunk's tokens so far (gradient_at "decayed")
    pos       int32 [B], tokens of the row seen so far (padding included: the grid counts them)
    segment   int32 [B], segment id of the last token seen (0 before any)

Per token (id s, t = pos):
    if s != segment and s != 0:        M = W0, S = 0           (a new document; also the first
                                                                 token of a row)
    if that, or t % b == 0:            A = M, lam = 1
    if s == 0:                         o = 0, nothing else changes
    else                               lam *= 1 - alpha; u = grad l(A or lam A; k, v);
                                       S = eta S - theta u (GD: -theta u); M = (1 - alpha) M + S
                                       o = M(q) or A(q)

The cache starts from zeros, never from W0 (a scanned stack builds one cache for all layers):
every row's first non-padding token follows a segment id of 0, so it resets M to W0 before use,
as the op's first token starts from W0. This module would shrink to a call of the reference's
step if reference.py exposed its scan body as a function of (state, token); it does not, so the
lines are repeated here and tests/layers/test_memory_mixer.py checks them against the op.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory import common

F32 = jnp.float32


class MemoryCache(NamedTuple):
    weights: tuple
    momentum: tuple
    anchor: tuple
    lam: jax.Array
    pos: jax.Array
    segment: jax.Array


def init_cache(spec: common.MemorySpec, batch: int, heads: int, dk: int, dv: int) -> MemoryCache:
    """An empty cache (zeros; the first real token loads W0, see the module docstring)."""
    w = tuple(jnp.zeros((batch, heads, *s), F32) for s in common.layer_shapes(spec, dk, dv))
    return MemoryCache(w, w if spec.momentum else (), w, jnp.ones((batch, heads), F32),
                       jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))


def _scale(c, x):
    """c [B, H] times x [B, H, ...]."""
    return c.reshape(c.shape + (1,) * (x.ndim - 2)) * x


def _where(c, x, y):
    """c [B] or [B, H] selects between the pytrees x and y of [B, H, ...] leaves."""
    return jax.tree.map(lambda a, z: jnp.where(c.reshape(c.shape + (1,) * (a.ndim - c.ndim)), a, z), x, y)


def step(spec: common.MemorySpec, w0: tuple, cache: MemoryCache, q, k, v, theta, alpha, eta, delta,
         segment) -> tuple[jax.Array, MemoryCache]:
    """One token per row: q, k [B, H, K], v [B, H, V], gates [B, H] (None where `spec` has no
    use for them), segment int [B]; w0 tuple of [H, d_in, d_out] -> (o [B, H, V] float32,
    the cache after the token)."""
    b, h = theta.shape
    zeros = jnp.zeros((b, h), F32)
    al = zeros if alpha is None else alpha.astype(F32)
    et = zeros if eta is None else eta.astype(F32)
    de = zeros if delta is None else delta.astype(F32)
    th = theta.astype(F32)
    q, k, v = (x.astype(F32) for x in (q, k, v))
    segment = segment.astype(jnp.int32)
    valid = segment != 0
    reset = (segment != cache.segment) & valid
    start = cache.pos % spec.chunk_size == 0

    m = _where(reset, tuple(jnp.broadcast_to(x.astype(F32), y.shape) for x, y in zip(w0, cache.weights)),
               cache.weights)
    s = _where(reset, jax.tree.map(jnp.zeros_like, cache.momentum), cache.momentum)
    new = reset | start
    anchor = _where(new, m, cache.anchor)
    lam = jnp.where(new[:, None], 1.0, cache.lam)

    lam_t = lam * (1.0 - al)
    point = anchor if spec.gradient_at == "undecayed" else tuple(_scale(lam_t, a) for a in anchor)
    grad = jax.grad(lambda w, k_, v_, d_: common.token_loss(spec, w, k_, v_, d_))
    u = jax.vmap(jax.vmap(grad))(point, k, v, de)
    if spec.momentum:
        s_new = tuple(_scale(et, x) - _scale(th, g) for x, g in zip(s, u))
        upd = s_new
    else:
        s_new, upd = s, tuple(-_scale(th, g) for g in u)
    m_new = tuple(_scale(1.0 - al, x) + d for x, d in zip(m, upd))
    read = jax.vmap(jax.vmap(lambda w, x: common.apply(spec, w, x)))
    o = read(m_new if spec.read == "after_write" else anchor, q)

    out = MemoryCache(weights=_where(valid, m_new, m), momentum=_where(valid, s_new, s), anchor=anchor,
                      lam=jnp.where(valid[:, None], lam_t, lam), pos=cache.pos + 1, segment=segment)
    return jnp.where(valid[:, None, None], o, 0.0), out


def scan(spec: common.MemorySpec, w0: tuple, cache: MemoryCache, q, k, v, theta, alpha, eta, delta,
         segment_ids) -> tuple[jax.Array, MemoryCache]:
    """`step` over T tokens: q, k [B, T, H, K], v [B, T, H, V], gates [B, T, H] or None,
    segment_ids [B, T] -> (o [B, T, H, V] float32, cache)."""
    tm = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

    def body(c, xs):
        o, c = step(spec, w0, c, *xs)
        return c, o

    cache, o = jax.lax.scan(body, cache, tuple(map(tm, (q, k, v, theta, alpha, eta, delta, segment_ids))))
    return jnp.moveaxis(o, 0, 1), cache

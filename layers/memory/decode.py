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
as the op's first token starts from W0. The equations are reference.py's `token_step` itself
(the reference's scan body); this module only keeps the grid position and the last segment id
that the parallel form reads from the token's index.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory import common, reference

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


def step(spec: common.MemorySpec, w0: tuple, cache: MemoryCache, q, k, v, theta, alpha, eta, delta,
         segment) -> tuple[jax.Array, MemoryCache]:
    """One token per row: q, k [B, H, K], v [B, H, V], gates [B, H] (None where `spec` has no
    use for them), segment int [B]; w0 tuple of [H, d_in, d_out] -> (o [B, H, V] float32,
    the cache after the token). The equations are the op's definition
    (pallas_kernels/neural_memory/reference.py `token_step`); the cache adds what the parallel
    form knows from the token's index: the chunk grid position and the previous segment id."""
    b, h = theta.shape
    zeros = jnp.zeros((b, h), F32)
    gates = [zeros if g is None else g.astype(F32) for g in (theta, alpha, eta, delta)]
    segment = segment.astype(jnp.int32)
    valid = segment != 0
    reset = (segment != cache.segment) & valid
    start = cache.pos % spec.chunk_size == 0
    o, m, s, anchor, lam = reference.token_step(
        spec, w0, cache.weights, cache.momentum, cache.anchor, cache.lam,
        *(x.astype(F32) for x in (q, k, v)), *gates, valid, reset, start)
    return o, MemoryCache(weights=m, momentum=s, anchor=anchor, lam=lam, pos=cache.pos + 1,
                          segment=segment)


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

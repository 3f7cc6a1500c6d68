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
    gates     [3, B, H], theta, alpha, eta of the token that set the anchor (gate_granularity
              "chunk" uses them for the whole chunk; zeros otherwise)

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
that the parallel form reads from the token's index. `prefill` runs the whole chunks of a
multi-token call through the chunk-parallel op when the cache sits on the grid.
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
    gates: jax.Array


def init_cache(spec: common.MemorySpec, batch: int, heads: int, dk: int, dv: int) -> MemoryCache:
    """An empty cache (zeros; the first real token loads W0, see the module docstring)."""
    w = tuple(jnp.zeros((batch, heads, *s), F32) for s in common.layer_shapes(spec, dk, dv))
    return MemoryCache(w, w if spec.momentum else (), w, jnp.ones((batch, heads), F32),
                       jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32),
                       jnp.zeros((3, batch, heads), F32))


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
    held = jnp.stack(gates[:3])
    if spec.gate_granularity == "chunk":  # the anchor token's gates (common.hold_gates)
        held = jnp.where((reset | start)[None, :, None], held, cache.gates)
        gates = [*held, gates[3]]
    o, m, s, anchor, lam = reference.token_step(
        spec, w0, cache.weights, cache.momentum, cache.anchor, cache.lam,
        *(x.astype(F32) for x in (q, k, v)), *gates, valid, reset, start)
    return o, MemoryCache(weights=m, momentum=s, anchor=anchor, lam=lam, pos=cache.pos + 1,
                          segment=segment, gates=held)


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


def prefill(spec: common.MemorySpec, w0: tuple, cache: MemoryCache, q, k, v, theta, alpha, eta,
            delta, segment_ids, *, parallel) -> tuple[jax.Array, MemoryCache]:
    """Any number of tokens from a cache, as `scan`, but chunk-parallel where that is exact:
    when every row's cache sits on the chunk grid (pos % b == 0, e.g. a fresh cache), the
    whole chunks in front go through `parallel` (the op: `neural_memory(spec, q, k, v, gates...,
    initial_weights, initial_state, segment_ids)`, started from the cache's state, or from W0
    for rows whose first token starts a new document) and only the last T mod b tokens are
    stepped. After whole chunks the next token starts a chunk, so the anchor, lam and held
    gates are reset by it and need not be recovered. Otherwise (a row off the grid) all T
    tokens are stepped. The choice is a `lax.cond`; both branches equal `scan` (tests).
    Shapes as `scan`."""
    t = q.shape[1]
    whole = t - t % spec.chunk_size
    args = (q, k, v, theta, alpha, eta, delta)
    stepped = lambda c: scan(spec, w0, c, *args, segment_ids)
    if whole == 0 or t == 1:
        return stepped(cache)
    part = lambda x, sl: None if x is None else x[:, sl]

    def chunked(c):
        head, tail = slice(0, whole), slice(whole, t)
        new_doc = (segment_ids[:, 0] != c.segment) & (segment_ids[:, 0] != 0)
        fresh = common.start_state(spec, w0, None, q.shape[0])
        start = reference.select_rows(new_doc, fresh, common.MemoryState(c.weights, c.momentum))
        o_head, state = parallel(spec, *(part(x, head) for x in args), initial_weights=w0,
                                 initial_state=start, segment_ids=segment_ids[:, head])
        c = c._replace(weights=state.weights, momentum=state.momentum, pos=c.pos + whole,
                       segment=segment_ids[:, whole - 1].astype(jnp.int32))
        o_tail, c = scan(spec, w0, c, *(part(x, tail) for x in args), segment_ids[:, tail])
        return jnp.concatenate([o_head.astype(F32), o_tail], axis=1), c

    return jax.lax.cond(jnp.all(cache.pos % spec.chunk_size == 0), chunked, stepped, cache)

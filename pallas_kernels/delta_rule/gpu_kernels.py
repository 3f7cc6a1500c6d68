"""Kernel bodies of the Pallas Triton delta rule (gpu.py holds the wrappers and the design).

Two kinds of kernels:
* per-chunk kernels (grid (B, H, NT)): their refs are one chunk, [C, D] for a token tensor,
  [C] for per-token scalars, [C, C] for the inverse T, [K, V] for a chunk's state;
* sequential kernels (grid (B, H, NV)): refs are whole rows ([Tp, D], [Tp], [NT*K, BV] for the
  per-chunk states) and an in-kernel `lax.fori_loop` walks the chunks with a [K, BV] fp32 state
  (or state gradient) in registers.
All array sizes are powers of two and no value is sliced (Triton rules): sub-blocks are loaded
from refs, per-row selections use masks and reductions.

Notation inside one chunk (C tokens, local index i for rows, j for columns):
  G [C]        inclusive cumsum of the log decay g within the chunk (<= 0); Gl = G at the end.
  reach_i      the state entering the chunk reaches token i (no reset since the chunk start);
               computed outside (gpu.py) and passed per token.
  tail_j       doc_j == last doc of the chunk: token j's write reaches the state leaving it.
  keep         reach at the last token: the entering state survives the whole chunk.
  Mi / Ms      i >= j / i > j, and doc_i == doc_j.    D_ij = exp(G_i - G_j) on Mi, else 0.
  wq_i = reach_i exp(G_i)     wk_j = tail_j exp(Gl - G_j)     kw_i = beta_i exp(G_i) reach_i

Chunk algebra (S0 = state entering the chunk, [K, V]):
  A  = beta_i D_ij (k_i . k_j) on Ms            T = (I + A)^-1 (unit lower triangular)
  W  = T (kw . K)        U~ = T (beta . V)       U = U~ - W S0 = T R,  R = beta.V - (kw.K) S0
  O  = scale [ (wq . Q) S0 + P U ],  P = (Q K^T) . D
  S' = keep exp(Gl) S0 + (wk . K)^T U
and its gradient (dO, dS' given): dU = scale P^T dO + (wk . K) dS', dR = T^T dU, and
  dA = -dR U^T on Ms (the gradient of U = (I + A)^-1 R with respect to A),
  dS0 = keep exp(Gl) dS' + scale (wq . Q)^T dO - (kw . K)^T dR,
the rest being products of these with the chunk's q, k, v, beta and decays
(grad_wy_kernel, grad_o_kernel).
Every exponent is <= 0 (masked entries become -inf before the exp).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
SUB = 16  # diagonal blocks of the triangular inverse: the smallest tensor-core tile


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call (hashable: it is a custom_vjp nondiff argument).

    chunk: C in {16, 32, 64}; num_chunks: NT = Tp / C.
    scale: multiplies q. heads, kv_heads: H and G. key_dim, block_v: K and BV (the V tile).
    dot_dtype / precision: operands and precision of the matmuls on input-derived tiles (bf16
      with DEFAULT for bf16 inputs; f32 with 3-pass tf32 on GPU, HIGHEST in interpret mode).
    inv_precision: precision of the fp32 matmuls of the triangular inverse (never bf16).
    has_g: a log decay is given (else G = 0 and no g ref). has_s0: an initial state is given.
    with_t: the intra kernel also writes T (the backward needs it; the forward does not).
    num_stages: Triton software-pipelining depth of the sequential kernels' chunk loop.
    """
    chunk: int
    num_chunks: int
    scale: float
    heads: int
    kv_heads: int
    key_dim: int
    block_v: int
    dot_dtype: Any
    precision: Any
    inv_precision: Any
    has_g: bool
    has_s0: bool
    with_t: bool
    num_stages: int


# ----------------------------------------------------------------------------- helpers

def _mm(a, b, cfg: Config, *, ta: bool = False, tb: bool = False):
    """a @ b (a^T if ta, b^T if tb): operands in cfg.dot_dtype, fp32 result."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a.astype(cfg.dot_dtype), b.astype(cfg.dot_dtype), dims,
                           precision=cfg.precision, preferred_element_type=F32)


def _mm32(a, b, cfg: Config):
    """a @ b with fp32 operands (the triangular inverse keeps full precision)."""
    return lax.dot_general(a.astype(F32), b.astype(F32), (((1,), (0,)), ((), ())),
                           precision=cfg.inv_precision, preferred_element_type=F32)


def _iota2(c: int, start=0):
    """Row / column indices of a [C, C] tile, offset by `start` (the chunk's first position,
    a multiple of C) inside chunk loops so that Triton does not hoist the [C, C] masks out of
    the loop, where they would occupy registers for its whole length."""
    return (start + lax.broadcasted_iota(jnp.int32, (c, c), 0),
            start + lax.broadcasted_iota(jnp.int32, (c, c), 1))


def _split(refs, names):
    """Name the flat ref list of a kernel (only the refs that exist for this config)."""
    return dict(zip(names, refs, strict=True))


def _tri_inv(a):
    """(I + A)^-1 for a strictly lower [n, n] fp32 block, by forward substitution: row i of
    the inverse X is e_i - a_i X, where a_i (row i of A) only reads rows < i of X, all final
    when row i is formed. Masked reductions, elementwise fp32; no matrix powers."""
    n = a.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (n, n), 0)
    col = lax.broadcasted_iota(jnp.int32, (n, n), 1)

    def step(i, t):
        a_i = jnp.sum(jnp.where(row == i, a, 0.0), axis=0)           # row i of A, [n]
        new = -jnp.sum(a_i[:, None] * t, axis=0)                     # -(a_i @ T), [n]
        return t + jnp.where(row == i, new[None, :], 0.0)

    return lax.fori_loop(1, n, step, jnp.where(row == col, 1.0, 0.0).astype(F32))


class _Chunk:
    """Decays, masks and row weights of one chunk (module docstring notation)."""

    def __init__(self, cfg: Config, g, doc, reach, beta, start=0):
        c = cfg.chunk
        if g is None:
            self.G = jnp.zeros((c,), F32)
            gl = jnp.float32(0.0)
        else:
            self.G = jnp.cumsum(g)
            gl = jnp.sum(g)
        reach = reach > 0
        self.keep = jnp.min(jnp.where(reach, 1, 0)) > 0               # reach is 1..1 0..0
        tail = doc == jnp.max(doc)                                    # doc ids never decrease
        eg = jnp.exp(self.G)
        self.wq = jnp.where(reach, eg, 0.0)                           # [C]
        self.wk = jnp.where(tail, jnp.exp(gl - self.G), 0.0)          # [C]
        self.kw = None if beta is None else jnp.where(reach, beta * eg, 0.0)
        self.decay = jnp.where(self.keep, jnp.exp(gl), 0.0)           # scalar
        self.gl_exp = jnp.exp(gl)
        i, j = _iota2(c, start)
        same = doc[:, None] == doc[None, :]
        self.mi = (i >= j) & same
        self.ms = (i > j) & same
        self.dmat = jnp.exp(jnp.where(self.mi, self.G[:, None] - self.G[None, :], -jnp.inf))
        self.last = (lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1)


# ----------------------------------------------------------------------------- forward

def intra_kernel(*refs, cfg: Config, names):
    """Grid (B, H, NT). Refs: k [C,K], v [C,V], beta [C], g [C], doc [C], reach [C]
    -> w [C,K], ut [C,V] (dot dtype), t [C,C] fp32 (if cfg.with_t).

    A is built in SUB x SUB blocks loaded straight from the refs (no value slicing in
    Triton); the diagonal blocks are inverted by forward substitution and the off-diagonal
    blocks of T follow by block forward substitution,
        T_ab = -T_aa sum_{b <= m < a} A_am T_mb          (a > b),
    which is the merge [[X, 0], [Y, Z]]^-1 = [[X^-1, 0], [-Z^-1 Y X^-1, Z^-1]] applied block
    row by block row. A and T stay fp32; W and U~ use dot-dtype operands."""
    r = _split(refs, names)
    n = cfg.chunk // SUB
    ks, betas, Gs, docs, kws = [], [], [], [], []
    prefix = jnp.float32(0.0)
    for a in range(n):
        rows = pl.ds(a * SUB, SUB)
        ks.append(r["k"][rows, :])
        betas.append(r["beta"][rows])
        if cfg.has_g:
            g = r["g"][rows]
            Gs.append(prefix + jnp.cumsum(g))
            prefix = prefix + jnp.sum(g)
        else:
            Gs.append(jnp.zeros((SUB,), F32))
        docs.append(r["doc"][rows])
        reach = r["reach"][rows] > 0
        kws.append(jnp.where(reach, betas[a] * jnp.exp(Gs[a]), 0.0))
    row = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    col = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)
    A = {}
    for a in range(n):
        for b in range(a + 1):
            mask = docs[a][:, None] == docs[b][None, :]
            if a == b:
                mask = mask & (row > col)
            dec = jnp.exp(jnp.where(mask, Gs[a][:, None] - Gs[b][None, :], -jnp.inf))
            A[a, b] = betas[a][:, None] * dec * _mm(ks[a], ks[b], cfg, tb=True)
    T = {}
    for a in range(n):
        T[a, a] = _tri_inv(A[a, a])
        for b in range(a - 1, -1, -1):
            acc = _mm32(A[a, b], T[b, b], cfg)
            for m in range(b + 1, a):
                acc += _mm32(A[a, m], T[m, b], cfg)
            T[a, b] = -_mm32(T[a, a], acc, cfg)
    vbs = [betas[b][:, None] * r["v"][pl.ds(b * SUB, SUB), :].astype(F32) for b in range(n)]
    for a in range(n):
        rows = pl.ds(a * SUB, SUB)
        w = sum(_mm(T[a, b], kws[b][:, None] * ks[b].astype(F32), cfg) for b in range(a + 1))
        r["w"][rows, :] = w.astype(r["w"].dtype)
        ut = sum(_mm(T[a, b], vbs[b], cfg) for b in range(a + 1))
        r["ut"][rows, :] = ut.astype(r["ut"].dtype)
        if cfg.with_t:
            for b in range(n):
                block = T[a, b] if b <= a else jnp.zeros((SUB, SUB), F32)
                r["t"][rows, pl.ds(b * SUB, SUB)] = block


def state_kernel(*refs, cfg: Config, names):
    """Grid (B, H, NV). Refs: k [Tp,K], w [Tp,K], ut [Tp,BV], g [Tp], doc [Tp], reach [Tp],
    s0 [K,BV] -> h [NT*K,BV] fp32 (state entering each chunk), u [Tp,BV] (new values U),
    sT [K,BV]. The fp32 state S[:, vb] is carried over the chunks in registers."""
    r = _split(refs, names)
    c_len, dk = cfg.chunk, cfg.key_dim

    def body(c, s):
        start = pl.multiple_of(c * c_len, c_len)
        rows = pl.ds(start, c_len)
        r["h"][pl.ds(pl.multiple_of(c * dk, dk), dk), :] = s
        ch = _Chunk(cfg, r["g"][rows] if cfg.has_g else None, r["doc"][rows], r["reach"][rows],
                    None, start)
        u = r["ut"][rows, :].astype(F32) - _mm(r["w"][rows, :], s, cfg)
        r["u"][rows, :] = u.astype(r["u"].dtype)
        k = r["k"][rows, :]
        return ch.decay * s + _mm(ch.wk[:, None] * k.astype(F32), u, cfg, ta=True)

    s0 = r["s0"][...] if cfg.has_s0 else jnp.zeros(r["sT"].shape, F32)
    r["sT"][...] = lax.fori_loop(0, cfg.num_chunks, body, s0)


def output_kernel(*refs, cfg: Config, names):
    """Grid (B, H, NT). Refs: q [C,K], k [C,K], u [C,V], g [C], doc [C], reach [C], h [K,V]
    -> o [C,V]. O = scale [(wq . Q) S0 + ((Q K^T) . D) U], V in tiles of BV."""
    r = _split(refs, names)
    ch = _Chunk(cfg, r["g"][...] if cfg.has_g else None, r["doc"][...], r["reach"][...], None)
    q = r["q"][...]
    p = _mm(q, r["k"][...], cfg, tb=True) * ch.dmat
    bv = cfg.block_v
    for j in range(r["o"].shape[-1] // bv):
        cols = pl.ds(j * bv, bv)
        o = ch.wq[:, None] * _mm(q, r["h"][:, cols], cfg) + _mm(p, r["u"][:, cols], cfg)
        r["o"][:, cols] = (cfg.scale * o).astype(r["o"].dtype)


# ----------------------------------------------------------------------------- backward

def dstate_kernel(*refs, cfg: Config, names):
    """Grid (B, H, NV). Refs: q [Tp,K], k [Tp,K], do [Tp,BV], t [Tp,C], beta, g, doc, reach
    [Tp], dsT [K,BV] -> dh [NT*K,BV] (gradient of the state leaving each chunk), ds0 [K,BV].
    Carries dS[:, vb] ([K, BV] fp32) backwards over the chunks: the columns of the state are
    independent, so a V tile of the gradient evolves on its own."""
    r = _split(refs, names)
    c_len, dk, nt = cfg.chunk, cfg.key_dim, cfg.num_chunks

    def body(i, ds):
        c = nt - 1 - i
        start = pl.multiple_of(c * c_len, c_len)
        rows = pl.ds(start, c_len)
        r["dh"][pl.ds(pl.multiple_of(c * dk, dk), dk), :] = ds
        ch = _Chunk(cfg, r["g"][rows] if cfg.has_g else None, r["doc"][rows], r["reach"][rows],
                    r["beta"][rows], start)
        q, k, do = r["q"][rows, :], r["k"][rows, :], r["do"][rows, :]
        kf = k.astype(F32)
        p = _mm(q, k, cfg, tb=True) * ch.dmat
        du = cfg.scale * _mm(p, do, cfg, ta=True) + ch.wk[:, None] * _mm(k, ds, cfg)
        dr = _mm(r["t"][rows, :], du, cfg, ta=True)
        return (ch.decay * ds + cfg.scale * _mm(ch.wq[:, None] * q.astype(F32), do, cfg, ta=True)
                - _mm(ch.kw[:, None] * kf, dr, cfg, ta=True))

    ds = lax.fori_loop(0, nt, body, r["dsT"][...])
    if cfg.has_s0:
        r["ds0"][...] = ds


def grad_wy_kernel(*refs, cfg: Config, names):
    """Grid (B, H, NT). The gradient through the WY form and the state (everything that
    involves T). Refs: q [C,K], k [C,K], v [C,V], do [C,V], u [C,V], t [C,C], beta, g, doc,
    reach [C], h [K,V] (S0), dh [K,V] (dS') -> dk [C,K] fp32 (partial: grad_o_kernel adds
    the rest), dv [C,V] (this query head's share), dbeta [C], dG [C] fp32 (partial).

    V is walked in tiles of BV: dU = scale P^T dO + wk . (K dS'), dR = T^T dU, dv = beta . dR;
    every other gradient is a sum over V, accumulated in fp32: dA = -dR U^T [C, C] and
    dk = kw . (-dR S0^T) + wk . (U dS'^T) [C, K] (the row weights applied to the [C, BV]
    operands; the row dots with k that dbeta and dG need come from K S0 and K dS')."""
    r = _split(refs, names)
    c = cfg.chunk
    beta = r["beta"][...]
    ch = _Chunk(cfg, r["g"][...] if cfg.has_g else None, r["doc"][...], r["reach"][...], beta)
    q, k, t = r["q"][...], r["k"][...], r["t"][...]
    p = _mm(q, k, cfg, tb=True) * ch.dmat                   # P = (Q K^T) . D
    da = jnp.zeros((c, c), F32)
    dk = jnp.zeros(k.shape, F32)
    k_dkw = jnp.zeros((c,), F32)       # k . (-dR S0^T): gradient of kw (beta, dG)
    k_dkk = jnp.zeros((c,), F32)       # k . (U dS'^T): gradient of wk (dG)
    dbeta = jnp.zeros((c,), F32)
    gsum = jnp.zeros((cfg.key_dim,), F32)   # <S0, dS'> by rows: a scalar accumulated in
    # the V loop made Triton spill 8 KB (C = 32), and a 2-D -> scalar reduction does not lower
    bv = cfg.block_v
    for j in range(r["v"].shape[-1] // bv):
        cols = pl.ds(j * bv, bv)
        do, u = r["do"][:, cols], r["u"][:, cols].astype(F32)
        s0, ds = r["h"][:, cols], r["dh"][:, cols]
        kds = _mm(k, ds, cfg)                                 # K dS'  [C, BV]
        du = cfg.scale * _mm(p, do, cfg, ta=True) + ch.wk[:, None] * kds
        dr = _mm(t, du, cfg, ta=True)
        r["dv"][:, cols] = (beta[:, None] * dr).astype(r["dv"].dtype)
        dbeta += jnp.sum(r["v"][:, cols].astype(F32) * dr, axis=1)
        da -= _mm(dr, u, cfg, tb=True)
        dk += (_mm(-ch.kw[:, None] * dr, s0, cfg, tb=True)
               + _mm(ch.wk[:, None] * u, ds, cfg, tb=True))
        k_dkw -= jnp.sum(dr * _mm(k, s0, cfg), axis=1)
        k_dkk += jnp.sum(u * kds, axis=1)
        gsum += jnp.sum(s0 * ds, axis=1)
    dmat_s = jnp.where(ch.ms, ch.dmat, 0.0)
    kk = _mm(k, k, cfg, tb=True) * dmat_s                   # D . (K K^T) on Ms
    dam = da * beta[:, None] * dmat_s                       # gradient of K K^T (from A)
    dk += _mm(dam, k, cfg) + _mm(dam, k, cfg, ta=True)
    r["dk"][...] = dk
    r["dbeta"][...] = dbeta + jnp.sum(da * kk, axis=1) + ch.wq * k_dkw  # wq = reach exp(G)
    if not cfg.has_g:
        return
    # dG: D_ij = exp(G_i - G_j) in A (row sums minus column sums of grad . value), then the
    # row weights kw (+), wk (- at j, + at the end) and exp(Gl) (+ at the end).
    za = da * beta[:, None] * kk
    wk_term = ch.wk * k_dkk
    end = jnp.sum(wk_term) + jnp.where(ch.keep, ch.gl_exp, 0.0) * jnp.sum(gsum)
    dg = jnp.sum(za, axis=1) - jnp.sum(za, axis=0) + ch.kw * k_dkw - wk_term
    r["dG"][...] = dg + jnp.where(ch.last, end, 0.0)


def grad_o_kernel(*refs, cfg: Config, names):
    """Grid (B, H, NT). The gradient through O = scale [(wq . Q) S0 + P U] with respect to
    q, k and the decays (U and S0 held fixed: their own gradients went through dU and the
    state). Refs: q [C,K], k [C,K], do [C,V], u [C,V], g, doc, reach [C], h [K,V],
    dk_wy [C,K] and dG_wy [C] (grad_wy_kernel's partial sums) -> dq [C,K], dk [C,K], dG [C].
    V is walked in tiles of BV, accumulating dP = scale dO U^T [C, C] and dO S0^T [C, K]."""
    r = _split(refs, names)
    c = cfg.chunk
    ch = _Chunk(cfg, r["g"][...] if cfg.has_g else None, r["doc"][...], r["reach"][...], None)
    q, k = r["q"][...], r["k"][...]
    dp = jnp.zeros((c, c), F32)
    dq = jnp.zeros(q.shape, F32)
    bv = cfg.block_v
    for j in range(r["u"].shape[-1] // bv):
        cols = pl.ds(j * bv, bv)
        do = r["do"][:, cols]
        dp += _mm(do, r["u"][:, cols], cfg, tb=True)
        dq += _mm(do, r["h"][:, cols], cfg, tb=True)
    dp = cfg.scale * dp
    dpm = dp * ch.dmat                                      # gradient of Q K^T
    dq_s = cfg.scale * ch.wq[:, None] * dq
    r["dq"][...] = (dq_s + _mm(dpm, k, cfg)).astype(r["dq"].dtype)
    r["dk"][...] = (r["dk_wy"][...] + _mm(dpm, q, cfg, ta=True)).astype(r["dk"].dtype)
    if not cfg.has_g:
        return
    # dG: D_ij in P (row sums minus column sums of dP . P), and the row weight wq (+).
    zp = dp * (_mm(q, k, cfg, tb=True) * ch.dmat)
    r["dG"][...] = (r["dG_wy"][...] + jnp.sum(zp, axis=1) - jnp.sum(zp, axis=0)
                    + jnp.sum(q.astype(F32) * dq_s, axis=1))

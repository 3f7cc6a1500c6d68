"""Kernel bodies of the Pallas Triton chunked linear attention (gpu.py holds the wrappers).

Every kernel runs one program per (batch, query head, head-dim block) and walks the chunks of
its row with an in-kernel `lax.fori_loop`, keeping a [K, BV] (or [BK, V]) float32 state in
registers. Refs are whole rows: [Tp, D] for a token tensor (T padded to the chunk, Tp = NT*C),
[Tp] for per-token scalars, [K, BV] / [BK, V] for states. Loads and stores move one chunk:
[C, D] or [C]. All array sizes are powers of two (the Triton rule); no value is sliced (a
Triton rule too): per-row selections use masks and reductions.

Notation inside one chunk (C tokens, local index i for queries, j for keys):
  g [C] or [C, K]   per-token log decay (<= 0), G = inclusive cumsum of g within the chunk,
                    Gl = G at the last token (= sum of g): decays are relative to the chunk start.
  doc [C]           document number; `dprev` = doc of the token before the chunk (0 at row start).
  same_i  = doc_i == dprev   the state entering the chunk reaches token i
  keep    = dlast == dprev   the state entering the chunk survives to its end (no reset inside)
  tail_j  = doc_j == dlast   token j's write survives to the end of the chunk
  M_ij    = i >= j and doc_i == doc_j   (intra-chunk pairs that interact)

Forward per chunk (S: state before the chunk):
  A   = (q k^T) . exp(G_i - G_j) . M          [C, C] fp32 (per-channel decay: see below)
  o   = scale * (A v + same . (q . exp(G)) S)
  S  <- keep * exp(Gl) . S + (k . exp(Gl - G) . tail)^T v

Per-channel decay cannot factor exp(G_i - G_j) as exp(G_i) exp(-G_j) (overflow). The exact,
overflow-free form used here splits the strictly-lower pairs (i > j) of the chunk by the highest
bit b in which i and j differ (log2(C) levels). At level b, pair (i, j) lies in one aligned group
of 2^(b+1) tokens, i in its upper half and j in its lower half, so with R = G at the last token
of the lower half: exp(G_i - G_j) = exp(G_i - R) * exp(R - G_j), both exponents <= 0. Per
level this is one tensor-core dot of (x . e_b) and (y . e_b) masked to that level's pairs,
where e_b = exp(G_i - R) on upper rows and exp(R - G_j) on lower rows, computed from a
segmented cumsum of g over aligned segments of 2^b tokens. The diagonal (i == j) has decay 1
and is an elementwise row sum. No exponent anywhere in this file is positive.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call (hashable: it is a custom_vjp nondiff argument).

    mode: "none" (no decay), "scalar" (g [B, T, H]) or "vector" (g [B, T, H, K]).
    chunk: C in {16, 32, 64}; num_chunks: NT = Tp / C.
    heads, kv_heads: H and G (query head h reads kv head h // (H // G)).
    block_k, block_v: BK, BV, the head-dim tiles of the K-tiled / V-tiled kernels.
    dot_dtype: operand dtype of every in-kernel matmul (bf16 for bf16 inputs, else f32);
    precision: precision of those matmuls (gpu.py `_precision`): DEFAULT for bf16 (and tf32
      for f16 inputs, whose range would not hold the fp32 state), 3-pass tf32 for f32 inputs
      on GPU, HIGHEST (exact f32) in interpret mode.
    has_s0: an initial state is given.
    num_stages: Triton software-pipelining depth of the chunk loop.
    """
    mode: str
    chunk: int
    num_chunks: int
    scale: float
    heads: int
    kv_heads: int
    block_k: int
    block_v: int
    dot_dtype: Any
    precision: Any
    has_s0: bool
    num_stages: int


# ----------------------------------------------------------------------------- small helpers

def _mm(a, b, cfg: Config, *, ta: bool = False, tb: bool = False):
    """a @ b (a^T if ta, b^T if tb) on tensor cores: operands in cfg.dot_dtype, fp32 result."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a.astype(cfg.dot_dtype), b.astype(cfg.dot_dtype), dims,
                           precision=cfg.precision, preferred_element_type=F32)


def _iota2(c: int, start=0):
    """Token positions (start + local index) of the rows and columns of a [C, C] tile.

    With `start` = the chunk's first position (a multiple of C, itself a power of two), i >= j
    and (i ^ j) >> b agree with the local indices. Offsetting by the loop variable keeps Triton
    from hoisting the [C, C] masks built from these out of the chunk loop, where each would hold
    C*C/threads registers for the whole loop (measured: heavy spills with per-level masks)."""
    return (start + lax.broadcasted_iota(jnp.int32, (c, c), 0),
            start + lax.broadcasted_iota(jnp.int32, (c, c), 1))


def _pair_mask(doc, start=0):
    """M [C, C]: query i may read key j (i >= j, same document)."""
    i, j = _iota2(doc.shape[0], start)
    return (i >= j) & (doc[:, None] == doc[None, :])


def _scalar_decay(G, mask):
    """exp(G_i - G_j) on `mask`, 0 elsewhere; masked exponents (possibly > 0) never reach exp."""
    return jnp.exp(jnp.where(mask, G[:, None] - G[None, :], -jnp.inf))


def _levels(g):
    """Per-level factors of the exact per-channel intra-chunk decay (module docstring).

    g [C, D] fp32 -> yields (b, up [C, 1] bool, e [C, D] fp32 in (0, 1]) for b < log2(C):
      up rows (bit b of i set):    e = exp(G_i - R),  G_i - R = cumsum of g within i's
                                   aligned 2^b-segment (the upper half of its group);
      lower rows:                  e = exp(R - G_j),  R - G_j = (segment total) - (cumsum to j)
    """
    c, d = g.shape
    row = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    for b in range(c.bit_length() - 1):  # a generator: each level's [C, D] factor dies after use
        s = 1 << b
        if s == 1:
            cs, tot = g, g
        else:
            g3 = g.reshape(c // s, s, d)
            cs = jnp.cumsum(g3, axis=1).reshape(c, d)
            tot = jnp.broadcast_to(jnp.sum(g3, axis=1, keepdims=True), (c // s, s, d)).reshape(c, d)
        up = ((row >> b) & 1) == 1
        yield b, up, jnp.exp(jnp.where(up, cs, tot - cs))


def _level_mask(b: int, c: int, start):
    """Pairs whose highest differing index bit is b."""
    i, j = _iota2(c, start)
    return ((i ^ j) >> b) == 1


def _vector_scores(x, y, g, mask, start, cfg: Config):
    """A_ij = sum_d x_id y_jd exp(G_id - G_jd) on `mask` (causal, same doc), [C, C] fp32."""
    c = x.shape[0]
    i, j = _iota2(c, start)
    xf, yf = x.astype(F32), y.astype(F32)
    acc = jnp.where(i == j, jnp.sum(xf * yf, axis=1)[:, None], 0.0)
    for b, up, e in _levels(g):
        xs = jnp.where(up, xf * e, 0.0)
        ys = jnp.where(up, 0.0, yf * e)
        acc += jnp.where(mask & _level_mask(b, c, start), _mm(xs, ys, cfg, tb=True), 0.0)
    return acc


def _vector_rows(p, y, g, start, cfg: Config):
    """out_i = sum_j p_ij exp(G_i - G_j) y_j for p [C, C] already zero off the causal mask."""
    c = p.shape[0]
    i, j = _iota2(c, start)
    yf = y.astype(F32)
    acc = jnp.sum(jnp.where(i == j, p, 0.0), axis=1)[:, None] * yf
    for b, up, e in _levels(g):
        ys = jnp.where(up, 0.0, yf * e)
        acc += jnp.where(up, e, 0.0) * _mm(jnp.where(_level_mask(b, c, start), p, 0.0), ys, cfg)
    return acc


def _vector_cols(p, x, g, start, cfg: Config):
    """out_j = sum_i p_ij exp(G_i - G_j) x_i for p [C, C] already zero off the causal mask."""
    c = p.shape[0]
    i, j = _iota2(c, start)
    xf = x.astype(F32)
    acc = jnp.sum(jnp.where(i == j, p, 0.0), axis=1)[:, None] * xf
    for b, up, e in _levels(g):
        xs = jnp.where(up, xf * e, 0.0)
        acc += jnp.where(up, 0.0, e) * _mm(jnp.where(_level_mask(b, c, start), p, 0.0), xs, cfg,
                                          ta=True)
    return acc


class _Chunk:
    """Masks and decay factors of one chunk, and the products that use them.

    Two row weightings (C rows; per key channel, [C, D], for per-channel decay; one factor per
    row, [C, 1], otherwise):
      wq_i = same_i exp(G_i)             how query row i sees the state entering the chunk
      wk_j = tail_j exp(Gl - G_j)        how key row j's write reaches the state leaving it
    With a factor per row, products scale whichever operand (or result) is smaller, so the
    [C, K] q / k tiles reach the tensor cores untouched; per-channel factors must scale the
    operand that carries K.
    """

    def __init__(self, cfg: Config, g, doc, dprev, start):
        self.mode = cfg.mode
        self.cfg = cfg
        self.start = start
        dlast = jnp.max(doc)  # doc ids never decrease along a row
        same = (doc == dprev)[:, None]
        tail = (doc == dlast)[:, None]
        self.keep = dlast == dprev
        self.mask = _pair_mask(doc, start)
        self.g = g
        if self.mode == "none":
            self.wq = jnp.where(same, 1.0, 0.0)                      # [C, 1]
            self.wk = jnp.where(tail, 1.0, 0.0)
        elif self.mode == "scalar":
            G = jnp.cumsum(g)
            gl = jnp.sum(g)
            self.wq = jnp.where(same, jnp.exp(G)[:, None], 0.0)      # [C, 1]
            self.wk = jnp.where(tail, jnp.exp(gl - G)[:, None], 0.0)
            self.decay = jnp.exp(gl)                                 # scalar
            self.dmat = _scalar_decay(G, self.mask)                  # [C, C]
        else:
            G = jnp.cumsum(g, axis=0)
            gl = jnp.sum(g, axis=0)
            self.wq = jnp.where(same, jnp.exp(G), 0.0)               # [C, D]
            self.wk = jnp.where(tail, jnp.exp(gl[None, :] - G), 0.0)
            self.decay = jnp.exp(gl)[:, None]                        # [D, 1]

    def state(self, s):
        """keep * exp(Gl) . S: the state (or its gradient) decayed over the chunk, S [D, *]."""
        return jnp.where(self.keep, s if self.mode == "none" else s * self.decay, 0.0)

    def _weighted(self, x, w, y, *, ta=False, tb=False, out_rows=False):
        """x @ y (x^T if ta, y^T if tb) with diag(w) on the C axis: on x when w is per channel
        (x carries K), else on the smaller of x, y or, if out_rows, on the result's rows."""
        cfg = self.cfg
        if self.mode == "vector":
            return _mm(x.astype(F32) * w, y, cfg, ta=ta, tb=tb)
        if out_rows:
            return _mm(x, y, cfg, ta=ta, tb=tb) * w
        if x.shape[1] <= y.shape[1]:
            return _mm(x.astype(F32) * w, y, cfg, ta=ta, tb=tb)
        return _mm(x, y.astype(F32) * w, cfg, ta=ta, tb=tb)

    def read(self, q, s):
        """(wq . q) S: queries reading the entering state, q [C, K], S [K, N] -> [C, N]."""
        return self._weighted(q, self.wq, s, out_rows=True)

    def write(self, k, v):
        """(wk . k)^T v: the chunk's contribution to the leaving state, [K, N]."""
        return self._weighted(k, self.wk, v, ta=True)

    def read_t(self, q, do):
        """(wq . q)^T do: gradient of the entering state from the outputs, [K, N]."""
        return self._weighted(q, self.wq, do, ta=True)

    def write_t(self, k, ds):
        """(wk . k) dS: value gradients from the leaving state's gradient, [C, N]."""
        return self._weighted(k, self.wk, ds, out_rows=True)

    def scores(self, q, k):
        """A = (q k^T) . decay on the pair mask, [C, C] fp32 (no scale)."""
        if self.mode == "vector":
            return _vector_scores(q, k, self.g, self.mask, self.start, self.cfg)
        a = _mm(q, k, self.cfg, tb=True)
        return a * self.dmat if self.mode == "scalar" else jnp.where(self.mask, a, 0.0)

    def masked(self, p):
        """p on the pair mask, times the scalar decay (vector decay is applied by rows/cols)."""
        return p * self.dmat if self.mode == "scalar" else jnp.where(self.mask, p, 0.0)

    def rows_of(self, p, y):
        """sum_j p_ij decay_ij y_j  (p from `masked`)."""
        if self.mode == "vector":
            return _vector_rows(p, y, self.g, self.start, self.cfg)
        return _mm(p, y, self.cfg)

    def cols_of(self, p, x):
        """sum_i p_ij decay_ij x_i  (p from `masked`)."""
        if self.mode == "vector":
            return _vector_cols(p, x, self.g, self.start, self.cfg)
        return _mm(p, x, self.cfg, ta=True)


def _load_g(cfg: Config, g_ref, rows):
    if cfg.mode == "none":
        return None
    return g_ref[rows] if cfg.mode == "scalar" else g_ref[rows, :]


def _prev_doc(doc_ref, c, start, chunk):
    """Document of the token before chunk c (0 for the first chunk, the row start's)."""
    prev = doc_ref[pl.ds(jnp.maximum(start - chunk, 0), chunk)]
    return jnp.where(c == 0, 0, jnp.max(prev))


def _split(refs, names):
    """Name the flat ref list of a kernel (only the refs that exist for this config)."""
    return dict(zip(names, refs, strict=True))


# ----------------------------------------------------------------------------- forward

def fwd_kernel(*refs, cfg: Config, names):
    """Grid (B, H, NV). Refs: q [Tp,K], k [Tp,K], v [Tp,BV], g [Tp] | [Tp,K], doc [Tp],
    s0 [K,BV] -> o [Tp,BV], sT [K,BV]. State S [K, BV] fp32 carried over the chunks."""
    r = _split(refs, names)
    c_len = cfg.chunk

    def body(c, carry):
        s, dprev = carry
        start = pl.multiple_of(c * c_len, c_len)
        rows = pl.ds(start, c_len)
        q, k, v = r["q"][rows, :], r["k"][rows, :], r["v"][rows, :]
        doc = r["doc"][rows]
        ch = _Chunk(cfg, _load_g(cfg, r.get("g"), rows), doc, dprev, start)
        o = _mm(ch.scores(q, k), v, cfg) + ch.read(q, s)
        r["o"][rows, :] = (cfg.scale * o).astype(r["o"].dtype)
        return ch.state(s) + ch.write(k, v), jnp.max(doc)

    s0 = r["s0"][...] if cfg.has_s0 else jnp.zeros(r["sT"].shape, F32)
    s, _ = lax.fori_loop(0, cfg.num_chunks, body, (s0, jnp.int32(0)))
    r["sT"][...] = s


# ----------------------------------------------------------------------------- backward

def dq_kernel(*refs, cfg: Config, names):
    """Grid (B, H, NK). Refs: q [Tp,BK], k [Tp,BK], v [Tp,V], do [Tp,V], g [Tp] | [Tp,BK],
    doc [Tp], s0 [BK,V] -> dq [Tp,BK], dgq [Tp] | [Tp,BK] (q . dq, the query half of dG).
    Recomputes the state rows S[kb, :] ([BK, V] fp32) going forward over the chunks."""
    r = _split(refs, names)
    c_len = cfg.chunk

    def body(c, carry):
        s, dprev = carry
        start = pl.multiple_of(c * c_len, c_len)
        rows = pl.ds(start, c_len)
        q, k, v, do = r["q"][rows, :], r["k"][rows, :], r["v"][rows, :], r["do"][rows, :]
        doc = r["doc"][rows]
        ch = _Chunk(cfg, _load_g(cfg, r.get("g"), rows), doc, dprev, start)
        p = ch.masked(_mm(do, v, cfg, tb=True))                    # dA = do v^T on the mask
        dq_inter = _mm(do, s, cfg, tb=True) * ch.wq                 # wq . (do S^T), [C, BK]
        dq = cfg.scale * (ch.rows_of(p, k) + dq_inter)
        r["dq"][rows, :] = dq.astype(r["dq"].dtype)
        if cfg.mode != "none":
            qdq = q.astype(F32) * dq
            if cfg.mode == "scalar":
                r["dgq"][rows] = jnp.sum(qdq, axis=1)
            else:
                r["dgq"][rows, :] = qdq
        return ch.state(s) + ch.write(k, v), jnp.max(doc)

    s0 = r["s0"][...] if cfg.has_s0 else jnp.zeros((cfg.block_k, r["v"].shape[-1]), F32)
    lax.fori_loop(0, cfg.num_chunks, body, (s0, jnp.int32(0)))


def dk_kernel(*refs, cfg: Config, names):
    """Grid (B, H, NK). Refs: q [Tp,BK], k [Tp,BK], v [Tp,V], do [Tp,V], g, doc [Tp],
    dsT [BK,V] -> dk [Tp,BK] (this query head's share), dgk [Tp] | [Tp,BK] (k . dk),
    ds0 [BK,V]. Carries dS[kb, :] = dL/dS ([BK, V] fp32) backwards over the chunks."""
    r = _split(refs, names)
    c_len = cfg.chunk
    nt = cfg.num_chunks

    def body(t, ds):
        c = nt - 1 - t
        start = pl.multiple_of(c * c_len, c_len)
        rows = pl.ds(start, c_len)
        q, k, v, do = r["q"][rows, :], r["k"][rows, :], r["v"][rows, :], r["do"][rows, :]
        doc = r["doc"][rows]
        ch = _Chunk(cfg, _load_g(cfg, r.get("g"), rows), doc, _prev_doc(r["doc"], c, start, c_len),
                    start)
        p = ch.masked(_mm(do, v, cfg, tb=True))
        dk = cfg.scale * ch.cols_of(p, q) + _mm(v, ds, cfg, tb=True) * ch.wk
        r["dk"][rows, :] = dk.astype(r["dk"].dtype)
        if cfg.mode != "none":
            kdk = k.astype(F32) * dk
            if cfg.mode == "scalar":
                r["dgk"][rows] = jnp.sum(kdk, axis=1)
            else:
                r["dgk"][rows, :] = kdk
        return ch.state(ds) + cfg.scale * ch.read_t(q, do)

    ds = lax.fori_loop(0, nt, body, r["dsT"][...])
    if cfg.has_s0:
        r["ds0"][...] = ds


def dv_kernel(*refs, cfg: Config, names):
    """Grid (B, H, NV). Refs: q [Tp,K], k [Tp,K], do [Tp,BV], g, doc [Tp], dsT [K,BV]
    -> dv [Tp,BV] (this query head's share). Carries dS[:, vb] ([K, BV] fp32) backwards."""
    r = _split(refs, names)
    c_len = cfg.chunk
    nt = cfg.num_chunks

    def body(t, ds):
        c = nt - 1 - t
        start = pl.multiple_of(c * c_len, c_len)
        rows = pl.ds(start, c_len)
        q, k, do = r["q"][rows, :], r["k"][rows, :], r["do"][rows, :]
        doc = r["doc"][rows]
        ch = _Chunk(cfg, _load_g(cfg, r.get("g"), rows), doc, _prev_doc(r["doc"], c, start, c_len),
                    start)
        dv = cfg.scale * _mm(ch.scores(q, k), do, cfg, ta=True) + ch.write_t(k, ds)
        r["dv"][rows, :] = dv.astype(r["dv"].dtype)
        return ch.state(ds) + cfg.scale * ch.read_t(q, do)

    lax.fori_loop(0, nt, body, r["dsT"][...])

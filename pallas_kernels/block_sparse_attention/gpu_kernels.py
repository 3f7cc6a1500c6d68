"""Kernel bodies of the Pallas Triton block-sparse attention (gpu.py holds the wrappers and the
design).

Three kernels, each a loop over a CSR block list read from int32 refs (Triton has no scalar
prefetch, so the lists are ordinary inputs and the loop bound is a count loaded in-kernel):
* forward_kernel  (grid (nq * bq/TQ, B*H)): TQ rows of one query block of one head; walks the
  key blocks listed for that block with an online softmax (or a plain sum of sigmoid
  weights) -> o, lse.
* dq_kernel       (same grid): the same walk, probabilities recomputed from lse -> dq.
* dkv_kernel      (grid (nk * bk/TK, B*K)): TK keys of one key block of one kv head; walks the
  query heads of the GQA group and the query blocks that list this key block -> dk, dv.
  Each program owns its dk / dv tile, so no atomics are needed.

Tiles vs layout blocks. The layout's blocks (bq, bk) say what is visible; the kernels' tiles
bound what a program holds. A program owns TQ (forward, dq) or TK (dkv) rows of one block and
walks the other side in chunks of KC keys (forward, dq) or QC query rows (dkv): every listed
block is visited bk/KC (bq/QC) times, as one flat loop over (slot, chunk). So a large layout
block (a MoBA block of 512) never makes a [512, 512] score tile, and the tiles are tuned for
registers independently of the layout (gpu.py chooses them).

Ref shapes seen by the kernels (D / Dv head dims, S / Sq list widths, P patterns, Tqp / Tkp
padded lengths, G = H / K query heads per kv head):
  forward / dq: q, do, o, dq [TQ, D|Dv]; k, v [Tkp, D|Dv] (whole row of the kv head);
                q_seg, q_pos [TQ]; kv_seg, kv_pos [Tkp]; kv_blocks, kv_mask_ids [S];
                kv_count []; lse,
                delta [TQ]; sinks [H].
  dkv:          q, do [Tqp, G, D|Dv] (whole row of the group's heads); k, v, dk, dv
                [TK, D|Dv]; q_seg, q_pos [Tqp]; kv_seg, kv_pos [TK]; lse, delta [G, Tqp]; q_blocks,
                q_mask_ids [G, Sq] (per-head layout) or [Sq] (shared); q_counts [G] or [].
  all:          patterns int8 [P, bq, bk].
Every loaded / stored value is [TQ|QC, KC|TK], [TQ|QC|KC|TK, D], a vector of those or a
scalar: powers of two (a Triton rule; gpu.py refuses other block sizes and head dims), and no
value is sliced (sub-blocks are loaded from refs).

Softmax scores are kept in log2 units (s * log2(e)) so the exponentials are exp2; lse is
converted back to natural log on the way out and in.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call (hashable: a custom_vjp nondiff argument).

    block_q, block_k: the layout's bq, bk. heads, kv_heads: H, K. layout_rows, layout_heads:
    Bl, Hl of the layout (1 = shared). scale: multiplies q.k. softcap: None or c
    (s -> c tanh(s / c)). sigmoid: score function sigma(s + sigmoid_bias) instead of softmax.
    has_sinks: a per-head sink logit joins the softmax denominator. dot_dtype / precision:
    matmul operands (the input dtype) and precision. Tiles (powers of two dividing the block):
    tile_q / chunk_k: query rows per forward / dq program and keys per step of its walk;
    tile_k / chunk_q: keys per dkv program and query rows per step of its walk.
    positions / window: the attention op's mask on top of the layout (pallas_kernels/
    attention/pallas.py): key j visible to query i only if pos_q[i] - pos_k[j] is in
    [0, window) ([0, inf) for window None); q_pos / kv_pos refs ride beside the segment ids.
    """
    block_q: int
    block_k: int
    heads: int
    kv_heads: int
    layout_rows: int
    layout_heads: int
    scale: float
    softcap: float | None
    sigmoid: bool
    sigmoid_bias: float
    has_sinks: bool
    dot_dtype: Any
    precision: Any
    tile_q: int
    chunk_k: int
    tile_k: int
    chunk_q: int
    positions: bool = False
    window: int | None = None


# ----------------------------------------------------------------------------- helpers

def _mm(a, b, cfg: Config, *, ta: bool = False, tb: bool = False):
    """a @ b (a^T if ta, b^T if tb): operands in cfg.dot_dtype, fp32 result."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a.astype(cfg.dot_dtype), b.astype(cfg.dot_dtype), dims,
                           precision=cfg.precision, preferred_element_type=F32)


def _logits(q, k, cfg: Config):
    """q [n, D], k [m, D] -> (s [n, m] fp32, t): s = scale q.k, soft-capped, in log2 units
    for softmax (natural units for sigmoid); t = tanh(scale q.k / c) (the soft-cap derivative
    is 1 - t^2), None without a cap."""
    qk = _mm(q, k, cfg, tb=True)
    unit = 1.0 if cfg.sigmoid else LOG2E
    if cfg.softcap is None:
        return qk * (cfg.scale * unit), None
    t = jnp.tanh(qk * (cfg.scale / cfg.softcap))
    return t * (cfg.softcap * unit), t


def _sigmoid(x):
    """sigma(x) written with exp (Triton lowers it directly); exp(-x) = inf gives 0."""
    return 1.0 / (1.0 + jnp.exp(-x))


def _visible(patterns_ref, mask_id, seg_q, seg_k, row0, col0, pos=None, window=None):
    """bool [n, m] for the n = len(seg_q) query rows from row `row0` and the m = len(seg_k)
    keys from column `col0` of a block: the block's pattern (full blocks: all True, and their
    predicated load reads no memory) AND same nonzero segment AND, with pos = (pos_q [n],
    pos_k [m]), 0 <= pos_q - pos_k (< window)."""
    shape = (seg_q.shape[0], seg_k.shape[0])
    partial = jnp.broadcast_to(mask_id >= 0, shape)
    pattern_ref = patterns_ref.at[jnp.maximum(mask_id, 0), pl.ds(row0, shape[0]),
                                  pl.ds(col0, shape[1])]
    pattern = pltriton.load(pattern_ref, mask=partial, other=1)
    same = (seg_q[:, None] == seg_k[None, :]) & (seg_q[:, None] != 0)
    ok = (pattern != 0) & same
    if pos is not None:
        dist = pos[0][:, None] - pos[1][None, :]
        ok = ok & (dist >= 0)
        if window is not None:
            ok = ok & (dist < window)
    return ok


def _grad_scores(cfg: Config, s, t, ok, dp, lse2, delta):
    """(p, ds) fp32: the weights and the gradient w.r.t. the raw scaled score q.k*scale
    (before the cap), from dp = do.v^T. softmax: p = e^(s - lse), ds = p (dp - Delta);
    sigmoid: p = sigma(s + b), ds = dp p (1 - p). Invisible pairs get p = ds = 0."""
    if cfg.sigmoid:
        p = jnp.where(ok, _sigmoid(s + cfg.sigmoid_bias), 0.0)
        ds = dp * p * (1.0 - p)
    else:
        # where (not a -inf score) because lse is -inf on empty rows: their p must be 0.
        p = jnp.where(ok, jnp.exp2(s - lse2[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
    if t is not None:
        ds = ds * (1.0 - t * t)
    return p, ds


def _refs(refs, names):
    """Name the flat ref list of a kernel (only the refs this config passes)."""
    return dict(zip(names, refs, strict=True))


def _aligned(x, n: int):
    """x, known to be a multiple of n (a hint for Triton's address analysis; Python ints pass
    through: the hint applies to traced values only)."""
    return x if isinstance(x, int) else pl.multiple_of(x, n)


def _at(start, size):
    return pl.ds(_aligned(start, size), size)


def _divmod(x, n: int):
    """(x // n, x % n) for x >= 0 and a static n, as lax.div / lax.rem: the Pallas Triton
    lowering of jnp's `%` (its sign fix-up) fails inside loops, and that of `x % 1` always."""
    return (x, 0) if n == 1 else (lax.div(x, n), lax.rem(x, n))


def _tile_start(tile: int, block: int):
    """First row (column) of this program's tile within its block (grid axis 0 counts tiles)."""
    return _aligned(_divmod(pl.program_id(0), block // tile)[1] * tile, tile)


def _key_walk(cfg: Config, r):
    """(trips, step): the forward / dq walk over the listed key blocks, chunk_k keys a trip.
    step(it) -> (keys slice, visibility [TQ, KC]) for trip `it` of this program."""
    bk, kc = cfg.block_k, cfg.chunk_k
    nc = bk // kc
    row0 = _tile_start(cfg.tile_q, cfg.block_q)
    seg_q = r["q_seg"][...]
    pos_q = r["q_pos"][...] if cfg.positions else None

    def step(it):
        slot, c = _divmod(it, nc)
        kb, mask_id = r["kv_blocks"][slot], r["kv_mask_ids"][slot]
        keys = _at(kb * bk + c * kc, kc)
        pos = None if pos_q is None else (pos_q, r["kv_pos"][keys])
        ok = _visible(r["patterns"], mask_id, seg_q, r["kv_seg"][keys], row0,
                      _aligned(c * kc, kc), pos, cfg.window)
        return keys, ok

    return r["kv_count"][...] * nc, step


# ----------------------------------------------------------------------------- kernels

def forward_kernel(*refs, cfg: Config, names):
    """TQ rows of one (query block, head): o = normalised sum of p v over the listed key
    blocks, lse."""
    r = _refs(refs, names)
    q = r["q"][...]
    tq, dv = q.shape[0], r["o"].shape[-1]
    trips, step = _key_walk(cfg, r)

    def load(it):
        keys, ok = step(it)
        s, _ = _logits(q, r["k"][keys, :], cfg)
        return s, ok, r["v"][keys, :]

    def sigmoid_body(it, acc):
        s, ok, v = load(it)
        return acc + _mm(jnp.where(ok, _sigmoid(s + cfg.sigmoid_bias), 0.0), v, cfg)

    def softmax_body(it, carry):
        acc, m, l = carry
        s, ok, v = load(it)
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row that has seen nothing yet keeps m = -inf; exponentiate against 0 then, so
        # that exp2(-inf - -inf) never appears (alpha = p = 0 there).
        m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_ref)
        p = jnp.exp2(s - m_ref[:, None])
        acc = alpha[:, None] * acc + _mm(p, v, cfg)
        return acc, m_new, alpha * l + jnp.sum(p, axis=1)

    acc = jnp.zeros((tq, dv), F32)
    if cfg.sigmoid:
        r["o"][...] = lax.fori_loop(0, trips, sigmoid_body, acc).astype(r["o"].dtype)
        return
    m = jnp.full((tq,), -jnp.inf, F32)
    acc, m, l = lax.fori_loop(0, trips, softmax_body, (acc, m, jnp.zeros((tq,), F32)))
    if cfg.has_sinks:   # exp(sink) joins the denominator (no value): rescale to a common max
        sink = r["sinks"][_divmod(pl.program_id(1), cfg.heads)[1]] * LOG2E
        m_new = jnp.maximum(m, sink)
        alpha = jnp.exp2(m - m_new)
        acc, l, m = alpha[:, None] * acc, alpha * l + jnp.exp2(sink - m_new), m_new
    empty = l == 0.0    # nothing visible and no sink: o = 0, lse = -inf
    r["o"][...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(r["o"].dtype)
    r["lse"][...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l)) / LOG2E)


def dq_kernel(*refs, cfg: Config, names):
    """TQ rows of one (query block, head): dq = scale sum_j ds_ij k_j over the listed key
    blocks."""
    r = _refs(refs, names)
    q, do = r["q"][...], r["do"][...]
    lse2 = None if cfg.sigmoid else r["lse"][...] * LOG2E
    delta = None if cfg.sigmoid else r["delta"][...]
    trips, step = _key_walk(cfg, r)

    def body(it, dq):
        keys, ok = step(it)
        k = r["k"][keys, :]
        s, t = _logits(q, k, cfg)
        dp = _mm(do, r["v"][keys, :], cfg, tb=True)
        _, ds = _grad_scores(cfg, s, t, ok, dp, lse2, delta)
        return dq + _mm(ds, k, cfg)

    dq = lax.fori_loop(0, trips, body, jnp.zeros(q.shape, F32))
    r["dq"][...] = (dq * cfg.scale).astype(r["dq"].dtype)


def dkv_kernel(*refs, cfg: Config, names):
    """TK keys of one (key block, kv head): dk = scale sum_i ds_ij q_i, dv = sum_i p_ij do_i
    over the query heads of the GQA group and, per head, the query blocks that list this key
    block, chunk_q rows a trip.

    A per-head layout (Hl = H) walks heads, then each head's own list; a shared layout walks
    its one list and, per chunk of query rows, the heads (the visibility is built once)."""
    r = _refs(refs, names)
    bq, qc = cfg.block_q, cfg.chunk_q
    nc = bq // qc
    group = cfg.heads // cfg.kv_heads
    k, v = r["k"][...], r["v"][...]
    seg_k = r["kv_seg"][...]
    pos_k = r["kv_pos"][...] if cfg.positions else None
    col0 = _tile_start(cfg.tile_k, cfg.block_k)

    def accumulate(g, rows, ok, carry):
        """Adds query head g (of the group) x query rows `rows` to (dk, dv)."""
        dk, dv = carry
        q, do = r["q"][rows, g, :], r["do"][rows, g, :]
        s, t = _logits(q, k, cfg)
        dp = _mm(do, v, cfg, tb=True)
        lse2 = None if cfg.sigmoid else r["lse"][g, rows] * LOG2E
        delta = None if cfg.sigmoid else r["delta"][g, rows]
        p, ds = _grad_scores(cfg, s, t, ok, dp, lse2, delta)
        return dk + _mm(ds, q, cfg, ta=True), dv + _mm(p, do, cfg, ta=True)

    def step(it, qb_of, mask_of):
        """Query rows and visibility [QC, TK] of trip `it` (list slot it // nc)."""
        slot, c = _divmod(it, nc)
        mask_id = mask_of(slot)
        rows = _at(qb_of(slot) * bq + c * qc, qc)
        pos = None if pos_k is None else (r["q_pos"][rows], pos_k)
        return rows, _visible(r["patterns"], mask_id, r["q_seg"][rows], seg_k,
                              _aligned(c * qc, qc), col0, pos, cfg.window)

    zeros = (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
    if cfg.layout_heads > 1:
        def head_body(g, carry):
            def body(it, carry):
                rows, ok = step(it, lambda s: r["q_blocks"][g, s],
                                lambda s: r["q_mask_ids"][g, s])
                return accumulate(g, rows, ok, carry)
            return lax.fori_loop(0, r["q_counts"][g] * nc, body, carry)
        dk, dv = (head_body(0, zeros) if group == 1
                  else lax.fori_loop(0, group, head_body, zeros))
    else:
        def body(it, carry):
            rows, ok = step(it, lambda s: r["q_blocks"][s], lambda s: r["q_mask_ids"][s])
            if group == 1:
                return accumulate(0, rows, ok, carry)
            return lax.fori_loop(0, group, lambda g, c: accumulate(g, rows, ok, c), carry)
        dk, dv = lax.fori_loop(0, r["q_counts"][...] * nc, body, zeros)
    r["dk"][...] = (dk * cfg.scale).astype(r["dk"].dtype)
    r["dv"][...] = dv.astype(r["dv"].dtype)

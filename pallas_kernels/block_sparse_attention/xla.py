"""Blocked block-sparse attention in pure JAX: cost proportional to the listed blocks.

Forward: for each query block, a loop over the slots of its query-major list (kv_blocks /
kv_counts / kv_mask_ids): gather the slot's key and value block, score it, mask it with the
block's pattern and the segment ids, and fold it into an online softmax (running max m, sum l,
accumulator) -- or, for sigmoid scores, into a plain sum. Only (o, lse) are saved; the backward
pass recomputes the probabilities.

Memory stays bounded whatever the block sizes: query blocks are processed in groups of `ng`
(a `lax.scan` over groups, a `lax.while_loop` over slots inside). With block_q = 1 (token-granular
MoBA / NSA routing: nq = Tq), gathering one [bk, D] tile per query and slot for all Tq queries at
once would take gigabytes; a group's gathered tiles and fp32 score tiles take about
_GROUP_BYTES (or one query block's share when that is larger). The slot loop of a group runs to
the largest count in the group, so padding slots cost nothing unless another block of the same
group needs that many: with causal lists (counts growing by one per block) a group wastes about
(ng - 1) / 2 slots per query block. Hence small groups: _GROUP_BYTES = 1 MB is about the
smallest working set whose loop overhead (~25 us per iteration on XLA:CPU) stays near 10%; for
bq = bk = 64, D = 64, H = 4 it gives ng = 2, and fwd / fwd+bwd time per listed block is then
the same for causal and windowed layouts (measured at T = 2048).

GQA: the kv heads are never repeated in memory. With a layout shared by every head (Hl = 1) or
one list per kv head (Hl = K, e.g. NSA's selection shared by a GQA group) the G = H // K query
heads of a kv head are stacked as rows of one matmul (R = G * bq rows per query block), so a key
tile is gathered once per kv head. With per-head lists (Hl = H > K) each query head gathers its
own tiles from its kv head (a gather, not a copy of k).
Lanes: L = K (Hl = 1 or K) or H (Hl = H); `Gl` heads per kv head are lanes, `Gr` are rows
(Gl * Gr = G): query head k * G + gl * Gr + g is lane k * Gl + gl, rows g * bq + t.

Backward (custom_vjp): the same walk, group by group and slot by slot, recomputing p from the
saved lse. dq of the group accumulates in the loop carry; the slot's dk / dv contributions
(ds^T q and p^T do, [bk, D] per lane and query block) are scatter-added into fp32 dk / dv
[B, K, nk, bk, D] carried through the whole walk. Why scatter-add rather than a second,
key-major walk over q_blocks (as the Pallas kernels do, where each program must own its dk tile):
one walk computes each probability tile once, while a separate dk/dv walk would recompute the
q.k and do.v matmuls and the exponentials (7 matmuls per tile instead of 5); the scatter-add
into the loop carry is done in place by XLA (measured: its cost does not grow with nk), one
read-modify-write of a [bk, D] tile. With token-granular routing (block_q = 1) a key-major walk
would also be poor: a key block is listed by up to Tq single-query blocks. The key-major lists
are not used here.

Softmax with lse as a differentiable output: Delta_i = sum(do_i * o_i) - dlse_i, ds = p (dp -
Delta). Sinks start the online softmax as one extra key of logit sink_h and value 0 (m = sink,
l = 1); their gradient is -sum_i exp(sink_h - lse_i) Delta_i.

Dimension letters as in common.py, plus NG groups of ng query blocks, L lanes, R rows.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.block_sparse_attention import common
from pallas_kernels.block_sparse_attention.layout import FULL

F32 = common.F32
# Floor of the running max: finite, so exp(m_old - m_new) stays finite while every key seen so
# far was masked (masked logits are -inf, and exp(-inf - floor) = 0 exactly).
_M_FLOOR = -1e30
# Target size of one slot's working set for a group of query blocks (gathered k / v tiles,
# fp32 score tiles, accumulators): see the module docstring.
_GROUP_BYTES = 1 << 20


class _Static(NamedTuple):
    """Hashable description of one call (a nondiff argument of the custom_vjp)."""
    batch: int
    kv_heads: int
    gl: int  # heads of a kv head laid out as lanes (G with per-head lists, else 1)
    gr: int  # heads of a kv head stacked as rows (G with a shared layout, else 1)
    block_q: int
    block_k: int
    num_kv_blocks: int
    group: int  # ng: query blocks per group
    sigmoid: bool
    sigmoid_bias: float
    softcap: float | None
    scale: float
    has_sinks: bool


def block_sparse_attention(q, k, v, layout, q_seg, kv_seg, sinks, *, score: str,
                           sigmoid_bias: float, logit_softcap: float | None, scale: float):
    """q [B,Tq,H,D], k [B,Tk,K,D], v [B,Tk,K,Dv], q_seg [B,Tq], kv_seg [B,Tk], sinks None | fp32
    [H] -> (o [B,Tq,H,Dv] in q.dtype, lse fp32 [B,H,Tq]; zeros for score="sigmoid")."""
    b, tq, h, d = q.shape
    kv_heads, dv = k.shape[2], v.shape[3]
    g = h // kv_heads
    # Hl = K (one list per kv head) shares a kv head's lists among its G query heads, as Hl = 1
    # does, so both stack the G heads as rows; only Hl = H (> K) needs one lane per query head.
    per_head = layout.heads not in (1, kv_heads)
    gl, gr = (g, 1) if per_head else (1, g)
    bq, bk = layout.block_q, layout.block_k
    nq, nk = layout.num_q_blocks, layout.num_kv_blocks
    lanes, rows = kv_heads * gl, gr * bq
    # Bytes of one query block's share of a slot: k/v tiles, ~4 fp32 [R, bk] tiles (s, p, dp,
    # ds) and the fp32 [R, D + Dv] accumulators (acc / dq and the inputs they pair with).
    per_block = b * lanes * (bk * (d + dv) * q.dtype.itemsize + 4 * 4 * rows * bk
                             + 2 * 4 * rows * (d + dv))
    ng_max = max(1, min(nq, -(-_GROUP_BYTES // per_block)))
    n_groups = -(-nq // ng_max)
    ng = -(-nq // n_groups)  # same number of groups, least padding
    cfg = _Static(b, kv_heads, gl, gr, bq, bk, nk, ng, score == "sigmoid", float(sigmoid_bias),
                  logit_softcap, float(scale), sinks is not None)

    qg = _q_groups(cfg, q, n_groups)
    kb, vb = _kv_blocks(k, bk), _kv_blocks(v, bk)
    qs = _pad_axis(q_seg.astype(jnp.int32), 1, n_groups * ng * bq)
    qs = qs.reshape(b, n_groups, ng, bq).transpose(1, 0, 2, 3)  # [NG, B, ng, bq]
    ks = _pad_axis(kv_seg.astype(jnp.int32), 1, nk * bk).reshape(b, nk, bk)
    blocks, ids, counts = _list_groups(layout, n_groups, ng)
    patterns = jnp.asarray(layout.partial_masks)
    sink_rows = (jnp.zeros((lanes, rows), F32) if sinks is None else
                 jnp.repeat(sinks.astype(F32).reshape(lanes, gr), bq, axis=1))
    o, lse = _attend(cfg, qg, kb, vb, qs, ks, blocks, ids, counts, patterns, sink_rows)
    return _from_q_groups(cfg, o, tq, h), _lse_from_groups(cfg, lse, tq, h)


# ----------------------------------------------------------------------------- layout

def _pad_axis(x, axis: int, size: int):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _q_groups(cfg: _Static, q, n_groups: int):
    """[B, Tq, H, D] -> [NG, B, L, ng, R, D]: one transpose, zero-padded queries at the end."""
    b, _, h, d = q.shape
    ng, bq = cfg.group, cfg.block_q
    q = _pad_axis(q, 1, n_groups * ng * bq)
    q = q.reshape(b, n_groups, ng, bq, cfg.kv_heads, cfg.gl, cfg.gr, d)
    q = q.transpose(1, 0, 4, 5, 2, 6, 3, 7)  # [NG, B, K, Gl, ng, Gr, bq, D]
    return q.reshape(n_groups, b, cfg.kv_heads * cfg.gl, ng, cfg.gr * bq, d)


def _from_q_groups(cfg: _Static, o, tq: int, h: int):
    """[NG, B, L, ng, R, Dv] -> [B, Tq, H, Dv] (inverse of `_q_groups`, padding dropped)."""
    n_groups, b, _, ng, _, dv = o.shape
    o = o.reshape(n_groups, b, cfg.kv_heads, cfg.gl, ng, cfg.gr, cfg.block_q, dv)
    o = o.transpose(1, 0, 4, 6, 2, 3, 5, 7)  # [B, NG, ng, bq, K, Gl, Gr, Dv]
    return o.reshape(b, n_groups * ng * cfg.block_q, h, dv)[:, :tq]


def _lse_from_groups(cfg: _Static, lse, tq: int, h: int):
    """[NG, B, L, ng, R] -> [B, H, Tq]."""
    n_groups, b, _, ng, _ = lse.shape
    lse = lse.reshape(n_groups, b, cfg.kv_heads, cfg.gl, ng, cfg.gr, cfg.block_q)
    lse = lse.transpose(1, 2, 3, 5, 0, 4, 6)  # [B, K, Gl, Gr, NG, ng, bq]
    return lse.reshape(b, h, n_groups * ng * cfg.block_q)[:, :, :tq]


def _kv_blocks(x, bk: int):
    """[B, Tk, K, D] -> [B, K, nk, bk, D] (zero-padded keys at the end)."""
    b, tk, kv_heads, d = x.shape
    nk = -(-tk // bk)
    x = _pad_axis(x, 1, nk * bk)
    return x.reshape(b, nk, bk, kv_heads, d).transpose(0, 3, 1, 2, 4)


def _list_groups(layout, n_groups: int, ng: int):
    """Query-major lists, group-major with the slot axis leading (a slot is a cheap dynamic
    index): blocks, ids int32 [NG, S, Bl, Hl, ng]; counts int32 [NG, Bl, Hl, ng]. Query blocks
    added by padding to whole groups list nothing."""
    nqp = n_groups * ng

    def prep(x, fill):
        x = jnp.asarray(x).astype(jnp.int32)
        pad = nqp - x.shape[2]
        if pad:
            widths = [(0, 0)] * x.ndim
            widths[2] = (0, pad)
            x = jnp.pad(x, widths, constant_values=fill)
        return x.reshape(x.shape[0], x.shape[1], n_groups, ng, *x.shape[3:])

    blocks = prep(layout.kv_blocks, 0).transpose(2, 4, 0, 1, 3)
    ids = prep(layout.kv_mask_ids, FULL).transpose(2, 4, 0, 1, 3)
    counts = prep(layout.kv_counts, 0).transpose(2, 0, 1, 3)
    return blocks, ids, counts


# ----------------------------------------------------------------------------- one slot

def _dot(a, b, contract: tuple[int, int]):
    """Batched matmul over the leading (B, L, ng) dims, fp32 result, operands in their dtype."""
    dims = (((contract[0],), (contract[1],)), ((0, 1, 2), (0, 1, 2)))
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


def _lane_index(cfg: _Static, x):
    """[Bl, Hl, ng] (Hl = 1 or L: K with shared rows, H with per-head lanes) -> [B, K, Gl * ng]: a slot's block index per lane, laid out
    for a gather from [B, K, nk, ...] (lane k * Gl + gl reads kv head k)."""
    lanes = cfg.kv_heads * cfg.gl
    x = jnp.broadcast_to(x, (cfg.batch, lanes, x.shape[-1]))
    return x.reshape(cfg.batch, cfg.kv_heads, cfg.gl * x.shape[-1])


def _gather(cfg: _Static, xb, idx):
    """xb [B, K, nk, bk, D], idx [B, K, Gl * ng] -> tiles [B, L, ng, bk, D] (no copy of xb)."""
    tiles = jnp.take_along_axis(xb, idx[:, :, :, None, None], axis=2)
    b, kv_heads, m, bk, d = tiles.shape
    return tiles.reshape(b, kv_heads * cfg.gl, m // cfg.gl, bk, d)


def _slot(cfg: _Static, s, qg, kb, vb, qs, ks, blocks, ids, counts, patterns):
    """Everything one slot of a group needs: (idx, k tile, v tile, visible bool [B,L,ng,R,bk],
    logits fp32 [B,L,ng,R,bk] (soft-capped, not masked), tanh of the cap or None)."""
    idx = _lane_index(cfg, blocks[s])
    k_t, v_t = _gather(cfg, kb, idx), _gather(cfg, vb, idx)
    b, lanes, ng = k_t.shape[:3]
    bq, bk = cfg.block_q, cfg.block_k
    kv_seg = jnp.take_along_axis(ks, idx.reshape(b, -1)[:, :, None], axis=1)
    kv_seg = kv_seg.reshape(b, lanes, ng, 1, 1, bk)
    q_seg = qs[:, None, :, None, :, None]  # [B, 1, ng, 1, bq, 1]
    mid = ids[s]  # [Bl, Hl, ng]
    pattern = jnp.where((mid == FULL)[..., None, None], True, patterns[jnp.maximum(mid, 0)])
    pattern = pattern & (s < counts)[..., None, None]  # padding slots see nothing
    vis = pattern[:, :, :, None] & (q_seg == kv_seg) & (q_seg != 0)  # [B, L, ng, 1|Gr, bq, bk]
    vis = jnp.broadcast_to(vis, (b, lanes, ng, cfg.gr, bq, bk)).reshape(b, lanes, ng, -1, bk)
    x = _dot(qg, k_t, (4, 4)) * cfg.scale
    t = None
    if cfg.softcap is not None:
        t = jnp.tanh(x / cfg.softcap)
        x = cfg.softcap * t
    return idx, k_t, v_t, vis, x, t


# ----------------------------------------------------------------------------- passes

def _forward(cfg: _Static, qg, kb, vb, qs, ks, blocks, ids, counts, patterns, sink_rows):
    """Returns o [NG, B, L, ng, R, Dv] (input dtype) and lse fp32 [NG, B, L, ng, R]."""
    _, b, lanes, ng, rows, _ = qg.shape
    dv = vb.shape[-1]

    def group(_, xs):
        q_g, qs_g, blocks_g, ids_g, counts_g = xs

        def step(s, carry):
            m, l, acc = carry
            _, _, v_t, vis, x, _ = _slot(cfg, s, q_g, kb, vb, qs_g, ks, blocks_g, ids_g,
                                         counts_g, patterns)
            if cfg.sigmoid:
                p = jnp.where(vis, jax.nn.sigmoid(x + cfg.sigmoid_bias), 0.0)
                return m, l, acc + _dot(p.astype(vb.dtype), v_t, (4, 3))
            x = jnp.where(vis, x, -jnp.inf)
            m_new = jnp.maximum(m, x.max(axis=-1))
            p = jnp.exp(x - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            l = alpha * l + p.sum(axis=-1)
            acc = acc * alpha[..., None] + _dot(p.astype(vb.dtype), v_t, (4, 3))
            return m_new, l, acc

        shape = (b, lanes, ng, rows)
        if cfg.has_sinks:  # the sink is one more key of logit sink_h and value 0
            m0 = jnp.broadcast_to(sink_rows[None, :, None], shape)
            l0 = jnp.ones(shape, F32)
        else:
            m0, l0 = jnp.full(shape, _M_FLOOR, F32), jnp.zeros(shape, F32)
        init = (m0, l0, jnp.zeros((*shape, dv), F32))
        m, l, acc = lax.fori_loop(0, jnp.max(counts_g), step, init)
        if cfg.sigmoid:
            return None, (acc.astype(qg.dtype), jnp.zeros(shape, F32))
        seen = l > 0  # False for rows without any visible key and no sink: o = 0, lse = -inf
        l_safe = jnp.where(seen, l, 1.0)
        o = jnp.where(seen[..., None], acc / l_safe[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
        return None, (o.astype(qg.dtype), lse)

    _, (o, lse) = lax.scan(group, None, (qg, qs, blocks, ids, counts))
    return o, lse


def _backward(cfg: _Static, qg, kb, vb, qs, ks, blocks, ids, counts, patterns, dog, lse, delta):
    """dq [NG, B, L, ng, R, D] fp32 and dk, dv [B, K, nk, bk, D|Dv] fp32, one walk."""
    _, b, lanes, ng, rows, d = qg.shape
    kv_heads, nk, bk = cfg.kv_heads, cfg.num_kv_blocks, cfg.block_k
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(kv_heads)[None, :, None]
    # lse is -inf on empty rows; any finite value works there since all their logits are -inf.
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def group(dkv, xs):
        q_g, qs_g, blocks_g, ids_g, counts_g, do_g, lse_g, delta_g = xs

        def step(s, carry):
            dq, dk, dv = carry
            idx, k_t, v_t, vis, x, t = _slot(cfg, s, q_g, kb, vb, qs_g, ks, blocks_g, ids_g,
                                             counts_g, patterns)
            dp = _dot(do_g, v_t, (4, 4))  # [B, L, ng, R, bk]
            if cfg.sigmoid:
                p = jnp.where(vis, jax.nn.sigmoid(x + cfg.sigmoid_bias), 0.0)
                ds = dp * p * (1.0 - p)
            else:
                p = jnp.exp(jnp.where(vis, x, -jnp.inf) - lse_g[..., None])
                ds = p * (dp - delta_g[..., None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            ds = ds * cfg.scale  # d(logit) / d(q.k)
            dq = dq + _dot(ds.astype(kb.dtype), k_t, (4, 3))
            dk_t = _dot(ds.astype(qg.dtype), q_g, (3, 3))  # [B, L, ng, bk, D]
            dv_t = _dot(p.astype(dog.dtype), do_g, (3, 3))
            tiles = lambda y: y.reshape(b, kv_heads, -1, *y.shape[3:])  # lanes -> [B, K, Gl*ng]
            dk = dk.at[bi, hi, idx].add(tiles(dk_t))
            dv = dv.at[bi, hi, idx].add(tiles(dv_t))
            return dq, dk, dv

        dq0 = jnp.zeros((b, lanes, ng, rows, d), F32)
        dq, dk, dv = lax.fori_loop(0, jnp.max(counts_g), step, (dq0, *dkv))
        return (dk, dv), dq

    dkv0 = (jnp.zeros((b, kv_heads, nk, bk, d), F32),
            jnp.zeros((b, kv_heads, nk, bk, vb.shape[-1]), F32))
    (dk, dv), dq = lax.scan(group, dkv0, (qg, qs, blocks, ids, counts, dog, lse, delta))
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg, qg, kb, vb, qs, ks, blocks, ids, counts, patterns, sink_rows):
    return _forward(cfg, qg, kb, vb, qs, ks, blocks, ids, counts, patterns, sink_rows)


def _attend_fwd(cfg, qg, kb, vb, qs, ks, blocks, ids, counts, patterns, sink_rows):
    o, lse = _forward(cfg, qg, kb, vb, qs, ks, blocks, ids, counts, patterns, sink_rows)
    return (o, lse), (qg, kb, vb, qs, ks, blocks, ids, counts, patterns, sink_rows, o, lse)


def _attend_bwd(cfg, res, cotangents):
    qg, kb, vb, qs, ks, blocks, ids, counts, patterns, sink_rows, o, lse = res
    do, dlse = cotangents
    dsink = None
    if cfg.sigmoid:
        delta = jnp.zeros(lse.shape, F32)
    else:
        # Delta_i = sum_j p_ij dp_ij = do_i . o_i, minus dlse_i: lse_i's own gradient enters
        # every ds_ij = p_ij (dp_ij - Delta_i) as d lse_i / d s_ij = p_ij.
        delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1) - dlse
        if cfg.has_sinks:  # d lse_i / d sink = exp(sink - lse_i); d o_i / d sink = -o_i that
            w = jnp.exp(sink_rows[None, None, :, None] - lse)
            dsink = -jnp.sum(w * delta, axis=(0, 1, 3))  # [L, R]
    dq, dk, dv = _backward(cfg, qg, kb, vb, qs, ks, blocks, ids, counts, patterns,
                           do.astype(qg.dtype), lse, delta)
    return (dq.astype(qg.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype),
            None, None, None, None, None, None, dsink)


_attend.defvjp(_attend_fwd, _attend_bwd)

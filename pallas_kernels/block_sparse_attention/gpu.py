"""Block-sparse attention as Pallas Triton (GPU) kernels, forward and backward.

    o, lse = attention of each query over the keys its layout lists     (contract: api.py)

Design: FlashAttention-2 over a CSR block layout (layout.py). Triton has no scalar prefetch,
so the block lists are ordinary int32 inputs: each program reads its list and count from refs
and walks the listed blocks in an in-kernel `lax.fori_loop` whose bound is the loaded count
(anchors_kernels.md 2.1, 2.3). The sequence is padded to whole blocks (Tqp = nq bq,
Tkp = nk bk; padding tokens get segment 0, so they see and are seen by nothing).

Kernels and grids (B batch, H query heads, K kv heads, G = H / K, nq / nk query / key
blocks of bq / bk; tiles TQ <= bq, KC <= bk, TK <= bk, QC <= bq, see below):
  forward  (nq bq/TQ, B*H)  TQ rows of one query block of one head; online softmax (or a sum
                            of sigmoid weights) over the listed key blocks of its (row, head),
                            KC keys a step -> o, lse
  backward
    Delta (jnp)             rowsum(do * o) - dlse: lse is a differentiable output, so its
                            cotangent enters the softmax gradient there
    dq       (nq bq/TQ, B*H)  the forward's walk, probabilities recomputed from lse -> dq
    dkv      (nk bk/TK, B*K)  TK keys of one key block of one kv head; walks the G heads of
                            its group and the key-major lists (the query blocks that list
                            this key block), QC query rows a step -> dk, dv
    dsinks (jnp)            -sum over (b, i) of exp(sink - lse) Delta
Each program owns its output tile, so there are no atomics and no cross-program communication
(as Triton requires); dk and dv come out per kv head, already summed over the group.

Tiles vs blocks. The layout's blocks say what is visible; the tiles bound what one program
holds in registers, so they are chosen per head dim and dtype (`_tiles`), never by the
layout: a block larger than a tile is split over several programs (TQ, TK) and walked in
several steps (KC, QC); gpu_kernels.py handles the pattern sub-blocks. Chosen by compiling
the lowered Triton IR for sm_90a with the `triton` 3.9 wheel (pallas_kernels/lowering.py:
write_triton_kernels + its __main__), fwd + bwd, causal, GQA, 2 pipeline stages; per kernel
fwd / dq / dkv, registers (spill bytes) and shared memory in KB:
  bf16 D=64,  bq=bk=64:  135 / 128 / 240 (0)            44 / 52 / 56    4 / 4 / 4 warps
  bf16 D=128, bq=bk=64:  157 / 184 / 239 (0)            84 / 100 / 104  8 warps
  bf16 D=128, bq=bk=128: 228 / 208 / 239 (0)            104 / 136 / 104 8 warps
  bf16 D=256, bq=bk=128: 214 / 230 / 182 (0)            98 / 130 / 66   8 warps
  fp32 D=128 (3-pass tf32): 234 (0) / 255 (28) / 255 (296)  73 / 97 / 96  8 warps
(One 128 x 128 tile per program, the obvious first choice, spilled 0.7-3.5 KB in dkv and
needed up to 230 KB of shared memory; fp32 / D = 256 with the bf16 tiles went past the
227 KB an H100 block can have.) fp32 with D = 256 still spills 3-11 KB (a corner case:
GPU training runs bf16). Not yet timed on a GPU.

Refs. Per-tile tensors (q, o, do, dq; k, v, dk, dv in dkv) are tiled by BlockSpecs; the
tensors a program gathers from (k, v and kv segment ids in forward / dq; q, do, lse, Delta and
query segment ids in dkv) are passed as whole rows of one head (or one GQA group) and sliced
in-kernel with `pl.ds` at the listed block. dkv reads q / do through a free reshape
[B, Tqp, K, G, D] -> its group's [Tqp, G, D] (indexed by the traced head g in the group),
and lse / Delta as [B, K, G, Tqp] -> [G, Tqp]. Layout broadcasting (rows Bl in {1, B}, heads
Hl in {1, H}) is in the index maps: a shared layout maps every batch row / head to index 0.
Partial-block patterns are int8 [P, bq, bk]; a full block's pattern load is predicated off.

Shape rules and refusals. Served: block_q, block_k powers of two >= 16 and head dims powers
of two in [16, 256] (Triton: every array a power of two; tensor-core dots need dims >= 16;
larger heads would not fit the tiles in registers / shared memory); any Tq, Tk; H % K == 0;
q / k / v float32, bfloat16 or float16. Refused with NotImplementedError, before any work,
so that `dispatch` falls back: other block sizes and head dims, and a non-GPU platform
unless interpret=True.

Numerics. Scores, softmax statistics and every accumulation are fp32; softmax runs in log2
units (exp2). Matmul operands are the input dtype (bf16 / fp16, with p and ds rounded to it
as in FlashAttention); fp32 inputs use 3-pass tf32 on GPU and exact fp32 in interpret mode
(`pallas_wrappers.triton_precision`). Memory policy: the custom_vjp saves its inputs, o and
lse (fp32 [B, H, Tqp]); nothing [T, T]-sized is ever stored.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.block_sparse_attention import gpu_kernels as kern

F32 = jnp.float32
HEAD_DIMS = (16, 32, 64, 128, 256)
# Tiles and launch parameters (module docstring; module constants so that a benchmark can
# sweep them): (TQ, KC, TK, QC) by row width.
NUM_STAGES = 2
TILES = (128, 64, 64, 64)       # rows of <= 256 bytes (bf16 / fp16 D <= 128, fp32 D <= 32)
WIDE_TILES = (64, 32, 32, 32)   # bf16 / fp16 with D = 256
FP32_TILES = (32, 32, 32, 32)   # fp32 operands with D >= 64 (3-pass tf32 needs more room)


def _is_block(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _tiles(bq: int, bk: int, dim: int, itemsize: int) -> dict:
    """Kernel tiles (gpu_kernels.Config) for blocks bq x bk and head dim `dim`: TQ query rows
    per forward / dq program walking KC keys a step, TK keys per dkv program walking QC query
    rows a step, each at most its block. Wider rows take smaller tiles, so that registers and
    shared memory (227 KB on H100) hold them."""
    row_bytes = dim * itemsize
    if itemsize >= 4:
        tq, kc, tk, qc = TILES if row_bytes < 256 else FP32_TILES
    else:
        tq, kc, tk, qc = TILES if row_bytes <= 256 else WIDE_TILES
    return {"tile_q": min(bq, tq), "chunk_k": min(bk, kc), "tile_k": min(bk, tk),
            "chunk_q": min(bq, qc)}


def block_sparse_attention(q, k, v, layout, q_seg, kv_seg, sinks, *, score: str,
                           sigmoid_bias: float, logit_softcap: float | None, scale: float,
                           positions=None, window: int | None = None,
                           interpret: bool = False):
    """q [B,Tq,H,D], k [B,Tk,K,D], v [B,Tk,K,Dv], layout: BlockLayout, q_seg int [B,Tq],
    kv_seg int [B,Tk], sinks None | fp32 [H] -> (o [B,Tq,H,Dv] in q.dtype, lse [B,H,Tq] fp32;
    zeros for score="sigmoid"). Arguments are validated by the api. `interpret=True` runs the
    kernels in Pallas interpret mode (any backend, e.g. CPU tests). Raises NotImplementedError
    for what it cannot serve (see the module docstring).

    positions: None, or (q_pos int [B,Tq], kv_pos int [B,Tk]): the attention op's mask on top
    of the layout's (pallas_kernels/attention/pallas.py), key j visible to query i only if
    0 <= q_pos[i] - kv_pos[j] < window (window None: no upper bound)."""
    pw.check_triton_supported(q, v, interpret, HEAD_DIMS)
    bq, bk = layout.block_q, layout.block_k
    if layout.heads not in (1, q.shape[2]):
        raise NotImplementedError(
            f"a layout with one list per kv head (Hl = {layout.heads}) is not served by the Triton "
            f"kernels: they take Hl = 1 or H = {q.shape[2]}")
    if not (_is_block(bq) and _is_block(bk)):
        raise NotImplementedError(
            f"block_q={bq}, block_k={bk} not supported: Triton kernels need powers of two >= 16")
    _, tq, h, d = q.shape
    tk, kvh, dv = k.shape[1], k.shape[2], v.shape[-1]
    nq, nk = layout.num_q_blocks, layout.num_kv_blocks
    cdt = jnp.result_type(q.dtype, k.dtype, v.dtype)
    sigmoid = score == "sigmoid"
    cfg = kern.Config(
        block_q=bq, block_k=bk, heads=h, kv_heads=kvh, layout_rows=layout.rows,
        layout_heads=layout.heads, scale=float(scale),
        softcap=None if logit_softcap is None else float(logit_softcap), sigmoid=sigmoid,
        sigmoid_bias=float(sigmoid_bias), has_sinks=sinks is not None and not sigmoid,
        dot_dtype=jnp.dtype(cdt), precision=pw.triton_precision(cdt, interpret),
        positions=positions is not None, window=None if window is None else int(window),
        **_tiles(bq, bk, max(d, dv), jnp.dtype(cdt).itemsize))
    pad = lambda x, t, n: jnp.pad(x, [(0, 0), (0, n - t)] + [(0, 0)] * (x.ndim - 2))
    qp = pad(q.astype(cdt), tq, nq * bq)
    kp, vp = pad(k.astype(cdt), tk, nk * bk), pad(v.astype(cdt), tk, nk * bk)
    q_seg = pad(q_seg.astype(jnp.int32), tq, nq * bq)   # padding: segment 0
    kv_seg = pad(kv_seg.astype(jnp.int32), tk, nk * bk)
    q_pos = kv_pos = None
    if positions is not None:   # padding tokens have segment 0: their position is unread
        q_pos = pad(positions[0].astype(jnp.int32), tq, nq * bq)
        kv_pos = pad(positions[1].astype(jnp.int32), tk, nk * bk)
    lists = tuple(jnp.asarray(x, jnp.int32) for x in (
        layout.kv_blocks, layout.kv_counts, layout.kv_mask_ids,
        layout.q_blocks, layout.q_counts, layout.q_mask_ids))
    patterns = jnp.asarray(layout.partial_masks).astype(jnp.int8)
    sinks = sinks.astype(F32) if cfg.has_sinks else None
    o, lse = _core(cfg, bool(interpret), qp, kp, vp, sinks, q_seg, kv_seg, q_pos, kv_pos,
                   patterns, *lists)
    return o[:, :tq].astype(q.dtype), lse[:, :, :tq]


# ----------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(cfg, interpret, q, k, v, sinks, q_seg, kv_seg, q_pos, kv_pos, patterns, *lists):
    """Padded inputs (q_pos, kv_pos None unless cfg.positions) -> (o [B,Tqp,H,Dv] in q.dtype,
    lse [B,H,Tqp] fp32, zeros for sigmoid)."""
    ids = (q_seg, kv_seg, q_pos, kv_pos)
    return _forward(cfg, interpret, q, k, v, sinks, ids, patterns, lists)


def _core_fwd(cfg, interpret, q, k, v, sinks, q_seg, kv_seg, q_pos, kv_pos, patterns, *lists):
    ids = (q_seg, kv_seg, q_pos, kv_pos)
    o, lse = _forward(cfg, interpret, q, k, v, sinks, ids, patterns, lists)
    return (o, lse), (q, k, v, sinks, ids, patterns, lists, o, lse)


def _core_bwd(cfg, interpret, res, cotangents):
    q, k, v, sinks, ids, patterns, lists, o, lse = res
    do, dlse = cotangents
    do = do.astype(q.dtype)
    delta = dsinks = None
    if not cfg.sigmoid:
        delta = jnp.einsum("bthd,bthd->bht", do.astype(F32), o.astype(F32)) - dlse
    dq = _dq(cfg, interpret, q, k, v, do, lse, delta, ids, patterns, lists)
    dk, dv = _dkv(cfg, interpret, q, k, v, do, lse, delta, ids, patterns, lists)
    if sinks is not None:
        # lse >= sink wherever a sink is present, so the exponent is <= 0.
        dsinks = -jnp.sum(jnp.exp(sinks[None, :, None] - lse) * delta, axis=(0, 2))
    return (dq, dk, dv, dsinks) + (None,) * (5 + len(lists))


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------- pallas_calls

_call = pw.named_pallas_call


def _params(cfg, rows: int, cols: int, dim: int):
    """Triton launch parameters of a program holding a [rows, cols] fp32 score tile and
    [rows or cols, dim] fp32 accumulators: 8 warps from 64 x 128 elements on (counted twice
    for fp32 operands, whose 3-pass tf32 dots need more registers), else 4."""
    size = max(rows * cols, max(rows, cols) * dim) * (2 if cfg.dot_dtype == F32 else 1)
    return pltriton.CompilerParams(num_warps=8 if size >= 64 * 128 else 4,
                                   num_stages=NUM_STAGES)


def _div(x, n: int):
    """x // n for x >= 0 and a static n (lax.div; x itself for n == 1): the Pallas Triton
    lowering of jnp's `//` / `%` sign fix-ups is fragile (gpu_kernels._divmod)."""
    return x if n == 1 else lax.div(x, n)


def _mod(x, n: int):
    """x % n for x >= 0 and a static n (lax.rem; 0 for n == 1)."""
    return 0 if n == 1 else lax.rem(x, n)


class _Specs:
    """BlockSpecs of one call. Grids (tiles, B*H) for forward / dq and (tiles, B*K) for dkv:
    axis 0 counts tiles (TQ query rows or TK keys), axis 1 flattens (row, head). Layout arrays
    map row / head to 0 when the layout is shared (Bl / Hl = 1)."""

    def __init__(self, cfg):
        self.cfg, self.h, self.k = cfg, cfg.heads, cfg.kv_heads
        self.rep = cfg.heads // cfg.kv_heads
        self.qt = cfg.block_q // cfg.tile_q   # programs per query block (forward, dq)
        self.kt = cfg.block_k // cfg.tile_k   # programs per key block (dkv)

    def lrow(self, b):
        return b if self.cfg.layout_rows > 1 else 0

    def lhead(self, h):
        return h if self.cfg.layout_heads > 1 else 0

    # -- query-major kernels (forward, dq): grid (nq * bq / TQ, B*H), bh = b * H + h
    def _bh(self, bh):
        """(row, query head, kv head) of grid index bh."""
        h = _mod(bh, self.h)
        return _div(bh, self.h), h, _div(h, self.rep)

    def q_tile(self, n, d):            # q, o, do, dq [B, Tqp, H, D] -> [TQ, D]
        def index(i, bh):
            b, h, _ = self._bh(bh)
            return b, i, h, 0
        return pl.BlockSpec((None, n, None, d), index)

    def q_stat(self, n):               # lse, delta [B, H, Tqp] -> [TQ]
        def index(i, bh):
            b, h, _ = self._bh(bh)
            return b, h, i
        return pl.BlockSpec((None, None, n), index)

    def q_seg(self, n):                # [B, Tqp] -> [TQ]
        return pl.BlockSpec((None, n), lambda i, bh: (self._bh(bh)[0], i))

    def kv_row(self, t, d):            # k, v [B, Tkp, K, D] -> [Tkp, D] of the head's kv head
        def index(i, bh):
            b, _, kh = self._bh(bh)
            return b, 0, kh, 0
        return pl.BlockSpec((None, t, None, d), index)

    def kv_seg_row(self, t):           # [B, Tkp] -> [Tkp]
        return pl.BlockSpec((None, t), lambda i, bh: (self._bh(bh)[0], 0))

    def _q_list_index(self, i, bh):
        b, h, _ = self._bh(bh)
        return self.lrow(b), self.lhead(h), _div(i, self.qt)

    def q_list(self, s):               # kv_blocks, kv_mask_ids [Bl, Hl, nq, S] -> [S]
        return pl.BlockSpec((None, None, None, s), lambda i, bh: (*self._q_list_index(i, bh), 0))

    def q_count(self):                 # kv_counts [Bl, Hl, nq] -> []
        return pl.BlockSpec((None, None, None), self._q_list_index)

    def whole(self, shape):            # patterns [P, bq, bk], sinks [H]
        return pl.BlockSpec(shape, lambda i, bh: (0,) * len(shape))

    # -- key-major kernel (dkv): grid (nk * bk / TK, B*K), bg = b * K + kv head
    def _bg(self, bg):
        return _div(bg, self.k), _mod(bg, self.k)

    def k_tile(self, n, d):            # k, v, dk, dv [B, Tkp, K, D] -> [TK, D]
        def index(j, bg):
            b, kh = self._bg(bg)
            return b, j, kh, 0
        return pl.BlockSpec((None, n, None, d), index)

    def k_seg(self, n):                # [B, Tkp] -> [TK]
        return pl.BlockSpec((None, n), lambda j, bg: (self._bg(bg)[0], j))

    def group_row(self, t, d):         # q, do [B, Tqp, K, G, D] -> [Tqp, G, D]
        def index(j, bg):
            b, kh = self._bg(bg)
            return b, 0, kh, 0, 0
        return pl.BlockSpec((None, t, None, self.rep, d), index)

    def group_stat(self, t):           # lse, delta [B, K, G, Tqp] -> [G, Tqp]
        def index(j, bg):
            b, kh = self._bg(bg)
            return b, kh, 0, 0
        return pl.BlockSpec((None, None, self.rep, t), index)

    def q_seg_row(self, t):            # [B, Tqp] -> [Tqp]
        return pl.BlockSpec((None, t), lambda j, bg: (self._bg(bg)[0], 0))

    def k_list(self, sq):
        """q_blocks, q_mask_ids: [Bl, K, G, nk, Sq] (per-head layout) -> [G, Sq];
        [Bl, 1, nk, Sq] (shared) -> [Sq]."""
        def index(j, bg):
            b, kh = self._bg(bg)
            if self.cfg.layout_heads > 1:
                return self.lrow(b), kh, 0, _div(j, self.kt), 0
            return self.lrow(b), 0, _div(j, self.kt), 0
        if self.cfg.layout_heads > 1:
            return pl.BlockSpec((None, None, self.rep, None, sq), index)
        return pl.BlockSpec((None, None, None, sq), index)

    def k_count(self):
        """q_counts: [Bl, K, G, nk] -> [G]; [Bl, 1, nk] -> []."""
        def index(j, bg):
            b, kh = self._bg(bg)
            if self.cfg.layout_heads > 1:
                return self.lrow(b), kh, 0, _div(j, self.kt)
            return self.lrow(b), 0, _div(j, self.kt)
        if self.cfg.layout_heads > 1:
            return pl.BlockSpec((None, None, self.rep, None), index)
        return pl.BlockSpec((None, None, None), index)


def _query_major_inputs(cfg, sp, k, v, ids, patterns, lists):
    q_seg, kv_seg, q_pos, kv_pos = ids
    kv_blocks, kv_counts, kv_mask_ids = lists[:3]
    tkp, d, dv, s = k.shape[1], k.shape[-1], v.shape[-1], kv_blocks.shape[-1]
    return [("k", k, sp.kv_row(tkp, d)), ("v", v, sp.kv_row(tkp, dv)),
            ("q_seg", q_seg, sp.q_seg(cfg.tile_q)), ("kv_seg", kv_seg, sp.kv_seg_row(tkp)),
            ("q_pos", q_pos, sp.q_seg(cfg.tile_q)), ("kv_pos", kv_pos, sp.kv_seg_row(tkp)),
            ("kv_blocks", kv_blocks, sp.q_list(s)), ("kv_count", kv_counts, sp.q_count()),
            ("kv_mask_ids", kv_mask_ids, sp.q_list(s)),
            ("patterns", patterns, sp.whole(patterns.shape))]


def _forward(cfg, interpret, q, k, v, sinks, ids, patterns, lists):
    b, tqp, h, d = q.shape
    dv, tq = v.shape[-1], cfg.tile_q
    sp = _Specs(cfg)
    inputs = [("q", q, sp.q_tile(tq, d)),
              *_query_major_inputs(cfg, sp, k, v, ids, patterns, lists),
              ("sinks", sinks, sp.whole((h,)))]
    outputs = [("o", jax.ShapeDtypeStruct((b, tqp, h, dv), q.dtype), sp.q_tile(tq, dv))]
    if not cfg.sigmoid:
        outputs.append(("lse", jax.ShapeDtypeStruct((b, h, tqp), F32), sp.q_stat(tq)))
    res = _call(kern.forward_kernel, cfg, interpret, (tqp // tq, b * h), inputs, outputs,
                "block_sparse_attention_fwd", _params(cfg, tq, cfg.chunk_k, max(d, dv)))
    lse = jnp.zeros((b, h, tqp), F32) if cfg.sigmoid else res[1]
    return res[0], lse


def _dq(cfg, interpret, q, k, v, do, lse, delta, ids, patterns, lists):
    b, tqp, h, d = q.shape
    dv, tq = v.shape[-1], cfg.tile_q
    sp = _Specs(cfg)
    stats = [] if cfg.sigmoid else [("lse", lse, sp.q_stat(tq)), ("delta", delta, sp.q_stat(tq))]
    inputs = [("q", q, sp.q_tile(tq, d)), ("do", do, sp.q_tile(tq, dv)), *stats,
              *_query_major_inputs(cfg, sp, k, v, ids, patterns, lists)]
    outputs = [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype), sp.q_tile(tq, d))]
    (dq,) = _call(kern.dq_kernel, cfg, interpret, (tqp // tq, b * h), inputs, outputs,
                  "block_sparse_attention_dq", _params(cfg, tq, cfg.chunk_k, max(d, dv)))
    return dq


def _dkv(cfg, interpret, q, k, v, do, lse, delta, ids, patterns, lists):
    q_seg, kv_seg, q_pos, kv_pos = ids
    b, tqp, h, d = q.shape
    tkp, kvh, dv = k.shape[1], k.shape[2], v.shape[-1]
    g, tk = h // kvh, cfg.tile_k
    q_blocks, q_counts, q_mask_ids = lists[3:]
    if cfg.layout_heads > 1:   # [Bl, H, ...] -> [Bl, K, G, ...]: the group's rows together
        split = lambda x: x.reshape(x.shape[0], kvh, g, *x.shape[2:])
        q_blocks, q_counts, q_mask_ids = split(q_blocks), split(q_counts), split(q_mask_ids)
    sq = q_blocks.shape[-1]
    sp = _Specs(cfg)
    group = lambda x: x.reshape(b, tqp, kvh, g, x.shape[-1])
    stats = [] if cfg.sigmoid else [
        ("lse", lse.reshape(b, kvh, g, tqp), sp.group_stat(tqp)),
        ("delta", delta.reshape(b, kvh, g, tqp), sp.group_stat(tqp))]
    inputs = [("q", group(q), sp.group_row(tqp, d)), ("do", group(do), sp.group_row(tqp, dv)),
              *stats, ("k", k, sp.k_tile(tk, d)), ("v", v, sp.k_tile(tk, dv)),
              ("q_seg", q_seg, sp.q_seg_row(tqp)), ("kv_seg", kv_seg, sp.k_seg(tk)),
              ("q_pos", q_pos, sp.q_seg_row(tqp)), ("kv_pos", kv_pos, sp.k_seg(tk)),
              ("q_blocks", q_blocks, sp.k_list(sq)), ("q_counts", q_counts, sp.k_count()),
              ("q_mask_ids", q_mask_ids, sp.k_list(sq)),
              ("patterns", patterns, sp.whole(patterns.shape))]
    outputs = [("dk", jax.ShapeDtypeStruct(k.shape, k.dtype), sp.k_tile(tk, d)),
               ("dv", jax.ShapeDtypeStruct(v.shape, v.dtype), sp.k_tile(tk, dv))]
    dk, dv_ = _call(kern.dkv_kernel, cfg, interpret, (tkp // tk, b * kvh), inputs, outputs,
                    "block_sparse_attention_dkv", _params(cfg, cfg.chunk_q, tk, max(d, dv)))
    return dk, dv_

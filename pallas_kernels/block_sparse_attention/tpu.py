"""Block-sparse attention as Pallas Mosaic (TPU) kernels, forward and backward.

    o, lse = block_sparse_attention(q, k, v, layout, q_seg, kv_seg, sinks, score=...,
                                    sigmoid_bias=..., logit_softcap=..., scale=...,
                                    interpret=False)

Same contract as reference.py (see api.py); registered under "tpu" by api.py.

Design: splash attention's scheme (anchors_kernels.md 2.3) on our CSR layout (layout.py). The
block lists are scalar-prefetched into SMEM (PrefetchScalarGridSpec), the grid has one step
per list slot, and the BlockSpec index maps read the lists, so the Pallas pipeline copies
exactly the listed key blocks (HBM -> VMEM, double-buffered) while the previous one is being
computed. A padding slot repeats the previous block index, so its copy is skipped, and
`pl.when(slot < count)` skips its compute. A full block skips the pattern; a partial block's
pattern comes through a BlockSpec indexed by its mask id, and full / padding slots keep the
previous pattern's index so that they trigger no pattern copy either. Sequences are padded to
whole blocks inside (Tqp = nq bq, Tkp = nk bk); padding tokens get segment 0, which sees and
is seen by nothing.

Kernels (tpu_kernels.py), grids and dimension semantics ("parallel" x3, "arbitrary"):
  forward  (B, H, nq, S)      online softmax of one query block over slot s of its list, m /
                              l / acc in VMEM scratch, written at the last slot -> o, lse.
                              Sigmoid scores: acc += sigmoid(s + bias) v, no statistics.
  dq       (B, H, nq, S)      the same walk; p recomputed from lse -> dq (fp32 scratch).
  dkv      (B, K, nk, G*Sq)   one key block of one kv head walks, for each query head of its
                              GQA group in turn, the key-major lists (the query blocks that
                              list the key block) -> dk, dv already summed over the group.
  jnp                         Delta = rowsum(do * o) - dlse (lse is a differentiable output,
                              so its cotangent enters the softmax gradient here) and
                              dsinks = -sum_{b,i} exp(sink - lse) Delta.
Every grid point owns its output block; the accumulation runs along the last ("arbitrary")
axis in VMEM, so there are no atomics and no cross-core reductions. Layout broadcasting
(rows Bl in {1, B}, heads Hl in {1, H}) is static arithmetic on the flat list offsets; kv
heads are shared through the index maps (query head h reads kv head h // (H // K)).

Layouts in HBM (built here, outside the kernels): q / k / v / o head-major [B, heads, T, D];
query segment ids as a lane-replicated column [B, Tqp, 128] and key ids as a sublane-
replicated row [B, 8, Tkp] (the key-major dkv kernel uses the transposed pair); lse out of
the forward as [B, H, Tqp, 128] (lane-replicated, sliced to [B, H, Tqp]); lse and Delta into
the backward as rows, [B, H, 1, Tqp] (a free reshape) for dq and sublane-replicated
[B, H, 8, Tqp] for dkv; partial patterns as int32 [P, bq, bk] (and transposed [P, bk, bq] for
dkv); the lists flattened to 1-D and downcast to int8 / int16 where their static bounds allow,
for SMEM (1 MiB on current TPUs).

Shape rules and refusals (NotImplementedError, raised before any work, so `dispatch` falls
back): not on a TPU backend unless interpret=True; block_q or block_k not a multiple of 128;
head dims D or Dv not a multiple of 128 or above MAX_HEAD_DIM; an estimated VMEM footprint
of the largest kernel (dkv) above VMEM_BUDGET; block lists whose SMEM footprint exceeds
SMEM_BUDGET (e.g. per-row and per-head lists of a large batch: share the layout or split the
batch). Why: Mosaic tiles the two minor dims of every
block by (8, 128) (sublanes, lanes). The score tile is [bq, bk] in the query-major kernels
and [bk, bq] in dkv (kept transposed so that no tile is transposed in VMEM), so both block
sizes sit in lanes somewhere; the segment-id rows [8, bk] / [8, bq] and the lse / Delta rows
[8, bq] are lane-dense blocks of the sequence; the lane-replicated softmax state is widened to
[bq, bk] and [bq, Dv] by whole-lane tiling. The same rules splash attention lives by (block
sizes and head dims multiples of 128). Served beyond that: any Tq, Tk (padded inside),
H % K == 0 (GQA / MQA), segment ids, softmax or sigmoid, soft-cap, sinks, Bl / Hl
broadcasting, float32 / bfloat16 (float16 and mixed inputs compute in float32).

Numerics: scores, softmax statistics and all accumulations are float32; matmul operands are
the compute dtype (bfloat16 when q, k, v all are, p and ds rounded to it as in FlashAttention,
else float32 with a full-precision contraction). A row with nothing visible and no sink gets
o = 0 and lse = -inf (the running max stays -inf and is shifted by 0 instead). Memory policy:
the custom_vjp saves its (padded, head-major) inputs, o and lse [B, H, Tqp] fp32; nothing
[T, T]-sized exists anywhere.

Lowering for TPU is checked on CPU (jax.export, tests/pallas_kernels/test_block_sparse_tpu.py);
the kernels have not been compiled by Mosaic on a real TPU (see the limits listed there).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.block_sparse_attention import tpu_kernels as kern
from pallas_kernels.block_sparse_attention.layout import FULL

F32 = jnp.float32
LANES = kern.LANES
MAX_HEAD_DIM = 256
VMEM_BUDGET = 12 * 2 ** 20  # bytes; under Mosaic's default 16 MiB scoped VMEM limit
SMEM_BUDGET = 2 ** 19       # bytes of scalar-prefetched lists per kernel: half of the 1 MiB SMEM


def refusal(q, k, v, layout, interpret: bool) -> str | None:
    """Why these kernels cannot serve the call, or None if they can."""
    return pw.mosaic_platform_refusal(interpret) or shape_refusal(q, k, v, layout)


def _vmem_estimate(bq: int, bk: int, d: int, dv: int, itemsize: int) -> int:
    """Bytes of VMEM of the dkv kernel (the largest): double-buffered input and output blocks
    (positions counted, as the attention op passes them), fp32 accumulators and about six
    fp32 [bk, bq] temporaries (scores, p, dp, ds, masks)."""
    inputs = (bq * d + bk * d + bk * dv + bq * dv) * itemsize + 4 * (bq * bk + 2 * bk * LANES
                                                                      + 4 * 8 * bq)
    outputs = bk * (d + dv) * itemsize
    return 2 * (inputs + outputs) + 4 * bk * (d + dv) + 6 * 4 * bq * bk


def head_dims_refusal(d: int, dv: int) -> str | None:
    """Why the Mosaic kernels refuse head dims D = d, Dv = dv (lane tiling), or None."""
    for name, x in (("D", d), ("Dv", dv)):
        if x % LANES or x > MAX_HEAD_DIM:
            return (f"head dim {name}={x} not supported by the Mosaic kernels: accepted "
                    f"multiples of {LANES} up to {MAX_HEAD_DIM}")
    return None


def shape_refusal(q, k, v, layout) -> str | None:
    """Shape part of `refusal` (independent of the platform); see the module docstring."""
    bq, bk = layout.block_q, layout.block_k
    if layout.heads not in (1, q.shape[2]):
        return (f"a layout with one list per kv head (Hl = {layout.heads}) is not served by the "
                f"Mosaic kernels: they take Hl = 1 or H = {q.shape[2]}")
    for name, blk in (("block_q", bq), ("block_k", bk)):
        if blk % LANES:
            return (f"{name}={blk} not supported by the Mosaic kernels: block sizes must be "
                    f"multiples of {LANES} (TPU lane tiling of the score tiles)")
    reason = head_dims_refusal(q.shape[-1], v.shape[-1])
    if reason:
        return reason
    n_pat = layout.partial_masks.shape[0]
    for kind, shape, n_other in (("query-major", layout.kv_blocks.shape, layout.num_kv_blocks),
                                 ("key-major", layout.q_blocks.shape, layout.num_q_blocks)):
        need = _smem_bytes(shape, n_other, n_pat)
        if need > SMEM_BUDGET:
            return (f"the {kind} block lists {list(shape)} need {need >> 10} KiB of SMEM "
                    f"(budget {SMEM_BUDGET >> 10} KiB): share the layout across rows / heads "
                    "or use larger blocks")
    itemsize = 2 if _compute_dtype(q, k, v) == jnp.bfloat16 else 4
    need = _vmem_estimate(bq, bk, q.shape[-1], v.shape[-1], itemsize)
    if need > VMEM_BUDGET:
        return (f"block_q={bq}, block_k={bk} with head dims {q.shape[-1]}/{v.shape[-1]} need "
                f"about {need >> 20} MiB of VMEM (budget {VMEM_BUDGET >> 20} MiB); use "
                "smaller blocks")
    return None


def _compute_dtype(q, k, v):
    return jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in (q, k, v)) else F32


def block_sparse_attention(q, k, v, layout, q_seg, kv_seg, sinks, *, score: str,
                           sigmoid_bias: float, logit_softcap: float | None, scale: float,
                           positions=None, window: int | None = None,
                           interpret: bool = False):
    """q [B,Tq,H,D], k [B,Tk,K,D], v [B,Tk,K,Dv], layout: BlockLayout, q_seg int [B,Tq],
    kv_seg int [B,Tk], sinks None | fp32 [H] -> (o [B,Tq,H,Dv] in q.dtype, lse [B,H,Tq] fp32;
    zeros for score="sigmoid"). Validated by the api. Raises NotImplementedError (see the
    module docstring) before any work when it cannot serve the call.

    positions: None, or (q_pos int [B,Tq], kv_pos int [B,Tk]): the attention op's mask on top
    of the layout's (pallas_kernels/attention/pallas.py), key j visible to query i only if
    0 <= q_pos[i] - kv_pos[j] < window (window None: no upper bound)."""
    reason = refusal(q, k, v, layout, interpret)
    if reason is not None:
        raise NotImplementedError(reason)
    return mosaic_attention(q, k, v, layout, q_seg, kv_seg, sinks, score=score,
                            sigmoid_bias=sigmoid_bias, logit_softcap=logit_softcap,
                            scale=scale, positions=positions, window=window,
                            interpret=interpret)


def mosaic_attention(q, k, v, layout, q_seg, kv_seg, sinks, *, score: str,
                     sigmoid_bias: float = 0.0, logit_softcap: float | None = None,
                     scale: float, positions=None, window: int | None = None,
                     interpret: bool = False):
    """The kernels without the platform check: `interpret=False` stages Mosaic custom calls on
    any platform, which is how the tests lower them for TPU on a CPU-only machine
    (jax.export). Shapes are still checked (NotImplementedError). `interpret` may also be a
    `pltpu.InterpretParams` (TPU interpret mode: simulated DMAs and cores, race detection)."""
    reason = shape_refusal(q, k, v, layout)
    if reason is not None:
        raise NotImplementedError(reason)
    b, tq, h, _ = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    bq, bk = layout.block_q, layout.block_k
    tqp, tkp = layout.num_q_blocks * bq, layout.num_kv_blocks * bk
    sigmoid = score == "sigmoid"
    cfg = kern.Config(
        block_q=bq, block_k=bk, heads=h, kv_heads=kvh, layout_rows=layout.rows,
        layout_heads=layout.heads, scale=float(scale),
        softcap=None if logit_softcap is None else float(logit_softcap), sigmoid=sigmoid,
        sigmoid_bias=float(sigmoid_bias), has_sinks=sinks is not None and not sigmoid,
        interpret=interpret if isinstance(interpret, pltpu.InterpretParams) else bool(interpret),
        positions=positions is not None, window=None if window is None else int(window))
    cd = _compute_dtype(q, k, v)

    def head_major(x, t, tp):   # [B, T, heads, D] -> padded [B, heads, Tp, D]
        return jnp.swapaxes(jnp.pad(x.astype(cd), ((0, 0), (0, tp - t), (0, 0), (0, 0))), 1, 2)

    def seg(x, t, tp):          # padding tokens: segment 0
        return jnp.pad(jnp.asarray(x, jnp.int32), ((0, 0), (0, tp - t)))

    lists = (*_lists(layout.kv_blocks, layout.kv_counts, layout.kv_mask_ids),
             *_lists(layout.q_blocks, layout.q_counts, layout.q_mask_ids))
    patterns = jnp.asarray(layout.partial_masks).astype(jnp.int32)
    # padding tokens have segment 0, so their (zero) position is never read
    q_pos, kv_pos = (None, None) if positions is None else (
        seg(positions[0], tq, tqp), seg(positions[1], tk, tkp))
    o, lse = _core(cfg, head_major(q, tq, tqp), head_major(k, tk, tkp),
                   head_major(v, tk, tkp), sinks.astype(F32) if cfg.has_sinks else None,
                   seg(q_seg, tq, tqp), seg(kv_seg, tk, tkp), q_pos, kv_pos, patterns, *lists)
    return jnp.swapaxes(o, 1, 2)[:, :tq].astype(q.dtype), lse[:, :, :tq]


def _lists(blocks, counts, ids):
    """int32 lists; a layout with no slot at all (S = 0) gets one empty padding slot, since a
    grid axis cannot be empty."""
    blocks, counts, ids = (jnp.asarray(x, jnp.int32) for x in (blocks, counts, ids))
    if blocks.shape[-1] == 0:
        blocks = jnp.zeros(blocks.shape[:-1] + (1,), jnp.int32)
        ids = jnp.full(ids.shape[:-1] + (1,), FULL, jnp.int32)
    return blocks, counts, ids


def _small_int(max_value: int):
    """The smallest of int8 / int16 / int32 holding [-1, max_value] (SMEM is scarce)."""
    for dt in (jnp.int8, jnp.int16):
        if max_value <= jnp.iinfo(dt).max:
            return dt
    return jnp.int32


def _list_dtypes(n_other: int, slots: int, patterns: int):
    """Static dtypes of (blocks, counts, ids, fetch) for lists of block indices < n_other."""
    ids = _small_int(patterns - 1)
    return _small_int(n_other - 1), _small_int(slots), ids, ids


def _smem_bytes(blocks_shape, n_other: int, patterns: int) -> int:
    """SMEM bytes of one direction's scalar-prefetched lists ([Bl, Hl, n, S] blocks)."""
    entries, rows, slots = math.prod(blocks_shape), math.prod(blocks_shape[:-1]), blocks_shape[-1]
    b, c, i, f = (jnp.dtype(d).itemsize for d in _list_dtypes(n_other, max(slots, 1), patterns))
    return entries * (b + i + f) + rows * c


def _prefetch(blocks, counts, ids, n_other: int, patterns: int):
    """-> (flat blocks, counts, ids, pattern fetch indices) downcast, the list width."""
    ids = ids.reshape(-1)
    dts = _list_dtypes(n_other, blocks.shape[-1], patterns)
    flat = (blocks.reshape(-1), counts.reshape(-1), ids, kern.fetch_ids(ids))
    return tuple(x.astype(dt) for x, dt in zip(flat, dts)), blocks.shape[-1]


# ----------------------------------------------------------------------------- custom_vjp

def _col(ids):
    """int32 [B, T] -> lane-replicated [B, T, 128] (None stays None)."""
    if ids is None:
        return None
    return jax.lax.broadcast_in_dim(ids, (ids.shape[0], ids.shape[1], LANES), (0, 1))


def _row(ids):
    """int32 [B, T] -> sublane-replicated [B, 8, T] (None stays None)."""
    if ids is None:
        return None
    return jax.lax.broadcast_in_dim(ids, (ids.shape[0], 8, ids.shape[1]), (0, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, sinks, q_seg, kv_seg, q_pos, kv_pos, patterns, *lists):
    """Padded head-major q [B,H,Tqp,D], k [B,K,Tkp,D], v [B,K,Tkp,Dv] (compute dtype), sinks
    None | fp32 [H], segment ids (and with cfg.positions positions, else None) int32 [B,Tqp] /
    [B,Tkp], patterns int32 [P,bq,bk], the six layout lists -> (o [B,H,Tqp,Dv], lse fp32
    [B,H,Tqp], zeros for sigmoid)."""
    return _forward(cfg, q, k, v, sinks, (q_seg, kv_seg, q_pos, kv_pos), patterns, lists)


def _forward(cfg, q, k, v, sinks, ids, patterns, lists):
    q_seg, kv_seg, q_pos, kv_pos = ids
    b, h, tqp, _ = q.shape
    prefetch, slots = _prefetch(*lists[:3], k.shape[2] // cfg.block_k, patterns.shape[0])
    sinks8 = None if sinks is None else jnp.broadcast_to(sinks[None, :], (8, h))
    o, lse = kern.forward(q, k, v, _col(q_seg), _row(kv_seg), patterns, sinks8, prefetch,
                          slots=slots, cfg=cfg, pos=(_col(q_pos), _row(kv_pos)))
    lse = jnp.zeros((b, h, tqp), F32) if lse is None else lse[..., 0]
    return o, lse


def _core_fwd(cfg, q, k, v, sinks, q_seg, kv_seg, q_pos, kv_pos, patterns, *lists):
    ids = (q_seg, kv_seg, q_pos, kv_pos)
    o, lse = _forward(cfg, q, k, v, sinks, ids, patterns, lists)
    return (o, lse), (q, k, v, sinks, ids, patterns, lists, o, lse)


def _core_bwd(cfg, res, cotangents):
    q, k, v, sinks, ids, patterns, lists, o, lse = res
    q_seg, kv_seg, q_pos, kv_pos = ids
    do, dlse = cotangents
    do = do.astype(q.dtype)
    b, h, tqp, _ = q.shape
    tkp = k.shape[2]
    n_pat = patterns.shape[0]
    rows1 = lambda x: None if x is None else x[:, :, None, :]                # [B, H, 1, Tqp]
    rows8 = lambda x: None if x is None else jnp.broadcast_to(x[:, :, None, :], (b, h, 8, tqp))
    delta = dsinks = None
    if not cfg.sigmoid:
        delta = jnp.einsum("bhtd,bhtd->bht", do.astype(F32), o.astype(F32)) - dlse
    stat = None if cfg.sigmoid else lse
    fwd_prefetch, slots = _prefetch(*lists[:3], tkp // cfg.block_k, n_pat)
    dq = kern.dq(q, k, v, do, _col(q_seg), _row(kv_seg), patterns, rows1(stat), rows1(delta),
                 fwd_prefetch, slots=slots, cfg=cfg, pos=(_col(q_pos), _row(kv_pos)))
    bwd_prefetch, q_slots = _prefetch(*lists[3:], tqp // cfg.block_q, n_pat)
    dk, dv = kern.dkv(q, k, v, do, _col(kv_seg), _row(q_seg), jnp.swapaxes(patterns, 1, 2),
                      rows8(stat), rows8(delta), bwd_prefetch, slots=q_slots, cfg=cfg,
                      pos=(_col(kv_pos), _row(q_pos)))
    if sinks is not None:
        # lse >= sink wherever a sink is present, so the exponent is <= 0
        dsinks = -jnp.sum(jnp.exp(sinks[None, :, None] - lse) * delta, axis=(0, 2))
    return (dq, dk, dv, dsinks) + (None,) * (5 + len(lists))


_core.defvjp(_core_fwd, _core_bwd)

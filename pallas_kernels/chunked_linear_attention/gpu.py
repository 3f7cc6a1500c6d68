"""Chunked linear attention as Pallas Triton (GPU) kernels, forward and backward.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale * q_t S_t      (contract: api.py)

Design: "fused chunk" kernels in the style of Lightning Attention-2 / fla's fused_chunk. Each
program owns one (batch row, query head, head-dim tile), walks the row's chunks of C tokens in
an in-kernel `lax.fori_loop`, and keeps its slice of the fp32 state in registers: no state is
ever written to HBM (except the final one, an output). Per chunk, the intra-chunk part is a
masked [C, C] score matrix times values (tensor cores, fp32 accumulation) and the inter-chunk
part reads the carried state; decays are chunk-local cumulative sums with exponents <= 0
(gpu_kernels.py has the per-chunk algebra, including the exact per-channel-decay scheme).

Kernels and grids (B batch, H query heads, G kv heads, K / V head dims, Tp = T padded to C):
  forward  (B, H, V/BV)  state S[:, vb]  [K, BV]  forward over chunks  -> o, final state
  dq       (B, H, K/BK)  state S[kb, :]  [BK, V]  forward (recomputes S) -> dq, q.dq
  dk       (B, H, K/BK)  dS[kb, :]       [BK, V]  backward over chunks -> dk, k.dk, dS_0
  dv       (B, H, V/BV)  dS[:, vb]       [K, BV]  backward over chunks -> dv
The state recurrence is separable by rows of S (the decay is per key channel) and by columns
(values are independent), so a K tile or a V tile of it evolves on its own: dq and dk sum over
V and so tile K; o and dv sum over K and so tile V. Each program recomputes the [C, C] scores
it needs (duplicated across the K/V tiles of a head, a small share of the work). The programs
are independent (no cross-program communication), as Triton requires.

GQA: k and v keep their G heads in memory; the BlockSpec index maps send query head h to kv
head h // (H // G). dk and dv are produced per query head (fp32 when H > G) and summed over
each group of H // G heads outside the kernels.

Gradient of the log decay. With Gamma the cumulative log decay along the row, the loss
depends on it only through differences Gamma_i - Gamma_j (query side i, key side j) and through
the final state, so
    dGamma_t = q_t . dq_t - k_t . dk_t  (+ sum_v dS_T . S_T at the last position)
(per channel; summed over K for a per-head decay), and dg = reverse cumsum of dGamma over time.
This holds across document resets (pairs across documents are masked). The per-head share
k . dk^(h) is needed, so the dq / dk kernels write q.dq and k.dk in fp32 before any GQA sum.

Memory policy (fla's): the custom_vjp saves only its inputs (q, k, v, the fp32 log decay g,
the int32 document ids, the initial state) and the final state (an output). The backward
recomputes every chunk state inside the dq kernel and runs the state gradient recurrence in
the dk and dv kernels.

Shape rules and refusals. Served: K and V powers of two in [16, 256] (Triton tiles: every
array a power of two, tensor-core dots need dims >= 16); any T (padded to the chunk by
`common.prepare`); H % G == 0; q/k/v float32, bfloat16 or float16 (mixed dtypes promoted);
any power-of-two chunk_size, used as a hint: clamped to 16..64, to the sequence length, and
to 32 for per-channel decay (the result does not depend on the chunk). Refused with
NotImplementedError, before any work, so that `dispatch` falls back: other head dims, and a
non-GPU platform unless interpret=True.

Numerics. Matmul operands are bf16 for bf16 inputs (fp32 accumulation, the fp32 state is
rounded to bf16 as an operand, as in fla); for fp32 inputs 3-pass tf32 on GPU (about fp32
accuracy on tensor cores) and exact fp32 in interpret mode; for fp16 inputs fp32 operands
with tf32 (fp16 could not hold the state). Every exponent is <= 0, so there is no overflow for
any g <= 0. Cumulative log decays are fp32 sums local to a chunk: a decay factor
exp(G_i - G_j) carries a relative error of about 1e-7 * |G_i| (1e-4 only if the log decay
accumulated within one chunk reaches ~1000, e.g. a single step of g = -300 followed by
tokens that still interact).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.chunked_linear_attention import common
from pallas_kernels.chunked_linear_attention import gpu_kernels as kern

F32 = jnp.float32
CHUNKS = (16, 32, 64)
HEAD_DIMS = (16, 32, 64, 128, 256)
# Tuning knobs (module constants so that a benchmark can sweep them). Not yet timed on a GPU;
# checked on CPU by compiling the lowered Triton IR for sm_90a with the `triton` package
# (pallas_kernels/lowering.py): bf16, K = V = 128, chunk 64, per-head decay: 8 warps,
# 217-255 registers, no spill, 91 KB shared memory per kernel; per-channel decay (chunk 32):
# 0-176 bytes of spill; K = V = 256: up to 173 KB shared memory (H100 limit: 227 KB).
BLOCK = 64          # K / V tile of the K-tiled / V-tiled kernels (smaller dims: whole)
NUM_STAGES = 2      # software pipelining of the next chunk's loads
NUM_WARPS = None    # None: 4, or 8 once the fp32 state tile or a [C, D] tile is large
VECTOR_CHUNK = 32   # largest chunk for per-channel decay: at 64 its log2(C) level factors
                    # spill 1.5 KB per thread (K = 128); at 32 they fit, and the per-token
                    # intra-chunk work (levels x C) is 2.4x smaller
WIDE_BLOCK, WIDE_STAGES = 32, 1  # fp32 operands (fp32 / fp16 inputs): 3-pass tf32 or tf32
                    # dots need twice the shared memory; stages 2 would exceed 227 KB


def chunked_linear_attention(q, k, v, log_decay, initial_state, segment_ids, *, scale: float,
                             chunk_size: int, interpret: bool = False):
    """q [B,T,H,K], k [B,T,G,K], v [B,T,G,V], log_decay None | [B,T,H] | [B,T,H,K],
    initial_state None | [B,H,K,V], segment_ids None | int [B,T] -> (o [B,T,H,V] in q.dtype,
    final state [B,H,K,V] fp32). `interpret=True` runs the kernels in Pallas interpret mode
    (any backend, e.g. CPU tests). Raises NotImplementedError for what it cannot serve."""
    pw.check_triton_supported(q, v, interpret, HEAD_DIMS)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    cdt = jnp.result_type(q.dtype, k.dtype, v.dtype)
    out_dtype = q.dtype
    q, k, v = q.astype(cdt), k.astype(cdt), v.astype(cdt)
    mode = "none" if log_decay is None else ("scalar" if log_decay.ndim == 3 else "vector")
    # chunk_size is a hint (the result does not depend on it): clamped to CHUNKS, never more
    # than the sequence needs, and at most VECTOR_CHUNK for per-channel decay.
    chunk = min(max(chunk_size, CHUNKS[0]), CHUNKS[-1], max(CHUNKS[0], pl.next_power_of_2(t)))
    if mode == "vector":
        chunk = min(chunk, VECTOR_CHUNK)
    wide = cdt != jnp.bfloat16   # matmul operands in fp32
    block = WIDE_BLOCK if wide else BLOCK
    prep = common.prepare(q, k, v, log_decay, segment_ids, chunk)
    tp = prep.q.shape[1]
    cfg = kern.Config(
        mode=mode, chunk=chunk, num_chunks=tp // chunk, scale=float(scale),
        heads=h, kv_heads=k.shape[2], block_k=min(dk, block), block_v=min(dv, block),
        dot_dtype=jnp.dtype(F32) if wide else jnp.dtype(jnp.bfloat16),
        precision=pw.triton_precision(cdt, interpret), has_s0=initial_state is not None,
        num_stages=WIDE_STAGES if wide else NUM_STAGES)
    s0 = None if initial_state is None else initial_state.astype(F32)
    g = None if mode == "none" else prep.g
    o, s_final = _core(cfg, bool(interpret), prep.q, prep.k, prep.v, g, prep.doc, s0)
    return common.finish(o, prep.valid).astype(out_dtype), s_final


# ----------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(cfg, interpret, q, k, v, g, doc, s0):
    """Prepared (padded) inputs -> (o [B,Tp,H,V] in q.dtype, final state [B,H,K,V] fp32)."""
    return _forward(cfg, interpret, q, k, v, g, doc, s0)


def _core_fwd(cfg, interpret, q, k, v, g, doc, s0):
    o, s_final = _forward(cfg, interpret, q, k, v, g, doc, s0)
    return (o, s_final), (q, k, v, g, doc, s0, s_final)


def _core_bwd(cfg, interpret, res, cotangents):
    q, k, v, g, doc, s0, s_final = res
    do, ds_final = cotangents
    do = do.astype(q.dtype)
    ds_final = ds_final.astype(F32)
    dq, dgq = _dq(cfg, interpret, q, k, v, do, g, doc, s0)
    dk, dgk, ds0 = _dk(cfg, interpret, q, k, v, do, g, doc, ds_final)
    dv = _dv(cfg, interpret, q, k, do, g, doc, ds_final)
    # per query head [B,Tp,H,D] -> per kv head [B,Tp,G,D]
    dk = pw.sum_kv_groups(dk, cfg.kv_heads, axis=2).astype(k.dtype)
    dv = pw.sum_kv_groups(dv, cfg.kv_heads, axis=2).astype(v.dtype)
    dg = None
    if cfg.mode != "none":
        if cfg.mode == "scalar":          # partial sums over the K tiles: [NK, B, Tp, H]
            d_gamma = jnp.sum(dgq, axis=0) - jnp.sum(dgk, axis=0)
            last = jnp.sum(ds_final * s_final, axis=(2, 3))            # [B, H]
        else:                             # [B, Tp, H, K]
            d_gamma = dgq - dgk
            last = jnp.sum(ds_final * s_final, axis=3)                 # [B, H, K]
        d_gamma = d_gamma.at[:, -1].add(last)
        dg = lax.cumsum(d_gamma, axis=1, reverse=True).astype(g.dtype)
    return dq, dk, dv, dg, None, ds0


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------- pallas_calls

_call = pw.named_pallas_call


def _params(cfg, state_elems: int, width: int):
    """Triton launch parameters: 8 warps once the fp32 state tile or a [C, D] tile is large."""
    warps = NUM_WARPS or (4 if state_elems <= 64 * 64 and width <= 64 else 8)
    return pltriton.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


def _token_spec(tp, d, head, tile):
    """Whole-row block [Tp, d] of a [B, Tp, heads, D] tensor; grid (b, h, j)."""
    return pl.BlockSpec((None, tp, None, d), lambda b, h, j: (b, 0, head(h), tile(j)))


def _decay_input(cfg, g, tp, tile):
    """(name, g, spec) for the log decay, or nothing without decay."""
    if cfg.mode == "none":
        return []
    if cfg.mode == "scalar":
        return [("g", g, pl.BlockSpec((None, tp, None), lambda b, h, j: (b, 0, h)))]
    width = cfg.block_k if tile else g.shape[-1]
    return [("g", g, _token_spec(tp, width, lambda h: h, (lambda j: j) if tile else (lambda j: 0)))]


def _forward(cfg, interpret, q, k, v, g, doc, s0):
    b, tp, h, dk = q.shape
    dv, bv = v.shape[-1], cfg.block_v
    rep = h // cfg.kv_heads
    same, kvh = (lambda i: i), (lambda i: i // rep)
    whole, tile = (lambda j: 0), (lambda j: j)
    inputs = [("q", q, _token_spec(tp, dk, same, whole)),
              ("k", k, _token_spec(tp, dk, kvh, whole)),
              ("v", v, _token_spec(tp, bv, kvh, tile)),
              *_decay_input(cfg, g, tp, tile=False),
              ("doc", doc, pl.BlockSpec((None, tp), lambda b, h, j: (b, 0)))]
    state_spec = pl.BlockSpec((None, None, dk, bv), lambda b, h, j: (b, h, 0, j))
    if cfg.has_s0:
        inputs.append(("s0", s0, state_spec))
    outputs = [("o", jax.ShapeDtypeStruct((b, tp, h, dv), q.dtype),
                _token_spec(tp, bv, same, tile)),
               ("sT", jax.ShapeDtypeStruct((b, h, dk, dv), F32), state_spec)]
    o, s_final = _call(kern.fwd_kernel, cfg, interpret, (b, h, dv // bv), inputs, outputs,
                       "chunked_linear_attention_fwd", _params(cfg, dk * bv, max(dk, bv)))
    return o, s_final


def _k_tiled_inputs(cfg, q, k, v, do, g, doc):
    """Inputs of the K-tiled backward kernels (dq, dk): q/k/g tiles [Tp, BK], v/do whole."""
    b, tp, h, dk = q.shape
    dv, bk = v.shape[-1], cfg.block_k
    rep = h // cfg.kv_heads
    same, kvh = (lambda i: i), (lambda i: i // rep)
    whole, tile = (lambda j: 0), (lambda j: j)
    return [("q", q, _token_spec(tp, bk, same, tile)),
            ("k", k, _token_spec(tp, bk, kvh, tile)),
            ("v", v, _token_spec(tp, dv, kvh, whole)),
            ("do", do, _token_spec(tp, dv, same, whole)),
            *_decay_input(cfg, g, tp, tile=True),
            ("doc", doc, pl.BlockSpec((None, tp), lambda b, h, j: (b, 0)))]


def _dg_output(cfg, b, tp, h, dk, name):
    """(name, shape, spec) of q.dq / k.dk in fp32: [NK, B, Tp, H] partial sums over the K tiles
    (per-head decay) or [B, Tp, H, K] (per-channel decay)."""
    if cfg.mode == "none":
        return []
    nk = dk // cfg.block_k
    if cfg.mode == "scalar":
        return [(name, jax.ShapeDtypeStruct((nk, b, tp, h), F32),
                 pl.BlockSpec((None, None, tp, None), lambda b, h, j: (j, b, 0, h)))]
    return [(name, jax.ShapeDtypeStruct((b, tp, h, dk), F32),
             _token_spec(tp, cfg.block_k, lambda i: i, lambda j: j))]


def _dq(cfg, interpret, q, k, v, do, g, doc, s0):
    b, tp, h, dk = q.shape
    dv, bk = v.shape[-1], cfg.block_k
    inputs = _k_tiled_inputs(cfg, q, k, v, do, g, doc)
    if cfg.has_s0:
        inputs.append(("s0", s0, pl.BlockSpec((None, None, bk, dv), lambda b, h, j: (b, h, j, 0))))
    outputs = [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype),
                _token_spec(tp, bk, lambda i: i, lambda j: j)),
               *_dg_output(cfg, b, tp, h, dk, "dgq")]
    res = _call(kern.dq_kernel, cfg, interpret, (b, h, dk // bk), inputs, outputs,
                "chunked_linear_attention_dq", _params(cfg, bk * dv, max(bk, dv)))
    return res[0], (res[1] if cfg.mode != "none" else None)


def _dk(cfg, interpret, q, k, v, do, g, doc, ds_final):
    b, tp, h, dk = q.shape
    dv, bk = v.shape[-1], cfg.block_k
    state_spec = pl.BlockSpec((None, None, bk, dv), lambda b, h, j: (b, h, j, 0))
    inputs = _k_tiled_inputs(cfg, q, k, v, do, g, doc) + [("dsT", ds_final, state_spec)]
    dk_dtype = k.dtype if cfg.heads == cfg.kv_heads else F32
    outputs = [("dk", jax.ShapeDtypeStruct((b, tp, h, dk), dk_dtype),
                _token_spec(tp, bk, lambda i: i, lambda j: j)),
               *_dg_output(cfg, b, tp, h, dk, "dgk")]
    if cfg.has_s0:
        outputs.append(("ds0", jax.ShapeDtypeStruct((b, h, dk, dv), F32), state_spec))
    res = list(_call(kern.dk_kernel, cfg, interpret, (b, h, dk // bk), inputs, outputs,
                     "chunked_linear_attention_dk", _params(cfg, bk * dv, max(bk, dv))))
    dk_out = res.pop(0)
    dgk = res.pop(0) if cfg.mode != "none" else None
    ds0 = res.pop(0) if cfg.has_s0 else None
    return dk_out, dgk, ds0


def _dv(cfg, interpret, q, k, do, g, doc, ds_final):
    b, tp, h, dk = q.shape
    dv, bv = do.shape[-1], cfg.block_v
    rep = h // cfg.kv_heads
    same, kvh = (lambda i: i), (lambda i: i // rep)
    whole, tile = (lambda j: 0), (lambda j: j)
    inputs = [("q", q, _token_spec(tp, dk, same, whole)),
              ("k", k, _token_spec(tp, dk, kvh, whole)),
              ("do", do, _token_spec(tp, bv, same, tile)),
              *_decay_input(cfg, g, tp, tile=False),
              ("doc", doc, pl.BlockSpec((None, tp), lambda b, h, j: (b, 0))),
              ("dsT", ds_final, pl.BlockSpec((None, None, dk, bv), lambda b, h, j: (b, h, 0, j)))]
    dv_dtype = do.dtype if cfg.heads == cfg.kv_heads else F32
    outputs = [("dv", jax.ShapeDtypeStruct((b, tp, h, dv), dv_dtype),
                _token_spec(tp, bv, same, tile))]
    (dv_out,) = _call(kern.dv_kernel, cfg, interpret, (b, h, dv // bv), inputs, outputs,
                      "chunked_linear_attention_dv", _params(cfg, dk * bv, max(dk, bv)))
    return dv_out

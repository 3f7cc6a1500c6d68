"""The (gated) delta rule as Pallas Triton (GPU) kernels, forward and backward.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale q_t S_t
                                                                   (contract: api.py)

Design: fla's chunked Gated DeltaNet pipeline (WY / UT form), with documents. A row is cut
into chunks of C tokens; within a chunk the delta rule is a unit lower-triangular system
(I + A) U = R whose inverse T = (I + A)^-1 turns the C sequential rank-one updates into
matmuls (gpu_kernels.py has the chunk algebra and its gradient). Only the [K, V] state crosses
chunks, so one small kernel is sequential and the rest is parallel over chunks.

Kernels and grids (B batch, H query heads, G kv heads, NT chunks, NV = V / BV value tiles):
  forward
    intra    (B, H, NT)  A (fp32) -> T by 16x16 forward substitution + block merges
                         -> W = T (kw . K), U~ = T (beta . V)                  [, T]
    state    (B, H, NV)  sequential over chunks, S[:, vb] [K, BV] fp32 in registers
                         -> h (state entering each chunk), U = U~ - W h, final state
    output   (B, H, NT)  O = scale [(wq . Q) h + ((Q K^T) . D) U]
  backward
    intra, state again (T, h and U are recomputed, never saved)
    dstate   (B, H, NV)  reverse over chunks, dS[:, vb] fp32 in registers -> dh per chunk, dS0
    grad_wy  (B, H, NT)  chunk-local gradients through T and the state: dU, dR = T^T dU,
                         dA = -dR U^T -> dv, dbeta, the WY / state part of dk and dG
    grad_o   (B, H, NT)  chunk-local gradients through O = scale [(wq . Q) S0 + P U]
                         -> dq, dk and dG completed (grad_wy's partials are its inputs)
  and outside the kernels: the sum of dk, dv over each GQA group, dg = reverse cumsum of dG
  within each chunk (G is a chunk-local cumsum; the state carries the rest). The chunk-local
  gradient is split in two kernels because one kernel holding both halves' [C, C] and
  [C, K] fp32 tiles spilled 3.6 KB per thread (bf16, K = V = 128, C = 64, sm_90a); split,
  the WY half spills 1.8 KB there and nothing else more than 176 bytes.
Programs are independent (no cross-program communication), as Triton requires.

GQA: k and v keep their G heads in memory; the BlockSpec index maps send query head h to kv
head h // (H // G). A, T, W and U depend on the query head (beta and g are per query head),
so they are computed per query head; dk and dv are produced per query head (fp32 when H > G)
and summed over each group outside the kernels.

Memory policy (fla's): the custom_vjp saves only its inputs (q, k, v, fp32 beta and log decay,
int32 document ids and reach flags, the initial state). Intermediates in HBM: the forward
writes W, U~, U (q/v-sized, in the dot dtype) and the per-chunk states h [B, H, NT*K, V]
fp32 (T/C states per head, about 2x q for K = V = 128, C = 64); the backward rewrites those
plus T [B, Tp, H, C] fp32, the state gradients dh (as h) and grad_wy's fp32 partial dk.
No per-token state is stored.

Documents: `common.prepare` zeroes k, v, beta and g at padding (the step becomes the identity)
and numbers the documents of a row (`doc`). Per token, `reach` says whether the state entering
the token's chunk reaches it (no reset in between); the kernels derive the rest (same-document
pairs, the last document's writes, whether the state survives the chunk) from `doc`.

Shape rules and refusals. Served: K and V powers of two in [16, 256] (Triton tiles: every
array a power of two, tensor-core dots need dims >= 16); any T (padded to the chunk); H % G ==
0; q/k/v float32, bfloat16 or float16 (mixed dtypes promoted); any power-of-two chunk_size,
used as a hint: clamped to 16..64 and to the sequence length (the result does not depend on
the chunk). Refused with NotImplementedError, before any work, so that `dispatch` falls back:
other head dims, and a non-GPU platform unless interpret=True.

Numerics. A, T, states, gates and every accumulation are fp32. The triangular inverse is
fp32 throughout (elementwise forward substitution on the 16x16 diagonal blocks, fp32 matmuls
for the merges: 3-pass tf32 on GPU, exact in interpret mode); it is well conditioned only for
L2-normalised keys and beta in (0, 2) (the api guarantees the first, the mixers the second).
Other matmul operands are bf16 for bf16 inputs (the fp32 state, T and U rounded to bf16 as
operands, as in fla), fp32 with 3-pass tf32 for fp32 inputs on GPU (exact fp32 in interpret
mode) and fp32 with tf32 for fp16 inputs. Every exponent is <= 0 (decays relative to the
chunk start; masked entries become -inf before the exp).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.delta_rule import common
from pallas_kernels.delta_rule import gpu_kernels as kern

F32 = jnp.float32
CHUNKS = (16, 32, 64)
HEAD_DIMS = (16, 32, 64, 128, 256)
# Tuning knobs (module constants so that a benchmark can sweep them). Not yet timed on a GPU;
# checked on CPU by compiling the lowered Triton IR for sm_90a with the `triton` package
# (pallas_kernels/lowering.py), chunk 64, fwd + bwd. bf16, K = V = 64: no spill except 232 B
# in grad_wy; K = V = 128: up to 100 KB shared memory (dstate), spills 176 B (dstate) and
# 1.8 KB (grad_wy); K = V = 256: up to 165 KB shared memory, spills 1 KB (dstate) and
# 8 KB (grad_wy).
# fp32 inputs (3-pass tf32 dots) spill 0.3-9.6 KB per kernel at K = V = 128 (grad_wy most).
BLOCK_V = 64        # V tile of the sequential kernels and of the V loops (smaller V: whole)
WIDE_BLOCK_V = 32   # the same for fp32 operands (fp32 / fp16 inputs), which need 2x the memory
NUM_STAGES = 2      # software pipelining of the next chunk's loads in the sequential kernels


def delta_rule(q, k, v, beta, log_decay, initial_state, segment_ids, *, scale: float,
               chunk_size: int, interpret: bool = False):
    """q [B,T,H,K], k [B,T,G,K], v [B,T,G,V], beta [B,T,H], log_decay None | [B,T,H],
    initial_state None | [B,H,K,V], segment_ids None | int [B,T] -> (o [B,T,H,V] in q.dtype,
    final state [B,H,K,V] fp32). q and k are expected L2-normalised (api.py). `interpret=True`
    runs the kernels in Pallas interpret mode (any backend, e.g. CPU tests). Raises
    NotImplementedError for what it cannot serve."""
    pw.check_triton_supported(q, v, interpret, HEAD_DIMS)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    cdt = jnp.result_type(q.dtype, k.dtype, v.dtype)
    out_dtype = q.dtype
    q, k, v = q.astype(cdt), k.astype(cdt), v.astype(cdt)
    # chunk_size is a hint: clamped to CHUNKS and never more than the sequence needs.
    chunk = min(max(chunk_size, CHUNKS[0]), CHUNKS[-1], max(CHUNKS[0], pl.next_power_of_2(t)))
    prep = common.prepare(q, k, v, beta, log_decay, segment_ids, chunk)
    tp = prep.q.shape[1]
    wide = cdt != jnp.bfloat16   # matmul operands in fp32
    cfg = kern.Config(
        chunk=chunk, num_chunks=tp // chunk, scale=float(scale), heads=h, kv_heads=k.shape[2],
        key_dim=dk, block_v=min(dv, WIDE_BLOCK_V if wide else BLOCK_V),
        dot_dtype=jnp.dtype(F32) if wide else jnp.dtype(jnp.bfloat16),
        precision=pw.triton_precision(cdt, interpret),
        inv_precision=pw.triton_precision(F32, interpret),
        has_g=log_decay is not None, has_s0=initial_state is not None, with_t=False,
        num_stages=1 if wide else NUM_STAGES)
    s0 = None if initial_state is None else initial_state.astype(F32)
    g = prep.g if log_decay is not None else None
    o, s_final = _core(cfg, bool(interpret), prep.q, prep.k, prep.v, prep.beta, g, prep.doc,
                       _reach(prep.doc, chunk), s0)
    return common.finish(o, prep.valid).astype(out_dtype), s_final


def _reach(doc, chunk: int):
    """int32 [B, Tp]: 1 where the state entering the token's chunk reaches the token (same
    document as the token before the chunk; the row's first document for the first chunk)."""
    b, tp = doc.shape
    d = doc.reshape(b, tp // chunk, chunk)
    before = jnp.concatenate([jnp.zeros((b, 1), doc.dtype), d[:, :-1, -1]], axis=1)
    return (d == before[:, :, None]).reshape(b, tp).astype(jnp.int32)


# ----------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(cfg, interpret, q, k, v, beta, g, doc, reach, s0):
    """Prepared (padded) inputs -> (o [B,Tp,H,V] in q.dtype, final state [B,H,K,V] fp32)."""
    return _forward(cfg, interpret, q, k, v, beta, g, doc, reach, s0)


def _core_fwd(cfg, interpret, q, k, v, beta, g, doc, reach, s0):
    out = _forward(cfg, interpret, q, k, v, beta, g, doc, reach, s0)
    return out, (q, k, v, beta, g, doc, reach, s0)


def _forward(cfg, interpret, q, k, v, beta, g, doc, reach, s0):
    w, ut, _ = _intra(cfg, interpret, k, v, beta, g, doc, reach, with_t=False)
    hs, u, s_final = _state(cfg, interpret, k, w, ut, g, doc, reach, s0)
    return _output(cfg, interpret, q, k, u, g, doc, reach, hs), s_final


def _core_bwd(cfg, interpret, res, cotangents):
    q, k, v, beta, g, doc, reach, s0 = res
    do, ds_final = cotangents
    do = do.astype(q.dtype)
    w, ut, t = _intra(cfg, interpret, k, v, beta, g, doc, reach, with_t=True)
    hs, u, _ = _state(cfg, interpret, k, w, ut, g, doc, reach, s0)
    dhs, ds0 = _dstate(cfg, interpret, q, k, do, t, beta, g, doc, reach, ds_final.astype(F32))
    dq, dk, dv, dbeta, d_g = _grads(cfg, interpret, q, k, v, do, u, t, beta, g, doc, reach,
                                    hs, dhs)
    # per query head [B,Tp,H,D] -> per kv head [B,Tp,G,D]
    dk = pw.sum_kv_groups(dk, cfg.kv_heads, axis=2).astype(k.dtype)
    dv = pw.sum_kv_groups(dv, cfg.kv_heads, axis=2).astype(v.dtype)
    dg = None
    if cfg.has_g:   # G = cumsum of g within each chunk: dg = reverse cumsum of dG per chunk
        b, tp, h = d_g.shape
        d_g = d_g.reshape(b, cfg.num_chunks, cfg.chunk, h)
        dg = lax.cumsum(d_g, axis=2, reverse=True).reshape(b, tp, h).astype(g.dtype)
    return dq, dk, dv, dbeta.astype(beta.dtype), dg, None, None, ds0


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------- pallas_calls

_call = pw.named_pallas_call


def _params(cfg, tile_elems: int, stages: int = 1):
    """Triton launch parameters: 8 warps once the fp32 tiles a program holds are large (a
    [K, BV] state or a [C, D] tile of 64 x 64 or more; the chunk kernels count their [C, C]
    tiles twice, so C = 64 takes 8), else 4."""
    del cfg
    return pltriton.CompilerParams(num_warps=4 if tile_elems < 64 * 64 else 8,
                                   num_stages=stages)


class _Specs:
    """BlockSpecs of one call. Per-chunk kernels (grid (B, H, NT)) see one chunk of a token
    tensor; sequential kernels (grid (B, H, NV)) see whole rows and tile V."""

    def __init__(self, cfg, tp):
        self.c, self.tp, self.cfg = cfg.chunk, tp, cfg
        rep = cfg.heads // cfg.kv_heads
        self.head = {"q": lambda h: h, "kv": lambda h: h // rep}

    def chunk_tok(self, d, heads="q"):
        head = self.head[heads]
        return pl.BlockSpec((None, self.c, None, d), lambda b, h, c: (b, c, head(h), 0))

    def chunk_head(self):          # beta, g, dbeta, dG: [B, Tp, H] -> [C]
        return pl.BlockSpec((None, self.c, None), lambda b, h, c: (b, c, h))

    def chunk_row(self):           # doc, reach: [B, Tp] -> [C]
        return pl.BlockSpec((None, self.c), lambda b, h, c: (b, c))

    def chunk_t(self):             # T: [B, Tp, H, C] -> [C, C]
        return pl.BlockSpec((None, self.c, None, self.c), lambda b, h, c: (b, c, h, 0))

    def chunk_state(self, dk, dv):  # h, dh: [B, H, NT*K, V] -> [K, V]
        return pl.BlockSpec((None, None, dk, dv), lambda b, h, c: (b, h, c, 0))

    def row_tok(self, d, heads="q", tiled=False):
        head = self.head[heads]
        return pl.BlockSpec((None, self.tp, None, d),
                            lambda b, h, j: (b, 0, head(h), j if tiled else 0))

    def row_head(self):            # [B, Tp, H] -> [Tp]
        return pl.BlockSpec((None, self.tp, None), lambda b, h, j: (b, 0, h))

    def row_row(self):             # [B, Tp] -> [Tp]
        return pl.BlockSpec((None, self.tp), lambda b, h, j: (b, 0))

    def row_t(self):               # T: [B, Tp, H, C] -> [Tp, C]
        return pl.BlockSpec((None, self.tp, None, self.c), lambda b, h, j: (b, 0, h, 0))

    def row_states(self, dk, bv):  # h, dh: [B, H, NT*K, V] -> [NT*K, BV]
        return pl.BlockSpec((None, None, self.cfg.num_chunks * dk, bv),
                            lambda b, h, j: (b, h, 0, j))

    def state(self, dk, bv):       # s0, sT, dsT, ds0: [B, H, K, V] -> [K, BV]
        return pl.BlockSpec((None, None, dk, bv), lambda b, h, j: (b, h, 0, j))


def _intra(cfg, interpret, k, v, beta, g, doc, reach, *, with_t):
    b, tp, _, dk = k.shape
    dv, h = v.shape[-1], cfg.heads
    cfg = dataclasses.replace(cfg, with_t=with_t)
    sp = _Specs(cfg, tp)
    inputs = [("k", k, sp.chunk_tok(dk, "kv")), ("v", v, sp.chunk_tok(dv, "kv")),
              ("beta", beta, sp.chunk_head()), ("g", g, sp.chunk_head()),
              ("doc", doc, sp.chunk_row()), ("reach", reach, sp.chunk_row())]
    dot = cfg.dot_dtype
    outputs = [("w", jax.ShapeDtypeStruct((b, tp, h, dk), dot), sp.chunk_tok(dk)),
               ("ut", jax.ShapeDtypeStruct((b, tp, h, dv), dot), sp.chunk_tok(dv))]
    if with_t:
        outputs.append(("t", jax.ShapeDtypeStruct((b, tp, h, cfg.chunk), F32), sp.chunk_t()))
    res = _call(kern.intra_kernel, cfg, interpret, (b, h, cfg.num_chunks), inputs, outputs,
                "delta_rule_intra",
                _params(cfg, max(cfg.chunk * max(dk, dv), 2 * cfg.chunk * cfg.chunk)))
    return res[0], res[1], (res[2] if with_t else None)


def _state(cfg, interpret, k, w, ut, g, doc, reach, s0):
    b, tp, h, dk = w.shape
    dv, bv = ut.shape[-1], cfg.block_v
    sp = _Specs(cfg, tp)
    inputs = [("k", k, sp.row_tok(dk, "kv")), ("w", w, sp.row_tok(dk)),
              ("ut", ut, sp.row_tok(bv, tiled=True)), ("g", g, sp.row_head()),
              ("doc", doc, sp.row_row()), ("reach", reach, sp.row_row()),
              ("s0", s0, sp.state(dk, bv))]
    outputs = [("h", jax.ShapeDtypeStruct((b, h, cfg.num_chunks * dk, dv), F32),
                sp.row_states(dk, bv)),
               ("u", jax.ShapeDtypeStruct((b, tp, h, dv), cfg.dot_dtype),
                sp.row_tok(bv, tiled=True)),
               ("sT", jax.ShapeDtypeStruct((b, h, dk, dv), F32), sp.state(dk, bv))]
    hs, u, s_final = _call(kern.state_kernel, cfg, interpret, (b, h, dv // bv), inputs, outputs,
                           "delta_rule_state",
                           _params(cfg, max(dk * bv, cfg.chunk * dk), cfg.num_stages))
    return hs, u, s_final


def _output(cfg, interpret, q, k, u, g, doc, reach, hs):
    b, tp, h, dk = q.shape
    dv = u.shape[-1]
    sp = _Specs(cfg, tp)
    inputs = [("q", q, sp.chunk_tok(dk)), ("k", k, sp.chunk_tok(dk, "kv")),
              ("u", u, sp.chunk_tok(dv)), ("g", g, sp.chunk_head()),
              ("doc", doc, sp.chunk_row()), ("reach", reach, sp.chunk_row()),
              ("h", hs, sp.chunk_state(dk, dv))]
    outputs = [("o", jax.ShapeDtypeStruct((b, tp, h, dv), q.dtype), sp.chunk_tok(dv))]
    (o,) = _call(kern.output_kernel, cfg, interpret, (b, h, cfg.num_chunks), inputs, outputs,
                 "delta_rule_output", _params(cfg, max(dk * cfg.block_v, cfg.chunk * dk)))
    return o


def _dstate(cfg, interpret, q, k, do, t, beta, g, doc, reach, ds_final):
    b, tp, h, dk = q.shape
    dv, bv = do.shape[-1], cfg.block_v
    sp = _Specs(cfg, tp)
    inputs = [("q", q, sp.row_tok(dk)), ("k", k, sp.row_tok(dk, "kv")),
              ("do", do, sp.row_tok(bv, tiled=True)), ("t", t, sp.row_t()),
              ("beta", beta, sp.row_head()), ("g", g, sp.row_head()),
              ("doc", doc, sp.row_row()), ("reach", reach, sp.row_row()),
              ("dsT", ds_final, sp.state(dk, bv))]
    outputs = [("dh", jax.ShapeDtypeStruct((b, h, cfg.num_chunks * dk, dv), F32),
                sp.row_states(dk, bv))]
    if cfg.has_s0:
        outputs.append(("ds0", jax.ShapeDtypeStruct((b, h, dk, dv), F32), sp.state(dk, bv)))
    res = _call(kern.dstate_kernel, cfg, interpret, (b, h, dv // bv), inputs, outputs,
                "delta_rule_dstate",
                _params(cfg, max(dk * bv, cfg.chunk * dk, 2 * cfg.chunk * cfg.chunk),
                        cfg.num_stages))
    return res[0], (res[1] if cfg.has_s0 else None)


def _grads(cfg, interpret, q, k, v, do, u, t, beta, g, doc, reach, hs, dhs):
    b, tp, h, dk = q.shape
    dv = v.shape[-1]
    sp = _Specs(cfg, tp)
    common_in = [("beta", beta, sp.chunk_head()), ("g", g, sp.chunk_head()),
                 ("doc", doc, sp.chunk_row()), ("reach", reach, sp.chunk_row())]
    inputs = [("q", q, sp.chunk_tok(dk)), ("k", k, sp.chunk_tok(dk, "kv")),
              ("v", v, sp.chunk_tok(dv, "kv")), ("do", do, sp.chunk_tok(dv)),
              ("u", u, sp.chunk_tok(dv)), ("t", t, sp.chunk_t()), *common_in,
              ("h", hs, sp.chunk_state(dk, dv)), ("dh", dhs, sp.chunk_state(dk, dv))]
    grouped = cfg.heads != cfg.kv_heads
    tok = lambda d, dtype: jax.ShapeDtypeStruct((b, tp, h, d), F32 if grouped else dtype)
    per_token = jax.ShapeDtypeStruct((b, tp, h), F32)
    outputs = [("dk", jax.ShapeDtypeStruct((b, tp, h, dk), F32), sp.chunk_tok(dk)),
               ("dv", tok(dv, v.dtype), sp.chunk_tok(dv)),
               ("dbeta", per_token, sp.chunk_head())]
    if cfg.has_g:
        outputs.append(("dG", per_token, sp.chunk_head()))
    width = max(cfg.chunk * dk, cfg.chunk * cfg.block_v, 2 * cfg.chunk * cfg.chunk)
    res = _call(kern.grad_wy_kernel, cfg, interpret, (b, h, cfg.num_chunks), inputs, outputs,
                "delta_rule_grad_wy", _params(cfg, width))
    dk_wy, dv_out, dbeta = res[:3]
    inputs = [("q", q, sp.chunk_tok(dk)), ("k", k, sp.chunk_tok(dk, "kv")),
              ("do", do, sp.chunk_tok(dv)), ("u", u, sp.chunk_tok(dv)), *common_in[1:],
              ("h", hs, sp.chunk_state(dk, dv)), ("dk_wy", dk_wy, sp.chunk_tok(dk)),
              ("dG_wy", res[3] if cfg.has_g else None, sp.chunk_head())]
    outputs = [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype), sp.chunk_tok(dk)),
               ("dk", tok(dk, k.dtype), sp.chunk_tok(dk))]
    if cfg.has_g:
        outputs.append(("dG", per_token, sp.chunk_head()))
    res = _call(kern.grad_o_kernel, cfg, interpret, (b, h, cfg.num_chunks), inputs, outputs,
                "delta_rule_grad_o", _params(cfg, width))
    return res[0], res[1], dv_out, dbeta, (res[2] if cfg.has_g else None)

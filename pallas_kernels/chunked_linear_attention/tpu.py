"""Chunked linear attention as Pallas Mosaic (TPU) kernels, forward and backward.

    o, state = chunked_linear_attention(q, k, v, log_decay, initial_state, segment_ids,
                                        scale=..., chunk_size=64, interpret=False)

Same contract as reference.py (see api.py); registered under "tpu" by api.py. Dimension letters
as in common.py; Tp = T padded to a multiple of the chunk C; n = Tp / C chunks.

Algorithm (per batch row b and query head h; fla's chunk template with the state kept on chip).
Within a chunk, G_i = sum_{t <= i} g_t is the chunk-local inclusive cumsum of the log decay
(computed outside the kernel), so every exponent below is a difference of at most C steps:
    A_ij = scale q_i . (k_j exp(G_i - G_j))        j <= i, same document       [C, C]
    o    = A v + reach * scale (q exp(G)) S                                      [C, V]
    S   <- survive * exp(G_L) S + sum_j to_end_j (k_j exp(G_L - G_j)) v_j^T      [K, V] fp32
where S is the state after the previous chunk, G_L the chunk's last cumsum, reach_i = no
document reset between the previous chunk's end and token i, to_end_j = token j is in the
chunk's last document, survive = no reset inside the chunk. Per-head (scalar) decay forms
exp(G_i - G_j) exactly as a [C, C] matrix. Per-channel decay cannot (the pair decay differs per
key channel), so the chunk is split into 16-token sub-chunks: pairs in different sub-chunks use
one matmul against a reference gate between them (both factors have exponents <= 0, nothing
overflows), pairs inside a sub-chunk are summed exactly token by token (tpu_kernels.py).

Grid and blocks. Every kernel runs over grid (B, H, n), semantics ("parallel", "parallel",
"arbitrary"): the chunk axis is a sequential loop on one core, and the fp32 [K, V] state (or its
gradient) lives in a VMEM scratch buffer across it, initialised at the first chunk and written
out at the last one through an output block whose index does not move along the chunk axis.
Inputs are transposed to head-major [B, H, Tp, D] outside, so a q / k / v / o block is a
[C, D] slice; kv heads are shared through the index map (query head h reads kv head
h // (H // G)). The TPU block rule (last two block dims divisible by (8, 128) or equal to the
array's) holds because D is the full last dim and C is a multiple of 8; per-token rows are
laid out [B, (H,) n, 1, C] with a [1, C] block (doc numbers; per-head decay), never as a
trailing dim of 1, which HBM would pad to 128 lanes.

Kernels (tpu_kernels.py):
  forward   q, k, v, gate, doc, S0 -> o, S_T.
  dq        forward sweep, recomputes the chunk states: dq = scale (dL/dA-weighted keys +
            reach exp(G) (S dO)).
  dk, dv    reverse sweep (index maps read chunk n-1-i at step i), carries dS, the gradient of
            the state after the chunk, from dS_T down to dS0; dk, dv are per query head and
            summed over each kv group outside.
  dg        outside, by the identity dA_t = q_t . dq_t - k_t . dk_t (+ sum(dS_T * S_T) at the
            last position) for the global cumsum A of g, then a reverse cumsum over time; it
            holds with document resets too, because q only enters as q_t exp(A_t), k as
            k_t exp(-A_t) and the final state carries exp(A_T). Summed over K for per-head decay.
Saved residuals: the (prepared, head-major) inputs q, k, v, g, S0, the doc numbers and the
final state S_T ([B, H, K, V]); chunk states are recomputed, never stored.

Numerics: matmul operands are in the compute dtype (bfloat16 if q, k, v all are, else float32:
float16 and mixed inputs compute in float32), accumulation, decays and states are float32.

Refusals (NotImplementedError, raised before any work): not on a TPU backend with
interpret=False; chunk_size not in CHUNK_SIZES; head dims K or V not a multiple of 8 or above
MAX_HEAD_DIM.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.chunked_linear_attention import common
from pallas_kernels.chunked_linear_attention import tpu_kernels as kernels

F32 = common.F32
CHUNK_SIZES = (16, 32, 64, 128)
MAX_HEAD_DIM = 256  # [K, V] fp32 state and [C, K] fp32 temporaries stay far below scoped VMEM


def refusal(q, v, log_decay, chunk_size: int, interpret: bool) -> str | None:
    """Why these kernels cannot serve the call, or None if they can."""
    return pw.mosaic_platform_refusal(interpret) or shape_refusal(q, v, log_decay, chunk_size)


def shape_refusal(q, v, log_decay, chunk_size: int) -> str | None:
    """Shape / option part of `refusal` (independent of the platform)."""
    del log_decay  # every decay form (None, per head, per channel) is served
    return pw.mosaic_shape_refusal(q, v, chunk_size, CHUNK_SIZES, MAX_HEAD_DIM)


def chunked_linear_attention(q, k, v, log_decay, initial_state, segment_ids, *, scale: float,
                             chunk_size: int, interpret: bool = False):
    """q [B,T,H,K], k [B,T,G,K], v [B,T,G,V], log_decay None | [B,T,H] | [B,T,H,K],
    initial_state None | [B,H,K,V], segment_ids None | int [B,T] -> (o [B,T,H,V] in q.dtype,
    final state [B,H,K,V] fp32). Raises NotImplementedError (see the module docstring) before
    any work when it cannot serve the call."""
    reason = refusal(q, v, log_decay, int(chunk_size), interpret)
    if reason is not None:
        raise NotImplementedError(reason)
    return chunked(q, k, v, log_decay, initial_state, segment_ids, scale=scale,
                   chunk_size=int(chunk_size), interpret=interpret)


@dataclasses.dataclass(frozen=True)
class _Config:
    mode: str  # "none" | "scalar" | "channel"
    scale: float
    chunk: int
    interpret: bool


def chunked(q, k, v, log_decay, initial_state, segment_ids, *, scale: float, chunk_size: int,
            interpret: bool = False):
    """The kernels without the platform check: `interpret=False` stages Mosaic custom calls on
    any platform, which is how tests lower them for TPU on a CPU-only machine (jax.export)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    reason = shape_refusal(q, v, log_decay, chunk_size)
    if reason is not None:
        raise NotImplementedError(reason)
    mode = "none" if log_decay is None else ("scalar" if log_decay.ndim == 3 else "channel")
    p = common.prepare(q, k, v, log_decay, segment_ids, chunk_size)
    cd = jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in (q, k, v)) else F32
    head_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B, Tp, heads, ...] -> [B, heads, Tp, ...]
    qh, kh, vh = (head_major(x).astype(cd) for x in (p.q, p.k, p.v))
    gh = None if mode == "none" else head_major(p.g)                     # fp32
    s0 = (jnp.zeros((b, h, dk, dv), F32) if initial_state is None
          else initial_state.astype(F32))
    o, s_t = _core(qh, kh, vh, gh, s0, pw.relative_docs(p.doc, chunk_size),
                   _Config(mode, float(scale), chunk_size, bool(interpret)))
    o = common.finish(head_major(o), p.valid)
    return o.astype(q.dtype), s_t


def _kernel_gate(g, cfg: _Config):
    """Head-major g [B,H,Tp] / [B,H,Tp,K] -> the kernels' chunk-local inclusive cumsum:
    [B,H,n,1,C] (per head) / [B,H,Tp,K] (per channel); None without decay."""
    if cfg.mode == "none":
        return None
    b, h, tp = g.shape[:3]
    c = cfg.chunk
    local = jnp.cumsum(g.reshape(b, h, tp // c, c, *g.shape[3:]), axis=3)
    return local[:, :, :, None, :] if cfg.mode == "scalar" else local.reshape(g.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(q, k, v, g, s0, doc, cfg: _Config):
    """Head-major q [B,H,Tp,K], k [B,G,Tp,K], v [B,G,Tp,V] (compute dtype), g None | fp32
    [B,H,Tp] | [B,H,Tp,K], s0 fp32 [B,H,K,V], doc fp32 [B,n,1,C] -> (o [B,H,Tp,V], S_T)."""
    return _core_fwd(q, k, v, g, s0, doc, cfg)[0]


def _core_fwd(q, k, v, g, s0, doc, cfg: _Config):
    o, s_t = kernels.forward(q, k, v, _kernel_gate(g, cfg), doc, s0, mode=cfg.mode,
                             scale=cfg.scale, chunk=cfg.chunk, interpret=cfg.interpret)
    return (o, s_t), (q, k, v, g, s0, doc, s_t)


def _core_bwd(cfg: _Config, residuals, cotangents):
    q, k, v, g, s0, doc, s_t = residuals
    do, ds_t = cotangents
    b, h, tp, dk = q.shape
    n_kv, dv = k.shape[1], v.shape[-1]
    gate = _kernel_gate(g, cfg)
    opts = dict(mode=cfg.mode, scale=cfg.scale, chunk=cfg.chunk, interpret=cfg.interpret)
    do = do.astype(q.dtype)
    ds_t = ds_t.astype(F32)
    dq = kernels.backward_dq(k, v, gate, doc, s0, do, heads=h, **opts)
    dk_h, dv_h, ds0 = kernels.backward_dkdv(q, k, v, gate, doc, do, ds_t, **opts)
    dg = None
    if g is not None:
        # gradient of the global cumsum A of g: q enters as q exp(A), k as k exp(-A), S_T as
        # exp(A_T) S_T; then dg_t = sum_{s >= t} dA_s
        k_h = jnp.repeat(k, h // n_kv, axis=1) if n_kv != h else k
        da = q.astype(F32) * dq - k_h.astype(F32) * dk_h                    # [B,H,Tp,K]
        last = jnp.sum(ds_t * s_t, axis=-1)                                 # [B,H,K]
        if cfg.mode == "scalar":
            da, last = jnp.sum(da, axis=-1), jnp.sum(last, axis=-1)
        da = da.at[:, :, tp - 1].add(last)
        dg = jax.lax.cumsum(da, axis=2, reverse=True)
    dk = pw.sum_kv_groups(dk_h, n_kv, axis=1).astype(k.dtype)  # per query head -> per kv head
    dv = pw.sum_kv_groups(dv_h, n_kv, axis=1).astype(v.dtype)
    return (dq.astype(q.dtype), dk, dv,
            dg, ds0, jnp.zeros_like(doc))


_core.defvjp(_core_fwd, _core_bwd)

"""The (gated) delta rule as Pallas Mosaic (TPU) kernels, forward and backward.

    o, state = delta_rule(q, k, v, beta, log_decay, initial_state, segment_ids,
                          scale=..., chunk_size=64, interpret=False)

Same contract as reference.py (see api.py); registered under "tpu" by api.py. Dimension letters
as in common.py; Tp = T padded to a multiple of the chunk C; n = Tp / C chunks.

Algorithm (per batch row b and query head h): the WY / UT form of fla's chunked delta rule,
with the state kept on chip. In a chunk, G_i = sum_{t <= i} g_t is the chunk-local inclusive
cumsum of the log decay (computed outside the kernel), so every exponent is a difference of at
most C steps, and S is the state entering the chunk:
    A_ij = beta_i exp(G_i - G_j) k_i . k_j       j < i, same document (else 0)   [C, C]
    T    = (I + A)^{-1}                          unit lower triangular, by substitution
    W    = T diag(beta exp(G) reach) K,   U = T diag(beta) V - W S            ("new values")
    o_i  = scale (reach_i exp(G_i) q_i S + sum_{j <= i, same doc} exp(G_i - G_j) (q_i . k_j) U_j)
    S   <- survive exp(G_L) S + sum_j to_end_j exp(G_L - G_j) k_j U_j^T
with G_L the chunk's last cumsum, reach_i = no document reset between the previous chunk's end
and token i, to_end_j = token j is in the chunk's last document, survive = no reset in the
chunk. A is block diagonal over the chunk's documents, so T and W never mix documents. T is
formed by forward substitution inside 16 x 16 diagonal blocks, then block rows are merged
(tpu_kernels.unit_lower_inverse); never by matrix powers. It is well conditioned only for
unit-norm keys and beta in (0, 2), which api.py and the mixers guarantee.

Backward (per chunk, reverse order; dS' the gradient of the state after the chunk):
    dU  = scale P^T dO + ke dS'                  (P the masked, decayed q k^T; ke the keys
                                                  scaled into the end state)
    dW  = -dU S^T;  dT = dW Kb^T + dU Vb^T;  dKb = T^T dW;  dVb = T^T dU
    dA  = -T^T dT T^T on A's support (strictly lower, same document)
    dS  = survive exp(G_L) dS' + scale (reach exp(G) Q)^T dO - W^T dU
and from these dq, dk, dv, dbeta and dG (the gradient w.r.t. the chunk-local cumsum) by the
chain rule through the products above (tpu_kernels._backward_kernel). Outside the kernel:
dg = a chunk-local reverse cumsum of dG, dk / dv summed over each kv group, and the padding
and document folding of common.prepare is differentiated by JAX.

Grid and blocks. Both kernels run over grid (B, H, n), semantics ("parallel", "parallel",
"arbitrary"): the chunk axis is a sequential loop on one core and the fp32 [K, V] state (or its
gradient) lives in a VMEM scratch buffer across it, initialised at the first chunk and written
out at the last one through an output block whose index does not move along the chunk axis.
Inputs are transposed to head-major [B, H, Tp, D] outside, so a q / k / v / o block is a
[C, D] slice; kv heads are shared through the index map (query head h reads kv head
h // (H // G)). Per-token scalars (beta, G, doc numbers, and the dbeta / dG outputs) are laid
out [B, (H,) n, 1, C] with a [1, C] block, never as a trailing dim of 1, which HBM would pad to
128 lanes. The TPU block rule (last two block dims divisible by (8, 128) or equal to the
array's) holds because D is the full last dim and C is a multiple of 8.

Kernels (tpu_kernels.py):
  forward      q, k, v, beta, G, doc, S0 -> o, S_T.
  states       the same sweep, writing the state entering every chunk [B, H, n, K, V] instead
               of outputs (the backward's recompute).
  backward     reverse sweep (index maps read chunk n-1-i at step i): recomputes A, T, W, U
               from the inputs and the chunk's entering state, carries dS from dS_T down to
               dS0, writes dq, dk, dv (per query head), dbeta and dG.
Memory policy: the saved residuals are the (prepared, head-major) inputs, S0 and the doc
numbers; no per-token state is ever stored, and per-chunk states ([B, H, n, K, V] fp32, about
2x q for K = V = 128, C = 64) exist only inside the backward, recomputed by the states sweep
(as fla's GDN backward recomputes h).

Numerics: matmul operands are in the compute dtype (bfloat16 if q, k, v all are, else float32:
float16 and mixed inputs compute in float32) except the triangular algebra (A, T and every
product with T, forward and backward), which is float32 throughout; accumulation, decays,
beta and states are float32.

Refusals (NotImplementedError, raised before any work): not on a TPU backend with
interpret=False; chunk_size not in CHUNK_SIZES; head dims K or V not a multiple of 8 or above
MAX_HEAD_DIM. Lowering for TPU is checked (jax.export on CPU) at K = V = 64 and 128; smaller
multiples of 8 (the conformance suite's K = 16, V = 32) run in interpret mode.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.delta_rule import common
from pallas_kernels.delta_rule import tpu_kernels as kernels

F32 = common.F32
CHUNK_SIZES = (16, 32, 64)  # multiples of the 16-row inverse blocks; fla's range
MAX_HEAD_DIM = 256  # [K, V] fp32 state, [C, K] and [C, C] fp32 temporaries stay far below VMEM


def refusal(q, v, chunk_size: int, interpret: bool) -> str | None:
    """Why these kernels cannot serve the call, or None if they can."""
    return pw.mosaic_platform_refusal(interpret) or shape_refusal(q, v, chunk_size)


def shape_refusal(q, v, chunk_size: int) -> str | None:
    """Shape / option part of `refusal` (independent of the platform)."""
    return pw.mosaic_shape_refusal(q, v, chunk_size, CHUNK_SIZES, MAX_HEAD_DIM)


def delta_rule(q, k, v, beta, log_decay, initial_state, segment_ids, *, scale: float,
               chunk_size: int, interpret: bool = False):
    """q [B,T,H,K], k [B,T,G,K], v [B,T,G,V], beta [B,T,H], log_decay None | [B,T,H],
    initial_state None | [B,H,K,V], segment_ids None | int [B,T] -> (o [B,T,H,V] in q.dtype,
    final state [B,H,K,V] fp32). q and k already L2-normalised (api.py). Raises
    NotImplementedError (see the module docstring) before any work when it cannot serve."""
    reason = refusal(q, v, int(chunk_size), interpret)
    if reason is not None:
        raise NotImplementedError(reason)
    return chunked(q, k, v, beta, log_decay, initial_state, segment_ids, scale=scale,
                   chunk_size=int(chunk_size), interpret=interpret)


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    chunk: int
    interpret: bool


def chunked(q, k, v, beta, log_decay, initial_state, segment_ids, *, scale: float,
            chunk_size: int, interpret: bool = False):
    """The kernels without the platform check: `interpret=False` stages Mosaic custom calls on
    any platform, which is how tests lower them for TPU on a CPU-only machine (jax.export)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    reason = shape_refusal(q, v, chunk_size)
    if reason is not None:
        raise NotImplementedError(reason)
    p = common.prepare(q, k, v, beta, log_decay, segment_ids, chunk_size)
    cd = jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in (q, k, v)) else F32
    head_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B, Tp, heads, ...] -> [B, heads, Tp, ...]
    qh, kh, vh = (head_major(x).astype(cd) for x in (p.q, p.k, p.v))
    gh = None if log_decay is None else head_major(p.g)                 # fp32
    s0 = (jnp.zeros((b, h, dk, dv), F32) if initial_state is None
          else initial_state.astype(F32))
    o, s_t = _core(qh, kh, vh, head_major(p.beta), gh, s0, pw.relative_docs(p.doc, chunk_size),
                   _Config(float(scale), chunk_size, bool(interpret)))
    o = common.finish(head_major(o), p.valid)
    return o.astype(q.dtype), s_t


def _rows(x, chunk):
    """[B, H, Tp] -> the kernels' per-token rows [B, H, n, 1, C]."""
    b, h, tp = x.shape
    return x.reshape(b, h, tp // chunk, 1, chunk)


def _local_cumsum(g, q, chunk):
    """Head-major g None | [B, H, Tp] -> chunk-local inclusive cumsum rows [B, H, n, 1, C]."""
    if g is None:
        b, h, tp = q.shape[:3]
        return jnp.zeros((b, h, tp // chunk, 1, chunk), F32)
    return jnp.cumsum(_rows(g, chunk), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _core(q, k, v, beta, g, s0, doc, cfg: _Config):
    """Head-major q [B,H,Tp,K], k [B,G,Tp,K], v [B,G,Tp,V] (compute dtype), beta fp32
    [B,H,Tp], g None | fp32 [B,H,Tp], s0 fp32 [B,H,K,V], doc fp32 [B,n,1,C]
    -> (o [B,H,Tp,V] compute dtype, S_T)."""
    return _core_fwd(q, k, v, beta, g, s0, doc, cfg)[0]


def _core_fwd(q, k, v, beta, g, s0, doc, cfg: _Config):
    c = cfg.chunk
    o, s_t = kernels.forward(q, k, v, _rows(beta, c), _local_cumsum(g, q, c), doc, s0,
                             scale=cfg.scale, chunk=c, interpret=cfg.interpret)
    return (o, s_t), (q, k, v, beta, g, s0, doc)


def _core_bwd(cfg: _Config, residuals, cotangents):
    q, k, v, beta, g, s0, doc = residuals
    do, ds_t = cotangents
    b, h, tp, _ = q.shape
    n_kv, c = k.shape[1], cfg.chunk
    opts = dict(scale=cfg.scale, chunk=c, interpret=cfg.interpret)
    beta_rows, gate = _rows(beta, c), _local_cumsum(g, q, c)
    states = kernels.forward(q, k, v, beta_rows, gate, doc, s0, states=True, **opts)
    dq, dk_h, dv_h, dbeta, dgate, ds0 = kernels.backward(
        q, k, v, beta_rows, gate, doc, states, do.astype(q.dtype), ds_t.astype(F32), **opts)
    # G = chunk-local cumsum of g: dg_t = sum of dG_i over i >= t in t's chunk
    dg = None if g is None else jnp.cumsum(dgate[..., ::-1], axis=-1)[..., ::-1].reshape(b, h, tp)
    dk = pw.sum_kv_groups(dk_h, n_kv, axis=1).astype(k.dtype)  # per query head -> per kv head
    dv = pw.sum_kv_groups(dv_h, n_kv, axis=1).astype(v.dtype)
    return (dq.astype(q.dtype), dk, dv,
            dbeta.reshape(b, h, tp), dg, ds0, jnp.zeros_like(doc))


_core.defvjp(_core_fwd, _core_bwd)

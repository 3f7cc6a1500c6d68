"""Argument checks and small pieces shared by every block-sparse attention implementation.

The op (api.py has the full contract): for batch row b, query head h, query i and key j,

    visible(b, h, i, j) = layout lists block (i // bq, j // bk) for (b, h) and it is FULL or
                          its pattern is True at (i % bq, j % bk),
                          and seg_q[b, i] == seg_k[b, j] != 0
    s_ij = scale q_i.k_j   (soft-capped: c tanh(s / c))
    softmax: o_i = sum_j p_ij v_j, p_ij = exp(s_ij - lse_i) over visible j,
             lse_i = log(sum_visible exp(s_ij) + exp(sink_h))      (no sink: that term is 0)
    sigmoid: o_i = sum_visible sigmoid(s_ij + bias) v_j

Dimension letters: B batch, Tq / Tk query / key lengths, H query heads, K kv heads (H % K == 0;
query head h reads kv head h // (H // K)), D q/k head dim, Dv value head dim; layout letters
(Bl, Hl, nq, nk, S, Sq, P, bq, bk) as in layout.py.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.layout import validate
from pallas_kernels.scores import check_score_options

F32 = jnp.float32
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check(q, k, v, layout, segment_ids, kv_segment_ids, *, score, sigmoid_bias, logit_softcap,
          sinks, scale) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or options are impossible."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be a 4-d array [B, T, heads, dim]; got shape "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} not supported; accepted: float32, "
                             f"bfloat16, float16")
    if not (q.dtype == k.dtype == v.dtype):
        # Kernels pick one matmul operand dtype; a silent upcast would hide a caller's bug.
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, tq, h, d = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    if tq == 0 or tk == 0:
        raise ValueError(f"empty sequence: q {q.shape}, k {k.shape}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {k.shape} must be [B, Tk, K, D] matching q {q.shape} in B and D")
    if kv_heads < 1 or h % kv_heads:
        raise ValueError(f"kv heads of k ({kv_heads}) must divide the query heads of q ({h})")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {v.shape} must be [B, Tk, K, Dv] with k's B, Tk, K = "
                         f"{tuple(k.shape[:3])}")
    # Shapes and dtypes of the lists (and their values, for numpy layouts): layout.py's check.
    validate(layout, batch=b, heads=h, q_len=tq, kv_len=tk, kv_heads=k.shape[2])
    for name, ids, t in (("segment_ids", segment_ids, tq), ("kv_segment_ids", kv_segment_ids, tk)):
        if ids is not None and (tuple(ids.shape) != (b, t)
                                or not jnp.issubdtype(ids.dtype, jnp.integer)):
            raise ValueError(f"{name} must be int [B, T] = [{b}, {t}]; got "
                             f"{ids.dtype}{list(ids.shape)}")
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("kv_segment_ids given without segment_ids: pass both (or neither)")
    if segment_ids is not None and kv_segment_ids is None and tq != tk:
        raise ValueError(f"kv_segment_ids is None, which reuses segment_ids for the keys, but "
                         f"Tq = {tq} != Tk = {tk}: pass kv_segment_ids [B, Tk]")
    check_score_options(score, sigmoid_bias, sinks, h)
    if logit_softcap is not None and not (isinstance(logit_softcap, numbers.Real)
                                          and 0 < logit_softcap < math.inf):
        raise ValueError(f"logit_softcap must be None or a finite float > 0, got "
                         f"{logit_softcap!r}")
    if scale is not None and not float(scale) > 0:
        raise ValueError(f"scale must be > 0 or None (1/sqrt(D)), got {scale}")


def segments(q, k, segment_ids, kv_segment_ids) -> tuple[jax.Array, jax.Array]:
    """(q_seg int32 [B, Tq], kv_seg int32 [B, Tk]): all ones when segment_ids is None; the
    query ids for the keys when only segment_ids is given (self-attention, Tq == Tk)."""
    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    if segment_ids is None:
        return jnp.ones((b, tq), jnp.int32), jnp.ones((b, tk), jnp.int32)
    q_seg = jnp.asarray(segment_ids).astype(jnp.int32)
    kv_seg = q_seg if kv_segment_ids is None else jnp.asarray(kv_segment_ids).astype(jnp.int32)
    return q_seg, kv_seg


def default_scale(q, scale) -> float:
    """scale as a Python float, default 1/sqrt(D)."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def softcap(s: jax.Array, cap: float | None) -> jax.Array:
    """c tanh(s / c) (Gemma-2's logit soft-cap), s itself when cap is None."""
    return s if cap is None else cap * jnp.tanh(s / cap)

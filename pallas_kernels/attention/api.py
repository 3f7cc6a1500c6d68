"""Softmax attention: the one entry point the model calls.

    from pallas_kernels.attention.api import attention
    out = attention(q, k, v, segment_ids=seg, positions=pos)                    # training
    out = attention(q_new, k_cache, v_cache, segment_ids=seg_new, positions=pos_new,
                    kv_segment_ids=cache_seg, kv_positions=cache_pos)           # decode
    out, lse = attention_with_lse(q, k, v, segment_ids=seg, positions=pos)     # diagnostics
    out = attention(q, k, v, ..., sinks=sink_logits)                    # gpt-oss attention sinks
    out = attention(q, k, v, ..., score="sigmoid", sigmoid_bias=-math.log(T))   # FlashSigmoid

The function, for query i of head h, s_ij the scaled (and soft-capped) logit, j over the keys
visible to i (mask below):

    softmax: o_i = sum_j exp(s_ij - lse_i) v_j,   lse_i = log(sum_j exp(s_ij) + exp(sink_h))
    sigmoid: o_i = sum_j sigmoid(s_ij + bias) v_j  (no normalisation, no sinks)

The sink term is absent without `sinks`. Training, prefill and decode compute this one function;
only the schedule of the work differs.

Implementations, chosen by `pallas_kernels.dispatch` (`dispatch.describe("attention")` says
which one served the latest call):
  "reference"  dense masked attention (reference.py), the definition;
  "xla"        blocked online softmax, memory-efficient (xla.py);
  "gpu"        Pallas Triton kernels, "tpu" Pallas Mosaic kernels (pallas.py: the block-sparse
               op's flash kernels over a causal / window / full layout, the mask applied by
               position inside the kernel).
Order tried with implementation=None: gpu / tpu on their platform, then xla, then reference.
`attention_with_lse` (diagnostics, forward only) has xla and reference.
"""
from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.attention import pallas, reference, xla
from pallas_kernels.scores import check_score_options

OP = "attention"
# Forward only, also returning the per-query log-sum-exp (attention statistics, e.g. the
# sink rate and entropy of train/evals/diagnostics.py). A separate op, so that the training
# op's contract, outputs and choice stay exactly as they are.
OP_LSE = "attention_with_lse"

dispatch.register(OP, "xla", xla.attention)
dispatch.register(OP, "reference", reference.attention)
for _backend in pw.PALLAS:  # each on its own: a failed Mosaic import keeps Triton, and back
    try:
        dispatch.register(OP, _backend, pallas.implementation(_backend))
    except ImportError as e:  # an installation without Pallas still has xla and reference
        logging.getLogger("chimera.kernels").info("%s: %r unavailable: %s", OP, _backend, e)
dispatch.set_order(OP, ("xla", "reference"))
dispatch.set_order(OP, ("gpu", "xla", "reference"), platform="gpu")
dispatch.set_order(OP, ("tpu", "xla", "reference"), platform="tpu")
dispatch.register(OP_LSE, "xla", xla.attention_with_lse)
dispatch.register(OP_LSE, "reference", reference.attention_with_lse)
dispatch.set_order(OP_LSE, ("xla", "reference"))


KERNELS = {"gpu": "Pallas Triton", "tpu": "Pallas Mosaic", "xla": "xla blocked, no Pallas kernel",
           "reference": "dense reference, no Pallas kernel"}


def describe_implementation(implementation: str | None, head_dims=None) -> str:
    """One line for a layer's start-up log: what `attention(..., implementation=...)` runs on
    the platform being compiled for, e.g. "auto: gpu (Pallas Triton; xla where it refuses)"
    or "xla (xla blocked, no Pallas kernel)". head_dims: the layer's (D, Dv) pairs, so that
    a Pallas kernel refusing them is named as not serving the layer (e.g. "auto: xla (Pallas
    Triton refuses head dims 192/64)"). The exact choice per call is logged by `dispatch` on
    "chimera.kernels" at the first trace."""
    if implementation is not None:
        return f"{implementation} ({KERNELS.get(implementation, implementation)})"
    first, *rest = dispatch.available(OP)
    if first in pw.PALLAS and rest:
        refused = [f"{d}/{dv}" for d, dv in head_dims or ()
                   if pallas.head_dims_refusal(first, d, dv)]
        if refused and len(refused) == len(head_dims):
            return f"auto: {rest[0]} ({KERNELS[first]} refuses head dims {', '.join(refused)})"
        if refused:
            return (f"auto: {first} ({KERNELS[first]}; {rest[0]} for head dims "
                    f"{', '.join(refused)})")
        return f"auto: {first} ({KERNELS[first]}; {rest[0]} where it refuses)"
    return f"auto: {first} ({KERNELS.get(first, first)})"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              segment_ids: jax.Array, positions: jax.Array,
              kv_segment_ids: jax.Array | None = None, kv_positions: jax.Array | None = None,
              window: int | None = None, logit_softcap: float | None = None,
              sinks: jax.Array | None = None, score: str = "softmax",
              sigmoid_bias: float = 0.0, scale: float | None = None,
              implementation: str | None = None,
              block_q: int = 128, block_k: int = 128, interpret: bool = False) -> jax.Array:
    """Causal softmax (or sigmoid) attention over packed documents, for training, prefill and
    decode.

    Args:
      q: [B, Tq, H, D] queries.
      k: [B, Tk, K, D] keys; v: [B, Tk, K, Dv] values (Dv may differ from D, e.g. MLA),
        H % K == 0 (MHA: K == H, GQA, MQA: K == 1). Query head h uses kv head h // (H // K).
      segment_ids, positions: int [B, Tq] for the queries. Segment 0 is padding.
      kv_segment_ids, kv_positions: int [B, Tk] for the keys. None (both): k/v are the query
        tokens themselves (self-attention, Tk == Tq). Give them for a KV cache, whose slots may
        be in any order (ring buffer); empty slots have segment 0.
      window: None, or W >= 1: a query sees keys at positions (pos - W, pos].
      logit_softcap: None, or c > 0: logits s -> c * tanh(s / c) before masking and before
        the score function.
      sinks: None, or float [H]: one learned logit per query head that joins the softmax
        denominator with no value (gpt-oss attention sinks); softmax only; differentiable.
        A query that sees no key but has a sink returns 0.
      score: "softmax", or "sigmoid": weight sigmoid(s + sigmoid_bias) per visible key, no
        normalisation (FlashSigmoid).
      sigmoid_bias: static Python float added to the logits before the sigmoid (typically
        -log(context length)); must be 0 with score="softmax".
      scale: logit scale, default 1 / sqrt(D).
      implementation: None (best available for the platform, with fallback), "xla",
        "reference", "gpu" or "tpu" (no fallback: a refusal raises NotImplementedError).
      block_q, block_k: query / key block sizes of blocked implementations (shrunk to the
        sequence when it is shorter).
      interpret: run a Pallas implementation ("gpu" / "tpu", named explicitly) in interpret
        mode, e.g. on CPU for tests.

    Key j is visible to query i iff seg_q[i] == seg_k[j] != 0, pos_k[j] <= pos_q[i] and
    pos_q[i] - pos_k[j] < window. In self-attention, within a document pos_q[i] - pos_k[j] >=
    i - j must hold (each document's tokens contiguous in the row with strictly increasing
    positions, as packing lays them out): the blocked and Pallas paths skip blocks by index.
    Scores, softmax statistics and
    accumulation are float32. A query without any visible key returns exactly 0.

    Returns:
      [B, Tq, H, Dv] in q.dtype.
    """
    pw.check_interpret(interpret, implementation)
    return _call(OP, q, k, v, segment_ids, positions, kv_segment_ids, kv_positions, window,
                 logit_softcap, sinks, score, sigmoid_bias, scale, implementation, block_q,
                 block_k, interpret)


def attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, *,
                       segment_ids: jax.Array, positions: jax.Array,
                       kv_segment_ids: jax.Array | None = None, kv_positions: jax.Array | None = None,
                       window: int | None = None, logit_softcap: float | None = None,
                       sinks: jax.Array | None = None, score: str = "softmax",
                       sigmoid_bias: float = 0.0, scale: float | None = None,
                       implementation: str | None = None,
                       block_q: int = 128, block_k: int = 128) -> tuple[jax.Array, jax.Array]:
    """`attention` (same arguments and mask) that also returns each query's log-sum-exp.

    Returns (out [B, Tq, H, Dv] in q.dtype, lse float32 [B, Tq, H]), s_ij the scaled and (with
    `logit_softcap`) soft-capped logit, j over the keys visible to query i:
      softmax: lse_i = log(sum_j exp(s_ij) + exp(sink_h)) (no sink term without `sinks`); the
        probabilities are p_ij = exp(s_ij - lse_i) and the sink's share is exp(sink_h - lse_i).
        A query without any visible key has lse = sink_h (without sinks: 0) and output 0.
      sigmoid: lse_i = log(sum_j sigmoid(s_ij + sigmoid_bias)), the log of the query's total
        weight, so that key j's share of it is sigmoid(s_ij + sigmoid_bias) / exp(lse_i)
        (weights are not normalised: exp(lse_i) is the total, not 1). 0 for a query that sees
        no key.
    Forward only: not differentiable.
    """
    return _call(OP_LSE, q, k, v, segment_ids, positions, kv_segment_ids, kv_positions, window,
                 logit_softcap, sinks, score, sigmoid_bias, scale, implementation, block_q,
                 block_k)


def _call(op, q, k, v, segment_ids, positions, kv_segment_ids, kv_positions, window,
          logit_softcap, sinks, score, sigmoid_bias, scale, implementation, block_q, block_k,
          interpret=False):
    """Check the arguments, normalise them and dispatch `op` (OP or OP_LSE)."""
    _check(q, k, v, segment_ids, positions, kv_segment_ids, kv_positions, window,
           logit_softcap, sinks, score, sigmoid_bias, scale, block_q, block_k)
    self_attention = kv_segment_ids is None
    if self_attention:
        kv_segment_ids, kv_positions = segment_ids, positions
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window = None if window is None else int(window)
    logit_softcap = None if logit_softcap is None else float(logit_softcap)
    sigmoid_bias = float(sigmoid_bias)
    signature = dispatch.signature(
        q=q, k=k, v=v, self_attention=self_attention, window=window,
        logit_softcap=logit_softcap, sinks=sinks is not None, score=score,
        sigmoid_bias=sigmoid_bias, block_q=block_q, block_k=block_k)
    # float32 statistics: the sink logits join them as they are (the cast is differentiated).
    sinks = None if sinks is None else jnp.asarray(sinks).astype(jnp.float32)
    return dispatch.call(
        op, q, k, v, segment_ids, positions, kv_segment_ids, kv_positions,
        implementation=implementation, signature=signature, window=window,
        logit_softcap=logit_softcap, scale=scale, sinks=sinks, score=score,
        sigmoid_bias=sigmoid_bias, index_causal=self_attention,
        block_q=int(block_q), block_k=int(block_k), **({"interpret": True} if interpret else {}))


def _check(q, k, v, segment_ids, positions, kv_segment_ids, kv_positions, window,
           logit_softcap, sinks, score, sigmoid_bias, scale, block_q, block_k) -> None:
    """Raise ValueError naming the argument when shapes or options are impossible."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, heads, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
    b, tq, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {k.shape} must be [B, Tk, K, D] matching q {q.shape} in B and D")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {v.shape} must be [B, Tk, K, Dv] with k's B, Tk, K = "
                         f"{tuple(k.shape[:3])}")
    if h % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({h})")
    if tq == 0 or k.shape[1] == 0:
        raise ValueError(f"empty sequence: q {q.shape}, k {k.shape}")
    for name, x in (("segment_ids", segment_ids), ("positions", positions)):
        if x.shape != (b, tq) or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be int [B, Tq] = [{b}, {tq}]; got {x.dtype}{list(x.shape)}")
    if (kv_segment_ids is None) != (kv_positions is None):
        raise ValueError("give both kv_segment_ids and kv_positions, or neither (self-attention)")
    if kv_segment_ids is None:
        if k.shape[1] != tq:
            raise ValueError(
                f"self-attention (no kv ids) needs Tk == Tq; got Tk={k.shape[1]}, Tq={tq}; "
                f"pass kv_segment_ids/kv_positions for a KV cache")
    else:
        tk = k.shape[1]
        for name, x in (("kv_segment_ids", kv_segment_ids), ("kv_positions", kv_positions)):
            if x.shape != (b, tk) or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"{name} must be int [B, Tk] = [{b}, {tk}]; got {x.dtype}{list(x.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap}")
    if scale is not None and not float(scale) > 0:
        raise ValueError(f"scale must be > 0 or None (1/sqrt(D)), got {scale}")
    check_score_options(score, sigmoid_bias, sinks, h)
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if int(blk) != blk or blk < 1:
            raise ValueError(f"{name} must be a positive integer, got {blk}")

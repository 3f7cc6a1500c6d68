"""Block-sparse attention: attention over the key blocks a `BlockLayout` lists, the entry point
the mixers (swa, moba, nsa, full attention through a layout) call.

    from pallas_kernels.block_sparse_attention import masks
    from pallas_kernels.block_sparse_attention.api import block_sparse_attention, merge
    layout = masks.build_layout(masks.SlidingWindow(256), T, T, 64, 64)     # host, once
    o, lse = block_sparse_attention(q, k, v, layout, segment_ids=seg)
    o, lse = merge([(o1, lse1), (o2, lse2)])          # branches over disjoint key sets

Implementations, chosen by `pallas_kernels.dispatch` (`dispatch.describe(OP)` says which one
served the latest call):
  "reference"  dense masked attention (reference.py), the definition, O(Tq Tk);
  "xla"        blocked online softmax over the listed blocks only (xla.py);
  "gpu"        Pallas Triton kernels looping over the block lists (gpu.py);
  "tpu"        Pallas Mosaic kernels with scalar-prefetched block lists (tpu.py).
Order tried with implementation=None: gpu / tpu on their platform, then xla, then reference.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.block_sparse_attention import common, reference
from pallas_kernels.block_sparse_attention.layout import BlockLayout

OP = "block_sparse_attention"
PALLAS = pw.PALLAS
F32 = common.F32

pw.register_implementations(OP, __package__, reference.block_sparse_attention)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockLayout, *,
                           segment_ids: jax.Array | None = None,
                           kv_segment_ids: jax.Array | None = None,
                           score: str = "softmax", sigmoid_bias: float = 0.0,
                           logit_softcap: float | None = None,
                           sinks: jax.Array | None = None, scale: float | None = None,
                           implementation: str | None = None,
                           interpret: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Attention of each query over the keys its layout blocks make visible.

    Key j is visible to query i (batch row b, query head h) iff the layout lists block
    (i // block_q, j // block_k) for (b, h) (row 0 / head 0 of a shared layout) and the block is
    full or its pattern is True at (i % block_q, j % block_k), and the two tokens are in the
    same nonzero segment.

    Args:
      q: [B, Tq, H, D] queries; k: [B, Tk, K, D] keys; v: [B, Tk, K, Dv] values; one dtype
        (float32, bfloat16 or float16). H % K == 0 and query head h reads kv head h // (H // K)
        (GQA / MQA without repeating k, v).
      layout: the block lists (masks.build_layout on the host, layout.from_topk on device),
        built for q_len = Tq, kv_len = Tk; rows 1 or B; heads 1, K (one list per kv head, which
        its query heads share) or H (the Pallas implementations take 1 or H). Its arrays may be
        numpy (closed over / constants) or jax arrays (e.g. a pytree argument of a jitted
        function).
      segment_ids: int [B, Tq], 0 = padding (sees and is seen by nothing), or None (all one
        document). kv_segment_ids: int [B, Tk], or None to reuse segment_ids (needs Tq == Tk).
      score: "softmax", or "sigmoid": weights sigmoid(s + sigmoid_bias) per visible pair, no
        normalisation (sigmoid_bias is a static float).
      logit_softcap: None, or c > 0: scores s -> c tanh(s / c) before the score function.
      sinks: None or float [H]: a learnable logit per query head that joins the softmax
        denominator with no value (attention sinks); softmax only. Differentiable.
      scale: multiplies q.k, default 1/sqrt(D).
      implementation: None (best available, with fallback), or "reference", "xla", "gpu",
        "tpu" (no fallback: a refusal raises NotImplementedError).
      interpret: run a Pallas implementation ("gpu" / "tpu", named explicitly) in interpret
        mode, e.g. on CPU for tests.

    Returns:
      o [B, Tq, H, Dv] in q.dtype, and lse [B, H, Tq] float32 (softmax: the natural-log
      log-sum-exp of the visible scores and the sink; -inf for a row with nothing visible and
      no sink, whose o is 0) or None (sigmoid). lse is differentiable, so branches over
      disjoint keys can be combined with `merge`. Scores and accumulation are float32.
    """
    common.check(q, k, v, layout, segment_ids, kv_segment_ids, score=score,
                 sigmoid_bias=sigmoid_bias, logit_softcap=logit_softcap, sinks=sinks,
                 scale=scale)
    pw.check_interpret(interpret, implementation)
    q_seg, kv_seg = common.segments(q, k, segment_ids, kv_segment_ids)
    options = dict(score=score, sigmoid_bias=float(sigmoid_bias),
                   logit_softcap=None if logit_softcap is None else float(logit_softcap),
                   scale=common.default_scale(q, scale))
    if interpret:
        options["interpret"] = True
    signature = dispatch.signature(
        q=q, k=k, v=v, block_q=layout.block_q, block_k=layout.block_k,
        layout_rows=layout.rows, layout_heads=layout.heads,
        slots=layout.kv_blocks.shape[-1], key_slots=layout.q_blocks.shape[-1],
        patterns=layout.partial_masks.shape[0], segments=segment_ids is not None,
        score=score, softcap=options["logit_softcap"], sinks=sinks is not None)
    sinks = None if sinks is None else jnp.asarray(sinks).astype(F32)
    o, lse = dispatch.call(OP, q, k, v, layout, q_seg, kv_seg, sinks,
                           implementation=implementation, signature=signature, **options)
    return o, (None if score == "sigmoid" else lse)


def merge(pairs: Sequence[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """Combine softmax attention results over disjoint key sets into the one over their union.

    pairs: [(o_n [B, Tq, H, Dv], lse_n [B, H, Tq] fp32), ...] -> (o in o_0's dtype, lse fp32):
    lse = log(sum_n exp(lse_n)) and o = sum_n exp(lse_n - lse) o_n. Rows empty in every branch
    (all lse_n = -inf) give o = 0, lse = -inf, and zero (not NaN) gradients. Sinks belong to
    one branch only: each sink enters lse_n of the branch that was called with it.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs must hold at least one (o, lse) pair")
    for n, pair in enumerate(pairs):
        if len(pair) != 2 or pair[1] is None:
            raise ValueError(f"pairs[{n}] must be (o, lse) with an lse array (score='softmax'); "
                             f"got {pair!r:.80}")
        o_n, lse_n = pair
        b, tq, h = pairs[0][0].shape[:3]
        if o_n.ndim != 4 or tuple(o_n.shape) != tuple(pairs[0][0].shape) \
                or tuple(lse_n.shape) != (b, h, tq):
            raise ValueError(f"pairs[{n}]: o must be [B, Tq, H, Dv] = {list(pairs[0][0].shape)} "
                             f"and lse [B, H, Tq] = {[b, h, tq]}; got {list(o_n.shape)}, "
                             f"{list(lse_n.shape)}")
    lses = jnp.stack([lse.astype(F32) for _, lse in pairs])  # [N, B, H, Tq]
    m = jnp.max(lses, axis=0)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    w = jnp.exp(lses - m)  # 0 for empty branches
    l = jnp.sum(w, axis=0)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
    weights = jnp.transpose(w / l_safe, (0, 1, 3, 2))[..., None]  # [N, B, Tq, H, 1]
    o = sum(weights[n] * o_n.astype(F32) for n, (o_n, _) in enumerate(pairs))
    return o.astype(pairs[0][0].dtype), lse

"""Chunked linear attention with decay: the one entry point the mixers call.

    from pallas_kernels.chunked_linear_attention.api import chunked_linear_attention, decode_step
    o, state = chunked_linear_attention(q, k, v, log_decay, segment_ids=seg)       # training
    o, state = chunked_linear_attention(q, k, v, g, initial_state=state)          # prefill
    o, state = decode_step(q_t, k_t, v_t, g_t, state)                             # one token

Implementations, chosen by `pallas_kernels.dispatch` (`dispatch.describe(OP)` says which one
served the latest call):
  "reference"  token-by-token lax.scan (reference.py), the definition;
  "xla"        chunked: intra-chunk masked matmuls plus a carried inter-chunk state (xla.py);
  "gpu"        Pallas Triton kernels (gpu.py), custom_vjp with backward kernels;
  "tpu"        Pallas Mosaic kernels (tpu.py), custom_vjp with backward kernels.
Order tried with implementation=None: gpu / tpu on their platform, then xla, then reference.
"""
from __future__ import annotations

import math

import jax

from pallas_kernels import dispatch
from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.chunked_linear_attention import common, reference

OP = "chunked_linear_attention"
PALLAS = pw.PALLAS

pw.register_implementations(OP, __package__, reference.chunked_linear_attention)


def chunked_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                             log_decay: jax.Array | None = None, *,
                             initial_state: jax.Array | None = None,
                             segment_ids: jax.Array | None = None,
                             scale: float | None = None, chunk_size: int = 64,
                             implementation: str | None = None,
                             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Causal linear attention with a multiplicative decay of the state, over packed documents.

        S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale * q_t S_t

    Args:
      q: [B, T, H, K] queries (already feature-mapped by the mixer).
      k: [B, T, G, K] keys, v: [B, T, G, V] values; H % G == 0 and query head h reads kv head
        h // (H // G) (shared k/v heads, as GQA).
      log_decay: g <= 0 in log space. None (no decay: plain linear attention), [B, T, H] (one
        decay per head and token, e.g. RetNet, Mamba2) or [B, T, H, K] (one per key channel,
        e.g. GLA). Positive values are the caller's bug: exp overflows in chunked forms.
      initial_state: [B, H, K, V] state before the first token of every row (fp32), or None.
      segment_ids: int [B, T], 0 = padding, or None (one document per row). A change to a
        nonzero id starts a new document: the state is reset to zero before that token. Padding
        tokens neither write nor decay the state and output zeros.
      scale: multiplies q, default 1/sqrt(K).
      chunk_size: chunk length of the chunked implementations (a power of two); T need not be
        a multiple of it.
      implementation: None (best available, with fallback), or "reference", "xla", "gpu",
        "tpu" (no fallback: a refusal raises NotImplementedError).
      interpret: run a Pallas implementation ("gpu" / "tpu", named explicitly) in interpret
        mode, e.g. on CPU for tests.

    Returns:
      o [B, T, H, V] in q.dtype, and the final state [B, H, K, V] float32 (after token T - 1;
      trailing padding leaves it unchanged). States, decays and accumulation are float32.
    """
    common.check(q, k, v, log_decay, initial_state, segment_ids, scale, chunk_size)
    options = pw.dispatch_kwargs(
        q, k, v, log_decay, initial_state, segment_ids, scale=scale, chunk_size=chunk_size,
        implementation=implementation, interpret=interpret)
    return dispatch.call(OP, q, k, v, log_decay, initial_state, segment_ids, **options)


def decode_step(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array | None,
                state: jax.Array, *, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """One token of the recurrence (decode): q [B, H, K], k [B, G, K], v [B, G, V], log_decay
    None | [B, H] | [B, H, K], state [B, H, K, V] -> (o [B, H, V] in q.dtype, new state fp32).
    Equal to `chunked_linear_attention` on a one-token sequence with `initial_state=state`.
    The caller zeroes `state` where a new document starts."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or state.ndim != 4:
        raise ValueError(f"decode_step takes q [B,H,K], k [B,G,K], v [B,G,V], state [B,H,K,V]; got "
                         f"{q.shape}, {k.shape}, {v.shape}, {state.shape}")
    common.check(q[:, None], k[:, None], v[:, None],
                 None if log_decay is None else log_decay[:, None], state, None, scale, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return reference.step(q, k, v, log_decay, state, scale=scale)

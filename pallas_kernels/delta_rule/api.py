"""The delta rule (DeltaNet) and its gated form (Gated DeltaNet): the entry point the mixers call.

    from pallas_kernels.delta_rule.api import delta_rule, decode_step
    o, state = delta_rule(q, k, v, beta, log_decay, segment_ids=seg)          # training
    o, state = delta_rule(q, k, v, beta, g, initial_state=state)             # prefill
    o, state = decode_step(q_t, k_t, v_t, beta_t, g_t, state)                # one token

Implementations, chosen by `pallas_kernels.dispatch` (`dispatch.describe(OP)` says which one
served the latest call):
  "reference"  token-by-token lax.scan (reference.py), the definition;
  "xla"        chunked WY/UT form: per-chunk unit-lower solves by blocked substitution (no
               lax.linalg.triangular_solve: slow on XLA:CPU), a carried state (xla.py);
  "gpu"        Pallas Triton kernels (gpu.py), custom_vjp with backward kernels;
  "tpu"        Pallas Mosaic kernels (tpu.py), custom_vjp with backward kernels.
Order tried with implementation=None: gpu / tpu on their platform, then xla, then reference.
"""
from __future__ import annotations

import math

import jax

from pallas_kernels import dispatch
from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.delta_rule import common, reference

OP = "delta_rule"
PALLAS = pw.PALLAS

pw.register_implementations(OP, __package__, reference.delta_rule)


def delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
               log_decay: jax.Array | None = None, *,
               initial_state: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               scale: float | None = None, chunk_size: int = 64,
               qk_l2norm: bool = True,
               implementation: str | None = None,
               interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Causal (gated) delta rule over packed documents, per (batch row, query head):

        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * q_t S_t

    Args:
      q: [B, T, H, K] queries; k: [B, T, G, K] keys; v: [B, T, G, V] values. H % G == 0 and
        query head h reads kv head h // (H // G) (shared k/v heads, as GQA).
      beta: [B, T, H] write strength. The recurrence is a contraction only for unit-norm keys
        and beta in (0, 1], or (0, 2) when negative eigenvalues are allowed (DeltaNet with
        beta = 2 sigmoid(.)); outside that range chunked forms lose accuracy (the triangular
        system of the WY form becomes ill-conditioned). The mixers guarantee the range.
      log_decay: None (DeltaNet, no decay) or g <= 0 [B, T, H], one decay per head and token
        (Gated DeltaNet). Positive values are the caller's bug: exp overflows in chunked forms.
      initial_state: [B, H, K, V] state before the first token of every row (fp32), or None.
      segment_ids: int [B, T], 0 = padding, or None (one document per row). A change to a
        nonzero id starts a new document: the state is zeroed before that token. Padding
        tokens neither write, erase nor decay the state and output zeros.
      scale: multiplies q, default 1/sqrt(K).
      chunk_size: chunk length of the chunked implementations (a power of two); T need not be
        a multiple of it.
      qk_l2norm: L2-normalise q and k over K first (in float32, as fla's use_qk_l2norm_in_kernel),
        which keeps the triangular system well conditioned whatever the keys' norms. False
        when the caller passes unit-norm keys itself.
      implementation: None (best available, with fallback), or "reference", "xla", "gpu",
        "tpu" (no fallback: a refusal raises NotImplementedError).
      interpret: run a Pallas implementation ("gpu" / "tpu", named explicitly) in interpret
        mode, e.g. on CPU for tests.

    Returns:
      o [B, T, H, V] in q.dtype, and the final state [B, H, K, V] float32 (after token T - 1;
      trailing padding leaves it unchanged). States, gates and accumulation are float32.
    """
    common.check(q, k, v, beta, log_decay, initial_state, segment_ids, scale, chunk_size)
    options = pw.dispatch_kwargs(
        q, k, v, log_decay, initial_state, segment_ids, scale=scale, chunk_size=chunk_size,
        implementation=implementation, interpret=interpret)
    if qk_l2norm:
        q, k = common.l2_normalize(q), common.l2_normalize(k)
    return dispatch.call(OP, q, k, v, beta, log_decay, initial_state, segment_ids, **options)


def decode_step(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
                log_decay: jax.Array | None, state: jax.Array, *, scale: float | None = None,
                qk_l2norm: bool = True) -> tuple[jax.Array, jax.Array]:
    """One token of the recurrence (decode): q [B, H, K], k [B, G, K], v [B, G, V], beta [B, H],
    log_decay None | [B, H], state [B, H, K, V] -> (o [B, H, V] in q.dtype, new state fp32).
    Equal to `delta_rule` on a one-token sequence with `initial_state=state`. The caller
    zeroes `state` where a new document starts."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or beta.ndim != 2 or state.ndim != 4:
        raise ValueError(f"decode_step takes q [B,H,K], k [B,G,K], v [B,G,V], beta [B,H], "
                         f"state [B,H,K,V]; got {q.shape}, {k.shape}, {v.shape}, {beta.shape}, "
                         f"{state.shape}")
    common.check(q[:, None], k[:, None], v[:, None], beta[:, None],
                 None if log_decay is None else log_decay[:, None], state, None, scale, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if qk_l2norm:
        q, k = common.l2_normalize(q), common.l2_normalize(k)
    return reference.step(q, k, v, beta, log_decay, state, scale=scale)

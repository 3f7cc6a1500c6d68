"""Test-time memory (Titans / Miras): the entry point the memory mixers call.

    from pallas_kernels.neural_memory.api import neural_memory
    from pallas_kernels.neural_memory.common import MemorySpec, init_weights
    spec = MemorySpec()                                   # Titans LMM: MLP depth 2, l2, decay, momentum
    w0 = init_weights(spec, key, heads, K, V)             # outer-learned, per head
    o, state = neural_memory(spec, q, k, v, theta, alpha, eta, initial_weights=w0,
                             segment_ids=seg)

Implementations, chosen by `pallas_kernels.dispatch`:
  "reference"  token-by-token lax.scan with jax.grad of the bias (reference.py), the definition;
  "xla"        chunk-parallel form, lax.scan over chunks (xla.py): the dual form (closed-form
               per-layer gradients, no per-token weights) for linear and MLP memories; per-token
               weights from vmap(grad) only for the lq_norm / kl_softmax retentions.
No Pallas kernels yet. Order tried with implementation=None: xla, then reference.
"""
from __future__ import annotations

import jax

from pallas_kernels import dispatch
from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.neural_memory import common, reference

OP = "neural_memory"

pw.register_implementations(OP, __package__, reference.neural_memory)


def neural_memory(spec: common.MemorySpec, q: jax.Array, k: jax.Array, v: jax.Array,
                  theta: jax.Array, alpha: jax.Array | None = None,
                  eta: jax.Array | None = None, delta: jax.Array | None = None, *,
                  initial_weights: tuple, initial_state: common.MemoryState | None = None,
                  segment_ids: jax.Array | None = None,
                  implementation: str | None = None) -> tuple[jax.Array, common.MemoryState]:
    """Write every token into the memory and read it (common.py gives the equations).

    Args:
      spec: the memory's design (architecture, bias, retention, algorithm, chunk, read mode).
      q, k: [B, T, H, K] (the caller L2-normalises them, as Titans); v: [B, T, H, V].
      theta: [B, T, H] learning rate >= 0. alpha: [B, T, H] decay in [0, 1), only with
        retention "decay". eta: [B, T, H] momentum in (0, 1], only with "gd_momentum".
        delta: [B, T, H] Huber threshold > 0, only with bias "huber".
      initial_weights: W0, tuple of float32 [H, d_in, d_out] (common.layer_shapes): the
        memory every document starts from.
      initial_state: the state entering each row (prefill continuation), or None for W0 and
        zero momentum.
      segment_ids: int [B, T], 0 = padding, or None (one document per row).
      implementation: None (best available), "xla" or "reference" (no fallback).

    Returns:
      o [B, T, H, V] in q.dtype (zero at padding), and the final common.MemoryState (float32
      [B, H, d_in, d_out] leaves, after token T - 1).
    """
    common.check(spec, q, k, v, theta, alpha, eta, delta, initial_weights, initial_state,
                 segment_ids)
    signature = dispatch.signature(spec=spec, q=q, v=v, initial_state=initial_state is not None,
                                   segments=segment_ids is not None)
    return dispatch.call(OP, spec, q, k, v, theta, alpha, eta, delta,
                         initial_weights=initial_weights, initial_state=initial_state,
                         segment_ids=segment_ids, implementation=implementation,
                         signature=signature)

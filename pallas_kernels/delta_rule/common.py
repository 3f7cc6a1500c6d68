"""Argument checks and input preparation shared by every delta-rule implementation.

The op (see api.py for the full contract), per (batch row, query head), state S: [K, V]:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = scale * q_t S_t

g = 0 (log_decay None) is DeltaNet; a per-head, per-token g <= 0 is Gated DeltaNet. The same
step in "new value" form, as the kernels use it:

    S~ = exp(g_t) S_{t-1};   u_t = beta_t (v_t - S~^T k_t);   S_t = S~ + k_t u_t^T

Dimension letters: B batch, T time, H query heads, G kv heads (H % G == 0; query head h reads
kv head h // (H // G)), K key/query head dim, V value head dim, C chunk length.

Documents and padding follow chunked_linear_attention (its common.py): `segment_ids` [B, T]
(0 = padding); a nonzero id different from the previous token's starts a new document and the
state is zeroed before that token; padding tokens neither write, erase nor decay the state and
output zeros. `prepare` folds this into the inputs: k, v, beta and g are zeroed at padding
(k = 0 and beta = 0 make the step the identity), and `doc` numbers the documents of a row.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.chunked_linear_attention import common as cla_common

F32 = jnp.float32
L2_EPS = 1e-6  # added to |x|^2 before the rsqrt of the q/k L2 norm (fla's value)

expand_kv = cla_common.expand_kv
finish = cla_common.finish
resets = cla_common.resets


def check(q, k, v, beta, log_decay, initial_state, segment_ids, scale, chunk_size) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or options are impossible."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, K]; got shape {q.shape}")
    b, t, h = q.shape[:3]
    if beta.shape != (b, t, h):
        raise ValueError(f"beta must be [B, T, H] = {[b, t, h]} (one write strength per query "
                         f"head and token); got {list(beta.shape)}")
    if not jnp.issubdtype(beta.dtype, jnp.floating):
        raise ValueError(f"beta must be floating point, got {beta.dtype}")
    if log_decay is not None and log_decay.shape != (b, t, h):
        raise ValueError(f"log_decay must be None (DeltaNet) or [B, T, H] = {[b, t, h]} (Gated "
                         f"DeltaNet, one decay per head and token); got {list(log_decay.shape)}")
    cla_common.check(q, k, v, log_decay, initial_state, segment_ids, scale, chunk_size)


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / |x| over the last dim, computed in float32, returned in x.dtype; a zero vector
    (padding) stays zero and has finite gradients."""
    xf = x.astype(F32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + L2_EPS)).astype(x.dtype)


class Prepared(NamedTuple):
    """Inputs with padding folded in, T padded up to a multiple of the chunk (Tp).

    q [B, Tp, H, K], k [B, Tp, G, K], v [B, Tp, G, V]: input dtype, k and v zero at padding.
    beta, g: float32 [B, Tp, H], zero at padding (no write, no decay).
    doc: int32 [B, Tp], document number of each token within its row.
    valid: bool [B, T] (unpadded length), False at padding tokens.
    """
    q: jax.Array
    k: jax.Array
    v: jax.Array
    beta: jax.Array
    g: jax.Array
    doc: jax.Array
    valid: jax.Array


def prepare(q, k, v, beta, log_decay, segment_ids, chunk_size: int) -> Prepared:
    """Fold padding and documents into zeroed inputs plus `doc` ids; pad T to the chunk."""
    p = cla_common.prepare(q, k, v, log_decay, segment_ids, chunk_size)
    beta = jnp.where(p.valid[:, :, None], beta.astype(F32), 0.0)
    beta = jnp.pad(beta, [(0, 0), (0, p.q.shape[1] - beta.shape[1]), (0, 0)])
    return Prepared(p.q, p.k, p.v, beta, p.g, p.doc, p.valid)

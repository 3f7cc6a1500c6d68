"""The attention mask and logit soft-cap, shared by every implementation.

One definition of "which key a query may see", so that the implementations can only differ in
how they schedule the work, never in what they compute.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(seg_q: jax.Array, pos_q: jax.Array, seg_k: jax.Array, pos_k: jax.Array,
            window: int | None) -> jax.Array:
    """Whether key j is visible to query i (arguments broadcast against each other).

    Key j is visible to query i iff they are in the same document, the key is not padding
    (segment id 0), the key is not in the query's future *by position*, and, with a window W,
    the key is among the W most recent positions (the query itself included). Positions, not
    indices, decide causality so that KV caches in ring-buffer order mask correctly.

    Typical use: seg_q/pos_q [B, Tq, 1] against seg_k/pos_k [B, 1, Tk] -> bool [B, Tq, Tk].
    """
    ok = (seg_q == seg_k) & (seg_k != 0) & (pos_k <= pos_q)
    if window is not None:
        ok = ok & (pos_q - pos_k < window)
    return ok


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    """c * tanh(s / c) (Gemma 2 style), or the logits unchanged when `cap` is None."""
    if cap is None:
        return logits
    return cap * jnp.tanh(logits / cap)

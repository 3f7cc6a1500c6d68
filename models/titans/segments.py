"""MAC's per-segment math as pure functions: reading the memory for retrieval, and the mask of
the segment attention over [persistent | retrieved | tokens].

Retrieval (Titans Eq 21): token i of segment s reads h_i = M_{s-1}(q_i), the memory after the
previous segments, unless its document started after the segment's entry (a reset at or
before i inside the segment), in which case the memory its document has is W0 (nothing of that
document was written before the segment). `reach` [B, C] says which: True = no reset between
the segment's entry and i.

Mask: the retrieved token h_j and the token x_j both sit at slot j (index inside the segment);
query i sees slot j iff j <= i and the two carry the same nonzero segment id (the attention
op's document rule), and sees every persistent token unless it is padding.

Shapes: B batch, C segment length (slots), H memory heads, K / V memory key / value dims,
N_p persistent tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory import common

F32 = jnp.float32


def retrieve(spec: common.MemorySpec, weights: tuple, w0: tuple, q: jax.Array,
             reach: jax.Array) -> jax.Array:
    """weights: the memory state after the previous segments (its weights are
    common.weights_of of it), tuple of [B, H, d_in, d_out]; w0:
    tuple of [H, d_in, d_out]; q [B, C, H, K]; reach bool [B, C]
    -> o [B, C, H, V] float32: M_{s-1}(q_i) where reach, else W0(q_i)."""
    q = q.astype(F32)
    apply = lambda w, x: common.apply(spec, common.weights_of(spec, w), x)  # w: the state
    per_head = jax.vmap(apply, in_axes=(0, 1), out_axes=1)  # w [H, ...], x [C, H, K] -> [C, H, V]
    from_state = jax.vmap(per_head)(tuple(w.astype(F32) for w in weights), q)
    from_w0 = jax.vmap(apply, in_axes=(0, 2), out_axes=2)(tuple(w.astype(F32) for w in w0), q)
    return jnp.where(reach[:, :, None, None], from_state, from_w0)


def reach(resets: jax.Array) -> jax.Array:
    """resets bool [B, C] (a document starts at the token, common.resets over the whole row)
    -> bool [B, C]: no document started between the segment's entry and the token."""
    return jnp.cumsum(resets.astype(jnp.int32), axis=1) == 0


def segment_mask(seg_q: jax.Array, slot_q: jax.Array, seg_k: jax.Array, slot_k: jax.Array,
                 num_persistent: int) -> jax.Array:
    """Queries (seg_q, slot_q int [B, Tq]) against the segment's slots (seg_k, slot_k int
    [B, C] or [1, C]) -> bool [B, Tq, N_p + 2 C], columns [persistent | retrieved | tokens]."""
    tok = ((seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] != 0)
           & (slot_k[:, None, :] <= slot_q[:, :, None]))
    per = jnp.broadcast_to((seg_q != 0)[:, :, None], (*seg_q.shape, num_persistent))
    return jnp.concatenate([per, tok, tok], axis=-1)

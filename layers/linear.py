"""Dense projections and the token embedding, with fp32 params and a configurable compute dtype.

Activations may be [..., d_in]; projections flatten the leading dims into one so that every
matmul (and its weight gradient) is 2-D: on XLA:CPU, 3-D operands made the backward insert
transposes that cost 34-42% of a step (shared/research/perf_anchor.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.sharding import constrain, param


class Dense(nnx.Module):
    """y = x @ W, no bias. W: [d_in, d_out] float32, cast to `dtype` for the matmul.

    axes: logical names of (d_in, d_out) for sharding (layers/sharding.py), e.g. ("embed", "mlp").
    """

    def __init__(self, d_in: int, d_out: int, *, axes: tuple[str, str], std: float, dtype, rngs: nnx.Rngs):
        self.kernel = param(std * jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32), axes)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        y = x.reshape(-1, x.shape[-1]).astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        return y.reshape(*lead, y.shape[-1])


class Embed(nnx.Module):
    """Token embedding table [vocab, d]; `attend` reuses it as a tied output head."""

    def __init__(self, vocab: int, d: int, *, std: float, dtype, rngs: nnx.Rngs):
        self.embedding = param(std * jax.random.normal(rngs.params(), (vocab, d), jnp.float32), ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] int -> [B, T, d] in the compute dtype."""
        # Gather the FSDP shards of the table first (as FSDP does for every weight): the
        # batch is split over "fsdp" too, and a lookup whose table and rows both want that
        # axis makes XLA replicate and re-split the output.
        table = constrain(self.embedding[...], ("vocab", None))
        return jnp.take(table, tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [..., d] -> logits [..., vocab] (x @ E^T), in the compute dtype."""
        lead = x.shape[:-1]
        y = x.reshape(-1, x.shape[-1]).astype(self.dtype) @ self.embedding[...].astype(self.dtype).T
        return y.reshape(*lead, y.shape[-1])

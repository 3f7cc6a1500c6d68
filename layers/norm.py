"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * scale, statistics in float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.sharding import param


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x [..., d], scale [d] -> [..., d] in x.dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, d: int, *, eps: float = 1e-6):
        self.scale = param(jnp.ones((d,), jnp.float32), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)

"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import jax
from flax import nnx

from layers.linear import Dense


class SwiGLU(nnx.Module):
    def __init__(self, d: int, hidden: int, *, std: float, out_std: float, dtype, rngs: nnx.Rngs):
        self.gate = Dense(d, hidden, std=std, dtype=dtype, rngs=rngs)
        self.up = Dense(d, hidden, std=std, dtype=dtype, rngs=rngs)
        self.down = Dense(hidden, d, std=out_std, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., d] -> [..., d]."""
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))

    @staticmethod
    def flops_per_token(d: int, hidden: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x 2 x params)."""
        return 6.0 * 3 * d * hidden

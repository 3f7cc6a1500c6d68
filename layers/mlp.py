"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import jax
from flax import nnx

from layers.linear import Dense
from layers.sharding import constrain


class SwiGLU(nnx.Module):
    def __init__(self, d: int, hidden: int, *, std: float, out_std: float, dtype, rngs: nnx.Rngs):
        self.gate = Dense(d, hidden, axes=("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
        self.up = Dense(d, hidden, axes=("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
        self.down = Dense(hidden, d, axes=("mlp", "embed"), std=out_std, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, d] -> [B, T, d]."""
        h = constrain(jax.nn.silu(self.gate(x)) * self.up(x), ("batch", "seq", "act_mlp"))
        return self.down(h)

    @staticmethod
    def flops_per_token(d: int, hidden: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x 2 x params)."""
        return 6.0 * 3 * d * hidden

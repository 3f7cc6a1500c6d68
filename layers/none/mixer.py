"""The identity mixer (kind "none"): y = 0, so the residual block x + mixer(norm(x)) leaves x
as it is and the layer is its MLP alone. The control of mixer ablations ("what does this
mixer add over no mixing at all?"). No params, no FLOPs, and a decode cache with no leaves (an
empty dict, which lax.scan over stacked periods carries like any other pytree)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.none.config import NoneConfig
from layers.registry import LayerContext, register_mixer

__all__ = ["NoneMixer"]


@register_mixer(NoneConfig)
class NoneMixer(nnx.Module):
    def __init__(self, cfg: NoneConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d] -> (zeros [B, T, d] in x.dtype, cache unchanged)."""
        return jnp.zeros_like(x), cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        return {}

    @staticmethod
    def flops_per_token(cfg: NoneConfig, d_model: int, seq_len: int) -> float:
        return 0.0

    def describe(self) -> str:
        return "identity (no mixer): control"

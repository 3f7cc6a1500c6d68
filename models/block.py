"""Pre-norm residual block and one period of the layer pattern."""
from __future__ import annotations

import jax
from flax import nnx

import layers.catalog  # noqa: F401  (registers every mixer of layers/)
from layers.mlp import SwiGLU
from layers.norm import RMSNorm
from layers.registry import LayerContext, build_mixer
from layers.sharding import RESIDUAL, constrain
from models.config import ModelConfig
from models.titans import mac, mag, mal  # noqa: F401  (register the Titans mixers)


class Block(nnx.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)). x: [B, T, d]."""

    def __init__(self, name: str, cfg: ModelConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.name = name
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = build_mixer(cfg.mixer(name), ctx, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.hidden, std=ctx.init_std, out_std=ctx.out_std,
                          dtype=ctx.dtype, rngs=rngs)

    def __call__(self, x, *, positions, segment_ids, cache=None):
        y, cache = self.mixer(self.mixer_norm(x), positions=positions, segment_ids=segment_ids, cache=cache)
        x = constrain(x + y.astype(x.dtype), RESIDUAL)
        x = constrain(x + self.mlp(self.mlp_norm(x)).astype(x.dtype), RESIDUAL)
        return x, cache


class Period(nnx.Module):
    """The blocks of one period of `ModelConfig.pattern` (or a prefix of it, for the remainder)."""

    def __init__(self, names: tuple[str, ...], cfg: ModelConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(n, cfg, ctx, rngs=rngs) for n in names])

    def __call__(self, x, *, positions, segment_ids, cache=None):
        """cache: None, or a tuple with one mixer cache per block."""
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, positions=positions, segment_ids=segment_ids,
                         cache=None if cache is None else cache[i])
            new_caches.append(c)
        return x, (None if cache is None else tuple(new_caches))

    def init_cache(self, batch: int, max_len: int, dtype) -> tuple:
        return tuple(b.mixer.init_cache(batch, max_len, dtype) for b in self.blocks)

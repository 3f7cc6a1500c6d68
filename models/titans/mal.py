"""Titans MAL, memory as layer (Titans sec. 4.3, Eqs 29-31), kind "titans_mal"
(config: models/titans/config.py MALConfig).

    y = M(x)                                     the "memory" mixer (layers/memory), whole
    o = W_o SWA*(RMSNorm(y))                     sliding-window attention, window W, with the
                                                 N_p persistent tokens as an always-visible prefix

Paper: x~ = [p] || x, y = M(x~), o = SW-Attn(y). The persistent tokens here join the
attention, not the memory: the memory's reads at fixed prefix tokens are learned constants, so
a learned prefix in the attention's input space has the same freedom, and writing fixed tokens
into the memory from a learned W0 only moves W0 (up to the momentum such a prefix would leave
behind, which decays by eta each token; the memory starts with zero momentum, as the "memory"
mixer does). Choice the paper leaves open: the RMSNorm between memory and attention (the
pre-norm the attention would have as a layer of its own; the memory's output projection is
initialised with the input std, since its output is normalised rather than added to the
residual stream).

A packed document equals itself alone when it starts on the memory's chunk grid (the memory
op's contract); the attention never crosses documents. Decode: the memory mixer's own cache
(token-by-token steps reproducing the training chunking) and a ring-buffer KV cache of W slots.
Shapes: x, y, o [B, T, d]; positions, segment_ids [B, T] int32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.memory.mixer import NeuralMemory
from layers.norm import RMSNorm
from layers.registry import LayerContext, register_mixer
from models.titans.parts import PrefixAttention, attention_flops, inner_context
from models.titans.config import MALConfig


@register_mixer(MALConfig)
class TitansMAL(nnx.Module):
    def __init__(self, cfg: MALConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.memory = NeuralMemory(cfg.memory, inner_context(ctx), rngs=rngs)
        self.mid_norm = RMSNorm(ctx.d_model, eps=ctx.norm_eps)
        self.attn = PrefixAttention(cfg, ctx, window=cfg.window, rngs=rngs)

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d] -> (o [B, T, d], cache)."""
        get = (lambda n: None) if cache is None else cache.get
        y, mem = self.memory(x, positions=positions, segment_ids=segment_ids, cache=get("memory"))
        o, kv = self.attn(self.mid_norm(y), positions=positions, segment_ids=segment_ids, cache=get("attn"))
        return o, (None if cache is None else {"memory": mem, "attn": kv})

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        return {"memory": self.memory.init_cache(batch, max_len, dtype),
                "attn": self.attn.init_cache(batch, max_len, dtype)}

    @staticmethod
    def flops_per_token(cfg: MALConfig, d_model: int, seq_len: int) -> float:
        """The memory mixer's count plus the attention's (with its persistent keys)."""
        return (NeuralMemory.flops_per_token(cfg.memory, d_model, seq_len)
                + attention_flops(cfg, d_model, seq_len, cfg.window))

    def describe(self) -> str:
        return f"Titans MAL: memory [{self.memory.describe()}] -> RMSNorm -> {self.attn.describe()}"

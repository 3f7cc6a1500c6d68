"""Titans MAG, memory as gate (Titans sec. 4.2, Eqs 26-28), kind "titans_mag"
(config: models/titans/config.py MAGConfig).

    y = SWA*(x)                                  sliding-window attention, window W, with the N_p
                                                 persistent tokens as an always-visible prefix
    m = M(x)                                     the "memory" mixer (layers/memory), whole
    o = W_o(RMSNorm(y) * sigmoid(RMSNorm(m)))    parts.NormGate

Paper: x~ = [p] || x, y = SW-Attn*(x~), o = y (x) M(x~), "normalize the outputs y and M(x~)
using learnable vector-valued weights, followed by a non-linearity sigma(.)". The two branches
read the same input and run in parallel. The memory branch reads x alone: writing the fixed
persistent tokens into the memory from a learned W0 gives a state that is itself a learned
constant, i.e. another W0, so reading x from a learned W0 is the same model (up to the
momentum such a prefix would leave behind, which decays by eta each token; the memory starts
with zero momentum, as the "memory" mixer does), and the memory's reads at the prefix positions
are never outputs. Choices the paper leaves open: RMSNorm as the normalisation, a sigmoid on
the memory side as the non-linearity, an output projection after the product (the branches'
own output projections are initialised with the input std, since their outputs are normalised).

A packed document equals itself alone when it starts on the memory's chunk grid. Decode: the
memory mixer's cache plus a ring-buffer KV cache of W slots.
Shapes: x, o [B, T, d]; positions, segment_ids [B, T] int32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.memory.mixer import NeuralMemory
from layers.registry import LayerContext, register_mixer
from models.titans.parts import (
    NormGate,
    PrefixAttention,
    attention_flops,
    inner_context,
)
from models.titans.config import MAGConfig


@register_mixer(MAGConfig)
class TitansMAG(nnx.Module):
    def __init__(self, cfg: MAGConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        inner = inner_context(ctx)
        self.attn = PrefixAttention(cfg, inner, window=cfg.window, rngs=rngs)
        self.memory = NeuralMemory(cfg.memory, inner, rngs=rngs)
        self.gate = NormGate(ctx, rngs=rngs)

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d] -> (o [B, T, d], cache)."""
        get = (lambda n: None) if cache is None else cache.get
        y, kv = self.attn(x, positions=positions, segment_ids=segment_ids, cache=get("attn"))
        m, mem = self.memory(x, positions=positions, segment_ids=segment_ids, cache=get("memory"))
        return self.gate(y, m), (None if cache is None else {"memory": mem, "attn": kv})

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        return {"memory": self.memory.init_cache(batch, max_len, dtype),
                "attn": self.attn.init_cache(batch, max_len, dtype)}

    @staticmethod
    def flops_per_token(cfg: MAGConfig, d_model: int, seq_len: int) -> float:
        """The memory mixer's count, the attention's (with its persistent keys) and W_o."""
        return (NeuralMemory.flops_per_token(cfg.memory, d_model, seq_len)
                + attention_flops(cfg, d_model, seq_len, cfg.window) + NormGate.flops_per_token(d_model))

    def describe(self) -> str:
        return (f"Titans MAG: W_o(RMSNorm({self.attn.describe()}) * sigmoid(RMSNorm(memory "
                f"[{self.memory.describe()}])))")

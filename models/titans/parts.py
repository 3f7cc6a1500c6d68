"""The NNX pieces the three Titans mixers share: the attention with a persistent prefix and the
normalised gate that combines an attention output with a memory output.

`PrefixAttention` owns the attention's q/k/v/o projections (layers/attention/mixer.py's
`init_head_projections`, so the parameter names are the attention mixer's) and the N_p
persistent tokens p [N_p, d]. The persistent tokens are inputs, as in Titans Eq 19
(x_new = [p] || x): they pass through the same k/v projections (and k-norm), but get no RoPE,
because a prefix that every query sees at every distance has no position. Initialised N(0, 1),
the scale of the normalised inputs they sit beside.

`NormGate`: o = W_o(y_norm(y) * sigmoid(m_norm(m))), Titans Eq 28's "normalize the outputs y
and M(x~) using learnable vector-valued weights, followed by a non-linearity" with RMSNorms as
the normalisations and a sigmoid as the non-linearity (applied to the memory side, so the
memory gates the attention). W_o writes into the residual stream (std ctx.out_std).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention.mixer import init_head_projections, project_heads
from layers.kv_cache import init_kv_cache, kv_cache_update
from layers.linear import Dense
from layers.norm import RMSNorm
from layers.registry import LayerContext
from layers.rope import apply_rope
from layers.sharding import param
from models.titans import attend
from models.titans.config import TitansConfig

F32 = jnp.float32


def inner_context(ctx: LayerContext) -> LayerContext:
    """The context of a sub-layer whose output is normalised before it is used (not added to
    the residual stream): its output projection gets the input projections' std."""
    return dataclasses.replace(ctx, out_std=ctx.init_std)


class PrefixAttention(nnx.Module):
    """Softmax attention heads plus N_p persistent tokens (see the module docstring).

    window: the sliding window of `__call__` (MAG / MAL); MAC uses the projections and
    `persistent_kv` only. The output projection o_proj is created here with ctx.out_std.
    """

    def __init__(self, cfg: TitansConfig, ctx: LayerContext, *, window: int | None, rngs: nnx.Rngs):
        self.cfg, self.window, self.runtime = cfg, window, ctx.runtime
        init_head_projections(self, cfg, ctx, rngs)
        n = cfg.num_persistent
        self.persistent = (param(jax.random.normal(rngs.params(), (n, ctx.d_model), F32), (None, "embed"))
                           if n else None)

    def project(self, x: jax.Array, positions: jax.Array):
        """x [B, T, d] -> q [B, T, H, D], k, v [B, T, K, D] (normed with qk_norm, RoPE'd)."""
        return project_heads(self, x, positions)

    def keys_values(self, x: jax.Array, positions: jax.Array):
        """k, v [B, T, K, D] of x [B, T, d] at `positions` (MAC's retrieved tokens)."""
        b, t, _ = x.shape
        k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        if self.cfg.qk_norm:
            k = self.k_norm(k)
        return apply_rope(k, positions, self.cfg.rope_theta), v

    def persistent_kv(self):
        """(k, v) [N_p, K, D] of the persistent tokens (no RoPE), or None when N_p = 0."""
        if self.persistent is None:
            return None
        p = self.persistent[...]
        k = self.k_proj(p).reshape(-1, self.kv_heads, self.head_dim)
        v = self.v_proj(p).reshape(-1, self.kv_heads, self.head_dim)
        if self.cfg.qk_norm:
            k = self.k_norm(k)
        return k, v

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """Sliding-window attention with the persistent prefix, x [B, T, d] -> (W_o o [B, T, d],
        cache). Training and prefill: window branch (block-sparse op) + persistent branch;
        with a cache, a third branch over the tokens already cached."""
        b, t, _ = x.shape
        q, k, v = self.project(x, positions)
        rt = self.runtime
        branches = [attend.window_branch(q, k, v, segment_ids, window=self.window,
                                         block_q=rt.attention_block_q, block_k=rt.attention_block_k,
                                         implementation=rt.sparse_attention_impl)]
        pkv = self.persistent_kv()
        if pkv is not None:
            branches.append(attend.persistent_branch(q, *pkv, segment_ids))
        if cache is not None:
            old = {name: cache[name] for name in ("k", "v", "segment_ids", "positions")}
            _, cache = kv_cache_update(cache, k, v, segment_ids, positions)
            branches.append(attend.cache_branch(q, old, segment_ids, positions, window=self.window))
        o, _ = attend.merge(branches)
        return self.o_proj(o.reshape(b, t, self.heads * self.head_dim)), cache

    def init_cache(self, batch: int, max_len: int, dtype) -> dict:
        """A ring buffer of min(window, max_len) slots (the persistent tokens need none)."""
        return init_kv_cache(batch, min(max_len, self.window), self.kv_heads, self.head_dim, dtype)

    def describe(self) -> str:
        c, rt = self.cfg, self.runtime
        w = f"window={self.window} via block_sparse_attention impl={rt.sparse_attention_impl or 'auto'}, " \
            if self.window is not None else ""
        return (f"attention H={self.heads} KV={self.kv_heads} D={self.head_dim}"
                f"{' qk_norm' if c.qk_norm else ''}, {w}{c.num_persistent} persistent tokens (dense branch)")


class NormGate(nnx.Module):
    """o = W_o(y_norm(y) * sigmoid(m_norm(m))) for y, m [B, T, d] (module docstring)."""

    def __init__(self, ctx: LayerContext, *, rngs: nnx.Rngs):
        d = ctx.d_model
        self.y_norm = RMSNorm(d, eps=ctx.norm_eps)
        self.m_norm = RMSNorm(d, eps=ctx.norm_eps)
        self.o_proj = Dense(d, d, axes=("heads", "embed"), std=ctx.out_std, dtype=ctx.dtype, rngs=rngs)

    def gate(self, y_normed: jax.Array, m: jax.Array) -> jax.Array:
        """y_normed (already y_norm(y)), m [B, T, d] -> the product before W_o, in y's dtype."""
        g = jax.nn.sigmoid(self.m_norm(m).astype(F32))
        return (y_normed.astype(F32) * g).astype(y_normed.dtype)

    def __call__(self, y: jax.Array, m: jax.Array) -> jax.Array:
        return self.o_proj(self.gate(self.y_norm(y), m))

    @staticmethod
    def flops_per_token(d_model: int) -> float:
        return 3.0 * 2.0 * d_model * d_model


def attention_flops(cfg: TitansConfig, d_model: int, seq_len: int, window: int | None) -> float:
    """Training FLOPs per token of PrefixAttention: the attention mixer's count for the same
    heads and window, plus the N_p persistent keys every query scores and reads."""
    from layers.attention.mixer import Attention
    from layers.attention.config import AttentionConfig
    heads = AttentionConfig(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                            qk_norm=cfg.qk_norm, rope_theta=cfg.rope_theta, window=window)
    persistent = 2 * 2 * cfg.num_heads * cfg.dim_per_head(d_model) * cfg.num_persistent
    return Attention.flops_per_token(heads, d_model, seq_len) + 3.0 * persistent

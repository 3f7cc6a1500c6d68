"""Softmax attention mixer: MHA / GQA / MQA, causal or sliding window, packed documents,
optional QK-norm and logit soft-cap, KV-cache decode.

Registered for `AttentionConfig`; the default mixer names "attn" (full) and "swa" (window 128)
are two configs of this one module. The math lives in `pallas_kernels.attention.attention`;
this module only projects, normalises, rotates and hands over.

With `runtime.attention_impl="block_sparse"` training and prefill go through
`pallas_kernels.block_sparse_attention` instead, with a causal or sliding-window block layout
built once per sequence length on the host (implementation: `runtime.sparse_attention_impl`).
The layout is by token index, so this assumes what the blocked attention path assumes: positions
increase by one along each document of a packed row (segment ids mask the other documents).
Decode keeps the attention op: a ring-buffer cache has no index order for a layout to follow.

Shapes: B batch, T time, H query heads, K kv heads (H % K == 0), D head dim, d model width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.kv_cache import init_kv_cache, kv_cache_update
from layers.linear import Dense
from layers.norm import RMSNorm
from layers.registry import LayerContext, register_mixer
from layers.rope import apply_rope
from layers.sharding import constrain
from pallas_kernels.attention.api import attention
from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.api import block_sparse_attention
from train.config import AttentionConfig


@register_mixer(AttentionConfig)
class Attention(nnx.Module):
    def __init__(self, cfg: AttentionConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.runtime = ctx.runtime
        self.heads, self.kv_heads = cfg.num_heads, cfg.kv_heads
        self.head_dim = cfg.dim_per_head(ctx.d_model)
        d, hd = ctx.d_model, self.head_dim
        proj = dict(axes=("embed", "heads"), std=ctx.init_std, dtype=ctx.dtype, rngs=rngs)
        self.q_proj = Dense(d, self.heads * hd, **proj)
        self.k_proj = Dense(d, self.kv_heads * hd, **proj)
        self.v_proj = Dense(d, self.kv_heads * hd, **proj)
        self.o_proj = Dense(self.heads * hd, d, axes=("heads", "embed"), std=ctx.out_std, dtype=ctx.dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, eps=ctx.norm_eps)
            self.k_norm = RMSNorm(hd, eps=ctx.norm_eps)

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d]; positions, segment_ids [B, T] int32 -> (y [B, T, d], cache)."""
        b, t, _ = x.shape
        cfg, hd = self.cfg, self.head_dim
        heads = ("batch", "seq", "act_heads", None)
        q = constrain(self.q_proj(x).reshape(b, t, self.heads, hd), heads)
        k = constrain(self.k_proj(x).reshape(b, t, self.kv_heads, hd), heads)
        v = constrain(self.v_proj(x).reshape(b, t, self.kv_heads, hd), heads)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
        rt = self.runtime
        block_sparse = rt.attention_impl == "block_sparse"
        kw = dict(window=cfg.window, logit_softcap=cfg.logit_softcap,
                  implementation=None if block_sparse else rt.attention_impl,
                  block_q=rt.attention_block_q, block_k=rt.attention_block_k)
        if cache is None and block_sparse:
            lay = masks.causal_layout(t, cfg.window, rt.attention_block_q, rt.attention_block_k)
            o, _ = block_sparse_attention(q, k, v, lay, segment_ids=segment_ids,
                                          logit_softcap=cfg.logit_softcap,
                                          implementation=rt.sparse_attention_impl)
        elif cache is None:
            o = attention(q, k, v, segment_ids=segment_ids, positions=positions, **kw)
        else:
            keys, cache = kv_cache_update(cache, k, v, segment_ids, positions)
            o = attention(q, keys["k"], keys["v"], segment_ids=segment_ids, positions=positions,
                          kv_segment_ids=keys["segment_ids"], kv_positions=keys["positions"], **kw)
        return self.o_proj(o.reshape(b, t, self.heads * hd)), cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """A sliding-window layer keeps only `window` slots (a ring buffer)."""
        size = max_len if self.cfg.window is None else min(max_len, self.cfg.window)
        return init_kv_cache(batch, size, self.kv_heads, self.head_dim, dtype)

    @staticmethod
    def flops_per_token(cfg: AttentionConfig, d_model: int, seq_len: int) -> float:
        """Training FLOPs per token: projections plus QK^T and PV over the keys actually visible.

        Causal halving: query t sees min(t + 1, window) keys, averaged over t in [0, seq_len).
        Forward is 2 FLOPs per multiply-add; forward + backward is 3x forward.
        """
        hd, h, kvh = cfg.dim_per_head(d_model), cfg.num_heads, cfg.kv_heads
        proj = 2 * d_model * hd * (2 * h + 2 * kvh)
        w = seq_len if cfg.window is None else min(cfg.window, seq_len)
        # mean over t of min(t + 1, w) for t = 0 .. seq_len - 1
        visible = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
        scores = 2 * 2 * h * hd * visible
        return 3.0 * (proj + scores)

    def describe(self) -> str:
        c = self.cfg
        parts = [f"softmax attention H={self.heads} KV={self.kv_heads} D={self.head_dim}",
                 "full causal" if c.window is None else f"window={c.window}"]
        if c.qk_norm:
            parts.append("qk_norm")
        if c.logit_softcap:
            parts.append(f"softcap={c.logit_softcap}")
        rt = self.runtime
        if rt.attention_impl == "block_sparse":
            parts.append(f"impl=block_sparse/{rt.sparse_attention_impl or 'auto'} "
                         f"(decode: attention op)")
        else:
            parts.append(f"impl={rt.attention_impl or 'auto'}")
        return ", ".join(parts)


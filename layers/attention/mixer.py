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

from layers.conv import CausalConv1d
from layers.kv_cache import init_kv_cache, kv_cache_update
from layers.linear import Dense
from layers.norm import RMSNorm
from layers.registry import LayerContext, register_mixer
from layers.rope import apply_rope
from layers.sharding import constrain
from pallas_kernels.attention.api import attention
from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.api import block_sparse_attention
from layers.attention.config import AttentionConfig
from layers.config import HeadsConfig


HEADS = ("batch", "seq", "act_heads", None)  # sharding of [B, T, heads, D] activations


def init_head_projections(m: nnx.Module, cfg: HeadsConfig, ctx: LayerContext, rngs: nnx.Rngs) -> None:
    """Give the mixer `m` what every softmax-attention mixer (attention, moba, nsa) has: heads,
    kv_heads, head_dim, q/k/v/o projections and, with cfg.qk_norm, the q/k RMSNorms (as attributes
    of `m`, so parameter names stay q_proj, k_proj, ... wherever they are used)."""
    m.heads, m.kv_heads = cfg.num_heads, cfg.kv_heads
    m.head_dim = hd = cfg.dim_per_head(ctx.d_model)
    d = ctx.d_model
    proj = dict(axes=("embed", "heads"), std=ctx.init_std, dtype=ctx.dtype, rngs=rngs)
    m.q_proj = Dense(d, m.heads * hd, **proj)
    m.k_proj = Dense(d, m.kv_heads * hd, **proj)
    m.v_proj = Dense(d, m.kv_heads * hd, **proj)
    m.o_proj = Dense(m.heads * hd, d, axes=("heads", "embed"), std=ctx.out_std, dtype=ctx.dtype, rngs=rngs)
    if cfg.qk_norm:
        m.q_norm = RMSNorm(hd, eps=ctx.norm_eps)
        m.k_norm = RMSNorm(hd, eps=ctx.norm_eps)


def project_heads(m: nnx.Module, x: jax.Array, positions: jax.Array, k: jax.Array | None = None,
                  conv=None):
    """x [B, T, d] -> q [B, T, H, D], k, v [B, T, K, D], normed (qk_norm) and rotated (RoPE at
    `positions`) as attention sees them. k: the projected keys [B, T, K*D] when the caller
    transformed them (e.g. MoBA's key convolution); None projects x. conv: None, or a function
    applied to the concatenated projections [B, T, (H + 2K) * D] (the short convolution)."""
    b, t, _ = x.shape
    hd, cfg = m.head_dim, m.cfg
    q, k, v = m.q_proj(x), (m.k_proj(x) if k is None else k), m.v_proj(x)
    if conv is not None:
        q, k, v = jnp.split(conv(jnp.concatenate([q, k, v], axis=-1)),
                            [m.heads * hd, (m.heads + m.kv_heads) * hd], axis=-1)
    q = constrain(q.reshape(b, t, m.heads, hd), HEADS)
    k = constrain(k.reshape(b, t, m.kv_heads, hd), HEADS)
    v = constrain(v.reshape(b, t, m.kv_heads, hd), HEADS)
    if cfg.qk_norm:
        q, k = m.q_norm(q), m.k_norm(k)
    return apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta), v


@register_mixer(AttentionConfig)
class Attention(nnx.Module):
    def __init__(self, cfg: AttentionConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.runtime = ctx.runtime
        init_head_projections(self, cfg, ctx, rngs)
        channels = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.conv = (CausalConv1d(channels, cfg.conv_size, bias=False, dtype=ctx.dtype, rngs=rngs)
                     if cfg.conv_size else None)

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d]; positions, segment_ids [B, T] int32 -> (y [B, T, d], cache)."""
        b, t, _ = x.shape
        cfg, hd = self.cfg, self.head_dim
        conv, conv_cache = None, {}
        if self.conv is not None:
            def conv(u):
                y, conv_cache["conv"] = self.conv(u, segment_ids, None if cache is None else cache["conv"])
                return y
        q, k, v = project_heads(self, x, positions, conv=conv)
        # q and k as attention sees them, for attention statistics (train/evals/diagnostics.py
        # reads them with nnx.capture). Outside nnx.capture this is a no-op when tracing and
        # leaves nothing in the compiled graph.
        self.sow(nnx.Intermediate, "qk", (q, k), capture_noop=True)
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
            kv_cache = {k_: v_ for k_, v_ in cache.items() if k_ != "conv"}
            keys, cache = kv_cache_update(kv_cache, k, v, segment_ids, positions)
            o = attention(q, keys["k"], keys["v"], segment_ids=segment_ids, positions=positions,
                          kv_segment_ids=keys["segment_ids"], kv_positions=keys["positions"], **kw)
            cache = {**cache, **conv_cache}
        return self.o_proj(o.reshape(b, t, self.heads * hd)), cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """A sliding-window layer keeps only `window` slots (a ring buffer); with conv_size,
        the short convolution's last inputs too."""
        size = max_len if self.cfg.window is None else min(max_len, self.cfg.window)
        cache = init_kv_cache(batch, size, self.kv_heads, self.head_dim, dtype)
        if self.conv is not None:
            cache["conv"] = self.conv.init_cache(batch, dtype)
        return cache

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
        conv = 2.0 * cfg.conv_size * hd * (h + 2 * kvh)
        return 3.0 * (proj + scores + conv)

    def describe(self) -> str:
        c = self.cfg
        parts = [f"softmax attention H={self.heads} KV={self.kv_heads} D={self.head_dim}",
                 "full causal" if c.window is None else f"window={c.window}"]
        if c.qk_norm:
            parts.append("qk_norm")
        if c.logit_softcap:
            parts.append(f"softcap={c.logit_softcap}")
        if c.conv_size:
            parts.append(f"qkv conv={c.conv_size}")
        rt = self.runtime
        if rt.attention_impl == "block_sparse":
            parts.append(f"impl=block_sparse/{rt.sparse_attention_impl or 'auto'} "
                         f"(decode: attention op)")
        else:
            parts.append(f"impl={rt.attention_impl or 'auto'}")
        return ", ".join(parts)


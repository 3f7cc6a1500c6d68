"""RetNet multi-scale retention (Sun et al. 2023, "Retentive Network"), kind "retention".

    q_t = Rot(x_t W_q, pos_t),  k_t = Rot(x_t W_k, pos_t),  v_t = x_t W_v,  g_t = x_t W_g
    S_t = gamma_h S_{t-1} + k_t v_t^T / sqrt(K)           gamma_h = 1 - 2^(-5 - h), h = 0..H-1
    o_t = q_t S_t
    y_t = W_o [swish(g_t) * GroupNorm_head(o_t)]

Per head h the decay gamma_h is fixed (not learned), from 1 - 1/32 for the first head to ever
closer to 1, which gives the heads their different time scales ("multi-scale"). K = expand_k *
d / H, V = expand_v * d / H with expand_v = 2 in the paper (the retention block's value and gate
widths are 2d, and W_o maps 2d back to d).

Faithful: the decay schedule, the sqrt(K) key scaling, value width 2d, the swish output gate
after a per-head normalisation. Simplified, and why:
  * Rotation: the paper's xPos is a rotation (RoPE-like, theta = 10000) times a per-position
    exponential decay; that decay is exactly what gamma_h does in the recurrence, so the rotation
    alone remains. We use the framework's RoPE (rotate-half channel pairing, frequencies
    theta^(-2i/K)) rather than torchscale's rotate-every-two pairing with linspace frequencies: a
    fixed permutation of the key channels and a slightly different frequency ladder, not a
    different mechanism. Positions come from the batch, so they restart at every packed document.
  * GroupNorm is an RMSNorm per head with a learned scale (as torchscale's later RetNet and
    fla's MultiScaleRetention do), not a mean-subtracting LayerNorm per head.
  * Optional short convolution (+ SiLU) on q/k/v (conv_size, off by default; not in the paper).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.linear_attention import common
from layers.linear_attention.common import LinearAttentionMixer, OpInputs
from layers.norm import RMSNorm
from layers.registry import LayerContext, register_mixer
from layers.rope import apply_rope
from layers.linear_attention.config import RetentionConfig


def retention_log_decay(num_heads: int) -> np.ndarray:
    """log(gamma_h) = log(1 - 2^(-5 - h)) for h = 0..H-1, computed in float64 (gamma is within
    2^-20 of 1 for h = 15, where float32 arithmetic would round it), returned float32 [H]."""
    return np.log1p(-np.exp2(-5.0 - np.arange(num_heads, dtype=np.float64))).astype(np.float32)


@register_mixer(RetentionConfig)
class Retention(LinearAttentionMixer):
    def __init__(self, cfg: RetentionConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = ctx.d_model, cfg.num_heads
        conv_channels = self.setup_qkv(cfg, ctx, rngs)
        self.g_proj = common.dense_in(d, h * self.dv, ctx, rngs)
        self.o_norm = RMSNorm(self.dv, eps=ctx.norm_eps)
        self.o_proj = common.dense_out(h * self.dv, ctx, rngs)
        self.log_gamma = tuple(float(g) for g in retention_log_decay(h))  # static, not a param
        self.setup_op(ctx, heads=h, key_dim=self.dk, value_dim=self.dv, scale=None,
                      conv_size=cfg.conv_size, conv_channels=conv_channels, rngs=rngs)

    def features(self, x, *, positions, segment_ids, conv):
        q, k, v = self.project_qkv(x, conv)
        theta = self.cfg.rope_theta
        q, k = apply_rope(q, positions, theta), apply_rope(k, positions, theta)
        g = common.constant_log_decay(jnp.asarray(self.log_gamma), x.shape[0], x.shape[1])
        return OpInputs(q, k, v, g), self.g_proj(x)

    def readout(self, o, gate):
        o = self.o_norm(o)
        o = common.merge_heads(o) * jax.nn.silu(gate.astype(jnp.float32)).astype(o.dtype)
        return self.o_proj(o)

    @staticmethod
    def flops_per_token(cfg: RetentionConfig, d_model: int, seq_len: int) -> float:
        _, dv = common.qkv_widths(cfg, d_model)
        return common.qkv_training_flops(cfg, d_model, seq_len, gate_width=cfg.num_heads * dv)

    def describe_math(self) -> str:
        g = np.exp(np.asarray(self.log_gamma))
        return (f"retention H={self.heads} K={self.dk} V={self.dv}, gamma {g[0]:.4f}..{g[-1]:.6f}, "
                f"rope theta={self.cfg.rope_theta:g}, swish gate")

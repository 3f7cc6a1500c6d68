"""Gated Linear Attention (Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), kind "gla".

    q_t = x_t W_q,  k_t = x_t W_k    (key width expand_k d = d/2),   v_t = x_t W_v,  r_t = x_t W_r
    alpha_t = sigmoid(x_t W_a1 W_a2 + b_a)^(1/16)        per key channel, W_a1 W_a2 of rank 16
    S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T,   o_t = q_t S_t / sqrt(K)
    y_t = W_o [ swish(r_t) * RMSNorm_head(o_t) ]

In log space the gate is log alpha_t = logsigmoid(.) / gate_logit_normalizer (16): the
normaliser keeps alpha close to 1 at initialisation (slow forgetting), which the paper found
important. The decay is per key channel, [B, T, H, K] for the op (fla's chunk_gla).

Faithful: key dim d/2, low-rank (16) forget-gate projection with a bias, the 1/16 temperature,
swish output gate after a per-head RMSNorm, q.k scaled by 1/sqrt(K). Additions: an optional short
convolution (+ SiLU) on q/k/v (conv_size; fla offers it, the paper has none). The gate bias
starts at zero (alpha = 0.5^(1/16) ~ 0.958); projections are N(0, init_std).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.linear import Dense
from layers.linear_attention import common
from layers.linear_attention.common import LinearAttentionMixer, OpInputs
from layers.norm import RMSNorm
from layers.registry import LayerContext, register_mixer
from layers.sharding import param
from layers.linear_attention.config import GLAConfig

F32 = jnp.float32


@register_mixer(GLAConfig)
class GLA(LinearAttentionMixer):
    def __init__(self, cfg: GLAConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = ctx.d_model, cfg.num_heads
        conv_channels = self.setup_qkv(cfg, ctx, rngs)
        self.r_proj = common.dense_in(d, h * self.dv, ctx, rngs)  # output gate
        r = cfg.gate_low_rank_dim
        self.gk_down = common.dense_in(d, r, ctx, rngs, axes=("embed", None))  # rank 16: whole
        self.gk_up = Dense(r, h * self.dk, axes=(None, "heads"), std=r ** -0.5, dtype=ctx.dtype, rngs=rngs)
        self.gk_bias = param(jnp.zeros((h * self.dk,), F32), ("heads",))
        self.o_norm = RMSNorm(self.dv, eps=ctx.norm_eps)
        self.o_proj = common.dense_out(h * self.dv, ctx, rngs)
        self.setup_op(ctx, heads=h, key_dim=self.dk, value_dim=self.dv, scale=None,
                      conv_size=cfg.conv_size, conv_channels=conv_channels, rngs=rngs)

    def features(self, x, *, positions, segment_ids, conv):
        q, k, v = self.project_qkv(x, conv)
        gk = self.gk_up(self.gk_down(x)).astype(F32) + self.gk_bias[...]
        log_alpha = jax.nn.log_sigmoid(gk) / self.cfg.gate_logit_normalizer
        ins = OpInputs(q, k, v, common.split_heads(log_alpha, self.heads))
        return ins, self.r_proj(x)

    def readout(self, o, gate):
        o = common.merge_heads(self.o_norm(o))
        return self.o_proj(o * jax.nn.silu(gate.astype(F32)).astype(o.dtype))

    @staticmethod
    def flops_per_token(cfg: GLAConfig, d_model: int, seq_len: int) -> float:
        h, r = cfg.num_heads, cfg.gate_low_rank_dim
        dk, dv = common.qkv_widths(cfg, d_model)
        return common.qkv_training_flops(cfg, d_model, seq_len, gate_width=h * dv + r, extra=2.0 * r * h * dk)

    def describe_math(self) -> str:
        c = self.cfg
        return (f"gla H={self.heads} K={self.dk} V={self.dv}, gate rank {c.gate_low_rank_dim} "
                f"/{c.gate_logit_normalizer:g}, swish gate")

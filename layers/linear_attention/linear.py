"""Vanilla linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"), kind "linear".

    q_t = phi(x_t W_q),  k_t = phi(x_t W_k),  v_t = x_t W_v          (per head, dims K, K, V)
    S_t = S_{t-1} + k_t v_t^T,   z_t = z_{t-1} + k_t                  (no decay)
    o_t = q_t S_t / (q_t . z_t + eps)       if normalize, else  q_t S_t / sqrt(K)
    y_t = W_o [RMSNorm_head(o_t)]           (the norm if output_norm)

phi (`feature_map`): "elu" is elu(x) + 1 (the paper's choice, strictly positive), "relu", or
"identity". The normaliser z_t comes from the op itself: v is extended with a ones column, so the
last output channel is q_t . z_t (common.append_ones); the op's 1/sqrt(K) scale multiplies
numerator and denominator alike and cancels.

Faithful: feature map, causal normaliser, no decay. Additions (as in fla's LinearAttention):
multi-head split, an optional RMSNorm per head on the output (`output_norm`; Qin et al. 2022,
"The Devil in Linear Transformer", find the normaliser's unbounded gradients harmful and a norm
after the attention better: set normalize=False, output_norm=True for that variant), and an
optional short convolution (+ SiLU) on q/k/v before the feature map. The denominator has
eps = 1e-6 so an all-zero relu query gives 0, not NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.linear_attention import common
from layers.linear_attention.common import LinearAttentionMixer, OpInputs
from layers.norm import RMSNorm
from layers.registry import LayerContext, register_mixer
from layers.linear_attention.config import LinearAttnConfig

EPS = 1e-6

FEATURE_MAPS = {
    "elu": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}


@register_mixer(LinearAttnConfig)
class LinearAttention(LinearAttentionMixer):
    def __init__(self, cfg: LinearAttnConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = ctx.d_model, cfg.num_heads
        conv_channels = self.setup_qkv(cfg, ctx, rngs)
        self.o_norm = RMSNorm(self.dv, eps=ctx.norm_eps) if cfg.output_norm else None
        self.o_proj = common.dense_out(h * self.dv, ctx, rngs)
        self.setup_op(ctx, heads=h, key_dim=self.dk, value_dim=self.dv + cfg.normalize, scale=None,
                      conv_size=cfg.conv_size, conv_channels=conv_channels, rngs=rngs)

    def features(self, x, *, positions, segment_ids, conv):
        q, k, v = self.project_qkv(x, conv)
        phi = FEATURE_MAPS[self.cfg.feature_map]
        q, k = phi(q), phi(k)
        if self.cfg.normalize:
            v = common.append_ones(v)
        return OpInputs(q, k, v, None), None

    def readout(self, o, aux):
        if self.cfg.normalize:
            num, den = o[..., :-1].astype(jnp.float32), o[..., -1:].astype(jnp.float32)
            o = (num / (den + EPS)).astype(o.dtype)
        if self.o_norm is not None:
            o = self.o_norm(o)
        return self.o_proj(common.merge_heads(o))

    @staticmethod
    def flops_per_token(cfg: LinearAttnConfig, d_model: int, seq_len: int) -> float:
        return common.qkv_training_flops(cfg, d_model, seq_len, value_extra=int(cfg.normalize))

    def describe_math(self) -> str:
        c = self.cfg
        return (f"linear attention H={self.heads} K={self.dk} V={self.dv}, phi={c.feature_map}"
                f"{', normalised' if c.normalize else ''}{', output norm' if c.output_norm else ''}")

"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with
Delta Rule"), kind "gdn".

    q_t, k_t, v_t = SiLU(causal depthwise conv_4(x_t [W_q, W_k, W_v]))    (V = 2 K by default)
    q_t, k_t <- q_t / |q_t|, k_t / |k_t|                                 (L2 norm, inside the op)
    beta_t = sigmoid(x_t W_b)                                            per head, in (0, 1)
    g_t = -exp(A_log) * softplus(x_t W_a + dt_bias)                      per head, <= 0 (Mamba2's)
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = q_t S_t / sqrt(K)
    y_t = W_o [ RMSNorm_head(o_t) * swish(x_t W_g) ]                     (gated RMSNorm)

The gate alpha_t = exp(g_t) erases the whole state quickly when needed (Mamba2's strength); the
delta rule edits one key's value precisely (DeltaNet's); Gated DeltaNet has both. A_log and
dt_bias are initialised as ssd's (common.mamba2_decay_params: A uniform in [a_init_min,
a_init_max], dt log-uniform in [dt_min, dt_max]) and, like ssd's, are not weight-decayed (the
optimizer decays only "kernel"/"embedding"). `allow_neg_eigval` gives beta = 2 sigmoid(.) in
(0, 2), as fla's option.

Faithful (to the paper's layer as fla's `GatedDeltaNet` implements it): short convs + SiLU on
q, k, v (no bias), L2-normalised q/k (in float32, inside the op), per-head beta and decay from
bias-free projections, Mamba2's decay parameterisation, gated RMSNorm (norm, then swish gate:
fla's FusedRMSNormGated) before W_o, scale 1/sqrt(K), value heads twice as wide as key heads.
Differences: widths are ratios of d_model (expand_k 0.5, expand_v 1.0 by default; fla fixes
head_dim 256 and expand_v 2, i.e. 0.75 d and 1.5 d at d = 2048 with 6 heads), q/k/v heads are
equal in number (no separate num_v_heads); A is drawn from [1, 16] as mamba_ssm (fla's GDN:
[0, 16]); projections N(0, init_std) instead of PyTorch's uniform default; `use_gate=False`
(fla's option) drops the output gate, `conv_size=0` the conv and its SiLU.
"""
from __future__ import annotations

import jax
from flax import nnx

from layers.linear_attention import common
from layers.linear_attention.deltanet import DeltaNet
from layers.registry import LayerContext, register_mixer
from layers.linear_attention.config import GDNConfig


@register_mixer(GDNConfig)
class GatedDeltaNet(DeltaNet):
    def setup_decay(self, cfg: GDNConfig, ctx: LayerContext, rngs: nnx.Rngs) -> None:
        self.a_proj = common.dense_in(ctx.d_model, cfg.num_heads, ctx, rngs)  # dt, one per head
        self.A_log, self.dt_bias = common.mamba2_decay_params(rngs.params(), cfg.num_heads, cfg)

    def log_decay(self, x: jax.Array) -> jax.Array:
        return common.mamba2_log_decay(self.a_proj(x), self.A_log[...], self.dt_bias[...])[1]

    @staticmethod
    def flops_per_token(cfg: GDNConfig, d_model: int, seq_len: int) -> float:
        """DeltaNet's count plus the decay projection (H more output channels)."""
        return DeltaNet.flops_per_token(cfg, d_model, seq_len) + 3.0 * 2.0 * d_model * cfg.num_heads

    def describe_math(self) -> str:
        return f"gated deltanet H={self.heads} K={self.dk} V={self.dv}, mamba2 decay, {self._describe_options()}"

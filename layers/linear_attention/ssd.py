"""Mamba2's SSD layer (Dao & Gu 2024, "Transformers are SSMs"), kind "ssd".

    z, x, B, C, dt_raw = x_t W_in                 widths d_in, d_in, G N, G N, H   (d_in = expand d)
    x, B, C = SiLU(causal depthwise conv_4([x, B, C]))
    dt = softplus(dt_raw + dt_bias),  a = -exp(A_log) * dt          (per head, a <= 0)
    h_t = exp(a_t) h_{t-1} + (dt_t x_t) B_t^T      per head h: x_t [P], B_t, C_t [N] of group h // (H/G)
    y_t = C_t h_t + D_h x_t
    out = W_out [ RMSNorm_group(y * SiLU(z)) ]

H = d_in / P heads of head_dim P, state dim N (`state_dim`), G = n_groups groups of heads sharing
B and C (G = 1: one B/C for all heads, as multi-value attention).

Mapping onto the op (S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale q_t S_t): q = C,
k = B, v = dt * x, g = a (one decay per head and token), scale = 1. The op shares k with v (its
kv heads), but here B is shared across heads while x is per head, so B and C are repeated to the
H heads (a repeat XLA fuses; the op's [K, V] state per head is exactly Mamba2's [N, P] state).

Initialisation as mamba_ssm: A = exp(A_log) uniform in [a_init_min, a_init_max] = [1, 16],
dt = softplus(dt_bias) log-uniform in [dt_min, dt_max] = [1e-3, 0.1] (floored at dt_init_floor),
D = 1, conv uniform +-1/sqrt(4) with zero bias. A_log, D, dt_bias and biases are named so that
the optimizer applies no weight decay to them (train/optim.py decays only "kernel"/"embedding").

Faithful: everything above, including the gated RMSNorm with the gate applied before the norm
(mamba_ssm's norm_before_gate=False) and normalising per group. Differences: projections are
separate matrices (z, x, B|C, dt) rather than one fused in_proj, and projections are initialised
N(0, init_std) instead of PyTorch's uniform default. conv_size=0 removes the convolution (an
ablation; the SiLU stays); no dt clamping (mamba_ssm's default dt_limit is (0, inf) too).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.linear_attention import common
from layers.linear_attention.common import LinearAttentionMixer, OpInputs
from layers.registry import LayerContext, register_mixer
from layers.sharding import param
from layers.linear_attention.config import SSDConfig

F32 = jnp.float32


@register_mixer(SSDConfig)
class SSD(LinearAttentionMixer):
    def __init__(self, cfg: SSDConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = ctx.d_model
        self.d_inner = cfg.expand * d
        self.heads = cfg.num_heads(d)
        self.groups, self.dn, self.dp = cfg.n_groups, cfg.state_dim, cfg.head_dim
        h, gn = self.heads, cfg.n_groups * cfg.state_dim
        self.z_proj = common.dense_in(d, self.d_inner, ctx, rngs)
        self.x_proj = common.dense_in(d, self.d_inner, ctx, rngs)
        self.bc_proj = common.dense_in(d, 2 * gn, ctx, rngs)
        self.dt_proj = common.dense_in(d, h, ctx, rngs)
        self.A_log, self.dt_bias = common.mamba2_decay_params(rngs.params(), h, cfg)
        self.D = param(jnp.ones((h,), F32), ("heads",))
        self.norm = common.MergedHeadsNorm(self.d_inner, eps=ctx.norm_eps, groups=cfg.n_groups)
        self.out_proj = common.dense_out(self.d_inner, ctx, rngs)
        self.setup_op(ctx, heads=h, key_dim=cfg.state_dim, value_dim=cfg.head_dim, scale=1.0,
                      conv_size=cfg.conv_size, conv_channels=self.d_inner + 2 * gn, conv_bias=True, rngs=rngs)

    def features(self, x, *, positions, segment_ids, conv):
        b, t, _ = x.shape
        h, g, n = self.heads, self.groups, self.dn
        z = self.z_proj(x)
        xbc = conv(jnp.concatenate([self.x_proj(x), self.bc_proj(x)], axis=-1), "silu")
        if self.conv is None:  # SiLU with or without the conv (Mamba2)
            xbc = jax.nn.silu(xbc)
        xs, bm, cm = jnp.split(xbc, [self.d_inner, self.d_inner + g * n], axis=-1)
        dt, log_decay = common.mamba2_log_decay(self.dt_proj(x), self.A_log[...], self.dt_bias[...])  # [B, T, H]
        xh = common.split_heads(xs, h)  # [B, T, H, P]
        rep = lambda m: jnp.repeat(m.reshape(b, t, g, n), h // g, axis=2)  # group -> its heads
        v = (xh.astype(F32) * dt[..., None]).astype(xh.dtype)
        return OpInputs(rep(cm), rep(bm), v, log_decay), (xh, z)

    def readout(self, o, aux):
        xh, z = aux
        y = o.astype(F32) + self.D[...][:, None] * xh.astype(F32)  # D skip, per head
        y = common.merge_heads(y) * jax.nn.silu(z.astype(F32))  # gate, then norm (per group)
        return self.out_proj(self.norm(y.astype(o.dtype)))

    @staticmethod
    def flops_per_token(cfg: SSDConfig, d_model: int, seq_len: int) -> float:
        d_in, h, gn = cfg.expand * d_model, cfg.num_heads(d_model), cfg.n_groups * cfg.state_dim
        return common.training_flops(d_model, 2 * d_in + 2 * gn + h, d_in,
                                     common.chunk_flops(h, cfg.state_dim, cfg.head_dim, seq_len),
                                     conv=2.0 * cfg.conv_size * (d_in + 2 * gn))

    def describe_math(self) -> str:
        return (f"mamba2 ssd H={self.heads} P={self.dp} N={self.dn} groups={self.groups}, "
                f"d_inner={self.d_inner}, gated rmsnorm")

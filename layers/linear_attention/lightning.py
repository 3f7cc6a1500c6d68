"""TransNormerLLM's linear attention, computed by Lightning Attention (Qin et al. 2023
"TransNormerLLM"; 2024 "Lightning Attention-2" and "Various Lengths, Constant Speed"),
kind "lightning".

    q_t = swish(x_t W_q),  k_t = swish(x_t W_k),  v_t = x_t W_v,  u_t = x_t W_u
    S_t = lambda_h S_{t-1} + k_t v_t^T,   o_t = q_t S_t / sqrt(K)
    y_t = W_o [ act(u_t) * SRMSNorm(o_t) ]        SRMSNorm(x) = x / rms(x)   (over all heads)

Decay: lambda_h = exp(-s_h * slope_scale), with s_h the ALiBi slopes of H heads (Press et al.;
2^(-8 h' / H) for h' = 1..H when H is a power of two, interleaved otherwise), so the first head
is the most local. Layer dependence: TNL multiplies the slopes of layer l of L by
(1 - l / (L - 1) + 1e-5), so lower layers decay fast and the top layer barely decays at all. A
mixer here does not know its depth (the stack scans identical periods), so that factor is the
config field `slope_scale` (default 1: every layer like TNL's first). To reproduce TNL's
schedule, give the layers of a pattern different mixer names with different slope_scale.

Output gate: TNL's U has no activation (`output_gate="none"`, the paper's
O = Norm(Q K^T V) * U); MiniMax-01's lightning layers use a sigmoid gate ("sigmoid"); "swish"
is also accepted.

Faithful: swish feature map on q/k, fixed ALiBi-slope decay, SimpleRMSNorm (no learned scale)
over the concatenated heads, then the gate U. Simplified: the 1/sqrt(K) scale on q (TNL has
none; the SRMSNorm right after makes the output invariant to it, and it keeps the state small),
no LRPE (TNL's linearised relative position encoding on the first layer only), and an optional
short convolution (+ SiLU) on q/k/v (off by default; not in TNL).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.linear_attention import common
from layers.linear_attention.common import LinearAttentionMixer, OpInputs
from layers.registry import LayerContext, register_mixer
from layers.linear_attention.config import LightningConfig

GATES = {"none": lambda u: u, "sigmoid": jax.nn.sigmoid, "swish": jax.nn.silu}


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes (float64 [H]): 2^(-8 i / n) for i = 1..n when n = H is a power of two;
    otherwise the slopes of the next lower power of two followed by every other slope of twice
    that many heads, as in ALiBi and TNL / Lightning Attention."""
    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two(num_heads))
    low = 2 ** math.floor(math.log2(num_heads))
    return np.asarray(power_of_two(low) + power_of_two(2 * low)[0::2][: num_heads - low])


@register_mixer(LightningConfig)
class Lightning(LinearAttentionMixer):
    def __init__(self, cfg: LightningConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = ctx.d_model, cfg.num_heads
        conv_channels = self.setup_qkv(cfg, ctx, rngs)
        self.eps = ctx.norm_eps
        self.u_proj = common.dense_in(d, h * self.dv, ctx, rngs)
        self.o_proj = common.dense_out(h * self.dv, ctx, rngs)
        self.log_lambda = tuple(float(-s * cfg.slope_scale) for s in alibi_slopes(h))
        self.setup_op(ctx, heads=h, key_dim=self.dk, value_dim=self.dv, scale=None,
                      conv_size=cfg.conv_size, conv_channels=conv_channels, rngs=rngs)

    def features(self, x, *, positions, segment_ids, conv):
        q, k, v = self.project_qkv(x, conv)
        g = common.constant_log_decay(jnp.asarray(self.log_lambda), x.shape[0], x.shape[1])
        return OpInputs(jax.nn.silu(q), jax.nn.silu(k), v, g), self.u_proj(x)

    def readout(self, o, u):
        o = common.rms(common.merge_heads(o), self.eps)
        u = GATES[self.cfg.output_gate](u.astype(jnp.float32)).astype(o.dtype)
        return self.o_proj(o * u)

    @staticmethod
    def flops_per_token(cfg: LightningConfig, d_model: int, seq_len: int) -> float:
        _, dv = common.qkv_widths(cfg, d_model)
        return common.qkv_training_flops(cfg, d_model, seq_len, gate_width=cfg.num_heads * dv)

    def describe_math(self) -> str:
        lam = np.exp(np.asarray(self.log_lambda))
        return (f"lightning (TNL) H={self.heads} K={self.dk} V={self.dv}, lambda {lam[0]:.4f}..{lam[-1]:.6f} "
                f"(slope_scale={self.cfg.slope_scale:g}), gate={self.cfg.output_gate}")

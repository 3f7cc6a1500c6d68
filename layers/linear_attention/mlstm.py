"""xLSTM's mLSTM with a sigmoid input gate ("mLSTMsig": Beck et al. 2025, "Tiled Flash Linear
Attention"; layer layout of xLSTM 7B, Beck et al. 2025), kind "mlstm".

    q_t, k_t = x_t W_q, x_t W_k   (width expand_qk d = d/2),   v_t = x_t W_v,   o_t = sigmoid(x_t W_o)
    i~_t, f~_t = cap(x_t W_i + b_i), cap(x_t W_f + b_f)        scalars per head, cap(z) = c tanh(z / c)
    f_t = sigmoid(f~_t),   i_t = sigmoid(i~_t)
    C_t = f_t C_{t-1} + i_t k_t v_t^T / sqrt(K)                 matrix memory [K, V]
    n_t = f_t n_{t-1} + i_t k_t / sqrt(K)                       normaliser state [K]
    h_t = (q_t C_t) / (max(|q_t . n_t|, 1) + eps)
    y_t = W_out [ o_t * RMSNorm_head(h_t) ]

Mapping onto the op: log decay log f_t = logsigmoid(f~_t) ([B, T, H]); the input gate scales the
key (k' = i_t k_t), and v is extended by a ones column so that the op's last output channel is
q_t . n_t and its state carries n_t (common.append_ones); the op's 1/sqrt(K) scale is applied to
both, as in mlstm_kernels' sigmoid-input-gate parallel form, where the normaliser is
max(|sum_s D_ts (q_t . k_s) / sqrt(K)|, 1).

Why sigmoid: the original mLSTM's exponential input gate needs a running-max stabiliser state m_t
(the state is rescaled by exp(m_{t-1} - m_t)), which is not a plain decayed linear recurrence.
With i_t = sigmoid(.) in (0, 1) no stabiliser is needed and the cell is exactly gated linear
attention with a normaliser, which TFLA reports as fast and as good as mLSTMexp.

`input_gate="exp"` is the original exponential input gate, i_t = exp(i~_t), without the
running-max stabiliser: the stabilised cell keeps C_t e^{-m_t} and n_t e^{-m_t} and divides by
max(|q.n| e^{-m_t}, e^{-m_t}), which is exactly the unstabilised h_t above (the e^{-m_t} cancels)
except that its eps is scaled by e^{m_t}. Without the stabiliser, the soft cap keeps exp(i~) <=
e^{15} = 3.3e6, so the float32 state stays in range for any practical length; it is what
transformers' xLSTM (and xLSTM 7B) computes, and exports to it. `output_norm="layernorm"` is
xLSTM 7B's multi-head LayerNorm (mean-centred, a scale per head and channel) in place of the
per-head RMSNorm with one shared [V] scale.

Faithful (xLSTM 7B's mLSTM layer): q/k of width d/2, v of width d, per-head scalar gates from
linear projections with biases, soft-capped at 15, forget-gate bias initialised linspace(3, 6)
over heads, the max(|q.n|, 1) normaliser (eps 1e-6), a per-head norm (LayerNorm with
output_norm="layernorm"), sigmoid output gate from the layer input, out projection. Choices: by
default the sigmoid input gate and a per-head RMSNorm with one shared scale; the input-gate bias
starts at 0 (with the sigmoid gate i = 1/2; the 7B model's -10 is tuned for the exponential gate,
set igate_bias_init=-10 with input_gate="exp"); no short convolution by default (xLSTM 7B dropped the original
block's conv; conv_size > 0 puts a conv (+ SiLU) on q and k, as the original mLSTM block had
on its q/k path).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.linear_attention import common
from layers.linear_attention.common import LinearAttentionMixer, OpInputs
from layers.norm import RMSNorm
from layers.registry import LayerContext, register_mixer
from layers.sharding import param
from layers.linear_attention.config import MLSTMConfig, head_width

F32 = jnp.float32
EPS = 1e-6


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


class HeadLayerNorm(nnx.Module):
    """LayerNorm of each head's [V] output (mean removed, biased variance, float32 statistics)
    with its own scale per head and channel, [H * V], no bias: xLSTM 7B's multi-head norm."""

    def __init__(self, heads: int, width: int, *, eps: float):
        self.scale = param(jnp.ones((heads * width,), F32), ("heads",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, H, V] -> [B, T, H, V] in x.dtype."""
        xf = x.astype(F32)
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].reshape(x.shape[-2:])).astype(x.dtype)


@register_mixer(MLSTMConfig)
class MLSTM(LinearAttentionMixer):
    def __init__(self, cfg: MLSTMConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = ctx.d_model, cfg.num_heads
        self.heads = h
        self.dk = head_width(d, cfg.expand_qk, h, "mlstm", "expand_qk")
        self.dv = head_width(d, cfg.expand_v, h, "mlstm", "expand_v")
        self.q_proj = common.dense_in(d, h * self.dk, ctx, rngs)
        self.k_proj = common.dense_in(d, h * self.dk, ctx, rngs)
        self.v_proj = common.dense_in(d, h * self.dv, ctx, rngs)
        self.og_proj = common.dense_in(d, h * self.dv, ctx, rngs)
        self.ig_proj = common.dense_in(d, h, ctx, rngs)
        self.fg_proj = common.dense_in(d, h, ctx, rngs)
        self.ig_bias = param(jnp.full((h,), cfg.igate_bias_init, F32), ("heads",))
        self.fg_bias = param(jnp.linspace(cfg.fgate_bias_init_min, cfg.fgate_bias_init_max, h, dtype=F32),
                             ("heads",))
        self.o_norm = (RMSNorm(self.dv, eps=ctx.norm_eps) if cfg.output_norm == "rms" else
                       HeadLayerNorm(h, self.dv, eps=ctx.norm_eps))
        self.o_proj = common.dense_out(h * self.dv, ctx, rngs)
        self.setup_op(ctx, heads=h, key_dim=self.dk, value_dim=self.dv + 1, scale=None,
                      conv_size=cfg.conv_size, conv_channels=2 * h * self.dk, rngs=rngs)

    def features(self, x, *, positions, segment_ids, conv):
        h, dk, cap = self.heads, self.dk, self.cfg.gate_soft_cap
        qk = conv(jnp.concatenate([self.q_proj(x), self.k_proj(x)], axis=-1), "silu")
        q, k = jnp.split(qk, [h * dk], axis=-1)
        i_pre = soft_cap(self.ig_proj(x).astype(F32) + self.ig_bias[...], cap)  # [B, T, H]
        f_pre = soft_cap(self.fg_proj(x).astype(F32) + self.fg_bias[...], cap)
        k = common.split_heads(k, h)
        # the input gate scales the key: sigmoid (mLSTMsig) or exp (the original mLSTM, unstabilised:
        # the soft cap bounds exp(i) by exp(gate_soft_cap), so float32 states hold it; see the docstring)
        i_gate = jax.nn.sigmoid(i_pre) if self.cfg.input_gate == "sigmoid" else jnp.exp(i_pre)
        k = (k.astype(F32) * i_gate[..., None]).astype(k.dtype)
        v = common.append_ones(common.split_heads(self.v_proj(x), h))
        ins = OpInputs(common.split_heads(q, h), k, v, jax.nn.log_sigmoid(f_pre))
        return ins, self.og_proj(x)

    def readout(self, o, ogate):
        num, qn = o[..., :-1].astype(F32), o[..., -1:].astype(F32)
        hidden = (num / (jnp.maximum(jnp.abs(qn), 1.0) + EPS)).astype(o.dtype)
        hidden = common.merge_heads(self.o_norm(hidden))  # [B, T, H * V]
        return self.o_proj(hidden * jax.nn.sigmoid(ogate.astype(F32)).astype(hidden.dtype))

    @staticmethod
    def flops_per_token(cfg: MLSTMConfig, d_model: int, seq_len: int) -> float:
        h = cfg.num_heads
        dk = head_width(d_model, cfg.expand_qk, h, "mlstm", "expand_qk")
        dv = head_width(d_model, cfg.expand_v, h, "mlstm", "expand_v")
        return common.training_flops(d_model, 2 * h * dk + 2 * h * dv + 2 * h, h * dv,
                                     common.chunk_flops(h, dk, dv + 1, seq_len),
                                     conv=2.0 * cfg.conv_size * 2 * h * dk)

    def describe_math(self) -> str:
        c = self.cfg
        return (f"mlstm ({c.input_gate} input gate) H={self.heads} K={self.dk} V={self.dv}, "
                f"gate cap {c.gate_soft_cap}, normaliser max(|q.n|, 1), {c.output_norm} per head")

"""HGRN2 (Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion"), kind "hgrn2".

    f_t = lb + (1 - lb) * sigmoid(x_t W_f)          forget gate per key channel, in (lb, 1)
    q_t = swish(x_t W_q),   k_t = 1 - f_t,   v_t = x_t W_i           (K = expand_k d / H, V = d / H)
    S_t = Diag(f_t) S_{t-1} + k_t v_t^T,   o_t = q_t S_t / sqrt(K)
    y_t = W_o [ RMSNorm(o_t) ]          (RMSNorm over all heads; * swish(x_t W_g) if output_gate)

HGRN2 is HGRN's gated linear recurrence h_t = f_t * h_{t-1} + (1 - f_t) * i_t with the state
expanded by an outer product: the input gate is tied to the forget gate (k = 1 - f, no
parameters of its own) and the output gate becomes the query that reads the [K, V] state, which
is what makes it linear attention with per-channel decay (the op's [B, T, H, K] log decay,
log f_t).

Lower bound lb: HGRN learns a monotonically increasing lower bound across layers (cumulative
softmax of a per-layer parameter, 0 for the first layer), so upper layers keep long memories.
A mixer here does not know its depth, so lb is the fixed config field `lower_bound` (default 0,
HGRN's first layer); give different layers of a pattern different mixer names with increasing
lower_bound to reproduce the hierarchy. In log space:
log f = logaddexp(log lb, log(1 - lb) + logsigmoid(.)), never above 0.

Faithful: tied key 1 - f, swish query, per-channel forget gate with a lower bound, RMSNorm on the
output then W_o (as fla's HGRN2Attention; the 1/sqrt(K) scale before the norm only matters
through the norm's eps). `output_gate=True` adds HGRN1's swish output gate (not in HGRN2: its
output gate is the query). Optional short convolution on q/f/i without activation (conv_size;
fla offers it, off by default).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.linear_attention import common
from layers.linear_attention.common import LinearAttentionMixer, OpInputs
from layers.registry import LayerContext, register_mixer
from layers.linear_attention.config import HGRN2Config, head_width

F32 = jnp.float32


def log_forget_gate(logits: jax.Array, lower_bound: float) -> jax.Array:
    """log(lb + (1 - lb) * sigmoid(logits)) in float32, stably (<= 0)."""
    ls = jax.nn.log_sigmoid(logits.astype(F32))
    if lower_bound == 0.0:
        return ls
    return jnp.logaddexp(math.log(lower_bound), math.log1p(-lower_bound) + ls)


@register_mixer(HGRN2Config)
class HGRN2(LinearAttentionMixer):
    def __init__(self, cfg: HGRN2Config, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = ctx.d_model, cfg.num_heads
        self.heads = h
        self.dk = head_width(d, cfg.expand_k, h, "hgrn2", "expand_k")
        self.dv = d // h
        self.q_proj = common.dense_in(d, h * self.dk, ctx, rngs)
        self.f_proj = common.dense_in(d, h * self.dk, ctx, rngs)
        self.i_proj = common.dense_in(d, d, ctx, rngs)
        self.g_proj = common.dense_in(d, d, ctx, rngs) if cfg.output_gate else None
        self.o_norm = common.MergedHeadsNorm(d, eps=ctx.norm_eps)
        self.o_proj = common.dense_out(d, ctx, rngs)
        self.setup_op(ctx, heads=h, key_dim=self.dk, value_dim=self.dv, scale=None,
                      conv_size=cfg.conv_size, conv_channels=2 * h * self.dk + d, rngs=rngs)

    def features(self, x, *, positions, segment_ids, conv):
        h, dk = self.heads, self.dk
        qfi = conv(jnp.concatenate([self.q_proj(x), self.f_proj(x), self.i_proj(x)], axis=-1))
        q, f, i = jnp.split(qfi, [h * dk, 2 * h * dk], axis=-1)
        log_f = log_forget_gate(f, self.cfg.lower_bound)  # [B, T, H*K] float32
        k = (-jnp.expm1(log_f)).astype(q.dtype)  # 1 - f
        ins = OpInputs(jax.nn.silu(common.split_heads(q, h)), common.split_heads(k, h),
                       common.split_heads(i, h), common.split_heads(log_f, h))
        return ins, (None if self.g_proj is None else self.g_proj(x))

    def readout(self, o, gate):
        o = self.o_norm(common.merge_heads(o))
        if gate is not None:
            o = o * jax.nn.silu(gate.astype(F32)).astype(o.dtype)
        return self.o_proj(o)

    @staticmethod
    def flops_per_token(cfg: HGRN2Config, d_model: int, seq_len: int) -> float:
        h = cfg.num_heads
        dk = head_width(d_model, cfg.expand_k, h, "hgrn2", "expand_k")
        conv_ch = 2 * h * dk + d_model
        return common.training_flops(d_model, conv_ch + cfg.output_gate * d_model, d_model,
                                     common.chunk_flops(h, dk, d_model // h, seq_len),
                                     conv=2.0 * cfg.conv_size * conv_ch)

    def describe_math(self) -> str:
        c = self.cfg
        return (f"hgrn2 H={self.heads} K={self.dk} V={self.dv}, forget lower bound {c.lower_bound:g}"
                f"{', swish output gate' if c.output_gate else ''}")

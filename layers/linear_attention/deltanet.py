"""DeltaNet (Yang, Wang, Zhang, Shen, Kim 2024, "Parallelizing Linear Transformers with the Delta
Rule over Sequence Length"), kind "deltanet".

    q_t, k_t, v_t = SiLU(causal depthwise conv_4(x_t [W_q, W_k, W_v]))    (K = expand_k d / H, V = expand_v d / H)
    q_t, k_t <- q_t / |q_t|, k_t / |k_t|                                 (L2 norm, inside the op)
    beta_t = sigmoid(x_t W_beta)                 one write strength per head, in (0, 1)
    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = q_t S_t / sqrt(K)
    y_t = W_o [ RMSNorm_head(o_t) ]              (* swish(x_t W_g) after the norm with use_gate)

The delta rule writes v_t over what the state held at k_t (S_{t-1}^T k_t) instead of adding to
it: one step of online regression of v on k with learning rate beta. `allow_neg_eigval` uses
beta = 2 sigmoid(.) in (0, 2), so that I - beta k k^T may have a negative eigenvalue (Grazzi et
al. 2025, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues"), as fla's
option of that name. The op (`pallas_kernels/delta_rule`) L2-normalises q and k in float32, so
this module does not.

Faithful (to the paper's final layer, which is fla's `DeltaNet`): short convolutions with SiLU on
q, k and v (on by default, no bias), L2-normalised q/k, per-head sigmoid beta from a bias-free
projection, per-head RMSNorm before W_o, scale 1/sqrt(K), no output gate by default
(`use_gate=True` gives fla's FusedRMSNormGated: RMSNorm_head(o) * swish(x W_g)). Differences:
one depthwise conv over the concatenated q/k/v projections (the same as three separate ones,
as the conv is per channel); projections initialised N(0, init_std) instead of PyTorch's uniform
default; `conv_size=0` (an ablation) removes the conv and its SiLU (fla keeps a SiLU on v).

`GatedDeltaNet` (gdn.py) subclasses this class through `setup_decay` and `log_decay`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.linear_attention import common
from layers.linear_attention.common import LinearAttentionMixer, OpInputs
from layers.norm import RMSNorm
from layers.registry import LayerContext, register_mixer
from layers.linear_attention.config import DeltaNetConfig

F32 = jnp.float32


@register_mixer(DeltaNetConfig)
class DeltaNet(LinearAttentionMixer):
    def __init__(self, cfg: DeltaNetConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = ctx.d_model, cfg.num_heads
        conv_channels = self.setup_qkv(cfg, ctx, rngs)
        self.b_proj = common.dense_in(d, h, ctx, rngs)  # beta, one per head
        self.setup_decay(cfg, ctx, rngs)
        self.g_proj = common.dense_in(d, h * self.dv, ctx, rngs) if cfg.use_gate else None
        self.o_norm = RMSNorm(self.dv, eps=ctx.norm_eps)
        self.o_proj = common.dense_out(h * self.dv, ctx, rngs)
        self.setup_op(ctx, heads=h, key_dim=self.dk, value_dim=self.dv, scale=None,
                      conv_size=cfg.conv_size, conv_channels=conv_channels, delta_rule=True, rngs=rngs)

    # -- the decay: none here; GatedDeltaNet overrides both

    def setup_decay(self, cfg, ctx: LayerContext, rngs: nnx.Rngs) -> None:
        pass

    def log_decay(self, x: jax.Array) -> jax.Array | None:
        """x [B, T, d] -> log decay g [B, T, H] float32 (<= 0), or None (no decay)."""
        return None

    # -- the mixer's math

    def beta(self, x: jax.Array) -> jax.Array:
        """x [B, T, d] -> beta [B, T, H] float32 in (0, 1), or (0, 2) with allow_neg_eigval."""
        beta = jax.nn.sigmoid(self.b_proj(x).astype(F32))
        return 2.0 * beta if self.cfg.allow_neg_eigval else beta

    def features(self, x, *, positions, segment_ids, conv):
        q, k, v = self.project_qkv(x, conv)
        gate = self.g_proj(x) if self.g_proj is not None else None
        return OpInputs(q, k, v, self.log_decay(x), self.beta(x)), gate

    def readout(self, o, gate):
        o = common.merge_heads(self.o_norm(o))
        if gate is not None:
            o = o * jax.nn.silu(gate.astype(F32)).astype(o.dtype)
        return self.o_proj(o)

    @staticmethod
    def flops_per_token(cfg: DeltaNetConfig, d_model: int, seq_len: int) -> float:
        """Projections (q/k/v through the conv, beta, the gate when use_gate), the chunked delta
        rule (common.delta_chunk_flops) and W_o; norms and activations left out."""
        h = cfg.num_heads
        _, dv = common.qkv_widths(cfg, d_model)
        gate = h * dv if cfg.use_gate else 0
        return common.qkv_training_flops(cfg, d_model, seq_len, gate_width=h + gate, delta_rule=True)

    def describe_math(self) -> str:
        return f"deltanet H={self.heads} K={self.dk} V={self.dv}, {self._describe_options()}"

    def _describe_options(self) -> str:
        c = self.cfg
        beta = "beta 2 sigmoid (neg. eigenvalues)" if c.allow_neg_eigval else "beta sigmoid"
        return f"{beta}, {'swish-gated rmsnorm' if c.use_gate else 'rmsnorm'}"

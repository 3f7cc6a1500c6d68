"""Differential attention (Ye et al. 2024, "Differential Transformer"): the difference of two
softmax maps, so that attention noise common to both cancels.

Registered for `DiffAttentionConfig` (default mixer name "diff"). Shapes: B batch, T time,
H differential heads, K kv heads (H % K == 0), D the q/k head dim (default d // (2 H)), d model
width. Per layer:

    [Q1; Q2] = x W_q       2 H heads of D          W_q [d, H * 2 * D]
    [K1; K2] = x W_k       2 K heads of D          W_k [d, K * 2 * D]
    V        = x W_v       K heads of 2 D          W_v [d, K * 2 * D]
    (optional per-head RMSNorm of q and k (qk_norm), then RoPE at the batch's positions)
    A_i      = softmax(Q_i K_i^T / sqrt(D))        causal, windowed, one document at a time
    head_h   = (A_1 - lambda A_2) V                2 D wide
    lambda   = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init      (lq1, lk1, lq2, lk2 in R^D)
    head_h  <- (1 - lambda_init) * RMSNorm(head_h)                 (over 2 D, one learned scale
                                                                    shared by the heads)
    y        = concat_h(head_h) W_o            W_o [H * 2 * D, d]

Query h of either map uses kv head h // (H / K) (GQA); the projections' columns are laid out
per head as [H, 2, D] for q and [K, 2, D] for k (a head's two queries adjacent), so tensor
parallelism, which splits the "heads" dim, keeps both maps of a head on one shard.

Both maps go through `pallas_kernels.attention.api.attention` (two calls with the same mask,
keys and 2 D-wide values; implementation and block sizes from the runtime section, as the
softmax attention mixer passes them). `runtime.attention_impl="block_sparse"` concerns attn /
swa only: here it means the op's automatic choice. Decode keeps a KV cache of k [B, S, 2 K, D]
and v [B, S, K, 2 D] (layers/kv_cache.py), a ring buffer of `window` slots when windowed. The
difference, the head norm and the scale are computed in float32.

The q and k handed to attention are sown as "qk" for nnx.capture (as the attention mixer does;
the diagnostics suite measures kind "attention" layers only) with the two
maps stacked along heads: q [B, T, 2 H, D] = [Q1 heads; Q2 heads], k [B, T, 2 K, D] =
[K1 heads; K2 heads], so that ordinary GQA indexing pairs each query with its own keys.

Initialisation: W_q, W_k, W_v ~ N(0, ctx.init_std^2); W_o ~ N(0, ctx.out_std^2); lq1, lk1,
lq2, lk2 ~ N(0, 0.1^2) (the paper's re-parameterisation of lambda); head-norm scale 1.

Departures from the paper:
- lambda_init is a constant of the config (default 0.8) instead of the depth schedule
  0.8 - 0.6 exp(-0.3 (l - 1)): a mixer does not know its layer index. Declare one mixer name
  per depth band with its own lambda_init to follow the schedule.
- K < H kv heads (GQA) are allowed; the paper's models use K = H.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention.config import DiffAttentionConfig
from layers.kv_cache import init_kv_cache, kv_cache_update
from layers.linear import Dense
from layers.norm import RMSNorm
from layers.registry import LayerContext, register_mixer
from layers.rope import apply_rope
from layers.sharding import constrain, param
from layers.attention.mixer import HEADS, mean_visible
from layers.attention.op import attend
from pallas_kernels.attention.api import describe_implementation

PAIRS = ("batch", "seq", "act_heads", None, None)  # [B, T, heads, 2, D]: a head's two maps
LAMBDA_STD = 0.1  # std of the lambda re-parameterisation vectors (the paper's init)


def diff_lambda(lq1, lk1, lq2, lk2, lambda_init: float) -> jax.Array:
    """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, a float32 scalar."""
    f = lambda a: a.astype(jnp.float32)
    return (jnp.exp(jnp.sum(f(lq1) * f(lk1))) - jnp.exp(jnp.sum(f(lq2) * f(lk2)))
            + jnp.float32(lambda_init))


@register_mixer(DiffAttentionConfig)
class DiffAttention(nnx.Module):
    def __init__(self, cfg: DiffAttentionConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.runtime = ctx.runtime
        self.heads, self.kv_heads = cfg.num_heads, cfg.kv_heads
        self.head_dim = hd = cfg.dim_per_head(ctx.d_model)
        d, h, kvh = ctx.d_model, self.heads, self.kv_heads
        proj = dict(axes=("embed", "heads"), std=ctx.init_std, dtype=ctx.dtype, rngs=rngs)
        self.q_proj = Dense(d, h * 2 * hd, **proj)
        self.k_proj = Dense(d, kvh * 2 * hd, **proj)
        self.v_proj = Dense(d, kvh * 2 * hd, **proj)
        self.o_proj = Dense(h * 2 * hd, d, axes=("heads", "embed"), std=ctx.out_std, dtype=ctx.dtype,
                            rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, eps=ctx.norm_eps)
            self.k_norm = RMSNorm(hd, eps=ctx.norm_eps)
        lam = lambda: param(LAMBDA_STD * jax.random.normal(rngs.params(), (hd,), jnp.float32), ("norm",))
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = lam(), lam(), lam(), lam()
        self.head_norm = RMSNorm(2 * hd, eps=ctx.norm_eps)

    def lambda_(self) -> jax.Array:
        """The current lambda (float32 scalar)."""
        return diff_lambda(self.lambda_q1[...], self.lambda_k1[...], self.lambda_q2[...],
                           self.lambda_k2[...], self.cfg.lambda_init)

    def _project(self, x, positions):
        """x [B, T, d] -> q [B, T, H, 2, D], k [B, T, K, 2, D] (normed, rotated), v [B, T, K, 2 D]."""
        b, t, _ = x.shape
        h, kvh, hd, cfg = self.heads, self.kv_heads, self.head_dim, self.cfg
        q = constrain(self.q_proj(x).reshape(b, t, h, 2, hd), PAIRS).reshape(b, t, 2 * h, hd)
        k = constrain(self.k_proj(x).reshape(b, t, kvh, 2, hd), PAIRS).reshape(b, t, 2 * kvh, hd)
        v = constrain(self.v_proj(x).reshape(b, t, kvh, 2 * hd), HEADS)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
        return q.reshape(b, t, h, 2, hd), k.reshape(b, t, kvh, 2, hd), v

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d]; positions, segment_ids [B, T] int32 -> (y [B, T, d], cache)."""
        b, t, _ = x.shape
        h, hd, rt = self.heads, self.head_dim, self.runtime
        q, k, v = self._project(x, positions)
        q1, q2 = q[:, :, :, 0], q[:, :, :, 1]  # [B, T, H, D]
        self.sow(nnx.Intermediate, "qk", (jnp.concatenate([q1, q2], axis=2),
                                          jnp.concatenate([k[:, :, :, 0], k[:, :, :, 1]], axis=2)),
                 capture_noop=True)
        kw = dict(segment_ids=segment_ids, positions=positions, window=self.cfg.window,
                  implementation=None if rt.attention_impl == "block_sparse" else rt.attention_impl,
                  block_q=rt.attention_block_q, block_k=rt.attention_block_k)
        if cache is not None:
            kvh = self.kv_heads
            keys, cache = kv_cache_update(cache, k.reshape(b, t, 2 * kvh, hd), v, segment_ids, positions)
            k = keys["k"].reshape(b, -1, kvh, 2, hd)
            v = keys["v"]
            kw.update(kv_segment_ids=keys["segment_ids"], kv_positions=keys["positions"])
        o1 = attend(q1, k[:, :, :, 0], v, **kw)  # [B, T, H, 2 D]
        o2 = attend(q2, k[:, :, :, 1], v, **kw)
        o = o1.astype(jnp.float32) - self.lambda_() * o2.astype(jnp.float32)
        o = constrain(self.head_norm(o) * (1.0 - self.cfg.lambda_init), HEADS)
        return self.o_proj(o.reshape(b, t, h * 2 * hd).astype(x.dtype)), cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """k [B, S, 2 K, D] (each kv head's K1, K2 adjacent), v [B, S, K, 2 D], slot ids and
        positions; S = max_len, or min(max_len, window) slots (a ring buffer) when windowed."""
        size = max_len if self.cfg.window is None else min(max_len, self.cfg.window)
        cache = init_kv_cache(batch, size, 2 * self.kv_heads, self.head_dim, dtype)
        cache["v"] = jnp.zeros((batch, size, self.kv_heads, 2 * self.head_dim), dtype)
        return cache

    @staticmethod
    def flops_per_token(cfg: DiffAttentionConfig, d_model: int, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward, 2 FLOPs per multiply-add).

        Projections: q and k 2 H D and 2 K D wide, v 2 K D, output from 2 H D. Attention: two
        score maps Q_i K_i^T of width D and two products A_i V of width 2 D, over the keys a query
        sees (min(t + 1, window), averaged over t in [0, seq_len)). The difference, norm and
        lambda are O(H D) per token and left out.
        """
        hd, h, kvh = cfg.dim_per_head(d_model), cfg.num_heads, cfg.kv_heads
        proj = 2 * d_model * (2 * h * hd + 2 * kvh * hd + 2 * kvh * hd + 2 * h * hd)
        visible = mean_visible(cfg.window, seq_len)
        scores = 2 * (2 * h * hd + 2 * h * 2 * hd) * visible  # two maps: QK^T (D) + AV (2 D)
        return 3.0 * (proj + scores)

    def describe(self) -> str:
        c, rt = self.cfg, self.runtime
        impl = describe_implementation(
            None if rt.attention_impl == "block_sparse" else rt.attention_impl,
            ((self.head_dim, 2 * self.head_dim),))
        return (f"differential attention H={self.heads} KV={self.kv_heads} D={self.head_dim} "
                f"(values {2 * self.head_dim}), "
                + ("full causal" if c.window is None else f"window={c.window}")
                + f", lambda_init={c.lambda_init}" + (", qk_norm" if c.qk_norm else "")
                + f", impl={impl}")

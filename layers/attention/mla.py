"""Multi-head latent attention (MLA; DeepSeek-V2 sec. 2.1, DeepSeek-V3): keys and values are
decompressed from a small latent c_kv that is all decode has to cache, beside one RoPE key
shared by every head.

Shapes: B batch, T time, S cache slots, H heads, d model width, r = kv_lora_rank,
r_q = q_lora_rank, n = qk_nope_head_dim, p = qk_rope_head_dim (dR), v = v_head_dim.

Training and prefill (the "expanded" form), for a token x [d] at position t:

    c_kv   = RMSNorm(x W_dkv)                     [r]       W_dkv  [d, r]   \\ one matmul,
    k_R    = RoPE_t(x W_kr)                       [p]       W_kr   [d, p]   / kv_a_proj [d, r + p]
    k_h    = [c_kv W_uk,h ; k_R]                  [n + p]   W_uk,h [r, n]   \\ one matmul,
    v_h    = c_kv W_uv,h                          [v]       W_uv,h [r, v]   / kv_b_proj [r, H (n + v)]
    c_q    = RMSNorm(x W_dq)                      [r_q]     (q_lora_rank set; else c_q = x)
    q_h    = [c_q W_uq,h ; RoPE_t(c_q W_qr,h)]    [n + p]   q_proj, or q_a_proj / q_b_proj
    o_h    = sum_j softmax_j(q_h . k_h,j / sqrt(n + p)) v_h,j   over the visible keys j
    y      = [o_1 ; ... ; o_H] W_o                [d]       o_proj [H v, d]

computed by `pallas_kernels.attention.api.attention` (causal, packed documents by segment ids
and positions) with q/k head dim n + p and value head dim v.

Absorbed decode. The score of head h factors through the latent:

    q_h . k_h,j = q_nope,h . (c_kv,j W_uk,h) + q_R,h . k_R,j
                = (q_nope,h W_uk,h^T) . c_kv,j + q_R,h . k_R,j
                = [q_lat,h ; q_R,h] . [c_kv,j ; k_R,j]         q_lat,h = q_nope,h W_uk,h^T  [r]

and the output is linear in the values, so W_uv,h moves outside the sum:

    o_h = sum_j a_hj (c_kv,j W_uv,h) = (sum_j a_hj c_kv,j) W_uv,h = o_lat,h W_uv,h

That is multi-query attention with one kv head: keys [c_kv ; k_R] (r + p wide), values c_kv
(r wide), the same 1/sqrt(n + p) scale, then W_uv,h per head. The cache holds only c_kv and
k_R per token: (r + p) numbers, against H (n + p + v) for MHA with the same heads. With a
cache, a call with few new tokens attends absorbed; a long one (a prefill) decompresses the
cached latents and attends expanded, whichever costs fewer FLOPs (`absorbed_is_cheaper`): the
two are equal up to rounding.

Initialisation: every projection's weight ~ N(0, ctx.init_std^2), the output projection
N(0, ctx.out_std^2); the RMSNorm scales (of c_kv and c_q) ones. No biases.

Where this departs from DeepSeek:
  - no YaRN rope scaling (nor its mscale correction of the softmax scale): plain RoPE with base
    rope_theta, so the scale is exactly 1/sqrt(n + p);
  - RoPE rotates halves (layers/rope.py, Llama convention; transformers' rope_interleave=False);
    DeepSeek-V3's checkpoints rotate interleaved pairs (rope_interleave=True), which maps onto
    this by permuting the rope columns of q_proj / q_b_proj and kv_a_proj;
  - no MoE, no multi-token prediction: only the token mixer;
  - the defaults scale with d_model (MLAConfig.dims) instead of DeepSeek's fixed 128/64/512.

Parameter names follow transformers' DeepseekV3Attention (q_proj or q_a_proj/q_a_norm/q_b_proj,
kv_a_proj = kv_a_proj_with_mqa, kv_a_norm, kv_b_proj, o_proj); our kernels are [in, out], the
transpose of torch's Linear weights, with the same order of outputs (per head: nope then rope;
per head: k_nope then v; c_kv then k_R).
With runtime.attention_impl="block_sparse" (a layout for attn / swa) MLA uses the attention
op's automatic choice.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention.config import MLAConfig
from layers.kv_cache import init_kv_cache, kv_cache_update
from layers.linear import Dense
from layers.norm import RMSNorm
from layers.registry import LayerContext, register_mixer
from layers.rope import apply_rope
from layers.sharding import constrain
from layers.attention.mixer import HEADS, mean_visible
from layers.attention.op import attend
from pallas_kernels.attention.api import describe_implementation

LATENT = ("batch", "seq", None)  # [B, T, r] latents (not split by heads)


# ----------------------------------------------------------------------------- math

def expanded_attention(q_nope, q_rope, c_kv, k_rope, w_kv_b, *, scale, **attn_kw):
    """MLA with keys and values decompressed per head.

    q_nope [B, Tq, H, n], q_rope [B, Tq, H, p] (rotated); c_kv [B, Tk, r] (normed), k_rope
    [B, Tk, p] (rotated); w_kv_b [r, H, n + v] (kv_b_proj, in the compute dtype); attn_kw:
    the ids, positions and options of `attention`. Returns o [B, Tq, H, v] and the q, k that
    attention saw ([B, T, H, n + p]).
    """
    r, h, nv = w_kv_b.shape
    n = q_nope.shape[-1]
    b, tk, _ = c_kv.shape
    kv = (c_kv.reshape(b * tk, r) @ w_kv_b.reshape(r, h * nv)).reshape(b, tk, h, nv)
    k_nope, v = constrain(kv[..., :n], HEADS), constrain(kv[..., n:], HEADS)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], (b, tk, h, k_rope.shape[-1]))], -1)
    q = jnp.concatenate([q_nope, q_rope], -1)
    return attend(q, k, v, scale=scale, **attn_kw), (q, k)


def absorbed_attention(q_nope, q_rope, latent, w_kv_b, *, scale, **attn_kw):
    """The same as `expanded_attention` computed in the latent space: W_uk folded into the
    query, one shared kv head (keys latent = [c_kv ; k_rope] [B, Tk, r + p], as the cache
    holds them, values its first r channels, c_kv), W_uv folded into the output. Other
    arguments as `expanded_attention`'s; returns o [B, Tq, H, v]."""
    n = q_nope.shape[-1]
    r = w_kv_b.shape[0]
    w_uk, w_uv = w_kv_b[..., :n], w_kv_b[..., n:]  # [r, H, n], [r, H, v]
    q_lat = constrain(jnp.einsum("bthn,rhn->bthr", q_nope, w_uk), HEADS)
    q = jnp.concatenate([q_lat, q_rope], -1)  # [B, Tq, H, r + p]
    keys = latent[:, :, None, :]  # [B, Tk, 1, r + p]
    o_lat = attend(q, keys, keys[..., :r], scale=scale, **attn_kw)  # [B, Tq, H, r]
    return constrain(jnp.einsum("bthr,rhv->bthv", o_lat, w_uv), HEADS)


def absorbed_is_cheaper(tq: int, nope: int, rope: int, v: int, rank: int) -> bool:
    """Whether attending Tq new queries to a cache costs fewer FLOPs absorbed than expanded.

    Per cached key and head, expanded pays the decompression r (n + v) once plus
    Tq (n + p + v) for scores and values; absorbed pays Tq (2 r + p) (scores over r + p,
    values of r). The per-query absorption and output folds (r n + r v) are left out: they
    do not grow with the cache.
    """
    return tq * (2 * rank + rope - (nope + rope + v)) < rank * (nope + v)


# ----------------------------------------------------------------------------- module

@register_mixer(MLAConfig)
class MLA(nnx.Module):
    def __init__(self, cfg: MLAConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.runtime = ctx.runtime
        self.dtype = ctx.dtype
        self.heads = h = cfg.num_heads
        self.nope, self.rope, self.v_dim, self.rank = n, p, v, r = cfg.dims(ctx.d_model)
        d = ctx.d_model
        proj = dict(std=ctx.init_std, dtype=ctx.dtype, rngs=rngs)
        if cfg.q_lora_rank is None:
            self.q_proj = Dense(d, h * (n + p), axes=("embed", "heads"), **proj)
        else:
            self.q_a_proj = Dense(d, cfg.q_lora_rank, axes=("embed", None), **proj)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, eps=ctx.norm_eps)
            self.q_b_proj = Dense(cfg.q_lora_rank, h * (n + p), axes=(None, "heads"), **proj)
        self.kv_a_proj = Dense(d, r + p, axes=("embed", None), **proj)
        self.kv_a_norm = RMSNorm(r, eps=ctx.norm_eps)
        self.kv_b_proj = Dense(r, h * (n + v), axes=(None, "heads"), **proj)
        self.o_proj = Dense(h * v, d, axes=("heads", "embed"), std=ctx.out_std, dtype=ctx.dtype, rngs=rngs)

    def project(self, x: jax.Array, positions: jax.Array):
        """x [B, T, d] -> q_nope [B, T, H, n], q_rope [B, T, H, p] (rotated), c_kv [B, T, r]
        (normed), k_rope [B, T, p] (rotated)."""
        b, t, _ = x.shape
        n, p, r, theta = self.nope, self.rope, self.rank, self.cfg.rope_theta
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = constrain(q.reshape(b, t, self.heads, n + p), HEADS)
        q_nope, q_rope = q[..., :n], apply_rope(q[..., n:], positions, theta)
        kv = self.kv_a_proj(x)
        c_kv = constrain(self.kv_a_norm(kv[..., :r]), LATENT)
        k_rope = apply_rope(kv[..., None, r:], positions, theta)[:, :, 0]
        return q_nope, q_rope, c_kv, k_rope

    def _w_kv_b(self) -> jax.Array:
        """kv_b_proj's kernel as [r, H, n + v] in the compute dtype (W_uk | W_uv per head)."""
        return self.kv_b_proj.kernel[...].astype(self.dtype).reshape(self.rank, self.heads, self.nope + self.v_dim)

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d]; positions, segment_ids [B, T] int32 -> (y [B, T, d], cache)."""
        b, t, _ = x.shape
        q_nope, q_rope, c_kv, k_rope = self.project(x, positions)
        rt = self.runtime
        kw = dict(scale=1.0 / math.sqrt(self.nope + self.rope), segment_ids=segment_ids, positions=positions,
                  implementation=None if rt.attention_impl == "block_sparse" else rt.attention_impl,
                  block_q=rt.attention_block_q, block_k=rt.attention_block_k)
        w = self._w_kv_b()
        if cache is None:
            o, (q, k) = expanded_attention(q_nope, q_rope, c_kv, k_rope, w, **kw)
            # q and k as attention sees them, for nnx.capture (a no-op outside it), as the
            # attention mixer sows them; the diagnostics suite measures kind "attention" only.
            self.sow(nnx.Intermediate, "qk", (q, k), capture_noop=True)
        else:
            # The cache is kv_cache's with one kv head: "k" holds the latent [c_kv ; k_rope]
            # [B, S, 1, r + p], the absorbed keys as they are (no per-step concatenation of
            # the cache), and "v" is empty [B, S, 1, 0].
            latent = jnp.concatenate([c_kv, k_rope], -1)[:, :, None]
            keys, cache = kv_cache_update(cache, latent, latent[..., :0], segment_ids, positions)
            kw.update(kv_segment_ids=keys["segment_ids"], kv_positions=keys["positions"])
            all_lat = keys["k"][:, :, 0].astype(self.dtype)  # [B, S', r + p]
            if absorbed_is_cheaper(t, self.nope, self.rope, self.v_dim, self.rank):
                o = absorbed_attention(q_nope, q_rope, all_lat, w, **kw)
            else:
                r = self.rank
                o, _ = expanded_attention(q_nope, q_rope, all_lat[..., :r], all_lat[..., r:], w, **kw)
        return self.o_proj(o.reshape(b, t, self.heads * self.v_dim)), cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """The latent cache (layers/kv_cache.py's layout with one kv head): "k" = [c_kv ; k_R]
        [B, S, 1, r + p], "v" empty [B, S, 1, 0], segment_ids, positions [B, S], index."""
        cache = init_kv_cache(batch, max_len, 1, self.rank + self.rope, dtype)
        cache["v"] = jnp.zeros((batch, max_len, 1, 0), dtype)
        return cache

    @staticmethod
    def flops_per_token(cfg: MLAConfig, d_model: int, seq_len: int) -> float:
        """Training FLOPs per token of the expanded form: the projections (query, down kv_a,
        up kv_b, output) plus QK^T over n + p and PV over v for the keys a causal query sees
        ((seq_len + 1) / 2 on average, as attention counts). 2 FLOPs per multiply-add;
        forward + backward is 3x forward. Norms and RoPE are left out."""
        n, p, v, r = cfg.dims(d_model)
        h, qr = cfg.num_heads, cfg.q_lora_rank
        q = d_model * h * (n + p) if qr is None else d_model * qr + qr * h * (n + p)
        proj = 2 * (q + d_model * (r + p) + r * h * (n + v) + h * v * d_model)
        visible = mean_visible(None, seq_len)
        scores = 2 * h * (n + p + v) * visible
        return 3.0 * (proj + scores)

    def cache_bytes(self) -> tuple[int, int]:
        """(MLA, MHA with the same heads) cache bytes per token per layer in the compute dtype:
        (r + p) * itemsize against H * ((n + p) + v) * itemsize (keys plus values)."""
        size = jnp.dtype(self.dtype).itemsize
        return (self.rank + self.rope) * size, self.heads * (self.nope + self.rope + self.v_dim) * size

    def describe(self) -> str:
        c, rt = self.cfg, self.runtime
        mla, mha = self.cache_bytes()
        q = "q from x" if c.q_lora_rank is None else f"q_rank={c.q_lora_rank}"
        # training / prefill attend expanded (n + p, v); cached calls absorbed (r + p, r)
        impl = describe_implementation(
            None if rt.attention_impl == "block_sparse" else rt.attention_impl,
            ((self.nope + self.rope, self.v_dim), (self.rank + self.rope, self.rank)))
        over = 2 * self.rank + self.rope - (self.nope + self.rope + self.v_dim)
        absorbed = ("cached calls absorbed" if over <= 0 else
                    f"cached calls of < {-(-self.rank * (self.nope + self.v_dim) // over)} tokens absorbed")
        return (f"MLA H={self.heads} nope={self.nope} rope={self.rope} v={self.v_dim} "
                f"kv_rank={self.rank} {q}, cache (r+rope)*itemsize={mla} B/token/layer vs "
                f"MHA H*(nope+rope+v)*itemsize={mha} B ({mla / mha:.2f}x: GQA keeping "
                f"{(self.rank + self.rope) / (self.nope + self.rope + self.v_dim):.2g} of the {self.heads} kv heads), "
                f"{absorbed}, impl={impl}")

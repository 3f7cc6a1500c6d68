"""Softmax attention mixer: MHA / GQA / MQA, causal or sliding window (per layer or per kv head),
packed documents, optional QK-norm, logit soft-cap, output gate, attention sinks, sigmoid
scores, knocking-heads projections, KV-cache decode.

Registered for `AttentionConfig`; the default mixer names "attn" (full) and "swa" (window 128)
are two configs of this one module. The math lives in `pallas_kernels.attention.attention`;
this module only projects, normalises, rotates, hands over and gates.

Shapes: B batch, T time, H query heads, K kv heads (H % K == 0), G = H / K query heads per kv
head, D head dim, d model width.

Equations, for token i (mixer input x_i [d]) and query head h, whose kv head is j = h // G:

    q_i^h = (x_i W_q)^h,  k_i^j = (x_i W_k)^j,  v_i^j = (x_i W_v)^j          [D] each
    knock_heads:  v^j <- v^j T_v  ("v");  also q^h <- q^h T_q, k^j <- k^j T_k  ("qkv")
    qk_norm: q, k <- RMSNorm(q), RMSNorm(k);  RoPE at the token's position
    s_il = c tanh(q_i^h . k_l^j / (c sqrt(D)))   (logit_softcap c; without it q . k / sqrt(D))
    V_j(i) = {l : seg_l = seg_i != 0, pos_l <= pos_i, pos_i - pos_l < W_j}    W_j: kv head j's
             window (`window` for all heads, or head_windows[j]; infinite for full attention)
    softmax:  o_i^h = sum_{l in V_j(i)} exp(s_il) v_l^j / (sum_{l in V_j(i)} exp(s_il) + exp(a_h))
              where the exp(a_h) term exists only with sinks
    sigmoid:  o_i^h = sum_{l in V_j(i)} sigmoid(s_il + b) v_l^j,   b = cfg.bias (no normalisation)
    gate:     o_i^h <- o_i^h * sigmoid(x_i W_g)^h   (headwise: one scalar per head, elementwise:
              one per channel of the head)
    y_i = concat_h(o_i^h) W_o

Options, initialisation, and where they depart from their papers:

* gate (Gated Attention, Qiu et al. 2025, position G1): `gate_proj` W_g [d, H] ("headwise") or
  [d, H * D] ("elementwise", head-major like q_proj), N(0, init_std^2), no bias, as the paper's
  Y' = Y * sigmoid(X W_theta) and its code (the gate is extra output columns of q_proj, built
  without bias in Qwen3's default config). A separate projection instead of widened q_proj
  columns: the same function up to a permutation of columns. The gate starts near
  sigmoid(0) = 1/2, as the paper's does. x is the mixer's input (the block's pre-normed hidden
  state), as in the paper. Gate values are float32.
* sinks (gpt-oss): `sinks` [H], one learned logit a_h per query head in the softmax denominator
  with no value. Initialised to 0 (gpt-oss publishes trained values, not an initialisation):
  at init q.k is near 0, so a zero sink weighs like one more average key, a small
  perturbation (output scaled by n / (n + 1) over n visible keys) whose exp(a) is neither
  saturated nor vanishing, so the sink can learn either way from the first step.
* score="sigmoid" (Ramapuram et al. 2024): no parameter; b fixed, -ln(sigmoid_length) by
  default, from the paper's b = -ln n for sequence length n. A causal query at index t sees
  only t + 1 keys; we keep one b for every query rather than a per-query -ln(t + 1) (which n
  the paper means for causal LMs is not settled in shared/research/seeds_004.md #2), so early
  queries start with less total weight than late ones. LayerScale / hybrid-norm are
  ModelConfig options.
* head_windows (MSWA, seeds_001 A9): one window per kv head, its G query heads share it (a
  cache is per kv head). Heads are grouped by window and each group is one call of the op
  (dense with `window=`, or its own causal / window block layout); outputs are put back in head
  order. MSWA's schedule (windows growing with depth, a spread over heads) is left to the
  configs: each layer names its own windows.
* knock_heads (Knocking-Heads Attention, Zhou et al. 2025, the linear variant): `knock_v` (and
  `knock_q`, `knock_k` with "qkv") [D, D], the identity at init (so a fresh layer is exactly
  plain attention), shared by all heads, applied to each head's projection before QK-norm
  and RoPE. Not weight-decayed (train/optim.py decays only `kernel`s and embeddings): decay
  would pull them toward 0, not toward the identity. The paper's MLP variant is not provided.

Runtime. `runtime.attention_impl` picks the attention op's implementation (None: its Pallas
kernels on GPU / TPU, xla elsewhere or where they refuse; the start-up line names it). With
`runtime.attention_impl="block_sparse"` training and prefill go through
`pallas_kernels.block_sparse_attention` instead, with a causal or sliding-window block layout
(one per window group) built once per sequence length on the host (implementation:
`runtime.sparse_attention_impl`). The layout is by token index, so this assumes what the
blocked attention path assumes: positions increase by one along each document of a packed row
(segment ids mask the other documents). Decode keeps the attention op: a ring-buffer cache has
no index order for a layout to follow.

Decode cache (`init_cache`): without head_windows, layers/kv_cache.py's arrays (k, v, segment_ids,
positions, index), a ring of `window` slots for a sliding window, plus "conv" with conv_size.
With head_windows, one such cache per distinct window, holding that group's kv heads only:
{"w64": ring of min(max_len, 64) slots, "full": max_len slots, ...} (and "conv").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.conv import CausalConv1d
from layers.kv_cache import init_kv_cache, kv_cache_update
from layers.linear import Dense
from layers.norm import RMSNorm
from layers.registry import LayerContext, register_mixer
from layers.rope import apply_rope
from layers.sharding import constrain, param
from layers.attention.op import attend
from pallas_kernels.attention.api import describe_implementation
from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.api import block_sparse_attention
from layers.attention.config import AttentionConfig
from layers.config import HeadsConfig


HEADS = ("batch", "seq", "act_heads", None)  # sharding of [B, T, heads, D] activations
F32 = jnp.float32


def init_head_projections(m: nnx.Module, cfg: HeadsConfig, ctx: LayerContext, rngs: nnx.Rngs) -> None:
    """Give the mixer `m` what every softmax-attention mixer (attention, moba, nsa) has: heads,
    kv_heads, head_dim, q/k/v/o projections and, with cfg.qk_norm, the q/k RMSNorms (as attributes
    of `m`, so parameter names stay q_proj, k_proj, ... wherever they are used)."""
    m.heads, m.kv_heads = cfg.num_heads, cfg.kv_heads
    m.head_dim = hd = cfg.dim_per_head(ctx.d_model)
    d = ctx.d_model
    proj = dict(axes=("embed", "heads"), std=ctx.init_std, dtype=ctx.dtype, rngs=rngs)
    m.q_proj = Dense(d, m.heads * hd, **proj)
    m.k_proj = Dense(d, m.kv_heads * hd, **proj)
    m.v_proj = Dense(d, m.kv_heads * hd, **proj)
    m.o_proj = Dense(m.heads * hd, d, axes=("heads", "embed"), std=ctx.out_std, dtype=ctx.dtype, rngs=rngs)
    if cfg.qk_norm:
        m.q_norm = RMSNorm(hd, eps=ctx.norm_eps)
        m.k_norm = RMSNorm(hd, eps=ctx.norm_eps)


def head_matmul(x: jax.Array, t: jax.Array) -> jax.Array:
    """x [B, T, N, D] @ t [D, D] for every head (as one 2-D matmul), in float32 and back to
    x.dtype: t stays near the identity, whose small learned changes bfloat16 would round away
    (its spacing near 1 is 2^-7), as the RMSNorm scales are kept float32 for."""
    y = x.reshape(-1, x.shape[-1]).astype(F32) @ t.astype(F32)
    return y.reshape(x.shape).astype(x.dtype)


def project_heads(m: nnx.Module, x: jax.Array, positions: jax.Array, k: jax.Array | None = None,
                  conv=None, knock: dict | None = None):
    """x [B, T, d] -> q [B, T, H, D], k, v [B, T, K, D], normed (qk_norm) and rotated (RoPE at
    `positions`) as attention sees them. k: the projected keys [B, T, K*D] when the caller
    transformed them (e.g. MoBA's key convolution); None projects x. conv: None, or a function
    applied to the concatenated projections [B, T, (H + 2K) * D] (the short convolution).
    knock: None, or {"q" | "k" | "v": [D, D]} matrices multiplying every head of that
    projection before qk_norm and RoPE (knocking heads)."""
    b, t, _ = x.shape
    hd, cfg = m.head_dim, m.cfg
    q, k, v = m.q_proj(x), (m.k_proj(x) if k is None else k), m.v_proj(x)
    if conv is not None:
        q, k, v = jnp.split(conv(jnp.concatenate([q, k, v], axis=-1)),
                            [m.heads * hd, (m.heads + m.kv_heads) * hd], axis=-1)
    q = constrain(q.reshape(b, t, m.heads, hd), HEADS)
    k = constrain(k.reshape(b, t, m.kv_heads, hd), HEADS)
    v = constrain(v.reshape(b, t, m.kv_heads, hd), HEADS)
    if knock:
        q, k, v = (head_matmul(a, knock[n]) if n in knock else a for n, a in zip("qkv", (q, k, v)))
    if cfg.qk_norm:
        q, k = m.q_norm(q), m.k_norm(k)
    return apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta), v


def window_groups(windows: tuple[int | None, ...], heads: int) -> tuple[tuple, ...]:
    """Group kv heads by window: ((window, kv head indices, query head indices), ...) in order
    of first appearance; query head h belongs to kv head h // (heads / len(windows))."""
    g = heads // len(windows)
    out = []
    for w in dict.fromkeys(windows):
        kv = tuple(j for j, wj in enumerate(windows) if wj == w)
        out.append((w, kv, tuple(j * g + r for j in kv for r in range(g))))
    return tuple(out)


def cache_key(window: int | None) -> str:
    """The decode-cache entry of a window group: "full" or "w<W>"."""
    return "full" if window is None else f"w{window}"


def mean_visible(window: int | None, seq_len: int) -> float:
    """Mean over t in [0, seq_len) of min(t + 1, window): keys a causal query sees."""
    w = seq_len if window is None else min(window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _take(x: jax.Array, idx: tuple[int, ...], axis: int = 2) -> jax.Array:
    """x's heads `idx` along `axis`: x itself for every head in order, a slice for a run of
    consecutive heads, else a gather."""
    if idx == tuple(range(idx[0], idx[0] + len(idx))):
        if len(idx) == x.shape[axis]:
            return x
        return jax.lax.slice_in_dim(x, idx[0], idx[0] + len(idx), axis=axis)
    return jnp.take(x, jnp.asarray(idx), axis=axis)


@register_mixer(AttentionConfig)
class Attention(nnx.Module):
    def __init__(self, cfg: AttentionConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.runtime = ctx.runtime
        init_head_projections(self, cfg, ctx, rngs)
        h, hd = self.heads, self.head_dim
        channels = (h + 2 * self.kv_heads) * hd
        self.conv = (CausalConv1d(channels, cfg.conv_size, bias=False, dtype=ctx.dtype, rngs=rngs)
                     if cfg.conv_size else None)
        # Created after the projections, so that a layer with these options and one without
        # draw the same q/k/v/o weights from the same seed.
        self.gate_proj = (None if cfg.gate == "none" else
                          Dense(ctx.d_model, h * (hd if cfg.gate == "elementwise" else 1),
                                axes=("embed", "heads"), std=ctx.init_std, dtype=ctx.dtype, rngs=rngs))
        # Zero: weighs like one more average key at init (see the module docstring).
        self.sinks = param(jnp.zeros((h,), F32), ("heads",)) if cfg.sinks else None
        eye = lambda: param(jnp.eye(hd, dtype=F32), (None, None))
        self.knock_q = eye() if cfg.knock_heads == "qkv" else None
        self.knock_k = eye() if cfg.knock_heads == "qkv" else None
        self.knock_v = eye() if cfg.knock_heads != "none" else None
        self.groups = window_groups(cfg.kv_head_windows(), h)

    # ------------------------------------------------------------------------- options

    def score_options(self) -> dict:
        """What the attention probabilities depend on besides q and k (the sown "qk"), in the
        op's argument names, so that diagnostics can call `attention_with_lse` the same way:
        score ("softmax" | "sigmoid"), sigmoid_bias (float b; 0.0 and unused with softmax),
        sinks (the [H] float32 logits, or None), logit_softcap (or None), kv_head_windows (one
        window per kv head, None = full causal; query head h uses entry h // (H / K))."""
        c = self.cfg
        return {"score": c.score, "sigmoid_bias": c.bias if c.score == "sigmoid" else 0.0,
                "sinks": None if self.sinks is None else self.sinks[...],
                "logit_softcap": c.logit_softcap, "kv_head_windows": c.kv_head_windows()}

    def _op_options(self, qidx: tuple[int, ...]) -> dict:
        """Score keyword arguments of both ops for the query heads `qidx` (only those in use,
        so a plain layer calls the op exactly as before these options existed)."""
        c, kw = self.cfg, {}
        if c.logit_softcap is not None:
            kw["logit_softcap"] = c.logit_softcap
        if c.score == "sigmoid":
            kw.update(score="sigmoid", sigmoid_bias=c.bias)
        if self.sinks is not None:
            kw["sinks"] = _take(self.sinks[...], qidx, axis=0)
        return kw

    def _knock(self) -> dict | None:
        names = (("q", self.knock_q), ("k", self.knock_k), ("v", self.knock_v))
        return {n: p[...] for n, p in names if p is not None} or None

    # ------------------------------------------------------------------------- forward

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d]; positions, segment_ids [B, T] int32 -> (y [B, T, d], cache)."""
        b, t, _ = x.shape
        cfg, hd = self.cfg, self.head_dim
        conv, conv_cache = None, {}
        if self.conv is not None:
            def conv(u):
                y, conv_cache["conv"] = self.conv(u, segment_ids, None if cache is None else cache["conv"])
                return y
        q, k, v = project_heads(self, x, positions, conv=conv, knock=self._knock())
        # q and k as attention sees them, for attention statistics (train/evals/diagnostics.py
        # reads them with nnx.capture, and `score_options` for the rest). Outside nnx.capture
        # this is a no-op when tracing and leaves nothing in the compiled graph.
        self.sow(nnx.Intermediate, "qk", (q, k), capture_noop=True)
        rt = self.runtime
        block_sparse = rt.attention_impl == "block_sparse"
        blocks = dict(implementation=None if block_sparse else rt.attention_impl,
                      block_q=rt.attention_block_q, block_k=rt.attention_block_k)
        # One op call per group of kv heads sharing a window (one group without head_windows).
        outs, new_cache = [], dict(conv_cache)
        for window, kvidx, qidx in self.groups:
            qg, kg, vg = _take(q, qidx), _take(k, kvidx), _take(v, kvidx)
            opts = self._op_options(qidx)
            if cache is not None:
                # head_windows: a cache per window; otherwise the one cache at the top level
                name = cache_key(window) if cfg.head_windows else None
                own = cache[name] if name else {n: a for n, a in cache.items() if n != "conv"}
                keys, own = kv_cache_update(own, kg, vg, segment_ids, positions)
                new_cache.update({name: own} if name else own)
                og = attend(qg, keys["k"], keys["v"], segment_ids=segment_ids,
                               positions=positions, kv_segment_ids=keys["segment_ids"],
                               kv_positions=keys["positions"], window=window, **opts, **blocks)
            elif block_sparse:
                lay = masks.causal_layout(t, window, rt.attention_block_q, rt.attention_block_k)
                og, _ = block_sparse_attention(qg, kg, vg, lay, segment_ids=segment_ids,
                                               implementation=rt.sparse_attention_impl, **opts)
            else:
                og = attend(qg, kg, vg, segment_ids=segment_ids, positions=positions,
                               window=window, **opts, **blocks)
            outs.append(og)
        o = self._merge_heads(outs)
        cache = None if cache is None else new_cache
        if self.gate_proj is not None:
            g = jax.nn.sigmoid(self.gate_proj(x).astype(F32)).reshape(b, t, self.heads, -1)
            self.sow(nnx.Intermediate, "gate", g, capture_noop=True)  # gate statistics
            o = (o.astype(F32) * g).astype(o.dtype)
        return self.o_proj(o.reshape(b, t, self.heads * hd)), cache

    def _merge_heads(self, outs: list[jax.Array]) -> jax.Array:
        """Per-group outputs [B, T, H_g, D] -> [B, T, H, D] in head order."""
        if len(outs) == 1:  # one group holds every head, in order
            return outs[0]
        order = [h for _, _, qidx in self.groups for h in qidx]  # head at each concatenated slot
        slot_of_head = tuple(int(i) for i in np.argsort(order))  # the inverse permutation
        return constrain(_take(jnp.concatenate(outs, axis=2), slot_of_head), HEADS)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """A sliding-window layer keeps only `window` slots (a ring buffer); with head_windows,
        one cache per distinct window over that group's kv heads (module docstring); with
        conv_size, the short convolution's last inputs too."""
        size = lambda w: max_len if w is None else min(max_len, w)
        if self.cfg.head_windows:
            cache = {cache_key(w): init_kv_cache(batch, size(w), len(kv), self.head_dim, dtype)
                     for w, kv, _ in self.groups}
        else:
            cache = init_kv_cache(batch, size(self.cfg.window), self.kv_heads, self.head_dim, dtype)
        if self.conv is not None:
            cache["conv"] = self.conv.init_cache(batch, dtype)
        return cache

    # ------------------------------------------------------------------------- reports

    @staticmethod
    def flops_per_token(cfg: AttentionConfig, d_model: int, seq_len: int) -> float:
        """Training FLOPs per token: projections (gate and knocking-heads matrices included)
        plus QK^T and PV over the keys actually visible to each head.

        Causal halving: query t sees min(t + 1, W) keys (W: its kv head's window), averaged
        over t in [0, seq_len). Forward is 2 FLOPs per multiply-add; forward + backward is 3x
        forward.
        """
        hd, h, kvh = cfg.dim_per_head(d_model), cfg.num_heads, cfg.kv_heads
        proj = 2 * d_model * hd * (2 * h + 2 * kvh)
        gate = {"none": 0, "headwise": 2 * d_model * h, "elementwise": 2 * d_model * h * hd}[cfg.gate]
        knocked = {"none": 0, "v": kvh, "qkv": h + 2 * kvh}[cfg.knock_heads]
        knock = 2 * hd * hd * knocked
        g = h // kvh
        visible = sum(g * mean_visible(w, seq_len) for w in cfg.kv_head_windows())  # over heads
        scores = 2 * 2 * hd * visible
        conv = 2.0 * cfg.conv_size * hd * (h + 2 * kvh)
        return 3.0 * (proj + gate + knock + scores + conv)

    def describe(self) -> str:
        c = self.cfg
        parts = [f"{c.score} attention H={self.heads} KV={self.kv_heads} D={self.head_dim}"]
        if c.head_windows:
            wins = ", ".join("full" if w == 0 else str(w) for w in c.head_windows)
            parts.append(f"head_windows=[{wins}] ({len(self.groups)} groups)")
        else:
            parts.append("full causal" if c.window is None else f"window={c.window}")
        if c.qk_norm:
            parts.append("qk_norm")
        if c.logit_softcap:
            parts.append(f"softcap={c.logit_softcap}")
        if c.conv_size:
            parts.append(f"qkv conv={c.conv_size}")
        if c.knock_heads != "none":
            parts.append(f"knock_heads={c.knock_heads}")
        if c.score == "sigmoid":
            parts.append(f"score=sigmoid(b={c.bias:.4g})")
        if c.sinks:
            parts.append("sinks")
        if c.gate != "none":
            parts.append(f"gate={c.gate}")
        rt = self.runtime
        if rt.attention_impl == "block_sparse":
            kernel = {None: "Pallas Triton (gpu.py) on GPU, Pallas Mosaic (tpu.py) on TPU, "
                            "else xla",
                      "gpu": "Pallas Triton (gpu.py)", "tpu": "Pallas Mosaic (tpu.py)",
                      "xla": "xla, no Pallas kernel", "reference": "reference, no Pallas kernel",
                      }.get(rt.sparse_attention_impl, rt.sparse_attention_impl)
            parts.append(f"impl=block_sparse/{rt.sparse_attention_impl or 'auto'} "
                         f"(training/prefill: block_sparse_attention {kernel}; decode: attention op)")
        else:
            hd = self.head_dim
            parts.append(f"impl={describe_implementation(rt.attention_impl, ((hd, hd),))}")
        return ", ".join(parts)

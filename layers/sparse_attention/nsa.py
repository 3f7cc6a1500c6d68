"""NSA: Native Sparse Attention (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and
Natively Trainable Sparse Attention", arXiv 2502.11089). Kind "nsa".

    q, k, v = RoPE(x W_q), RoPE(x W_k), x W_v          (RMSNorm on q, k before RoPE if qk_norm)
    g_cmp, g_slc, g_win = sigmoid(x W_g)                per token and query head
    compressed tokens, one per complete block c of bs = block_size keys (stride bs):
        kc_c = phi_k(k_{c bs .. (c+1) bs - 1}),  vc_c = phi_v(v_...)
        phi = mean ("mean"), or MLP(flatten(block + intra-block position embedding)) ("mlp")
    o_cmp_i = softmax over visible c (q_i . kc_c / sqrt(D)) vc_c,
        c visible to i iff (c+1) bs - 1 <= i and the block lies in i's document
    importance[i, c] = sum over the query heads of i's GQA group of p_cmp[i, c]
    chosen(i) = top num_selected blocks of i's document up to i by importance, per KV group,
        with the own block i // bs, the one before and the document's first block forced in
        (in that priority when num_selected < 3)
    o_slc_i = softmax over j in chosen blocks, j <= i, same document (q_i . k_j / sqrt(D)) v_j
    o_win_i = softmax over i - window < j <= i, same document
    y = W_o (g_cmp o_cmp + g_slc o_slc + g_win o_win)

Faithful: the three branches, per-head sigmoid gates from x, compressed keys visible only when
their block is complete and in the past, selection by the compressed branch's probabilities
summed over the GQA group (one choice per KV group, shared by its heads), the forced initial and
local blocks counted in num_selected, no gradient through the choice (the compressed branch
itself trains through its output), the MLP compressor with an intra-block position encoding.
Departures (documented choices):
  * Compression stride = block size (no overlap; the paper: l = 32, d = 16) and selection
    block = compression block (the paper: l' = 64, scores mapped from overlapping compression
    blocks), so compressed token c scores block c directly.
  * One set of q, k, v for the three branches (as fla's layer; the paper gives each branch its
    own keys and values). The compressed tokens are built from the rotated keys (as fla).
  * "mlp": phi(block) = W2 silu(W1 flatten(block + E)), E [bs, D] a learned position embedding,
    hidden width D, shared by the KV heads, separate for keys and values; "mean" (fla's choice)
    is the default because it has no parameters and makes the routing stable at init.
  * Packed rows: positional blocks of the row; a query only considers compressed tokens and
    blocks of its own document (routing.py); a block straddling a document start has no visible
    compressed token. Forced "first block" is the first block of the query's document (block 0
    for an unpacked row). So NSA routing is document-local: a packed document's output does not
    depend on its neighbours, and equals the document alone when it starts on a block boundary.
  * Defaults are CPU-scale: block 64, num_selected 4, window 64 (paper 64 / 16 / 512).
  * Selection is per query token by default (route_block_q = 1; the paper selects per token
    too, sharing only across the GQA group). route_block_q = n > 1 (an option; a power of two
    >= 16 dividing bs): block routing (routing.py, "Block routing"). The n queries of group
    g = i // n share the selection of the group's first query l = g n:
        importance[g, c] = sum over the group's query heads of p_cmp[l, c]
        chosen(g) = top num_selected blocks of l's document up to l // bs (= i // bs), own,
                    previous and first blocks of l's document forced
        o_slc_i = softmax over j in chosen(i // n), j <= i, same document
    The compressed and window branches stay per token. The first query, not the group's mean
    probabilities, so that decode equals the parallel form (routing.py says why).

Computation: the compressed branch is dense masked jnp over the [B, H, T, T / bs] compressed
scores, because selection needs those probabilities anyway (fla avoids materialising them with
an online top-k inside its kernel; we have no such kernel), so the branch costs that one
[T, T / bs] matmul pair it had to compute: 1/bs of dense attention. The selected branch runs on
`pallas_kernels.block_sparse_attention` with `from_topk(blocks, block_q=1, block_k=bs)` built
with one list per KV group (Hl = K: the group's query heads share it, and the xla path gathers
each key tile once per group); the window branch on the same op with a host-built
`masks.SlidingWindow` layout (blocks runtime.attention_block_q x attention_block_k). Block
routing selects from the leaders' rows p_cmp[:, :, ::n] and builds `from_topk(blocks,
block_q=n, ...)`; when the op may run on the Pallas kernels (named "gpu" / "tpu", or None on a
GPU / TPU backend), the lists are repeated per query head (Hl = H), the only per-head form
those kernels take.

NSA selection at decode time. The cache is a full-length KV cache (common.py), slot j holding
index j, so the cache's blocks are the parallel form's blocks. Each new token: compresses the
complete blocks of the cache (visible when complete, in the past and in its document: the same
rule), attends to them, sums the probabilities over its GQA group, selects the same
num_selected blocks with the same forced ones, and attends densely over the cache to the
selected blocks and to its window; the three outputs are gated as in the parallel form. All
three are dense masked over the S cache slots (O(S) per token; the compression, O(S D) for
"mean" and O(S D^2) for "mlp", is recomputed each call: compressed tokens are not cached).
Prefill + token-by-token decode equals the full forward (tests/layers/test_sparse_attention_mixers.py).
With block routing each new token selects with its leader's compressed-branch probabilities:
the leader's query (from the call, or the cache's "route_q", float32 [B, H, D], when the
leader came earlier) attends to the compressed tokens visible to the leader (complete blocks
before the own one, in the leader's document), so the selection is the parallel form's
(tests/layers/test_sparse_block_routing.py).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.linear import Dense
from layers.registry import LayerContext, register_mixer
from layers.sharding import param
from layers.sparse_attention import routing
from layers.sparse_attention.common import SparseAttentionBase, masked_attention, mean_visible
from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.api import block_sparse_attention
from pallas_kernels.block_sparse_attention.layout import from_topk
from layers.sparse_attention.config import NSAConfig

F32 = jnp.float32


class MLPCompressor(nnx.Module):
    """phi(block [.., bs, D]) = W2 silu(W1 flatten(block + E)) -> [.., D]; E [bs, D] learned."""

    def __init__(self, block_size: int, head_dim: int, dtype, rngs: nnx.Rngs):
        self.pos = param(jnp.zeros((block_size, head_dim), F32), (None, None))
        self.w1 = Dense(block_size * head_dim, head_dim, axes=(None, None),
                        std=1.0 / math.sqrt(block_size * head_dim), dtype=dtype, rngs=rngs)
        self.w2 = Dense(head_dim, head_dim, axes=(None, None), std=1.0 / math.sqrt(head_dim), dtype=dtype,
                        rngs=rngs)

    def __call__(self, blocks: jax.Array) -> jax.Array:
        """blocks [B, n, bs, K, D] -> [B, n, K, D] in blocks.dtype."""
        b, n, bs, kvh, d = blocks.shape
        x = blocks + self.pos[...].astype(blocks.dtype)[:, None, :]
        x = jnp.moveaxis(x, 2, 3).reshape(b, n, kvh, bs * d)
        return self.w2(jax.nn.silu(self.w1(x))).astype(blocks.dtype)


@register_mixer(NSAConfig)
class NSA(SparseAttentionBase):
    def __init__(self, cfg: NSAConfig, ctx: LayerContext, *, rngs):
        super().__init__(cfg, ctx, rngs=rngs)
        self.g_proj = Dense(ctx.d_model, 3 * self.heads, axes=("embed", "heads"), std=ctx.init_std,
                            dtype=ctx.dtype, rngs=rngs)
        if cfg.compression == "mlp":
            self.k_compress = MLPCompressor(cfg.block_size, self.head_dim, ctx.dtype, rngs)
            self.v_compress = MLPCompressor(cfg.block_size, self.head_dim, ctx.dtype, rngs)

    def compress(self, k: jax.Array, v: jax.Array):
        """k, v [B, L, K, D] -> compressed tokens kc, vc [B, L // bs, K, D] (complete blocks)."""
        bs = self.cfg.block_size
        if self.cfg.compression == "mean":
            return routing.compress_mean(k, bs), routing.compress_mean(v, bs)
        n = k.shape[1] // bs
        blocks = lambda x: x[:, :n * bs].reshape(x.shape[0], n, bs, *x.shape[2:])
        return self.k_compress(blocks(k)), self.v_compress(blocks(v))

    def compressed(self, q, kc, vc, q_idx, q_seg, doc_start):
        """The compressed branch of queries q [B, Tq, H, D] at indices q_idx (segment ids q_seg,
        document starts doc_start [B, Tq]) over the compressed tokens kc, vc [B, nc, K, D]:
        (o_cmp [B, Tq, H, D], p_cmp float32 [B, H, Tq, nc])."""
        b, tq, h, _ = q.shape
        nc = kc.shape[1]
        if not nc:  # shorter than one block: nothing compressed yet
            return jnp.zeros_like(q), jnp.zeros((b, h, tq, 0), F32)
        vis = routing.compressed_visible(q_idx, q_seg, doc_start, nc, self.cfg.block_size)
        return masked_attention(q, kc, vc, vis[:, None], return_probs=True)

    def select(self, p_cmp, q_idx, doc_start, length: int):
        """Selected blocks int32 [B, K, Tq, num_selected] of the queries at q_idx whose
        compressed-branch probabilities are p_cmp [B, H, Tq, nc], over L = length keys."""
        cfg = self.cfg
        return routing.nsa_select(p_cmp, q_idx, doc_start, num_kv_heads=self.kv_heads,
                                  num_blocks=-(-length // cfg.block_size), block_size=cfg.block_size,
                                  num_selected=cfg.num_selected)

    def branches(self, q, k, v, segment_ids, q_seg, q_idx):
        """Compressed-branch output [B, Tq, H, D] and the selected blocks [B, K, Tq, n] of queries
        q at indices q_idx (segment ids q_seg) against keys k, v [B, L, K, D] (segment_ids [B, L])
        (token routing)."""
        doc_start = routing.query_doc_starts(segment_ids, q_idx)
        kc, vc = self.compress(k, v)
        o_cmp, p_cmp = self.compressed(q, kc, vc, q_idx, q_seg, doc_start)
        blocks = self.select(p_cmp, q_idx, doc_start, k.shape[1])
        return o_cmp, blocks  # [B, K, T, n]: one choice per GQA group, a layout with Hl = K

    def _pallas_may_serve(self) -> bool:
        """Whether the op may run on the Pallas kernels, which take per-query-head lists only."""
        impl = self.runtime.sparse_attention_impl
        return impl in ("gpu", "tpu") or (impl is None and jax.default_backend() in ("gpu", "cuda", "rocm", "tpu"))

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d]; positions, segment_ids [B, T] int32 -> (y [B, T, d], cache)."""
        cfg, rt = self.cfg, self.runtime
        b, t, _ = x.shape
        n = cfg.route_block_q
        q, k, v, cache = self.project(x, positions, segment_ids, cache)
        gates = jax.nn.sigmoid(self.g_proj(x).astype(F32)).reshape(b, t, self.heads, 3)
        if cache is None:
            q_idx = jnp.arange(t, dtype=jnp.int32)
            if n == 1:
                o_cmp, blocks = self.branches(q, k, v, segment_ids, segment_ids, q_idx)
            else:  # select with the leaders' rows (every n-th query) of the compressed branch
                doc_start = routing.query_doc_starts(segment_ids, q_idx)
                kc, vc = self.compress(k, v)
                o_cmp, p_cmp = self.compressed(q, kc, vc, q_idx, segment_ids, doc_start)
                blocks = self.select(p_cmp[:, :, ::n], q_idx[::n], doc_start[:, ::n], t)
                if self._pallas_may_serve():
                    blocks = jnp.repeat(blocks, self.heads // self.kv_heads, axis=1)
            layout = from_topk(blocks, block_q=n, block_k=cfg.block_size, q_len=t, kv_len=t, causal=True)
            o_slc, _ = block_sparse_attention(q, k, v, layout, segment_ids=segment_ids,
                                              implementation=rt.sparse_attention_impl)
            win = masks.causal_layout(t, cfg.window, rt.attention_block_q, rt.attention_block_k)
            o_win, _ = block_sparse_attention(q, k, v, win, segment_ids=segment_ids,
                                              implementation=rt.sparse_attention_impl)
        else:
            k_all, v_all, seg_all, q_idx, cache = self.write(cache, k, v, segment_ids, positions)
            length = k_all.shape[1]
            if n == 1:
                o_cmp, blocks = self.branches(q, k_all, v_all, seg_all, segment_ids, q_idx)
            else:  # each token selects with its group leader's compressed-branch probabilities
                kc, vc = self.compress(k_all, v_all)
                o_cmp, _ = self.compressed(q, kc, vc, q_idx, segment_ids,
                                           routing.query_doc_starts(seg_all, q_idx))
                leaders = routing.group_leaders(q_idx, n)
                lead_start = routing.query_doc_starts(seg_all, leaders)
                q_route, cache["route_q"] = routing.route_queries(q, q_idx, leaders, cache["route_q"])
                _, p_route = self.compressed(q_route, kc, vc, leaders, jnp.take(seg_all, leaders, axis=1),
                                             lead_start)
                blocks = self.select(p_route, leaders, lead_start, length)
            same = routing.same_document(segment_ids, seg_all)[:, None]  # [B, 1, Tq, S]
            slc = routing.selected_mask(blocks, q_idx, length, cfg.block_size)  # [B, K, Tq, S]
            slc = jnp.repeat(slc, self.heads // self.kv_heads, axis=1) & same
            o_slc = masked_attention(q, k_all, v_all, slc)
            o_win = masked_attention(q, k_all, v_all, routing.window_mask(q_idx, length, cfg.window) & same)
        o = sum(gates[..., i, None] * o_n.astype(F32) for i, o_n in enumerate((o_cmp, o_slc, o_win)))
        return self.output(o.astype(q.dtype)), cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        cache = super().init_cache(batch, max_len, dtype)
        if self.cfg.route_block_q > 1:  # the current group leader's query (block routing)
            cache["route_q"] = jnp.zeros((batch, self.heads, self.head_dim), jnp.float32)
        return cache

    @staticmethod
    def flops_per_token(cfg: NSAConfig, d_model: int, seq_len: int) -> float:
        """Training FLOPs per token (fwd + bwd = 3x fwd, 2 per multiply-add): projections and
        gates, the compressor ("mlp"), and the three branches over the keys each actually sees:
        the complete past blocks' compressed tokens, the own block up to the token plus up to
        num_selected - 1 whole earlier blocks, and min(t + 1, window) keys."""
        hd, h, kvh, bs = cfg.dim_per_head(d_model), cfg.num_heads, cfg.kv_heads, cfg.block_size
        proj = 2 * d_model * hd * (2 * h + 2 * kvh) + 2 * d_model * 3 * h
        comp = 0.0 if cfg.compression == "mean" else 2 * 2 * kvh * (bs * hd * hd + hd * hd) / bs
        cmp = mean_visible(seq_len, lambda t: (t + 1) // bs)
        slc = mean_visible(seq_len, lambda t: t % bs + 1 + bs * np.minimum(cfg.num_selected - 1, t // bs))
        win = mean_visible(seq_len, lambda t: np.minimum(t + 1, cfg.window))
        return 3.0 * (proj + comp + 2 * 2 * h * hd * (cmp + slc + win))

    def describe(self) -> str:
        c = self.cfg
        return ", ".join([f"nsa {self.describe_heads()}",
                          f"block={c.block_size} compression={c.compression} selected={c.num_selected} "
                          f"(first/own/previous forced) window={c.window}"
                          + (f" route_block_q={c.route_block_q}" if c.route_block_q > 1 else ""),
                          f"compressed branch dense, {self.describe_impl()}"])

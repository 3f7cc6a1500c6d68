"""MoBA: Mixture of Block Attention (Lu et al. 2025, arXiv 2502.13189), with the short key
convolution of FlashMoBA (Xiao et al. 2025, arXiv 2511.11571, "Optimizing Mixture of Block
Attention") as an option. Kind "moba".

    q, k, v = x W_q, [causal depthwise conv_W](x W_k), x W_v       (conv only if key_conv_size)
    q, k <- RoPE(RMSNorm(q), RMSNorm(k))                           (RMSNorm only if qk_norm)
    keys in blocks of bs = block_size tokens:   kbar_n = mean_{j in block n} k_j
    gate, per query token i and head h:         s[i, n] = q_i . kbar_n     (float32, no gradient)
    chosen(i) = top_k over the blocks n <= i // bs of i's document, own block i // bs forced
    o_i = softmax over j in chosen blocks, j <= i, same document (q_i . k_j / sqrt(D)) v_j
    y = W_o o

Faithful: parameter-free gate on mean-pooled keys, stop-gradient through the choice, future
blocks excluded, the own block always chosen, counted in top_k and causal inside; GQA; RoPE'd
q and k in the gate (MoBA gates the same q, k its attention uses). Routing is token-granular
by default (route_block_q = 1): each query token (not each query block) picks its blocks, the
layout is built with block_q = 1.
Choices of ours:
  * Ties: lax.top_k keeps the lower block index, so the choice is deterministic.
  * Packed rows (the papers route per sequence, varlen): blocks are positional blocks of the
    row; a query only considers blocks overlapping its own document up to itself (see
    routing.py), so blocks of padding or other documents are never chosen, and the op's segment
    ids mask other documents' keys inside a shared block. A block's mean is over its
    non-padding keys, other documents' included (one mean per block, not per query), so the
    choice (never the values) of a document's queries can depend on a neighbour sharing its
    first block; a document starting on a block boundary is routed exactly as if alone.
  * key_conv_size (FlashMoBA's key convolution; default 0 = MoBA as published): layers/conv.py's
    document-aware depthwise causal conv (with bias, no activation) on the projected keys, before
    qk_norm and RoPE; the convolved keys serve both the gate and the attention.
  * Defaults are CPU-scale: block 64 (paper 512-4096, FlashMoBA 128), top_k 3 (paper 3).
  * route_block_q = n > 1 (an option; a power of two >= 16 dividing bs): block routing
    (routing.py, "Block routing"). The n queries of group g = i // n share the choice of the
    group's first query l = g n:
        s[g, n'] = q_l . kbar_n'         chosen(g) = top_k over the blocks n' <= l // bs of l's
                                         document, own block l // bs (= i // bs) forced
        o_i = softmax over j in chosen(i // n), j <= i, same document (q_i . k_j / sqrt(D)) v_j
    The gate runs on nq = ceil(T / n) leaders only (n times fewer scores) and the op on
    [n, bs] block pairs (block matmuls; the Pallas kernels serve them). The first query, not
    the group's mean query, so that decode equals the parallel form (routing.py says why).

Computation: the gate is a dense [B, H, T, T / bs] matmul; the attention runs on
`pallas_kernels.block_sparse_attention` (implementation runtime.sparse_attention_impl) with
the layout `from_topk(blocks, block_q=1, block_k=bs, causal=True)` built on device (block
routing: the gate on the leaders q[:, ::n] and `from_topk(blocks, block_q=n, ...)`).

MoBA selection at decode time. The cache is a full-length KV cache (common.py): slot j holds
the token of index j, so the cache's blocks are the parallel form's blocks. Each new token
scores every block of the cache by q . mean(K_block) (the complete blocks and the current,
partial one: both are means over the tokens written so far, and the current block is its own
block, forced in anyway), takes the same top_k over the blocks of its document up to itself,
and attends densely over the cache with that mask (O(S) per token: decode reads the whole
cache once). The means of complete blocks are the same as in the parallel form, so prefill +
token-by-token decode equals the full forward (tests/layers/test_sparse_attention_mixers.py).
With key_conv_size the conv's history is cached too (layers/conv.py).
With block routing each new token is gated with its leader's query instead of its own (over
the leader's document's blocks): the leader's query is read from the call's tokens, or from
the cache's "route_q" (float32 [B, H, D], the routing query of the last token written) when
the leader came in an earlier call. The blocks before the own one are complete and the own
one is forced, so the leader's choice is the same whenever it is recomputed, and decode
equals the parallel form (tests/layers/test_sparse_block_routing.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from layers.conv import CausalConv1d
from layers.registry import LayerContext, register_mixer
from layers.sparse_attention import routing
from layers.sparse_attention.common import SparseAttentionBase, masked_attention, mean_visible
from pallas_kernels.block_sparse_attention.api import block_sparse_attention
from pallas_kernels.block_sparse_attention.layout import from_topk
from layers.sparse_attention.config import MoBAConfig


@register_mixer(MoBAConfig)
class MoBA(SparseAttentionBase):
    def __init__(self, cfg: MoBAConfig, ctx: LayerContext, *, rngs):
        super().__init__(cfg, ctx, rngs=rngs)
        if cfg.key_conv_size:
            self.key_conv = CausalConv1d(self.kv_heads * self.head_dim, cfg.key_conv_size, dtype=ctx.dtype,
                                         rngs=rngs)

    def key_transform(self, k, segment_ids, cache):
        if not self.cfg.key_conv_size:
            return k, cache
        if cache is None:
            return self.key_conv(k, segment_ids)[0], None
        k, conv = self.key_conv(k, segment_ids, cache["conv"])
        return k, {**cache, "conv": conv}

    def route(self, q, k, segment_ids, q_idx):
        """Top-k key blocks int32 [B, H, Tq, top_k] of queries q at indices q_idx against the keys
        k [B, L, K, D] with segment_ids [B, L] (the row itself, or the whole cache)."""
        cfg = self.cfg
        return routing.moba_topk(q, routing.block_means(k, segment_ids, cfg.block_size), q_idx,
                                 routing.query_doc_starts(segment_ids, q_idx),
                                 block_size=cfg.block_size, top_k=cfg.top_k)

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d]; positions, segment_ids [B, T] int32 -> (y [B, T, d], cache)."""
        t, n = x.shape[1], self.cfg.route_block_q
        q, k, v, cache = self.project(x, positions, segment_ids, cache)
        if cache is None:
            leaders = jnp.arange(0, t, n, dtype=jnp.int32)  # every token when n = 1
            blocks = self.route(q[:, ::n], k, segment_ids, leaders)  # [B, H, ceil(T / n), top_k]
            layout = from_topk(blocks, block_q=n, block_k=self.cfg.block_size, q_len=t, kv_len=t, causal=True)
            o, _ = block_sparse_attention(q, k, v, layout, segment_ids=segment_ids,
                                          implementation=self.runtime.sparse_attention_impl)
            return self.output(o), None
        k_all, v_all, seg_all, q_idx, cache = self.write(cache, k, v, segment_ids, positions)
        if n == 1:
            blocks = self.route(q, k_all, seg_all, q_idx)
        else:  # each token gated with its group leader's query, over the leader's document
            leaders = routing.group_leaders(q_idx, n)
            q_route, cache["route_q"] = routing.route_queries(q, q_idx, leaders, cache["route_q"])
            blocks = self.route(q_route, k_all, seg_all, leaders)
        mask = routing.selected_mask(blocks, q_idx, k_all.shape[1], self.cfg.block_size)
        mask = mask & routing.same_document(segment_ids, seg_all)[:, None]
        return self.output(masked_attention(q, k_all, v_all, mask)), cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        cache = super().init_cache(batch, max_len, dtype)
        if self.cfg.key_conv_size:
            cache["conv"] = self.key_conv.init_cache(batch, dtype)
        if self.cfg.route_block_q > 1:  # the current group leader's query (block routing)
            cache["route_q"] = jnp.zeros((batch, self.heads, self.head_dim), jnp.float32)
        return cache

    @staticmethod
    def flops_per_token(cfg: MoBAConfig, d_model: int, seq_len: int) -> float:
        """Training FLOPs per token (fwd + bwd = 3x fwd, 2 per multiply-add): projections, the
        attention over the keys actually visible (own block up to the token, plus up to
        top_k - 1 whole earlier blocks), the gate (forward only: no gradient; on one query in
        route_block_q) and the conv."""
        hd, h, kvh, bs = cfg.dim_per_head(d_model), cfg.num_heads, cfg.kv_heads, cfg.block_size
        proj = 2 * d_model * hd * (2 * h + 2 * kvh)
        visible = mean_visible(seq_len, lambda t: t % bs + 1 + bs * np.minimum(cfg.top_k - 1, t // bs))
        attn = 2 * 2 * h * hd * visible
        conv = 2 * cfg.key_conv_size * kvh * hd
        gate = 2 * h * hd * mean_visible(seq_len, lambda t: t // bs + 1) / cfg.route_block_q
        return 3.0 * (proj + attn + conv) + gate

    def describe(self) -> str:
        c = self.cfg
        parts = [f"moba {self.describe_heads()}", f"block={c.block_size} top_k={c.top_k} (own block included)"]
        if c.key_conv_size:
            parts.append(f"key_conv={c.key_conv_size}")
        if c.route_block_q > 1:
            parts.append(f"route_block_q={c.route_block_q} (block routing by each group's first query)")
        parts.append(self.describe_impl())
        return ", ".join(parts)

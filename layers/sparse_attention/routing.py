"""Routing of the sparse mixers as pure functions: which key blocks each query token attends to.

Everything here works on INDICES, not positions: the key at index j of a row (or slot j of a
full-length KV cache, which holds the token of index j) lies in block j // bs, and a query at
index i is causal in i. `q_idx` is therefore arange(T) for a training forward and
index + arange(T) for tokens added to a cache; the same code routes both, which is what makes
decode equal the parallel form.

Documents (packed rows). Blocks are positional blocks of the row: they do not restart at a
document start. A query only ever considers the blocks that overlap its own document up to
itself, n in [doc_start(i) // bs, i // bs], where doc_start(i) is the first index of the run
of equal segment ids holding i: blocks of other documents or padding are never chosen, and the
op (or the dense decode mask) removes the other documents' keys inside a shared block by
segment id. A document starting mid-block is routed over blocks offset from the ones it would
have alone (outputs equal the document alone when it starts on a block boundary).
A new document must get a segment id different from its left neighbour's
(the data pipeline numbers documents; the op compares ids, so an id reused after padding would
be the same document to it).

Block routing (`route_block_q` = n > 1; n a power of two >= 16 dividing bs, checked by the
configs). Queries are grouped by index, group g = i // n, and every query of a group uses the
choice that token routing makes for the group's LEADER, its first index l(i) = (i // n) n:

    chosen(i) = chosen_token(l(i))      (gate / importance of q_l, candidates and forced blocks
                                         of l, l's document), shared by the group's n queries
    o_i = softmax over j in chosen blocks, j <= i, same document (q_i . k_j / sqrt(D)) v_j

so the layout is `from_topk(choices [.., nq, k], block_q=n, block_k=bs)`: one list per query
block, whose blocks are block matmuls (the op keeps the causal mask j <= i per token inside the
own block, and the segment mask). Because n divides bs, a group lies inside one key block:
l // bs = i // bs for each of its queries, so the eligible blocks are the blocks up to the
group's last query (nothing in the future of any of them is listed except the own block,
which is causal inside) and the forced own block is every member's own block.
Why the leader, not the mean (or max) of the group's queries: a mean makes token i's keys
depend on queries after i, which decode cannot see (they depend on i's own output), so decode
could not equal the parallel form. The leader's choice is causal: decode keeps the latest
leader's query in the cache (`route_queries`) and repeats the parallel choice exactly. n = 1
makes every token its own leader: token routing, unchanged.
Documents under block routing: the group routes by its leader's document (padding, for a
padding leader). A query of the group in another document (one starting inside the group)
has its whole document history inside the own key block, which is always chosen and masked
to its document by segment id; the leader's other blocks end before the group starts and hold
none of its keys. So it attends to all of its document so far, exactly as token routing makes
it (its only eligible block is the own one): documents never see each other's keys, and a
document depends on a neighbour only where token routing already lets it (MoBA's mean of a
shared first block).

Dimension letters: B batch, Tq query tokens, L keys (T, or the cache's S slots), H query heads,
K kv heads (H % K == 0, head h reads kv head h // (H // K)), D head dim, bs block size,
nb = ceil(L / bs) blocks, nc = L // bs complete blocks (NSA's compressed tokens), k top-k slots.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def doc_starts(segment_ids: jax.Array) -> jax.Array:
    """int32 [B, L]: index of the first token of the run of equal segment ids holding each token."""
    seg = segment_ids.astype(jnp.int32)
    idx = jnp.arange(seg.shape[1], dtype=jnp.int32)
    change = jnp.concatenate([jnp.ones_like(seg[:, :1], jnp.bool_), seg[:, 1:] != seg[:, :-1]], axis=1)
    return lax.cummax(jnp.where(change, idx, 0), axis=1)


def query_doc_starts(segment_ids: jax.Array, q_idx: jax.Array) -> jax.Array:
    """doc_starts of the keys [B, L] read at the query indices q_idx [Tq] -> int32 [B, Tq]."""
    return jnp.take(doc_starts(segment_ids), q_idx, axis=1)


def group_leaders(q_idx: jax.Array, route_block_q: int) -> jax.Array:
    """int32 [Tq]: the leader (first index) of each query's routing group, (i // n) n."""
    return (q_idx.astype(jnp.int32) // route_block_q) * route_block_q


def route_queries(q: jax.Array, q_idx: jax.Array, leaders: jax.Array,
                  cached: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Decode under block routing: the routing query of each new token, its leader's query.

    q [B, Tq, H, D]: the new tokens, at indices q_idx [Tq] (consecutive, from the cache index);
    leaders [Tq] (`group_leaders`); cached float32 [B, H, D]: the routing query of the last
    token written before this call. A leader among the new tokens is read from q; an earlier
    one is the cached query (a token's leader is either new or the previous token's leader).
    Returns (float32 [B, Tq, H, D], the new cached query float32 [B, H, D]: the last token's).
    float32 keeps the query exact whatever the cache dtype (the gates cast it to float32 too).
    """
    local = leaders - q_idx[0]
    new = jnp.take(q, jnp.clip(local, 0, q.shape[1] - 1), axis=1).astype(F32)
    out = jnp.where((local >= 0)[None, :, None, None], new, cached[:, None].astype(F32))
    return out, out[:, -1]


def _blocks(x: jax.Array, block_size: int, complete_only: bool = False) -> jax.Array:
    """[B, L, ...] -> [B, n, bs, ...]: zero-padded to nb = ceil(L / bs) blocks, or cut to the
    nc = L // bs complete ones."""
    b, length = x.shape[:2]
    if complete_only:
        n = length // block_size
        x = x[:, :n * block_size]
    else:
        n = -(-length // block_size)
        x = jnp.pad(x, [(0, 0), (0, n * block_size - length)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, n, block_size, *x.shape[2:])


def block_means(k: jax.Array, segment_ids: jax.Array, block_size: int) -> jax.Array:
    """MoBA's block representatives: float32 [B, nb, K, D], the mean of each block's keys
    k [B, L, K, D] over its non-padding tokens (segment id != 0; 0 for a block of padding)."""
    kb = _blocks(k.astype(F32), block_size)  # [B, nb, bs, K, D]
    w = _blocks((segment_ids != 0).astype(F32), block_size)  # [B, nb, bs]
    total = jnp.einsum("bnsvd,bns->bnvd", kb, w)
    return total / jnp.maximum(jnp.sum(w, axis=2), 1.0)[:, :, None, None]


def candidates(q_idx: jax.Array, doc_start: jax.Array, num_blocks: int, block_size: int):
    """(eligible bool [B, Tq, nb], own block int32 [1, Tq, 1], first block int32 [B, Tq, 1]):
    block n is eligible for query i iff doc_start(i) // bs <= n <= i // bs (it overlaps i's
    document up to i: causal, same document)."""
    n = jnp.arange(num_blocks, dtype=jnp.int32)
    own = (q_idx.astype(jnp.int32) // block_size)[None, :, None]
    first = (doc_start.astype(jnp.int32) // block_size)[..., None]
    return (n >= first) & (n <= own), own, first


def top_k_blocks(scores: jax.Array, k: int) -> jax.Array:
    """int32 [..., k]: the indices of the k largest scores [..., nb] in decreasing order,
    -1 for slots whose score is -inf (not eligible) or beyond nb. Ties go to the lower block
    index (lax.top_k is stable), so the choice is deterministic."""
    kk = min(k, scores.shape[-1])
    values, idx = lax.top_k(scores, kk)
    idx = jnp.where(values > -jnp.inf, idx, -1).astype(jnp.int32)
    if kk < k:
        idx = jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, k - kk)], constant_values=-1)
    return idx


def moba_topk(q: jax.Array, k_mean: jax.Array, q_idx: jax.Array, doc_start: jax.Array, *,
              block_size: int, top_k: int) -> jax.Array:
    """MoBA's gate: int32 [B, H, Tq, top_k] key blocks per query token and head (-1 unused).

        s[b, h, i, n] = q[b, i, h] . k_mean[b, n, h // (H // K)]      (float32, no gradient)

    over the eligible blocks (`candidates`), the own block forced in (+inf: it counts toward
    top_k and is causal inside, which the layout's diagonal pattern takes care of).
    q [B, Tq, H, D]; k_mean [B, nb, K, D] (`block_means`); q_idx [Tq]; doc_start [B, Tq].
    """
    b, tq, h, d = q.shape
    nb, kvh = k_mean.shape[1], k_mean.shape[2]
    qf = lax.stop_gradient(q).astype(F32).reshape(b, tq, kvh, h // kvh, d)
    s = jnp.einsum("btkgd,bnkd->bkgtn", qf, lax.stop_gradient(k_mean).astype(F32),
                   precision=lax.Precision.HIGHEST).reshape(b, h, tq, nb)
    eligible, own, _ = candidates(q_idx, doc_start, nb, block_size)
    n = jnp.arange(nb, dtype=jnp.int32)
    s = jnp.where((n == own)[:, None], jnp.inf, jnp.where(eligible[:, None], s, -jnp.inf))
    return top_k_blocks(s, top_k)


# ----------------------------------------------------------------------------- NSA

def compress_mean(x: jax.Array, block_size: int) -> jax.Array:
    """NSA's mean-pooled compression: [B, L, K, D] -> [B, nc, K, D] (complete blocks only, stride
    = block size), in x.dtype with a float32 mean."""
    return jnp.mean(_blocks(x.astype(F32), block_size, complete_only=True), axis=2).astype(x.dtype)


def compressed_visible(q_idx: jax.Array, q_seg: jax.Array, doc_start: jax.Array, num_compressed: int,
                       block_size: int) -> jax.Array:
    """bool [B, Tq, nc]: compressed token c (keys c bs .. (c+1) bs - 1) is visible to query i iff
    the whole block lies in i's document up to i: (c+1) bs - 1 <= i and c bs >= doc_start(i),
    and i is not padding. (A block straddling a document start is seen by neither document.)"""
    c = jnp.arange(num_compressed, dtype=jnp.int32)
    i = q_idx.astype(jnp.int32)[None, :, None]
    return ((c + 1) * block_size - 1 <= i) & (c * block_size >= doc_start[..., None]) & \
        (q_seg != 0)[..., None]


def nsa_select(p_cmp: jax.Array, q_idx: jax.Array, doc_start: jax.Array, *, num_kv_heads: int,
               num_blocks: int, block_size: int, num_selected: int) -> jax.Array:
    """NSA's block selection: int32 [B, K, Tq, num_selected] key blocks per query token and KV
    group (-1 unused).

    importance[b, g, i, n] = sum over the query heads h of group g of p_cmp[b, h, i, n], the
    compressed branch's attention probabilities (selection block = compression block, so
    compressed token n scores block n; blocks without a visible compressed token score 0);
    the top num_selected eligible blocks (`candidates`), with the own block, the one before it
    and the document's first block forced in, in that priority (they count toward num_selected:
    with num_selected < 3 the own block goes first, then the previous one).
    p_cmp [B, H, Tq, nc] (no gradient is taken through the choice); q_idx [Tq]; doc_start [B, Tq].
    """
    b, h, tq, nc = p_cmp.shape
    imp = lax.stop_gradient(p_cmp).astype(F32).reshape(b, num_kv_heads, h // num_kv_heads, tq, nc).sum(2)
    imp = jnp.pad(imp, [(0, 0), (0, 0), (0, 0), (0, num_blocks - nc)])  # [B, K, Tq, nb]
    eligible, own, first = candidates(q_idx, doc_start, num_blocks, block_size)
    n = jnp.arange(num_blocks, dtype=jnp.int32)
    big = jnp.finfo(F32).max  # forced scores above any importance (<= H / K), ranked among themselves
    forced = jnp.where(n == own, jnp.inf, jnp.where(n == own - 1, big, jnp.where(n == first, big / 2, 0.0)))
    s = jnp.where(eligible[:, None], jnp.maximum(imp, forced[:, None]), -jnp.inf)
    return top_k_blocks(s, num_selected)


# ----------------------------------------------------------------------------- dense masks

def selected_mask(kv_blocks: jax.Array, q_idx: jax.Array, kv_len: int, block_size: int) -> jax.Array:
    """The dense form of a token-granular causal selection (decode path and tests):
    kv_blocks int [B, Hx, Tq, k] (-1 unused) -> bool [B, Hx, Tq, L], key j visible iff its
    block j // bs is selected and j <= i."""
    nb = -(-kv_len // block_size)
    chosen = jnp.max(jax.nn.one_hot(kv_blocks, nb, dtype=jnp.bool_), axis=-2)  # [B, Hx, Tq, nb]
    j = jnp.arange(kv_len, dtype=jnp.int32)
    return jnp.take(chosen, j // block_size, axis=-1) & (j <= q_idx.astype(jnp.int32)[:, None])


def window_mask(q_idx: jax.Array, kv_len: int, window: int) -> jax.Array:
    """bool [Tq, L]: i - window < j <= i (masks.SlidingWindow's rule)."""
    i = q_idx.astype(jnp.int32)[:, None]
    j = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    return (j <= i) & (i - j < window)


def same_document(q_seg: jax.Array, kv_seg: jax.Array) -> jax.Array:
    """bool [B, Tq, L]: same nonzero segment id (the op's rule)."""
    return (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg != 0)[:, :, None]

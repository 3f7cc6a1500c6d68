"""Which key blocks each query block attends to: the CSR block layout every implementation reads.

A `BlockLayout` lists, for each (batch row, query head, query block), the key blocks to visit, in
increasing order, each marked full (every pair visible) or partial (a pattern from a small,
deduplicated table: causal diagonals, window edges, the ragged tail). The same lists are also
kept key-block-major, for the backward kernels that produce dk/dv one key block at a time.
This is splash attention's MaskInfo idea in the CSR form that GPU kernels can loop over
(anchors_kernels.md 2.3).

Key j is visible to query i (row b, head h) iff block (i // bq, j // bk) is listed for (b, h)
and is full, or its pattern is True at (i % bq, j % bk). Segment ids are applied on top by the op.

Layouts come from two places: `masks.build_layout` evaluates a mask description on the host
(numpy arrays; static masks: causal, windows, documents...), and `from_topk` turns data-dependent
block choices (MoBA / NSA routing) into a layout on device, under jit.

Dimension letters: Bl in {1, B} rows of layouts (1: shared by every batch row), Hl in {1, K, H}
(1: shared by every query head; K: one list per kv head, shared by its GQA group of H / K query
heads; H: one per query head), nq / nk query / key blocks, S / Sq most listed blocks per query /
key block, P distinct partial patterns, bq / bk block sizes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FULL = -1  # mask id of a full block
EMPTY = -2  # internal (host tables): a block that is not listed


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Block lists of one attention call (a pytree: the arrays are leaves, the sizes static).

    kv_blocks: int32 [Bl, Hl, nq, S] key block of each slot, increasing; slots >= the count
      repeat the last listed block (0 when none), so prefetching kernels never read past the end.
    kv_counts: int32 [Bl, Hl, nq] listed key blocks, 0..S.
    kv_mask_ids: int32 [Bl, Hl, nq, S] FULL (-1) or the index of the block's pattern; padding
      slots hold FULL.
    q_blocks, q_counts, q_mask_ids: the same lists key-block-major: [Bl, Hl, nk, Sq],
      [Bl, Hl, nk], [Bl, Hl, nk, Sq]: for each key block, the query blocks that list it.
    partial_masks: bool [P, bq, bk], P >= 1 (one all-False pattern when no block is partial).
      Positions past q_len / kv_len are False in every pattern, so the ragged tail needs no
      other mask (a block that reaches past q_len or kv_len is never FULL).
    block_q, block_k, q_len, kv_len: block sizes and the sequence lengths Tq, Tk.
    """
    kv_blocks: jax.Array
    kv_counts: jax.Array
    kv_mask_ids: jax.Array
    q_blocks: jax.Array
    q_counts: jax.Array
    q_mask_ids: jax.Array
    partial_masks: jax.Array
    block_q: int
    block_k: int
    q_len: int
    kv_len: int

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)

    @property
    def rows(self) -> int:
        """Bl: 1 (shared by every batch row) or B."""
        return self.kv_blocks.shape[0]

    @property
    def heads(self) -> int:
        """Hl: 1 (shared by every query head) or H."""
        return self.kv_blocks.shape[1]

    @property
    def max_kv_blocks(self) -> int:
        """S: slots per query block (static; the longest list fits)."""
        return self.kv_blocks.shape[3]

    @property
    def max_q_blocks(self) -> int:
        """Sq: slots per key block (static)."""
        return self.q_blocks.shape[3]

    @property
    def num_patterns(self) -> int:
        """P: rows of `partial_masks`."""
        return self.partial_masks.shape[0]


jax.tree_util.register_dataclass(
    BlockLayout,
    data_fields=["kv_blocks", "kv_counts", "kv_mask_ids", "q_blocks", "q_counts", "q_mask_ids",
                 "partial_masks"],
    meta_fields=["block_q", "block_k", "q_len", "kv_len"])


def dense_mask(layout: BlockLayout) -> jax.Array:
    """The layout as a dense bool [Bl, Hl, Tq, Tk] (for the reference and tests: O(Tq Tk))."""
    bl, hl, nq, s = layout.kv_blocks.shape
    nk, bq, bk = layout.num_kv_blocks, layout.block_q, layout.block_k
    slot_ok = jnp.arange(s) < jnp.asarray(layout.kv_counts)[..., None]  # [Bl, Hl, nq, S]
    ids = jnp.asarray(layout.kv_mask_ids)
    pattern = jnp.where((ids == FULL)[..., None, None], True,
                        jnp.asarray(layout.partial_masks)[jnp.maximum(ids, 0)])  # [.., S, bq, bk]
    pattern = pattern & slot_ok[..., None, None]
    # Scatter each slot's pattern into its key block with `max` (an "or"): padding slots repeat a
    # listed block but carry all-False patterns, so they change nothing.
    b = jnp.arange(bl)[:, None, None, None]
    h = jnp.arange(hl)[None, :, None, None]
    q = jnp.arange(nq)[None, None, :, None]
    blocks = jnp.zeros((bl, hl, nq, nk, bq, bk), jnp.bool_)
    blocks = blocks.at[b, h, q, jnp.asarray(layout.kv_blocks)].max(pattern, mode="drop")
    dense = blocks.transpose(0, 1, 2, 4, 3, 5).reshape(bl, hl, nq * bq, nk * bk)
    return dense[:, :, :layout.q_len, :layout.kv_len]


# ----------------------------------------------------------------------------- summaries

def density(layout: BlockLayout):
    """Listed blocks / all nq * nk blocks, averaged over the layout's rows and heads.

    A Python float for a concrete layout; a jax scalar when the counts are traced.
    """
    total = layout.rows * layout.heads * layout.num_q_blocks * layout.num_kv_blocks
    counts = layout.kv_counts
    if isinstance(counts, jax.core.Tracer):
        return jnp.sum(counts) / total
    return float(np.sum(np.asarray(counts), dtype=np.int64)) / total


def describe(layout: BlockLayout) -> str:
    """A one-line summary for start-up logs (shapes, patterns, density, full / partial blocks)."""
    text = (f"BlockLayout Tq={layout.q_len} Tk={layout.kv_len} blocks {layout.block_q}x"
            f"{layout.block_k} (nq={layout.num_q_blocks} nk={layout.num_kv_blocks}) "
            f"rows={layout.rows} heads={layout.heads} S={layout.max_kv_blocks} "
            f"Sq={layout.max_q_blocks} patterns={layout.num_patterns}")
    if isinstance(layout.kv_counts, jax.core.Tracer) or \
            isinstance(layout.kv_mask_ids, jax.core.Tracer):
        return text + " (traced: no counts)"
    counts = np.asarray(layout.kv_counts)
    listed = np.arange(layout.max_kv_blocks) < counts[..., None]
    partial = int(np.sum(listed & (np.asarray(layout.kv_mask_ids) != FULL)))
    n = int(listed.sum())
    return text + f" density={density(layout):.4f} listed={n} (full {n - partial}, partial {partial})"


# ----------------------------------------------------------------------------- validation

_LIST_FIELDS = ("kv_blocks", "kv_counts", "kv_mask_ids", "q_blocks", "q_counts", "q_mask_ids")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def validate(layout: BlockLayout, *, batch: int, heads: int, q_len: int, kv_len: int,
             kv_heads: int | None = None) -> None:
    """Raises ValueError naming the field when `layout` cannot serve q [batch, q_len, heads, .]
    against keys [batch, kv_len, kv_heads, .] (kv_heads None: heads). Checks shapes and dtypes (works on traced layouts); the values
    (counts in 0..S, blocks in 0..nk-1, mask ids in -1..P-1) are checked only for numpy arrays,
    so that a device-built layout never forces a transfer."""
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    for name in ("block_q", "block_k", "q_len", "kv_len"):
        value = getattr(layout, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"layout.{name} must be an int >= 1, got {value!r}")
    if layout.q_len != q_len:
        raise ValueError(f"layout.q_len = {layout.q_len}, but the queries have Tq = {q_len}")
    if layout.kv_len != kv_len:
        raise ValueError(f"layout.kv_len = {layout.kv_len}, but the keys have Tk = {kv_len}")
    nq, nk = layout.num_q_blocks, layout.num_kv_blocks
    bq, bk = layout.block_q, layout.block_k
    shapes = {name: tuple(np.shape(getattr(layout, name))) for name in _LIST_FIELDS}
    for name in _LIST_FIELDS:
        dtype = getattr(layout, name).dtype
        if dtype != np.int32:
            raise ValueError(f"layout.{name} must be int32, got {dtype}")
    kvb = shapes["kv_blocks"]
    if len(kvb) != 4 or kvb[2] != nq or kvb[3] < 1:
        raise ValueError(f"layout.kv_blocks must be [Bl, Hl, nq={nq}, S>=1], got {list(kvb)}")
    bl, hl = kvb[:2]
    if bl not in (1, batch):
        raise ValueError(f"layout.kv_blocks has {bl} rows (Bl); must be 1 or the batch {batch}")
    kv_heads = heads if kv_heads is None else kv_heads
    if hl not in (1, kv_heads, heads):
        raise ValueError(f"layout.kv_blocks has {hl} heads (Hl); must be 1 (shared), the kv heads "
                         f"{kv_heads} (one list per GQA group) or the query heads {heads}")
    sq = shapes["q_blocks"][3] if len(shapes["q_blocks"]) == 4 else 0
    expected = {"kv_counts": (bl, hl, nq), "kv_mask_ids": kvb,
                "q_blocks": (bl, hl, nk, max(sq, 1)), "q_counts": (bl, hl, nk),
                "q_mask_ids": (bl, hl, nk, max(sq, 1))}
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ValueError(f"layout.{name} must have shape {list(shape)} (Bl, Hl, nq={nq}, "
                             f"nk={nk}, S, Sq>=1), got {list(shapes[name])}")
    pm = layout.partial_masks
    if pm.dtype != np.bool_ or len(np.shape(pm)) != 3 or np.shape(pm)[1:] != (bq, bk) \
            or np.shape(pm)[0] < 1:
        raise ValueError(f"layout.partial_masks must be bool [P>=1, {bq}, {bk}], got "
                         f"{pm.dtype} {list(np.shape(pm))}")
    if all(isinstance(getattr(layout, n), np.ndarray) for n in _LIST_FIELDS + ("partial_masks",)):
        _validate_values(layout, nk, nq, kvb[3], sq, np.shape(pm)[0])


def _validate_values(layout, nk, nq, s, sq, p):
    checks = (("kv_counts", 0, s), ("kv_blocks", 0, nk - 1), ("kv_mask_ids", FULL, p - 1),
              ("q_counts", 0, sq), ("q_blocks", 0, nq - 1), ("q_mask_ids", FULL, p - 1))
    for name, lo, hi in checks:
        a = getattr(layout, name)
        if a.size and (a.min() < lo or a.max() > hi):
            raise ValueError(f"layout.{name} values must lie in [{lo}, {hi}], got "
                             f"[{a.min()}, {a.max()}]")
    if layout.kv_counts.sum(dtype=np.int64) != layout.q_counts.sum(dtype=np.int64):
        raise ValueError("layout.q_counts must list as many blocks as layout.kv_counts "
                         f"({layout.q_counts.sum()} vs {layout.kv_counts.sum()})")


# ----------------------------------------------------------------------------- shared pieces

class PatternTable:
    """Deduplicated partial patterns (host side): `ids(patterns [n, bq, bk])` -> int32 [n]."""

    def __init__(self, block_q: int, block_k: int):
        self.shape = (block_q, block_k)
        self._index: dict[bytes, int] = {}
        self._list: list[np.ndarray] = []

    def ids(self, patterns: np.ndarray) -> np.ndarray:
        n = patterns.shape[0]
        if n == 0:
            return np.zeros((0,), np.int32)
        packed = np.packbits(patterns.reshape(n, -1), axis=1)  # [n, ceil(bq bk / 8)] uint8
        keys = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        out = np.empty(len(uniq), np.int32)
        for u in range(len(uniq)):  # one Python step per distinct pattern, not per block
            key = uniq[u].tobytes()
            if key not in self._index:
                self._index[key] = len(self._list)
                self._list.append(np.array(patterns[first[u]], bool))
            out[u] = self._index[key]
        return out[inverse.reshape(-1)]

    def masks(self) -> np.ndarray:
        """bool [P, bq, bk] (one all-False pattern when none was added)."""
        if not self._list:
            return np.zeros((1, *self.shape), bool)
        return np.stack(self._list)


def pad_lists(blocks, ids, counts, xp=np):
    """Slots >= count: repeat the last listed block (0 when none), mask id FULL (numpy or jnp)."""
    s = blocks.shape[-1]
    last = xp.take_along_axis(blocks, xp.maximum(counts - 1, 0)[..., None], axis=-1)
    last = xp.where(counts[..., None] > 0, last, 0)
    pad = xp.arange(s) >= counts[..., None]
    return (xp.where(pad, last, blocks).astype(np.int32),
            xp.where(pad, FULL, ids).astype(np.int32))


def transpose(kv_blocks, kv_counts, kv_mask_ids, num_kv_blocks: int):
    """Query-major lists -> key-major ones on device (jittable): (q_blocks, q_counts, q_mask_ids).

    kv_blocks / kv_mask_ids [Bl, Hl, nq, S], kv_counts [Bl, Hl, nq] (no key block listed twice
    for one query block) -> q_blocks / q_mask_ids [Bl, Hl, nk, Sq], q_counts [Bl, Hl, nk], query
    blocks increasing, padded like the query-major lists. Sq = nq, static: a key block can be
    listed by every query block, so nothing smaller is safe for data-dependent layouts (memory
    Bl*Hl*nk*nq int32 twice). Same lists as `masks.transpose_np` (which trims Sq to the longest).
    Cost: one stable sort of the Bl*Hl*nq*S (group, query block) pairs.
    """
    kv_blocks = jnp.asarray(kv_blocks, jnp.int32)
    bl, hl, nq, s = kv_blocks.shape
    nk = num_kv_blocks
    g = bl * hl * nk  # groups: (row, head, key block); g marks an unused slot
    valid = jnp.arange(s) < jnp.asarray(kv_counts)[..., None]
    row = (jnp.arange(bl, dtype=jnp.int32)[:, None] * hl + jnp.arange(hl, dtype=jnp.int32))
    group = jnp.where(valid, row[:, :, None, None] * nk + kv_blocks, g).reshape(-1)
    qb = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32)[:, None], (bl, hl, nq, s)).reshape(-1)
    mid = jnp.asarray(kv_mask_ids, jnp.int32).reshape(-1)
    # The flat order is (row, head, query block, slot): a stable sort by group alone keeps the
    # query blocks increasing inside each group.
    group, qb, mid = lax.sort((group, qb, mid), num_keys=1, is_stable=True)
    starts = jnp.searchsorted(group, jnp.arange(g + 1, dtype=jnp.int32), side="left")
    counts = (starts[1:] - starts[:-1]).astype(jnp.int32)
    rank = jnp.arange(group.shape[0], dtype=jnp.int32) - starts[group]
    q_blocks = jnp.zeros((g, nq), jnp.int32).at[group, rank].set(qb, mode="drop")
    q_ids = jnp.full((g, nq), FULL, jnp.int32).at[group, rank].set(mid, mode="drop")
    counts = counts.reshape(bl, hl, nk)
    q_blocks, q_ids = pad_lists(q_blocks.reshape(bl, hl, nk, nq), q_ids.reshape(bl, hl, nk, nq),
                                counts, xp=jnp)
    return q_blocks, counts, q_ids


# ----------------------------------------------------------------------------- from_topk

def _check_int(name: str, value, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=64)
def _topk_table(bq: int, bk: int, q_len: int, kv_len: int, causal: bool):
    """Static mask-id table of `from_topk`: int32 [bq + bk, 2, 2] and partial_masks [P, bq, bk].

    A listed block (qb, kb) is read at [clip(d, -bq, bk - 1) + bq, tail_q, tail_k], where
    d = qb * bq - kb * bk (the diagonal offset: pair (r, c) of the block is causal iff
    r - c >= -d, so d <= -bq is empty and d >= bk - 1 is full) and tail_q / tail_k say whether
    the block is the ragged last one. Without causal only d = bk - 1 is used. Entries: EMPTY
    (nothing visible: the block is dropped), FULL, or a pattern id. Only offsets that some
    (qb, kb) pair has are filled, so P stays at the patterns a selection can reach.
    """
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    rq, rk = q_len - (nq - 1) * bq, kv_len - (nk - 1) * bk  # valid rows / keys of the last block
    ragged_q, ragged_k = rq < bq, rk < bk
    r, c = np.arange(bq)[:, None], np.arange(bk)[None, :]
    table = np.full((bq + bk, 2, 2), EMPTY, np.int32)
    patterns = PatternTable(bq, bk)

    def offsets(qbs, kbs):
        """Distinct clipped d over qb in qbs x kb in kbs, without the full grid."""
        if not causal or qbs.size == 0 or kbs.size == 0:
            return np.array([bk - 1] if qbs.size and kbs.size else [], np.int64)
        if qbs.size == 1 or kbs.size == 1:
            d = qbs[:, None] * bq - kbs[None, :] * bk
        else:  # contiguous ranges: the query blocks near each key block's diagonal
            kb = kbs[:, None]
            qb = kb * bk // bq + np.arange(-1, bk // bq + 3)[None, :]
            qb = np.where((qb >= qbs[0]) & (qb <= qbs[-1]), qb, qbs[-1])
            d = np.concatenate([(qb * bq - kb * bk).ravel(),
                                [qbs[0] * bq - kbs[-1] * bk, qbs[-1] * bq - kbs[0] * bk]])
        return np.unique(np.clip(d, -bq, bk - 1))

    for tq in (False, True):
        qbs = np.arange(nq - 1, nq) if tq else np.arange(nq - (1 if ragged_q else 0))
        if tq and not ragged_q:
            continue
        for tk in (False, True):
            kbs = np.arange(nk - 1, nk) if tk else np.arange(nk - (1 if ragged_k else 0))
            if tk and not ragged_k:
                continue
            for d in offsets(qbs, kbs):
                vis = (r - c >= -d) if causal else np.ones((bq, bk), bool)
                if tq:
                    vis = vis & (r < rq)
                if tk:
                    vis = vis & (c < rk)
                if vis.all():
                    table[d + bq, int(tq), int(tk)] = FULL
                elif vis.any():
                    table[d + bq, int(tq), int(tk)] = patterns.ids(vis[None])[0]
    return table, patterns.masks()


def from_topk(kv_blocks, *, block_q: int, block_k: int, q_len: int, kv_len: int,
              causal: bool = True) -> BlockLayout:
    """The layout of data-dependent block choices (MoBA / NSA top-k routing), built on device.

    kv_blocks: int [Bl, Hl, nq, S] (may be traced; nq = ceil(q_len / block_q)): the key blocks
      each query block chose, in any order, duplicates allowed, -1 for an unused slot. Entries
      outside [-1, nk) are refused (ValueError) for concrete arrays and dropped when traced.
    causal: drop the blocks entirely after the query block (key j > every query i of it) and
      give those crossing the diagonal their causal pattern (j <= i on absolute indices, like
      `masks.Causal`); blocks touching the ragged tail get tail patterns. A block with nothing
      visible is dropped, as `build_layout` would.
    Returns kv lists sorted and deduplicated with S slots (the input's S), key-major lists with
    Sq = nq (see `transpose`), and a static numpy `partial_masks` computed on the host from
    (block_q, block_k, q_len, kv_len, causal) alone: the distinct diagonal offsets
    (gcd(bq, bk) apart; several when bq != bk) and the ragged-tail variants.
    Cost O(Bl*Hl*nq*S log) (two sorts per list and one for the key-major lists), never
    O(nq * nk), except the Sq = nq key-major output itself.
    """
    bq = _check_int("block_q", block_q, 1)
    bk = _check_int("block_k", block_k, 1)
    q_len = _check_int("q_len", q_len, 1)
    kv_len = _check_int("kv_len", kv_len, 1)
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    causal = bool(causal)
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    shape, dtype = np.shape(kv_blocks), getattr(kv_blocks, "dtype", None)
    if dtype is None:
        kv_blocks = np.asarray(kv_blocks)
        dtype = kv_blocks.dtype
    if len(shape) != 4 or shape[2] != nq or shape[3] < 1 or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"kv_blocks must be an int array [Bl, Hl, nq={nq}, S>=1] (nq = "
                         f"ceil(q_len / block_q)), got {dtype} {list(shape)}")
    if not isinstance(kv_blocks, jax.core.Tracer):
        concrete = np.asarray(kv_blocks)
        if concrete.size and (concrete.min() < -1 or concrete.max() >= nk):
            raise ValueError(f"kv_blocks entries must be -1 (unused) or key blocks in [0, {nk}), "
                             f"got values in [{concrete.min()}, {concrete.max()}]")
    table_np, partial = _topk_table(bq, bk, q_len, kv_len, causal)
    table = jnp.asarray(table_np)
    kb = jnp.asarray(kv_blocks).astype(jnp.int32)
    qb = jnp.arange(nq, dtype=jnp.int32)[:, None]  # broadcasts against [.., nq, S]

    def mask_id(kb):
        kb = jnp.clip(kb, 0, nk - 1)
        if causal:
            di = jnp.clip(qb * bq - kb * bk, -bq, bk - 1) + bq
        else:
            di = jnp.full_like(kb, bq + bk - 1)
        tq = ((qb == nq - 1) & (q_len % bq != 0)).astype(jnp.int32)
        tk = ((kb == nk - 1) & (kv_len % bk != 0)).astype(jnp.int32)
        return table[di, tq, tk]

    keep = (kb >= 0) & (kb < nk) & (mask_id(kb) != EMPTY)
    key = jnp.where(keep, kb, nk)  # nk: unused, sorts last
    if key.shape[-1] > 1:
        key = jnp.sort(key, axis=-1)
        dup = jnp.concatenate([jnp.zeros_like(key[..., :1], jnp.bool_),
                               key[..., 1:] == key[..., :-1]], axis=-1)
        key = jnp.sort(jnp.where(dup, nk, key), axis=-1)
    counts = jnp.sum(key < nk, axis=-1, dtype=jnp.int32)
    blocks, ids = pad_lists(jnp.minimum(key, nk - 1), mask_id(key), counts, xp=jnp)
    q_blocks, q_counts, q_ids = transpose(blocks, counts, ids, nk)
    return BlockLayout(kv_blocks=blocks, kv_counts=counts, kv_mask_ids=ids, q_blocks=q_blocks,
                       q_counts=q_counts, q_mask_ids=q_ids, partial_masks=partial,
                       block_q=bq, block_k=bk, q_len=q_len, kv_len=kv_len)


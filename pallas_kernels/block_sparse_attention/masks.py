"""Host-side attention masks and `build_layout`, which turns one into a `BlockLayout` (numpy).

A mask is a callable `m(q_idx, kv_idx) -> bool ndarray [Bm, Hm, ...]`: integer index arrays that
broadcast against each other (typically q [Tq', 1] and kv [1, Tk']), and a result with two
leading axes, Bm = `m.rows` (1, or B for a mask that depends on the batch row, such as documents)
and Hm = `m.heads` (1, or H for per-head masks). Keeping those axes always present is what lets
`&` and `|` combine a per-head mask with a per-row one by plain numpy broadcasting ([1, H] with
[B, 1] gives [B, H]).

`build_layout` evaluates the mask a few query-block rows at a time, and only on the key blocks
that the mask's `key_ranges` leaves open, so a long sequence never needs the [Tq, Tk] grid;
it classifies each (query block, key block) as empty, full or partial, and keeps one copy of
each distinct partial pattern (splash attention's MaskInfo, in CSR form).

Per head: `PerHead([...])` (e.g. `SlidingWindow.per_head([64, 64, 256, 4096])`) gives each query
head its own mask (Hl = H). Per layer: a layer builds its own layout from its own mask (say a
local layer's `SlidingWindow(512)` next to a global layer's `Causal()`); layouts are plain
values, built once per shape and passed to the op (`causal_layout` caches the causal and
window ones that the attention mixers ask for at every trace).
"""
from __future__ import annotations

import functools

import numpy as np

from pallas_kernels.block_sparse_attention.layout import (EMPTY, FULL, BlockLayout, PatternTable,
                                                          pad_lists)

# Mask values evaluated at a time by build_layout (bools): bounds its host memory.
_EVAL_BUDGET = 1 << 22


def _check_int(name: str, value, minimum: int) -> int:
    # bool is an int subclass; accepting True as "1" only hides bugs.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _lead(x: np.ndarray) -> np.ndarray:
    """Adds the [Bm=1, Hm=1] axes to a mask value that depends on neither."""
    return x[None, None]


# Key ranges: lists of half-open [lo, hi) key-index intervals (see Mask.key_ranges).
_ALL = [(0, 1 << 62)]


def _merge(ranges):
    """Sorted, disjoint, non-empty intervals covering the same keys."""
    out = []
    for lo, hi in sorted((lo, hi) for lo, hi in ranges if hi > lo):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _intersect(a, b):
    return _merge([(max(l1, l2), min(h1, h2)) for l1, h1 in a for l2, h2 in b])


class Mask:
    """Base of every mask: `m(q_idx, kv_idx) -> bool [Bm, Hm, *broadcast(q_idx, kv_idx)]`.

    Subclasses implement `__call__` and, when they depend on the batch row or the head, set
    `rows` / `heads`; `check(q_len, kv_len)` refuses lengths the mask cannot describe;
    `key_ranges` (optional) lets `build_layout` skip the keys a structured mask rules out.
    """
    rows: int = 1   # Bm: 1, or B for a mask that differs between batch rows
    heads: int = 1  # Hm: 1, or H for a mask that differs between heads

    def __call__(self, q_idx: np.ndarray, kv_idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def check(self, q_len: int, kv_len: int) -> None:
        """Raises ValueError when the mask is not defined for these lengths (default: always is)."""

    def key_ranges(self, q_lo: int, q_hi: int):
        """(candidates, full): lists of key intervals [lo, hi) for the queries q_lo..q_hi-1.

        No key outside `candidates` is visible to any of these queries (any row, head); every
        key inside `full` is visible to all of them. Both may be loose (the default, all keys
        and none, always is); they only let `build_layout` skip work, never change its result.
        """
        return _ALL, []

    def __and__(self, other: Mask) -> Mask:
        return And(self, other)

    def __or__(self, other: Mask) -> Mask:
        return Or(self, other)


def _combined_size(name: str, a: int, b: int) -> int:
    # 1 broadcasts; two different sizes > 1 (B=2 rows with B=4 rows) cannot be combined.
    if a != 1 and b != 1 and a != b:
        raise ValueError(f"cannot combine masks with {name} {a} and {b}: each must be 1 or equal")
    return max(a, b)


class _Binary(Mask):
    def __init__(self, a: Mask, b: Mask):
        for name, m in (("a", a), ("b", b)):
            if not isinstance(m, Mask):
                raise ValueError(f"{name} must be a Mask, got {type(m).__name__}")
        self.a, self.b = a, b
        self.rows = _combined_size("rows", a.rows, b.rows)
        self.heads = _combined_size("heads", a.heads, b.heads)

    def check(self, q_len, kv_len):
        self.a.check(q_len, kv_len)
        self.b.check(q_len, kv_len)


class And(_Binary):
    """Visible iff visible in both masks (`a & b`)."""

    def __call__(self, q_idx, kv_idx):
        return self.a(q_idx, kv_idx) & self.b(q_idx, kv_idx)

    def key_ranges(self, q_lo, q_hi):
        (ca, fa), (cb, fb) = self.a.key_ranges(q_lo, q_hi), self.b.key_ranges(q_lo, q_hi)
        return _intersect(ca, cb), _intersect(fa, fb)


class Or(_Binary):
    """Visible iff visible in either mask (`a | b`)."""

    def __call__(self, q_idx, kv_idx):
        return self.a(q_idx, kv_idx) | self.b(q_idx, kv_idx)

    def key_ranges(self, q_lo, q_hi):
        (ca, fa), (cb, fb) = self.a.key_ranges(q_lo, q_hi), self.b.key_ranges(q_lo, q_hi)
        return _merge(ca + cb), _merge(fa + fb)


class Causal(Mask):
    """Key j is visible to query i iff j <= i (indices, so Tq == Tk for the usual meaning)."""

    def __call__(self, q_idx, kv_idx):
        return _lead(np.asarray(kv_idx) <= np.asarray(q_idx))

    def key_ranges(self, q_lo, q_hi):
        return [(0, q_hi)], [(0, q_lo + 1)]


class Full(Mask):
    """Every key is visible to every query (bidirectional attention; a neutral element for `&`)."""

    def __call__(self, q_idx, kv_idx):
        return _lead(np.ones(np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx)), bool))

    def key_ranges(self, q_lo, q_hi):
        return _ALL, _ALL


class SlidingWindow(Mask):
    """Causal with a window of W keys, the query's own included: i - W < j <= i."""

    def __init__(self, window: int):
        self.window = _check_int("window", window, 1)

    @classmethod
    def per_head(cls, windows) -> PerHead:
        """One window per query head: `PerHead([SlidingWindow(w) for w in windows])`."""
        masks = []
        for h, w in enumerate(windows):
            try:
                masks.append(cls(w))
            except ValueError as e:
                raise ValueError(f"windows[{h}]: {e}") from None
        return PerHead(masks)

    def __call__(self, q_idx, kv_idx):
        q, kv = np.asarray(q_idx), np.asarray(kv_idx)
        return _lead((kv <= q) & (q - kv < self.window))

    def key_ranges(self, q_lo, q_hi):
        return [(q_lo - self.window + 1, q_hi)], _merge([(q_hi - self.window, q_lo + 1)])


class ChunkedLocal(Mask):
    """Causal within fixed chunks of C tokens (Llama 4 local layers): j <= i, j // C == i // C."""

    def __init__(self, chunk: int):
        self.chunk = _check_int("chunk", chunk, 1)

    def __call__(self, q_idx, kv_idx):
        q, kv = np.asarray(q_idx), np.asarray(kv_idx)
        return _lead((kv <= q) & (kv // self.chunk == q // self.chunk))

    def key_ranges(self, q_lo, q_hi):
        start = q_lo // self.chunk * self.chunk
        full = [(start, q_lo + 1)] if (q_hi - 1) // self.chunk == q_lo // self.chunk else []
        return [(start, q_hi)], full


class SinkWindow(Mask):
    """StreamingLLM: the first `sinks` keys plus a causal window of W keys, j <= i always."""

    def __init__(self, sinks: int, window: int):
        self.sinks = _check_int("sinks", sinks, 0)
        self.window = _check_int("window", window, 1)

    def __call__(self, q_idx, kv_idx):
        q, kv = np.asarray(q_idx), np.asarray(kv_idx)
        return _lead((kv <= q) & ((kv < self.sinks) | (q - kv < self.window)))

    def key_ranges(self, q_lo, q_hi):
        return (_merge([(0, min(self.sinks, q_hi)), (q_lo - self.window + 1, q_hi)]),
                _merge([(0, min(self.sinks, q_lo + 1)), (q_hi - self.window, q_lo + 1)]))


class DocumentCausal(Mask):
    """Causal within documents of packed rows (Bm = B): j <= i, seg[b, i] == seg[b, j] != 0.

    segment_ids: int [B, T] (0 = padding, which sees and is seen by nothing). Needs
    Tq == Tk == T. The op applies segment ids again; listing them here skips whole blocks that
    cross a document boundary, which is where packed rows save work.
    """

    def __init__(self, segment_ids):
        seg = np.asarray(segment_ids)
        if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
            raise ValueError(f"segment_ids must be an int array [B, T], got "
                             f"{seg.dtype} {list(seg.shape)}")
        self.segment_ids = seg
        self.rows = seg.shape[0]
        # First position of each query's document id in its row (the query itself for
        # padding): no key before it can be visible, whatever the id order.
        first = np.empty(seg.shape, np.int64)
        for b, row in enumerate(seg):
            _, index, inverse = np.unique(row, return_index=True, return_inverse=True)
            first[b] = np.where(row != 0, index[inverse.reshape(-1)], np.arange(row.size))
        self._first = first

    def check(self, q_len, kv_len):
        t = self.segment_ids.shape[1]
        if q_len != t or kv_len != t:
            raise ValueError(f"segment_ids has T = {t}, but q_len, kv_len = {q_len}, {kv_len} "
                             f"(DocumentCausal needs both equal to T)")

    def __call__(self, q_idx, kv_idx):
        q, kv = np.asarray(q_idx), np.asarray(kv_idx)
        seg_q, seg_k = self.segment_ids[:, q], self.segment_ids[:, kv]  # [B, *q], [B, *kv]
        return ((seg_q == seg_k) & (seg_k != 0) & (kv <= q))[:, None]

    def key_ranges(self, q_lo, q_hi):
        return [(int(self._first[:, q_lo:q_hi].min()), q_hi)], []


class PerHead(Mask):
    """A different mask per query head (Hm = H): head h sees what `masks[h]` lets it.

    Each mask must itself be shared by all heads; masks may depend on the batch row.
    """

    def __init__(self, masks):
        masks = list(masks)
        if not masks:
            raise ValueError("masks must be a non-empty list of Mask, one per head")
        rows = 1
        for h, m in enumerate(masks):
            if not isinstance(m, Mask) or m.heads != 1:
                raise ValueError(f"masks[{h}] must be a Mask shared by every head (heads == 1), "
                                 f"got {m!r}")
            rows = _combined_size("rows", rows, m.rows)
        self.masks, self.rows, self.heads = masks, rows, len(masks)

    def check(self, q_len, kv_len):
        for m in self.masks:
            m.check(q_len, kv_len)

    def key_ranges(self, q_lo, q_hi):
        cand, full = [], _ALL
        for m in self.masks:  # candidates of any head; full only where every head is
            c, f = m.key_ranges(q_lo, q_hi)
            cand, full = cand + c, _intersect(full, f)
        return _merge(cand), full

    def __call__(self, q_idx, kv_idx):
        vals = [m(q_idx, kv_idx) for m in self.masks]  # each [Bm or 1, 1, ...]
        shape = np.broadcast_shapes(*(v.shape for v in vals))
        return np.concatenate([np.broadcast_to(v, shape) for v in vals], axis=1)


class NumpyMask(Mask):
    """An explicit mask: bool [Tq, Tk] (every head), [H, Tq, Tk] (Hm = H) or [B, H, Tq, Tk]
    (Bm = B, Hm = H; use H = 1 for a mask per batch row only)."""

    def __init__(self, array):
        array = np.asarray(array)
        if array.ndim not in (2, 3, 4):
            raise ValueError(f"array must be [Tq, Tk], [H, Tq, Tk] or [B, H, Tq, Tk], got shape "
                             f"{array.shape}")
        if array.dtype != np.bool_:
            raise ValueError(f"array must be bool, got dtype {array.dtype}")
        self.array = array.reshape((1,) * (4 - array.ndim) + array.shape)  # [Bm, Hm, Tq, Tk]
        self.rows, self.heads = self.array.shape[:2]

    def check(self, q_len, kv_len):
        if self.array.shape[2:] != (q_len, kv_len):
            raise ValueError(f"array has [Tq, Tk] = {list(self.array.shape[2:])}, but "
                             f"q_len, kv_len = {q_len}, {kv_len}")

    def __call__(self, q_idx, kv_idx):
        q_idx, kv_idx = np.broadcast_arrays(q_idx, kv_idx)
        return self.array[:, :, q_idx, kv_idx]


class NumpyBlockMask(Mask):
    """A mask given per block: key j is visible to query i iff array[..., i // bq, j // bk].

    array: bool [nq, nk], [H, nq, nk] or [B, H, nq, nk] with nq = ceil(Tq / block_q),
    nk = ceil(Tk / block_k) (these block sizes need not be the layout's). Combine with `Causal()`
    (`&`) for a causal block selection.
    """

    def __init__(self, array, block_q: int, block_k: int):
        array = np.asarray(array)
        if array.ndim not in (2, 3, 4):
            raise ValueError(f"array must be [nq, nk], [H, nq, nk] or [B, H, nq, nk], got shape "
                             f"{array.shape}")
        if array.dtype != np.bool_:
            raise ValueError(f"array must be bool, got dtype {array.dtype}")
        self.block_q = _check_int("block_q", block_q, 1)
        self.block_k = _check_int("block_k", block_k, 1)
        self.array = array.reshape((1,) * (4 - array.ndim) + array.shape)  # [Bm, Hm, nq, nk]
        self.rows, self.heads = self.array.shape[:2]

    def check(self, q_len, kv_len):
        blocks = (-(-q_len // self.block_q), -(-kv_len // self.block_k))
        if self.array.shape[2:] != blocks:
            raise ValueError(f"array has [nq, nk] = {list(self.array.shape[2:])}, but q_len, "
                             f"kv_len = {q_len}, {kv_len} in blocks {self.block_q} x "
                             f"{self.block_k} need {list(blocks)}")

    def __call__(self, q_idx, kv_idx):
        q_idx, kv_idx = np.broadcast_arrays(np.asarray(q_idx) // self.block_q,
                                            np.asarray(kv_idx) // self.block_k)
        return self.array[:, :, q_idx, kv_idx]


def build_layout(mask: Mask, q_len: int, kv_len: int, block_q: int, block_k: int) -> BlockLayout:
    """The `BlockLayout` of `mask` for Tq = q_len, Tk = kv_len and blocks bq x bk (numpy arrays).

    The mask is evaluated a few query-block rows at a time ([Bm, Hm, c * bq, keys], about 4M
    values), so a long sequence never needs the [Tq, Tk] grid at once, and only on the key
    blocks that `mask.key_ranges` neither rules out nor knows to be full (windows, causal and
    documents cost O(T * window), not O(T^2)). A block is listed when
    any of its pairs is visible; it is full when every pair of its bq x bk (ragged tail
    included: rows past q_len and keys past kv_len count as not visible) is, and partial
    otherwise, with its pattern stored once however many blocks share it.
    Returns a layout with Bl = mask.rows, Hl = mask.heads, S / Sq the largest list (at least 1).
    """
    if not isinstance(mask, Mask):
        raise ValueError(f"mask must be a Mask, got {type(mask).__name__}")
    q_len = _check_int("q_len", q_len, 1)
    kv_len = _check_int("kv_len", kv_len, 1)
    bq = _check_int("block_q", block_q, 1)
    bk = _check_int("block_k", block_k, 1)
    mask.check(q_len, kv_len)
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    bl, hl = mask.rows, mask.heads

    table = PatternTable(bq, bk)
    rows_blocks, rows_ids = [], []  # per chunk of query blocks: [Bl, Hl, c, S_chunk]
    chunk = max(1, _EVAL_BUDGET // (bl * hl * bq * nk * bk))  # query blocks per evaluation
    q0 = 0
    while q0 < nq:
        c = min(chunk, nq - q0)
        ids, evaluated = _classify(mask, table, q0, c, q_len, kv_len, bq, bk, bl, hl)
        listed = ids != EMPTY
        # Stable sort puts the listed key blocks first, in increasing order; keep only as many
        # slots as this chunk needs, so the host never holds a [nq, nk] table.
        width = max(int(listed.sum(-1).max()), 1)
        order = np.argsort(~listed, axis=-1, kind="stable")[..., :width]
        rows_blocks.append(order)
        rows_ids.append(np.take_along_axis(ids, order, axis=-1))
        q0 += c
        # Few blocks evaluated (a window, a causal diagonal): take more query blocks at a time,
        # keeping the [Bl, Hl, c, nk] id table within the budget too.
        if 4 * bl * hl * c * max(bq * evaluated * bk, nk) < _EVAL_BUDGET:
            chunk = 2 * c

    s = max(r.shape[-1] for r in rows_blocks)
    widen = lambda r, fill: np.pad(r, [(0, 0)] * 3 + [(0, s - r.shape[-1])], constant_values=fill)
    kv_blocks = np.concatenate([widen(r, 0) for r in rows_blocks], axis=2)  # [Bl, Hl, nq, S]
    kv_mask_ids = np.concatenate([widen(r, EMPTY) for r in rows_ids], axis=2)
    kv_counts = (kv_mask_ids != EMPTY).sum(-1).astype(np.int32)
    kv_blocks, kv_mask_ids = _pad_lists(kv_blocks, kv_mask_ids, kv_counts)
    q_blocks, q_counts, q_mask_ids = transpose_np(kv_blocks, kv_counts, kv_mask_ids, nk)
    return BlockLayout(kv_blocks=kv_blocks, kv_counts=kv_counts, kv_mask_ids=kv_mask_ids,
                       q_blocks=q_blocks, q_counts=q_counts, q_mask_ids=q_mask_ids,
                       partial_masks=table.masks(), block_q=bq, block_k=bk, q_len=q_len,
                       kv_len=kv_len)


def _blocks_of(ranges, bk: int, nk: int, inner: bool) -> np.ndarray:
    """Key blocks meeting the intervals (inner=False) or lying inside them (inner=True)."""
    out = []
    for lo, hi in ranges:
        lo, hi = max(lo, 0), min(hi, nk * bk)
        first, stop = (-(-lo // bk), hi // bk) if inner else (lo // bk, -(-hi // bk))
        out.append(np.arange(first, max(stop, first)))
    return np.unique(np.concatenate(out)) if out else np.zeros((0,), np.int64)


def _classify(mask, table, q0, c, q_len, kv_len, bq, bk, bl, hl):
    """Mask ids int32 [Bl, Hl, c, nk] (EMPTY / FULL / pattern id) of query blocks q0..q0+c-1,
    and how many key blocks had to be evaluated (the rest ruled out or known full by
    `mask.key_ranges`)."""
    nk = -(-kv_len // bk)
    rows = q0 * bq + np.arange(c * bq)
    q_lo, q_hi = q0 * bq, min((q0 + c) * bq, q_len)
    cand, full = mask.key_ranges(q_lo, q_hi)
    cand = _blocks_of(cand, bk, nk, inner=False)
    # Known-full blocks skip evaluation only when none of their positions is ragged.
    full = _blocks_of(full, bk, kv_len // bk, inner=True) if (q0 + c) * bq <= q_len else cand[:0]
    todo = np.setdiff1d(cand, full)
    ids = np.full((bl, hl, c, nk), EMPTY, np.int32)
    ids[..., full] = FULL
    if todo.size:
        kv = (todo[:, None] * bk + np.arange(bk)).reshape(-1)  # keys of the evaluated blocks
        # Ragged rows / keys are evaluated at a valid index and blanked (False by contract).
        vis = mask(np.minimum(rows, q_len - 1)[:, None], np.minimum(kv, kv_len - 1)[None, :])
        vis = np.broadcast_to(vis, (bl, hl, c * bq, kv.size))
        vis = vis & ((rows < q_len)[:, None] & (kv < kv_len)[None, :])
        blocks = vis.reshape(bl, hl, c, bq, todo.size, bk).transpose(0, 1, 2, 4, 3, 5)
        anyv = blocks.any(axis=(-2, -1))  # [Bl, Hl, c, n_todo]
        allv = blocks.all(axis=(-2, -1))
        sub = np.full(anyv.shape, EMPTY, np.int32)
        sub[allv] = FULL
        partial = anyv & ~allv
        sub[partial] = table.ids(blocks[partial])  # [n, bq, bk] -> one id each
        ids[..., todo] = sub
    return ids, todo.size


def _pad_lists(blocks: np.ndarray, ids: np.ndarray, counts: np.ndarray):
    """Slots >= count: repeat the last listed block (0 when none), mask id FULL."""
    return pad_lists(blocks, ids, counts, xp=np)


def transpose_np(kv_blocks: np.ndarray, kv_counts: np.ndarray, kv_mask_ids: np.ndarray,
                 num_kv_blocks: int):
    """Query-major lists -> key-major ones (numpy): (q_blocks, q_counts, q_mask_ids).

    kv_blocks / kv_mask_ids [Bl, Hl, nq, S], kv_counts [Bl, Hl, nq] ->
    q_blocks / q_mask_ids [Bl, Hl, nk, Sq], q_counts [Bl, Hl, nk], Sq the largest count (>= 1),
    query blocks increasing, padding like the query-major lists. `layout.transpose` is the
    device version (Sq = nq).
    """
    kv_blocks, kv_counts, kv_mask_ids = map(np.asarray, (kv_blocks, kv_counts, kv_mask_ids))
    bl, hl, nq, s = kv_blocks.shape
    nk = num_kv_blocks
    b, h, qb, slot = np.nonzero(np.arange(s) < kv_counts[..., None])
    kb = kv_blocks[b, h, qb, slot].astype(np.int64)
    mid = kv_mask_ids[b, h, qb, slot]
    group = (b * hl + h) * nk + kb  # one group per (row, head, key block)
    # np.nonzero walks (row, head, query block, slot) in order: a stable sort by group alone
    # keeps the query blocks increasing inside each group.
    order = np.argsort(group, kind="stable")
    group, qb, mid = group[order], qb[order], mid[order]
    q_counts = np.bincount(group, minlength=bl * hl * nk).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(q_counts)[:-1]]).astype(np.int64)
    rank = np.arange(group.size) - starts[group]
    sq = max(int(q_counts.max()), 1)
    q_blocks = np.zeros((bl * hl * nk, sq), np.int32)
    q_ids = np.full((bl * hl * nk, sq), FULL, np.int32)
    q_blocks[group, rank] = qb
    q_ids[group, rank] = mid
    q_counts = q_counts.reshape(bl, hl, nk)
    q_blocks, q_ids = _pad_lists(q_blocks.reshape(bl, hl, nk, sq), q_ids.reshape(bl, hl, nk, sq),
                                 q_counts)
    return q_blocks, q_counts, q_ids


@functools.lru_cache(maxsize=64)
def causal_layout(length: int, window: int | None, block_q: int, block_k: int) -> BlockLayout:
    """The layout of `Causal()` (window None) or `SlidingWindow(window)` for self-attention over
    `length` tokens, blocks shrunk to the length when it is shorter. Cached: the layers of a
    model ask for the same one at every trace."""
    mask = Causal() if window is None else SlidingWindow(window)
    return build_layout(mask, length, length, min(block_q, length), min(block_k, length))

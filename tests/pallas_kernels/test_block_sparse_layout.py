"""Block layouts of `pallas_kernels.block_sparse_attention`: host masks, `build_layout`,
`from_topk` (device, under jit), the key-major lists, and the checks and summaries.

* Each mask kind against its definition written out as loops, then `dense_mask(build_layout(m))`
  against the mask evaluated densely (numpy), for ragged lengths, Tq != Tk, block sizes with
  bq != bk, bq = 1, blocks larger than T, and a tiny evaluation budget (one query block at a
  time, so `key_ranges` prunes and declares blocks full for real).
* Structure every layout must have (`_check_structure`): int32 lists, increasing deduplicated
  slots, padding repeating the last block with FULL, ragged-tail blocks never FULL, partial
  patterns neither empty nor full, key-major lists equal to `transpose_np` and to the device
  `transpose`.
* Dedup (long causal layouts hold one or a few patterns), full / partial classification by
  hand, unions and intersections with row / head broadcasting, documents, per-head windows,
  NumPy masks, errors naming the argument, `validate`, `density`, `describe`.
* `from_topk` under jit against `build_layout` of the same selection written as a dense NumPy
  mask, with -1 slots, duplicates, future blocks, causal or not, bq = 1 and bq = bk, ragged.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import layout as L
from pallas_kernels.block_sparse_attention import masks as M
from pallas_kernels.block_sparse_attention.layout import FULL, BlockLayout, dense_mask

LISTS = ("kv_blocks", "kv_counts", "kv_mask_ids", "q_blocks", "q_counts", "q_mask_ids")


# ----------------------------------------------------------------------------- helpers

def _dense_np(mask, q_len, kv_len):
    """The mask evaluated on the whole [Tq, Tk] grid: bool [Bm, Hm, Tq, Tk]."""
    vis = mask(np.arange(q_len)[:, None], np.arange(kv_len)[None, :])
    return np.broadcast_to(vis, (mask.rows, mask.heads, q_len, kv_len))


def _host(layout):
    return {f: np.asarray(getattr(layout, f)) for f in LISTS + ("partial_masks",)}


def _slot_patterns(a, blocks, ids, counts):
    """bool [..., S, bq, bk] pattern of every slot (FULL -> all True; padding -> all False)."""
    pm = a["partial_masks"]
    pat = np.where((ids == FULL)[..., None, None], True, pm[np.maximum(ids, 0)])
    return pat & (np.arange(blocks.shape[-1]) < counts[..., None])[..., None, None]


def _dense_layout_np(layout):
    """numpy twin of `dense_mask` (the jax one compiles per shape): bool [Bl, Hl, Tq, Tk]."""
    a = _host(layout)
    blocks, counts = a["kv_blocks"], a["kv_counts"]
    bl, hl, nq, s = blocks.shape
    nk, bq, bk = layout.num_kv_blocks, layout.block_q, layout.block_k
    pat = _slot_patterns(a, blocks, a["kv_mask_ids"], counts)
    out = np.zeros((bl, hl, nq, nk, bq, bk), bool)
    b, h, q, slot = np.nonzero(np.arange(s) < counts[..., None])  # listed slots only: unique
    out[b, h, q, blocks[b, h, q, slot]] = pat[b, h, q, slot]
    out = out.transpose(0, 1, 2, 4, 3, 5).reshape(bl, hl, nq * bq, nk * bk)
    return out[:, :, :layout.q_len, :layout.kv_len]


@functools.lru_cache(maxsize=None)
def _from_topk_jit(block_q, block_k, q_len, kv_len, causal=True):
    return jax.jit(functools.partial(L.from_topk, block_q=block_q, block_k=block_k, q_len=q_len,
                                     kv_len=kv_len, causal=causal))


def _check_structure(layout: BlockLayout, device: bool = False):
    """Invariants of the BlockLayout contract (see its docstring); device: also compare the
    device `transpose` (one compilation per shape)."""
    a = _host(layout)
    L.validate(layout, batch=layout.rows, heads=layout.heads, q_len=layout.q_len,
               kv_len=layout.kv_len)
    bq, bk = layout.block_q, layout.block_k
    nq, nk = layout.num_q_blocks, layout.num_kv_blocks
    for major, n_other, blocks, counts, ids in (
            ("kv", nk, a["kv_blocks"], a["kv_counts"], a["kv_mask_ids"]),
            ("q", nq, a["q_blocks"], a["q_counts"], a["q_mask_ids"])):
        s = blocks.shape[-1]
        listed = np.arange(s) < counts[..., None]
        assert (counts >= 0).all() and (counts <= s).all(), major
        assert ((blocks >= 0) & (blocks < n_other)).all(), major
        # Listed slots strictly increasing (sorted, no duplicate).
        inc = np.diff(blocks, axis=-1) > 0
        assert (inc | ~listed[..., 1:]).all(), f"{major} lists not increasing"
        # Padding: the last listed block (0 when none), mask id FULL.
        last = np.take_along_axis(blocks, np.maximum(counts - 1, 0)[..., None], -1)
        last = np.where(counts[..., None] > 0, last, 0)
        assert (np.where(listed, blocks, last) == blocks).all(), f"{major} padding blocks"
        assert (ids[~listed] == FULL).all(), f"{major} padding ids"
        assert ((ids >= FULL) & (ids < a["partial_masks"].shape[0])).all(), major
    # Partial patterns listed in the kv lists are neither all-False nor all-True, and ragged
    # tails are False in every pattern; so blocks touching the tail are never FULL.
    pat = _slot_patterns(a, a["kv_blocks"], a["kv_mask_ids"], a["kv_counts"])
    listed = np.arange(a["kv_blocks"].shape[-1]) < a["kv_counts"][..., None]
    part = listed & (a["kv_mask_ids"] != FULL)
    assert pat[part].any(axis=(-2, -1)).all() and not pat[part].all(axis=(-2, -1)).any()
    rq, rk = layout.q_len - (nq - 1) * bq, layout.kv_len - (nk - 1) * bk
    full = listed & (a["kv_mask_ids"] == FULL)
    if rq < bq:
        assert not full[:, :, nq - 1].any(), "a block of the ragged last query block is FULL"
        used = np.unique(a["kv_mask_ids"][:, :, nq - 1][part[:, :, nq - 1]])
        assert not a["partial_masks"][used][:, rq:, :].any()
    if rk < bk:
        assert not (full & (a["kv_blocks"] == nk - 1)).any(), "a ragged key block is FULL"
        used = np.unique(a["kv_mask_ids"][part & (a["kv_blocks"] == nk - 1)])
        assert not a["partial_masks"][used][:, :, rk:].any()
    # Key-major lists: the host transpose of the query-major ones, and the device one.
    qb, qc, qi = M.transpose_np(a["kv_blocks"], a["kv_counts"], a["kv_mask_ids"], nk)
    sq = max(qb.shape[-1], a["q_blocks"].shape[-1])
    np.testing.assert_array_equal(a["q_counts"], qc)
    for x, y, fill in ((a["q_blocks"], qb, None), (a["q_mask_ids"], qi, FULL)):
        np.testing.assert_array_equal(_widen(x, qc, sq, fill), _widen(y, qc, sq, fill))
    if device:
        db, dc, di = map(np.asarray, _transpose_jit(a["kv_blocks"], a["kv_counts"],
                                                    a["kv_mask_ids"], nk))
        np.testing.assert_array_equal(dc, qc)
        np.testing.assert_array_equal(db, _widen(qb, qc, nq, None))  # Sq = nq on device
        np.testing.assert_array_equal(di, _widen(qi, qc, nq, FULL))
    return a


def _widen(x, counts, width, fill):
    """Pads the slot axis to `width` with the padding rule (fill None: repeat the last)."""
    extra = width - x.shape[-1]
    if extra == 0:
        return x
    if fill is None:
        last = np.take_along_axis(x, np.maximum(counts - 1, 0)[..., None], -1)
        last = np.where(counts[..., None] > 0, last, 0)
        return np.concatenate([x, np.broadcast_to(last, (*x.shape[:-1], extra))], -1)
    return np.concatenate([x, np.full((*x.shape[:-1], extra), fill, x.dtype)], -1)


@functools.partial(jax.jit, static_argnums=3)
def _transpose_jit(kv_blocks, kv_counts, kv_mask_ids, nk):
    return L.transpose(kv_blocks, kv_counts, kv_mask_ids, nk)


def _assert_same_layout(got: BlockLayout, want: BlockLayout):
    """Same lists, same FULL / partial marks and the same pattern per slot (pattern ids and
    list widths may differ)."""
    assert (got.block_q, got.block_k, got.q_len, got.kv_len) == \
        (want.block_q, want.block_k, want.q_len, want.kv_len)
    g, w = _host(got), _host(want)
    for major in ("kv", "q"):
        counts = w[f"{major}_counts"]
        np.testing.assert_array_equal(g[f"{major}_counts"], counts)
        width = max(g[f"{major}_blocks"].shape[-1], w[f"{major}_blocks"].shape[-1])
        lists = []
        for a in (g, w):
            blocks = _widen(a[f"{major}_blocks"], counts, width, None)
            ids = _widen(a[f"{major}_mask_ids"], counts, width, FULL)
            pat = _slot_patterns(a, blocks, ids, counts)
            lists.append((blocks, ids == FULL, pat))
        for x, y in zip(*lists):
            np.testing.assert_array_equal(x, y)


def _evaluated(budget, fn):
    """Runs fn with build_layout's evaluation budget set to `budget` (None: the default)."""
    if budget is None:
        return fn()
    saved = M._EVAL_BUDGET
    M._EVAL_BUDGET = budget
    try:
        return fn()
    finally:
        M._EVAL_BUDGET = saved


# ----------------------------------------------------------------------------- masks

SEG = np.array([[1] * 9 + [2] * 20 + [3] * 11 + [0] * 5,          # packed, padding tail
                [4] * 16 + [5] * 16 + [4] * 13],                     # an id that comes back
               np.int32)


def _masks():
    """(name, mask, same_len_only) of every kind, plus combinations."""
    rng = np.random.default_rng(0)
    return [
        ("causal", M.Causal(), False),
        ("full", M.Full(), False),
        ("window7", M.SlidingWindow(7), False),
        ("window16", M.SlidingWindow(16), False),
        ("chunked10", M.ChunkedLocal(10), False),
        ("sink3_window5", M.SinkWindow(3, 5), False),
        ("document", M.DocumentCausal(SEG), True),
        ("per_head_windows", M.SlidingWindow.per_head([1, 9, 20]), False),
        ("numpy_heads", M.NumpyMask(rng.random((2, 45, 45)) < 0.2), True),
        ("numpy_rows_heads", M.NumpyMask(rng.random((2, 1, 45, 45)) < 0.1), True),
        ("window_and_documents", M.SlidingWindow.per_head([4, 30]) & M.DocumentCausal(SEG), True),
        ("chunked_or_sink", M.ChunkedLocal(8) | M.SinkWindow(2, 1), False),
        ("per_head_mixed", M.PerHead([M.Causal(), M.Full() & M.SlidingWindow(12),
                                      M.ChunkedLocal(5) | M.SlidingWindow(3)]), False),
    ]


def test_masks_follow_their_definitions():
    t = 13
    loops = {
        "causal": lambda i, j: j <= i,
        "full": lambda i, j: True,
        "window": lambda i, j: i - 4 < j <= i,
        "chunked": lambda i, j: j <= i and j // 5 == i // 5,
        "sink_window": lambda i, j: j <= i and (j < 2 or i - j < 3),
    }
    built = {"causal": M.Causal(), "full": M.Full(), "window": M.SlidingWindow(4),
             "chunked": M.ChunkedLocal(5), "sink_window": M.SinkWindow(2, 3)}
    for name, rule in loops.items():
        want = np.array([[rule(i, j) for j in range(t)] for i in range(t)])
        np.testing.assert_array_equal(_dense_np(built[name], t, t)[0, 0], want, err_msg=name)
    seg = SEG
    want = np.array([[[seg[b, i] == seg[b, j] != 0 and j <= i for j in range(45)]
                      for i in range(45)] for b in range(2)])
    np.testing.assert_array_equal(_dense_np(M.DocumentCausal(seg), 45, 45)[:, 0], want)


BLOCKS = [(8, 8), (4, 16), (16, 4), (1, 8), (64, 64)]


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("name", [m[0] for m in _masks()])
def test_build_layout_equals_the_mask(name, blocks):
    _, mask, same_len = next(m for m in _masks() if m[0] == name)
    for q_len, kv_len in [(45, 45)] if same_len else [(45, 45), (37, 50)]:
        layout = M.build_layout(mask, q_len, kv_len, *blocks)
        assert (layout.rows, layout.heads) == (mask.rows, mask.heads)
        np.testing.assert_array_equal(_dense_layout_np(layout), _dense_np(mask, q_len, kv_len))
        _check_structure(layout)


@pytest.mark.parametrize("blocks", BLOCKS[:4], ids=lambda b: f"{b[0]}x{b[1]}")
def test_build_layout_per_query_block_prunes_without_changing_the_layout(blocks):
    """Budget 1: one query block per evaluation, so `key_ranges` rules blocks out and declares
    them full for real; the layout must be that of the dense mask (pattern ids aside)."""
    for name, mask, same_len in _masks():
        if isinstance(mask, M.NumpyMask):
            continue
        for q_len, kv_len in [(45, 45)] if same_len else [(45, 45), (37, 50)]:
            layout = _evaluated(1, lambda: M.build_layout(mask, q_len, kv_len, *blocks))
            dense = _dense_np(mask, q_len, kv_len)
            np.testing.assert_array_equal(_dense_layout_np(layout), dense, err_msg=name)
            _assert_same_layout(layout, M.build_layout(M.NumpyMask(dense.copy()), q_len, kv_len,
                                                       *blocks))


def test_dense_mask_jax_equals_numpy():
    for mask, blocks in ((M.SlidingWindow.per_head([3, 20]) & M.DocumentCausal(SEG), (8, 4)),
                         (M.Causal(), (1, 8))):
        layout = M.build_layout(mask, 45, 45, *blocks)
        # jit: eager jax compiles every primitive per shape, slower here than one jit.
        got = jax.jit(dense_mask)(layout)
        assert got.shape == (layout.rows, layout.heads, 45, 45)
        np.testing.assert_array_equal(np.asarray(got), _dense_layout_np(layout))


@pytest.mark.parametrize("name", [m[0] for m in _masks() if not m[2]])
def test_key_ranges_are_sound(name):
    """Nothing outside the candidates is visible; everything in `full` is, for random spans."""
    mask = next(m for m in _masks() if m[0] == name)[1]
    t = 45
    dense = _dense_np(mask, t, t)
    rng = np.random.default_rng(1)
    for _ in range(40):
        lo = int(rng.integers(0, t))
        hi = int(rng.integers(lo + 1, t + 1))
        cand, full = mask.key_ranges(lo, hi)
        inside = np.zeros(t, bool)
        for a, b in cand:
            inside[max(a, 0):max(min(b, t), 0)] = True
        assert not dense[:, :, lo:hi, ~inside].any(), (lo, hi, cand)
        for a, b in full:
            assert dense[:, :, lo:hi, max(a, 0):min(b, t)].all(), (lo, hi, full)


def test_long_causal_layouts_have_few_patterns():
    # One diagonal pattern whatever T when bq == bk and T is a multiple.
    lay = M.build_layout(M.Causal(), 1024, 1024, 16, 16)
    assert lay.num_patterns == 1 and lay.num_q_blocks == 64
    assert int(np.sum(lay.kv_counts)) == 64 * 65 // 2
    # bq != bk: one pattern per diagonal offset (gcd(16, 4) = 4 apart in (-16, 3)).
    assert M.build_layout(M.Causal(), 1024, 1024, 16, 4).num_patterns == 4
    assert M.build_layout(M.Causal(), 1024, 1024, 4, 16).num_patterns == 4
    # Ragged: the diagonal plus the tail variants only.
    assert M.build_layout(M.Causal(), 1000, 1000, 16, 16).num_patterns <= 3
    # A window that is a multiple of the block: a diagonal and a window edge.
    assert M.build_layout(M.SlidingWindow(64), 1024, 1024, 16, 16).num_patterns == 2


def test_full_and_partial_classification_by_hand():
    lay = M.build_layout(M.Causal(), 16, 16, 4, 4)
    np.testing.assert_array_equal(lay.kv_counts[0, 0], [1, 2, 3, 4])
    np.testing.assert_array_equal(lay.kv_blocks[0, 0], [[0, 0, 0, 0], [0, 1, 1, 1],
                                                        [0, 1, 2, 2], [0, 1, 2, 3]])
    d = lay.kv_mask_ids[0, 0]
    assert (d[3, :3] == FULL).all() and d[3, 3] != FULL and (d[1, 2:] == FULL).all()
    np.testing.assert_array_equal(lay.partial_masks[d[3, 3]], np.tril(np.ones((4, 4), bool)))
    np.testing.assert_array_equal(lay.q_counts[0, 0], [4, 3, 2, 1])
    np.testing.assert_array_equal(lay.q_blocks[0, 0, 2], [2, 3, 3, 3])
    # Full attention with ragged lengths: only the blocks off both tails are FULL.
    lay = M.build_layout(M.Full(), 14, 10, 4, 4)
    full = lay.kv_mask_ids[0, 0] == FULL
    np.testing.assert_array_equal(full, [[1, 1, 0]] * 3 + [[0, 0, 0]])
    patterns = lay.partial_masks[lay.kv_mask_ids[0, 0, 3]]
    assert patterns[:, 2:].sum() == 0 and patterns[0, :2].all()
    # Nothing partial: one all-False placeholder pattern.
    lay = M.build_layout(M.Full(), 16, 16, 4, 4)
    assert lay.partial_masks.shape == (1, 4, 4) and not lay.partial_masks.any()
    # Nothing visible: counts 0, padding block 0 with FULL, S = Sq = 1.
    lay = M.build_layout(M.NumpyMask(np.zeros((9, 9), bool)), 9, 9, 4, 4)
    assert lay.kv_blocks.shape[-1] == lay.q_blocks.shape[-1] == 1
    assert not lay.kv_counts.any() and (lay.kv_mask_ids == FULL).all()
    _check_structure(lay)


def test_union_and_intersection_broadcast_rows_and_heads():
    heads = M.SlidingWindow.per_head([3, 11])                  # Bm = 1, Hm = 2
    docs = M.DocumentCausal(np.r_[SEG, SEG[:1, ::-1]])          # Bm = 3, Hm = 1
    both, either = heads & docs, heads | docs
    assert (both.rows, both.heads) == (either.rows, either.heads) == (3, 2)
    dh, dd = _dense_np(heads, 45, 45), _dense_np(docs, 45, 45)
    for m, want in ((both, dh & dd), (either, dh | dd)):
        lay = M.build_layout(m, 45, 45, 8, 8)
        np.testing.assert_array_equal(_dense_layout_np(lay), want)
        _check_structure(lay)
    with pytest.raises(ValueError, match="rows"):
        docs & M.DocumentCausal(SEG)
    with pytest.raises(ValueError, match="heads"):
        heads | M.SlidingWindow.per_head([1, 2, 3])


def test_document_causal_skips_blocks_across_documents():
    seg = np.repeat(np.arange(1, 9), 16)[None]  # 8 documents of 16 tokens, block-aligned
    lay = M.build_layout(M.DocumentCausal(seg), 128, 128, 8, 8)
    assert int(lay.kv_counts.sum()) == 8 * 3  # per document: 2 query blocks, 3 blocks listed
    assert L.density(lay) == 24 / 256
    assert lay.kv_blocks.shape[-1] == 2
    # Padding sees and is seen by nothing: a padding-only block row lists nothing.
    seg = np.r_[np.ones(20, np.int32), np.zeros(12, np.int32)][None]
    lay = M.build_layout(M.DocumentCausal(seg), 32, 32, 8, 8)
    np.testing.assert_array_equal(lay.kv_counts[0, 0], [1, 2, 3, 0])
    np.testing.assert_array_equal(lay.q_counts[0, 0], [3, 2, 1, 0])


def test_per_head_windows():
    windows = [2, 12, 33]
    mask = M.SlidingWindow.per_head(windows)
    lay = M.build_layout(mask, 50, 50, 8, 8)
    dense = _dense_layout_np(lay)
    assert dense.shape == (1, 3, 50, 50)
    for h, w in enumerate(windows):
        np.testing.assert_array_equal(dense[0, h], _dense_np(M.SlidingWindow(w), 50, 50)[0, 0])
    counts = lay.kv_counts[0].sum(-1)
    assert counts[0] < counts[1] < counts[2]


def test_numpy_masks_random():
    rng = np.random.default_rng(2)
    arr = rng.random((3, 2, 30, 41)) < 0.15
    lay = M.build_layout(M.NumpyMask(arr), 30, 41, 4, 8)
    assert (lay.rows, lay.heads) == (3, 2)
    np.testing.assert_array_equal(_dense_layout_np(lay), arr)
    _check_structure(lay)
    blocks = rng.random((2, 8, 6)) < 0.4  # [H, nq, nk] for blocks 4 x 8 over 30 x 41
    lay = M.build_layout(M.NumpyBlockMask(blocks, 4, 8), 30, 41, 4, 8)
    np.testing.assert_array_equal(lay.kv_counts[0], blocks.sum(-1))
    want = np.repeat(np.repeat(blocks, 4, 1), 8, 2)[:, :30, :41]
    np.testing.assert_array_equal(_dense_layout_np(lay)[0], want)


def test_errors_name_the_argument():
    cases = [
        (lambda: M.build_layout(M.Causal(), 0, 4, 2, 2), "q_len"),
        (lambda: M.build_layout(M.Causal(), 4, 4.0, 2, 2), "kv_len"),
        (lambda: M.build_layout(M.Causal(), 4, 4, True, 2), "block_q"),
        (lambda: M.build_layout(M.Causal(), 4, 4, 2, 0), "block_k"),
        (lambda: M.build_layout("causal", 4, 4, 2, 2), "mask"),
        (lambda: M.SlidingWindow(0), "window"),
        (lambda: M.SlidingWindow.per_head([4, 0]), r"windows\[1\]"),
        (lambda: M.ChunkedLocal(-1), "chunk"),
        (lambda: M.SinkWindow(-1, 4), "sinks"),
        (lambda: M.PerHead([]), "masks"),
        (lambda: M.PerHead([M.Causal(), M.SlidingWindow.per_head([1, 2])]), r"masks\[1\]"),
        (lambda: M.DocumentCausal(np.ones(8)), "segment_ids"),
        (lambda: M.build_layout(M.DocumentCausal(np.ones((1, 8), int)), 8, 9, 4, 4), "segment_ids"),
        (lambda: M.NumpyMask(np.ones((4, 4))), "array"),
        (lambda: M.NumpyMask(np.ones(4, bool)), "array"),
        (lambda: M.build_layout(M.NumpyMask(np.ones((4, 5), bool)), 4, 4, 2, 2), "array"),
        (lambda: M.build_layout(M.NumpyBlockMask(np.ones((2, 2), bool), 4, 4), 4, 8, 2, 2), "array"),
        (lambda: M.Causal() & 3, "b must be a Mask"),
        (lambda: M.DocumentCausal(np.ones((2, 8), int)) | M.NumpyMask(np.ones((3, 1, 8, 8), bool)),
         "rows"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()


def test_validate_names_the_field():
    lay = M.build_layout(M.SlidingWindow.per_head([4, 9]), 40, 40, 8, 8)  # Hl = 2
    L.validate(lay, batch=3, heads=2, q_len=40, kv_len=40)
    L.validate(M.build_layout(M.Causal(), 40, 40, 8, 8), batch=3, heads=5, q_len=40, kv_len=40)
    bad = [
        (dict(), dict(heads=4), "heads"),
        (dict(), dict(q_len=41), "q_len"),
        (dict(), dict(kv_len=39), "kv_len"),
        (dict(kv_blocks=lay.kv_blocks.astype(np.int64)), dict(), "kv_blocks.*int32"),
        (dict(q_counts=lay.q_counts[..., :-1]), dict(), "q_counts"),
        (dict(kv_mask_ids=lay.kv_mask_ids[..., :-1]), dict(), "kv_mask_ids"),
        (dict(q_mask_ids=lay.q_mask_ids[:, :1]), dict(), "q_mask_ids"),
        (dict(kv_counts=lay.kv_counts[None]), dict(), "kv_counts"),
        (dict(kv_blocks=lay.kv_blocks[:, :, :-1], kv_mask_ids=lay.kv_mask_ids[:, :, :-1]),
         dict(), "kv_blocks"),
        (dict(partial_masks=lay.partial_masks.astype(np.int8)), dict(), "partial_masks"),
        (dict(partial_masks=lay.partial_masks[:, :4]), dict(), "partial_masks"),
        (dict(partial_masks=lay.partial_masks[:0]), dict(), "partial_masks"),
        (dict(kv_counts=lay.kv_counts + 50), dict(), "kv_counts"),
        (dict(q_blocks=lay.q_blocks + 5), dict(), "q_blocks"),
        (dict(kv_mask_ids=lay.kv_mask_ids - 5), dict(), "kv_mask_ids"),
        (dict(block_q=True), dict(), "block_q"),
    ]
    for change, args, name in bad:
        kwargs = dict(batch=3, heads=2, q_len=40, kv_len=40) | args
        with pytest.raises(ValueError, match=name):
            L.validate(dataclasses.replace(lay, **change), **kwargs)
    rows = M.build_layout(M.DocumentCausal(np.ones((2, 40), int)), 40, 40, 8, 8)
    with pytest.raises(ValueError, match="rows"):
        L.validate(rows, batch=3, heads=1, q_len=40, kv_len=40)
    with pytest.raises(ValueError, match="layout"):
        L.validate("layout", batch=1, heads=1, q_len=40, kv_len=40)

    def traced(x):  # shapes and dtypes only: works on tracers
        L.validate(x, batch=3, heads=2, q_len=40, kv_len=40)
        return x.kv_counts.sum()

    assert jax.eval_shape(traced, lay).shape == ()
    with pytest.raises(ValueError, match="q_len"):
        jax.eval_shape(lambda x: L.validate(x, batch=3, heads=2, q_len=8, kv_len=40), lay)


def test_density_and_describe():
    assert L.density(M.build_layout(M.Full(), 64, 64, 16, 16)) == 1.0
    lay = M.build_layout(M.Causal(), 64, 64, 16, 16)
    assert L.density(lay) == 10 / 16
    text = L.describe(lay)
    assert "\n" not in text and "Tq=64" in text and "density=0.6250" in text
    assert "full 6, partial 4" in text
    out = []

    def traced(kv):
        lay = L.from_topk(kv, block_q=16, block_k=16, q_len=64, kv_len=64)
        out.append(L.describe(lay))
        return L.density(lay)

    kv = np.tile(np.arange(4, dtype=np.int32), (1, 1, 4, 1))
    assert jax.eval_shape(traced, kv).shape == ()  # traces, compiles nothing
    assert "traced" in out[0] and "\n" not in out[0]


# ----------------------------------------------------------------------------- from_topk

def _selection(kv_blocks, nk):
    """bool [Bl, Hl, nq, nk] of the listed blocks (-1 unused), the dense formulation."""
    sel = np.zeros((*kv_blocks.shape[:3], nk), bool)
    b, h, q, s = np.nonzero(kv_blocks >= 0)
    sel[b, h, q, kv_blocks[b, h, q, s]] = True
    return sel


_slow = pytest.mark.slow
TOPK_CASES = [  # (block_q, block_k, q_len, kv_len, causal, rows, heads, slots)
    (1, 8, 37, 37, True, 2, 3, 4),     # token-granular routing, ragged keys
    (8, 8, 45, 45, True, 1, 2, 5),     # bq == bk, ragged
    (8, 8, 45, 45, False, 2, 1, 3),
    (16, 8, 37, 50, True, 1, 2, 6),    # bq != bk, Tq != Tk: several diagonal offsets
    pytest.param((4, 16, 64, 64, False, 1, 1, 4), marks=_slow),
    pytest.param((8, 4, 45, 61, True, 2, 2, 7), marks=_slow),
    pytest.param((8, 8, 64, 64, True, 1, 1, 1), marks=_slow),  # one slot: no sort
    pytest.param((1, 16, 64, 64, False, 1, 2, 3), marks=_slow),
]


@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "bq{}_bk{}_tq{}_tk{}_{}".format(
    *c[:4], "causal" if c[4] else "bidir"))
def test_from_topk_equals_build_layout_of_the_dense_selection(case):
    bq, bk, q_len, kv_len, causal, rows, heads, slots = case
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    rng = np.random.default_rng(3)
    kv = rng.integers(-1, nk, size=(rows, heads, nq, slots)).astype(np.int32)  # -1s, dups
    kv[..., 0] = np.minimum(np.arange(nq) * bq // bk, nk - 1)  # the own block, as MoBA does
    if slots > 1:
        kv[..., 1] = kv[..., 0]  # a duplicate for sure
    kv[0, 0, 0] = -1  # a query block with nothing listed
    got = _from_topk_jit(bq, bk, q_len, kv_len, causal)(kv)
    assert got.kv_blocks.shape == kv.shape and got.q_blocks.shape[-1] == nq
    assert isinstance(got.partial_masks, jax.Array)
    mask = M.NumpyBlockMask(_selection(kv, nk), bq, bk)
    if causal:
        mask = mask & M.Causal()
    want = M.build_layout(mask, q_len, kv_len, bq, bk)
    _assert_same_layout(got, want)
    _check_structure(got)  # its key-major lists (device-built) equal transpose_np
    np.testing.assert_array_equal(_dense_layout_np(got), _dense_np(mask, q_len, kv_len))


def test_from_topk_pattern_table_is_static_and_small():
    # bq = 4, bk = 16: diagonal offsets d = 4 qb - 16 kb in {0, 4, 8, 12} -> 4 patterns, as
    # build_layout finds for Causal; no tail (64 = 4 * 16).
    table, partial = L._topk_table(4, 16, 64, 64, True)
    assert partial.shape[0] == M.build_layout(M.Causal(), 64, 64, 4, 16).num_patterns == 4
    d = np.arange(-4, 16)  # table rows: clipped offsets
    assert (table[d + 4, 0, 0][d <= -4] == L.EMPTY).all()
    assert (table[d + 4, 0, 0][d >= 15] == FULL).all()
    np.testing.assert_array_equal(np.sort(table[[4, 8, 12, 16], 0, 0]), [0, 1, 2, 3])
    # Token-granular routing: one pattern per offset inside a key block, whatever T.
    for t in (64, 4096):
        _, partial = L._topk_table(1, 16, t, t, True)
        assert partial.shape == (15, 1, 16)
    # Bidirectional without ragged tails: no partial block at all.
    table, partial = L._topk_table(4, 16, 64, 64, False)
    assert table[19, 0, 0] == FULL and not partial.any() and partial.shape == (1, 4, 16)


def test_from_topk_drops_future_blocks_and_out_of_range_when_traced():
    kv = np.array([[[[3, 0, 1], [1, 1, -1], [2, 0, 3], [0, 2, 1]]]], np.int32)
    build = _from_topk_jit(4, 4, 16, 16)
    lay = build(kv)
    assert L.density(lay) == 7 / 16
    np.testing.assert_array_equal(np.asarray(lay.kv_counts[0, 0]), [1, 1, 2, 3])
    np.testing.assert_array_equal(np.asarray(lay.kv_blocks[0, 0]),
                                  [[0, 0, 0], [1, 1, 1], [0, 2, 2], [0, 1, 2]])
    np.testing.assert_array_equal(np.asarray(lay.kv_mask_ids[0, 0]) == FULL,
                                  [[0, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(lay.q_counts[0, 0]), [3, 2, 2, 0])
    np.testing.assert_array_equal(np.asarray(lay.q_blocks[0, 0, :, :3]),
                                  [[0, 2, 3], [1, 3, 3], [2, 3, 3], [0, 0, 0]])
    # Traced entries outside [-1, nk) are dropped (cannot raise under jit).
    wild = kv.copy()
    wild[0, 0, 3, 1] = 7
    wild[0, 0, 2, 0] = -5
    np.testing.assert_array_equal(np.asarray(build(wild).kv_counts[0, 0]), [1, 1, 1, 2])


def test_from_topk_errors_name_the_argument():
    kv = np.zeros((1, 1, 4, 2), np.int32)
    good = dict(block_q=4, block_k=4, q_len=16, kv_len=16)
    cases = [
        (kv[0], {}, "kv_blocks"),
        (kv[:, :, :3], {}, "kv_blocks"),
        (kv.astype(np.float32), {}, "kv_blocks"),
        (kv + 4, {}, "kv_blocks"),
        (kv - 2, {}, "kv_blocks"),
        (kv, dict(block_q=0), "block_q"),
        (kv, dict(block_k=2.0), "block_k"),
        (kv, dict(q_len=-1), "q_len"),
        (kv, dict(kv_len=None), "kv_len"),
        (kv, dict(causal="yes"), "causal"),
    ]
    for x, change, name in cases:
        with pytest.raises(ValueError, match=name):
            L.from_topk(x, **(good | change))


def test_device_transpose_equals_transpose_np():
    rng = np.random.default_rng(4)
    lay = M.build_layout(M.NumpyMask(rng.random((2, 3, 33, 40)) < 0.1), 33, 40, 4, 8)
    got = _transpose_jit(lay.kv_blocks, lay.kv_counts, lay.kv_mask_ids, lay.num_kv_blocks)
    sq = lay.q_blocks.shape[-1]
    for g, w in zip(got, (lay.q_blocks, lay.q_counts, lay.q_mask_ids)):
        np.testing.assert_array_equal(np.asarray(g)[..., :sq] if g.ndim == 4 else g, w)
    _check_structure(lay, device=True)


# ----------------------------------------------------------------------------- slow

@pytest.mark.slow
@pytest.mark.parametrize("bq", [1, 64])
def test_from_topk_long_sequences(bq):
    t, bk, slots = 8192, 64, 8
    nq, nk = t // bq, t // bk
    rng = np.random.default_rng(5)
    kv = rng.integers(-1, nk, size=(1, 2, nq, slots)).astype(np.int32)
    nq = -(-(t - 3) // bq)
    kv = kv[:, :, :nq]
    lay = _from_topk_jit(bq, bk, t - 3, t - 3)(kv)
    a = _host(lay)
    qb, qc, qi = M.transpose_np(a["kv_blocks"], a["kv_counts"], a["kv_mask_ids"], nk)
    np.testing.assert_array_equal(a["q_counts"], qc)
    np.testing.assert_array_equal(a["q_blocks"][..., :qb.shape[-1]], qb)
    np.testing.assert_array_equal(a["q_mask_ids"][..., :qb.shape[-1]], qi)
    mask = M.NumpyBlockMask(_selection(kv, nk), bq, bk) & M.Causal()
    _assert_same_layout(lay, M.build_layout(mask, t - 3, t - 3, bq, bk))


@pytest.mark.slow
def test_build_layout_long_windows_match_dense():
    t = 4096
    mask = M.SlidingWindow.per_head([100, 1000]) | M.SinkWindow(4, 16)
    lay = _evaluated(1 << 14, lambda: M.build_layout(mask, t, t, 64, 32))
    ref = M.build_layout(M.NumpyMask(_dense_np(mask, t, t).copy()), t, t, 64, 32)
    _assert_same_layout(lay, ref)
    _check_structure(lay)

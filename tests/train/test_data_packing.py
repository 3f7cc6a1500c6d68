"""Packing: segment ids, positions, loss mask at document boundaries, no token lost or doubled."""
import grain
import numpy as np

from train.data.packing import pack_documents, pack_rows, row_to_example

SEQ = 16  # rows of SEQ + 1 = 17 tokens


def _docs(seed=0, count=40):
    """Documents whose tokens say where they come from: doc d, position p -> 1000 * d + p.
    Lengths include 0 (dropped), 1, exactly a row, and several rows."""
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(0, 30, size=count)) + [0, 1, SEQ + 1, 3 * (SEQ + 1) + 5]
    return [(1000 * (d + 1) + np.arange(n)).astype(np.int32) for d, n in enumerate(lengths)]


def _iter(docs):
    return grain.MapDataset.source(docs).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def test_rows_keep_every_token_once():
    docs = _docs()
    rows = list(pack_rows(_iter(docs), SEQ))
    tok = np.stack([r["tokens"] for r in rows])
    seg = np.stack([r["tokens_segment_ids"] for r in rows])
    pos = np.stack([r["tokens_positions"] for r in rows])
    assert tok.shape[1] == SEQ + 1
    # every row is full except the last one, whose padding sits at the end
    assert np.all(seg[:-1] > 0)
    pad = seg[-1] == 0
    assert not np.any(pad[:-1] & ~pad[1:])
    # the non-padding tokens, read in order, are exactly the documents in order
    np.testing.assert_array_equal(tok[seg > 0], np.concatenate(docs))
    for t, s, p in zip(tok, seg, pos):
        ids = s[s > 0]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        for piece in np.unique(ids):
            where = s == piece
            # positions restart at 0 for each piece and count up; a piece never mixes documents
            np.testing.assert_array_equal(p[where], np.arange(where.sum()))
            assert len(np.unique(t[where] // 1000)) == 1
            np.testing.assert_array_equal(np.diff(t[where]), 1)
        np.testing.assert_array_equal(p[s == 0], 0)


def test_loss_mask_never_crosses_a_document():
    docs = _docs(seed=1)
    examples = list(pack_documents(_iter(docs), SEQ))
    masked = 0
    for ex in examples:
        inp, tgt, mask, seg = ex["inputs"], ex["targets"], ex["loss_mask"], ex["segment_ids"]
        assert inp.shape == (SEQ,) and mask.dtype == np.float32
        on = mask == 1
        # a scored target is always the next token of the same document
        np.testing.assert_array_equal(tgt[on], inp[on] + 1)
        assert np.all(seg[on] > 0)
        # and every such next-token pair inside a row is scored
        same_doc_next = (tgt == inp + 1) & (seg > 0)
        np.testing.assert_array_equal(on, same_doc_next)
        masked += on.sum()
    assert masked > 0.8 * sum(len(d) for d in docs)


def test_row_to_example_mask_formula():
    row = {"tokens": np.arange(9, dtype=np.int32),
           "tokens_segment_ids": np.array([1, 1, 1, 2, 2, 3, 0, 0, 0], np.int32),
           "tokens_positions": np.array([0, 1, 2, 0, 1, 0, 0, 0, 0], np.int32)}
    ex = row_to_example(row)
    np.testing.assert_array_equal(ex["inputs"], np.arange(8))
    np.testing.assert_array_equal(ex["targets"], np.arange(1, 9))
    np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 3, 0, 0])
    np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 0, 1, 0, 0, 0, 0])

"""Row-sized pieces: every token kept once, and training rows are spread over the corpus."""
import numpy as np

from train.data.documents import DocSplit, TokenDocs, TokenPieces
from train.data.pipeline import _shuffled_records


def test_pieces_cover_every_token_once_and_respect_documents():
    rng = np.random.default_rng(0)
    docs = TokenDocs.from_arrays([rng.integers(0, 99, n) for n in (0, 1, 7, 8, 9, 30)])
    pieces = TokenPieces(docs, 8)
    assert [len(pieces[i]) for i in range(len(pieces))] == [1, 7, 8, 8, 1, 8, 8, 8, 6]
    np.testing.assert_array_equal(np.concatenate([pieces[i] for i in range(len(pieces))]), docs.tokens)


def test_shuffled_records_spread_over_documents():
    # 20 documents of 10_000 tokens whose every token is the document id: with whole documents
    # shuffled, the first 100 rows of 257 tokens would come from one or two documents.
    docs = TokenDocs.from_arrays([np.full(10_000, d, np.int32) for d in range(20)])
    split = DocSplit("synthetic", "train", docs, num_tokens=docs.num_tokens, num_bytes=docs.num_tokens)
    ds = _shuffled_records(split, 256, seed=0)
    first = {int(ds[i][0]) for i in range(100)}
    assert len(first) >= 15

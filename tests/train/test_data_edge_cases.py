"""Data edge cases: corpora too small for the split by document name (cut inside documents
instead), invalid UTF-8 and binary files (reported, not silently replaced)."""
import json
import logging

import numpy as np
import pytest

from train.config import ConfigError, DataConfig
from train.data import make_eval_batches, make_train_iterator
from train.data.documents import held_out_tokens, is_validation, tokenized_corpus
from train.data.files_source import Problem, decode_text, file_texts
from train.data.pipeline import doc_split
from train.data.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()
TEXT = "The quick brown fox jumps over the lazy dog. " * 4  # 180 bytes


def _files_cfg(*paths, **kw) -> DataConfig:
    return DataConfig(source="files", paths=tuple(str(p) for p in paths), seq_len=16, batch_size=2, **kw)


@pytest.fixture
def data_warnings(caplog, monkeypatch):
    """() -> the warnings logged on chimera.data so far. A training run earlier in the session
    (train.loop) stops "chimera" records from reaching the root logger, where caplog listens."""
    monkeypatch.setattr(logging.getLogger("chimera"), "propagate", True)
    return lambda: [r.getMessage() for r in caplog.records
                    if r.name == "chimera.data" and r.levelno == logging.WARNING]


def _assert_trains_and_evaluates(cfg: DataConfig):
    it = make_train_iterator(cfg, seed=0)
    for _ in range(3):
        assert next(it)["loss_mask"].sum() > 0
    evals = make_eval_batches(cfg, 2)
    assert evals and sum(b["loss_mask"].sum() for b in evals) > 0


# ----------------------------------------------------------------------------- tiny corpora

def test_one_txt_file_trains_and_evaluates(tmp_path, data_warnings):
    path = tmp_path / "one.txt"
    path.write_text(TEXT)
    cfg = _files_cfg(path)
    assert not is_validation("one.txt", cfg.val_fraction)  # the hash split alone leaves validation empty
    _assert_trains_and_evaluates(cfg)
    train, val = doc_split(cfg, "train"), doc_split(cfg, "validation")
    held = held_out_tokens(180, 0.05)
    assert held == 9 and val.keys == ("one.txt[171:]",) and train.keys == ("one.txt[:171]",)
    assert (train.num_tokens, val.num_tokens) == (171, 9) and train.num_bytes + val.num_bytes == 180
    # the two pieces are the document, cut at the end: nothing is lost or seen twice
    np.testing.assert_array_equal(np.concatenate([train.records[0], val.records[0]]), BYTE.encode(TEXT))
    [msg] = data_warnings()
    assert msg == ("data.source='files': the split by document name leaves validation empty (1 document, "
                   "data.val_fraction=0.05); validation is the last 5% of each document's tokens instead "
                   "(9 of 180 tokens)")


def test_one_jsonl_line_trains_and_evaluates(tmp_path, data_warnings):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": TEXT}) + "\n")
    cfg = _files_cfg(path)
    _assert_trains_and_evaluates(cfg)
    assert doc_split(cfg, "validation").keys == ("one.jsonl:1[171:]",)
    assert len(data_warnings()) == 1


def test_documents_that_all_hash_to_train_are_cut(tmp_path, data_warnings):
    names = ["doc0.txt", "doc1.txt", "doc2.txt"]
    assert not any(is_validation(n, 0.05) for n in names)
    for n in names:
        (tmp_path / n).write_text(TEXT[:40])
    cfg = _files_cfg(tmp_path)
    _assert_trains_and_evaluates(cfg)
    val = doc_split(cfg, "validation")
    assert val.keys == ("doc0.txt[38:]", "doc1.txt[38:]", "doc2.txt[38:]")  # at least 2 tokens each
    assert "leaves validation empty (3 documents" in data_warnings()[0]


def test_one_document_that_hashes_to_validation_still_trains(tmp_path, data_warnings):
    assert is_validation("doc16.txt", 0.05)
    (tmp_path / "doc16.txt").write_text(TEXT)
    cfg = _files_cfg(tmp_path / "doc16.txt")
    _assert_trains_and_evaluates(cfg)
    assert doc_split(cfg, "train").keys == ("doc16.txt[:171]",)
    assert "leaves train empty" in data_warnings()[0]


def test_held_out_tokens():
    assert [held_out_tokens(n, 0.05) for n in (0, 1, 3, 4, 5, 40, 100)] == [0, 0, 0, 2, 2, 2, 5]
    assert [held_out_tokens(n, 0.9) for n in (4, 10)] == [2, 8]  # train keeps at least 2


def test_too_small_corpus_is_an_error():
    with pytest.raises(ConfigError, match=r"data\.source='files': too little text .*2 documents, first a\.txt, "
                                          r"5 tokens.*give more or longer documents"):
        tokenized_corpus("files", [("a.txt", "abc"), ("b.txt", "de")], BYTE, 0.05)


def test_all_documents_as_validation_keeps_train_empty(data_warnings):
    # train.eval --all-documents asks for val_fraction just below 1: every document, whole
    corpus = tokenized_corpus("files", [("a.txt", "abcdef"), ("b.txt", "ghij")], BYTE, float(np.nextafter(1, 0)))
    assert corpus.validation.keys == ("a.txt", "b.txt") and len(corpus.train) == 0
    assert not data_warnings()


def test_hash_split_unchanged_when_both_sides_have_documents(data_warnings):
    texts = [(f"mod{i}.py", f"x = {i}\n") for i in range(200)]
    corpus = tokenized_corpus("stdlib", texts, BYTE, 0.05)
    want = tuple(k for k, _ in texts if is_validation(k, 0.05))
    assert 0 < len(want) < 200 and corpus.validation.keys == want
    assert corpus.train.keys == tuple(k for k, _ in texts if k not in want)
    assert not data_warnings()


# ----------------------------------------------------------------------------- bad bytes

def test_decode_text():
    assert decode_text("héllo\r\nworld\r".encode()) == ("héllo\nworld\n", None)
    assert decode_text(b"ab\xffcd") == ("ab\ufffdcd", Problem("utf-8", 2))
    assert decode_text(b"ab\x00cd") == (None, Problem("binary", 2))
    assert decode_text(b"a" * 8192 + b"\x00") == ("a" * 8192 + "\x00", None)  # only the first 8 KiB are sniffed


def test_invalid_utf8_is_replaced_and_reported(tmp_path, data_warnings):
    (tmp_path / "a.txt").write_bytes(b"good start \xe9 bad")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok \xff"}\n')
    (tmp_path / "c.txt").write_text("clean")
    docs = file_texts([str(tmp_path)], "text")
    assert docs == [("a.txt", "good start \ufffd bad"), ("b.jsonl:1", "ok \ufffd"), ("c.txt", "clean")]
    assert data_warnings() == [f"data.paths: 2 files are not valid UTF-8 (first: {tmp_path / 'a.txt'}, byte 11); "
                                 f"bad bytes were replaced with U+FFFD"]


def test_binary_file_is_skipped_and_reported(tmp_path, data_warnings):
    (tmp_path / "a.txt").write_text("real text")
    (tmp_path / "b.txt").write_bytes(b"PK\x03\x04" + bytes(range(256)))
    assert file_texts([str(tmp_path)], "text") == [("a.txt", "real text")]
    assert data_warnings() == [f"data.paths: 1 binary file skipped (first: {tmp_path / 'b.txt'}: NUL byte at offset 4)"]


def test_only_binary_files_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\x00\x01\x02")
    (tmp_path / "b.jsonl").write_bytes(b"\x89PNG\x00")
    with pytest.raises(ConfigError, match=r"data\.paths=.* hold no text documents: 2 binary file\(s\) skipped "
                                          r"\(first: .*a\.txt: NUL byte at offset 0\)"):
        file_texts([str(tmp_path)], "text")

"""Document sources: stdlib, local files (.txt / .jsonl / directories), tfds (mock and local build)."""
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from train.config import ConfigError, DataConfig
from train.data import make_eval_batches, make_train_iterator, unigram_bits_per_byte
from train.data.documents import is_validation, tokenized_corpus
from train.data.files_source import file_texts
from train.data.pipeline import doc_split
from train.data.stdlib_source import EXCLUDED_DIRS, stdlib_texts
from train.data.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()


# ----------------------------------------------------------------------------- split hash

def test_hash_split_is_pinned():
    # The split must never change between machines, runs or Python versions: pin some outcomes.
    got = [is_validation(f"doc{i}.txt", 0.5) for i in range(12)]
    assert got == [True, True, False, True, True, True, False, True, True, False, False, False]
    assert is_validation("copy.py", 0.05) and not is_validation("os.py", 0.05)


# ----------------------------------------------------------------------------- stdlib

def test_stdlib_corpus():
    texts = stdlib_texts()
    keys = [k for k, _ in texts]
    assert keys == sorted(keys) and len(keys) > 300
    assert all(k.endswith(".py") for k in keys)
    assert not any(set(k.split("/")[:-1]) & EXCLUDED_DIRS for k in keys)
    assert "os.py" in keys and "json/decoder.py" in keys

    cfg = DataConfig(source="stdlib")
    train, val = doc_split(cfg, "train"), doc_split(cfg, "validation")
    assert not set(train.keys) & set(val.keys)
    nonempty = {k for k, t in texts if t}
    assert set(train.keys) | set(val.keys) == nonempty
    assert all(is_validation(k, cfg.val_fraction) for k in val.keys)
    assert 0.02 < len(val) / len(nonempty) < 0.1
    # documents are the files' bytes, in key order
    text = dict(texts)
    i = train.keys.index("os.py")
    np.testing.assert_array_equal(train.records[i], BYTE.encode(text["os.py"]))
    assert train.num_tokens == sum(len(text[k].encode()) for k in train.keys)


def test_split_is_deterministic():
    texts = stdlib_texts()[:80]
    a = tokenized_corpus("stdlib", texts, BYTE, 0.2)
    b = tokenized_corpus("stdlib", list(reversed(texts)), BYTE, 0.2)
    assert set(a.validation.keys) == set(b.validation.keys) and len(a.validation) > 0


# ----------------------------------------------------------------------------- files

@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha text\nsecond line\n")
    (d / "sub" / "c.txt").write_text("gamma")
    (d / "skip.bin").write_bytes(b"\x00\x01")
    with open(d / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": "line one", "id": 1}) + "\n\n")  # blank lines are skipped
        f.write(json.dumps({"text": "línea dos", "id": 2}) + "\n")
    return d


def test_files_source(corpus_dir, tmp_path):
    docs = file_texts([str(corpus_dir)], "text")
    assert docs == [("a.txt", "alpha text\nsecond line\n"), ("b.jsonl:1", "line one"),
                    ("b.jsonl:3", "línea dos"), ("sub/c.txt", "gamma")]
    single = tmp_path / "one.txt"
    single.write_text("solo")
    assert file_texts([str(single), str(corpus_dir / "b.jsonl")], "text") == [
        ("one.txt", "solo"), ("b.jsonl:1", "line one"), ("b.jsonl:3", "línea dos")]

    cfg = DataConfig(source="files", paths=(str(corpus_dir),), val_fraction=0.5, seq_len=8, batch_size=2)
    train, val = doc_split(cfg, "train"), doc_split(cfg, "validation")
    assert sorted(train.keys + val.keys) == sorted(k for k, _ in docs)
    assert all(is_validation(k, 0.5) for k in val.keys)


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, r"data\.paths\[0\].*does not exist"),
    (lambda p: p.write_text("x"), r"data\.paths\[0\].*extension"),
    (lambda p: p.mkdir(), r"data\.paths\[0\].*directory without"),
])
def test_files_path_errors(tmp_path, setup, match):
    path = tmp_path / "thing.csv"
    setup(path)
    with pytest.raises(ConfigError, match=match):
        file_texts([str(path)], "text")


@pytest.mark.parametrize("lines, match", [
    (['{"text": "ok"}', "{broken"], r"data\.paths: .*bad\.jsonl:2 is not valid JSON"),
    (['{"text": "ok"}', '{"body": "no text"}'], r"data\.text_key='text' is missing at .*bad\.jsonl:2.*body"),
    (['{"text": 5}'], r"data\.text_key='text' at .*bad\.jsonl:1 is a int"),
    (['[1, 2]'], r"data\.text_key='text' is missing at .*bad\.jsonl:1"),
])
def test_jsonl_errors(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=match):
        file_texts([str(path)], "text")


def test_empty_splits_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"data\.paths.*no documents"):
        file_texts([str(tmp_path / "empty.jsonl")], "text")
    # one document is cut in two (tests/train/test_data_edge_cases.py), but 3 bytes are too few
    (tmp_path / "doc0.txt").write_text("abc")  # "doc0.txt" hashes to train at 0.05
    cfg = DataConfig(source="files", paths=(str(tmp_path / "doc0.txt"),))
    with pytest.raises(ConfigError, match=r"data\.source='files': too little text .*doc0\.txt, 3 tokens"):
        make_eval_batches(cfg, 2)


# ----------------------------------------------------------------------------- tfds

def test_tfds_mock_data():
    # tfds.testing.mock_data patches data_source: random text, same records for every split.
    cfg = DataConfig(source="tfds", tfds_name="imdb_reviews", seq_len=16, batch_size=2)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        it = make_train_iterator(cfg, seed=0)
        batches = [next(it) for _ in range(4)]
        evals = make_eval_batches(cfg, 2)
        assert unigram_bits_per_byte(cfg) > 0
    for b in batches + evals:
        assert b["inputs"].shape == (2, 16)
        text = bytes(b["inputs"][b["segment_ids"] > 0].astype(np.uint8)).decode()
        assert set(text) <= set("abcdefghij ")  # what the mock generates for Text features
    assert len(evals) == 2


def test_tfds_local_dataset(tiny_tfds):
    cfg = DataConfig(source="tfds", tfds_name="chimera_tiny_docs", tfds_data_dir=tiny_tfds, seq_len=32,
                     batch_size=2)
    val = doc_split(cfg, "validation")
    assert len(val) == 6 and val.num_tokens is None
    texts = sorted(BYTE.decode(val.to_tokens(val.records[i])) for i in range(len(val)))
    assert texts == sorted(f"<{i}> " + "words " * (i % 5) for i in range(100, 106))
    evals = make_eval_batches(cfg, 10)
    stream = "".join(BYTE.decode(b["inputs"][r][b["segment_ids"][r] > 0]) + BYTE.decode(b["targets"][r][-1:])
                     for b in evals for r in range(2) if b["segment_ids"][r].any())
    stream = stream.replace("\x00", "")  # the last row's final target is padding
    assert sorted(stream.replace("<", "\n<").split("\n")[1:]) == texts  # every document exactly once
    it = make_train_iterator(cfg, seed=3)  # lazy source: reader threads tokenize ahead
    _ = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    fresh = make_train_iterator(cfg, seed=3)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert want["inputs"].shape == (2, 32)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("change, match", [
    ({"eval_split": "test"}, r"data\.eval_split='test'.*Unknown split"),
    ({"tfds_name": "no_such_dataset_xyz"}, r"data\.tfds_name='no_such_dataset_xyz'.*not found"),
    ({"text_key": "body"}, r"data\.text_key='body' is not a feature.*'n', 'text'"),
])
def test_tfds_errors(tiny_tfds, change, match):
    cfg = DataConfig(**{"source": "tfds", "tfds_name": "chimera_tiny_docs", "tfds_data_dir": tiny_tfds, **change})
    with pytest.raises(ConfigError, match=match):
        make_eval_batches(cfg, 1)


def test_tfds_not_prepared(tmp_path):
    cfg = DataConfig(source="tfds", tfds_name="chimera_tiny_docs", tfds_data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.tfds_name"):
        make_eval_batches(cfg, 1)

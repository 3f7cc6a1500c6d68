"""The pipeline: batches, determinism, exact resume (mid-epoch and across epochs), eval, baselines."""
import json
import logging
import re

import numpy as np
import pytest

from train.config import ConfigError, DataConfig
from train.data import (get_tokenizer, make_eval_batches, make_train_iterator, task_vocab_size,
                        unigram_bits_per_byte)
from train.data.pipeline import doc_split

STDLIB = DataConfig(source="stdlib", seq_len=64, batch_size=4)


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture
def small_files(tmp_path):
    """14 short documents, each starting with a marker <i>: a few batches make an epoch."""
    rng = np.random.default_rng(0)
    for i in range(14):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"<{i}>" + "xyz " * int(rng.integers(1, 5)))
    return DataConfig(source="files", paths=(str(tmp_path),), val_fraction=0.2, seq_len=16, batch_size=2)


def test_batch_layout():
    b = next(make_train_iterator(STDLIB, seed=0))
    assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for k in ("inputs", "targets", "segment_ids", "positions"):
        assert b[k].shape == (4, 64) and b[k].dtype == np.int32, k
    assert b["loss_mask"].shape == (4, 64) and b["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    assert np.all(b["segment_ids"] > 0)  # training rows are always full
    same = (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1])
    np.testing.assert_array_equal(b["loss_mask"][:, :-1], same.astype(np.float32))
    assert task_vocab_size(STDLIB) == 256 and get_tokenizer(STDLIB).vocab_size == 256


def test_same_seed_same_batches_other_seed_other_order():
    a = _take(make_train_iterator(STDLIB, seed=0), 5)
    b = _take(make_train_iterator(STDLIB, seed=0), 5)
    c = _take(make_train_iterator(STDLIB, seed=1), 5)
    for x, y in zip(a, b):
        _assert_batches_equal(x, y)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_resume_mid_epoch_through_json():
    it = make_train_iterator(STDLIB, seed=7)
    _take(it, 13)
    state = it.get_state()
    restored_state = json.loads(json.dumps(state))
    assert restored_state == state
    expected = _take(it, 6)
    fresh = make_train_iterator(STDLIB, seed=7)
    fresh.set_state(restored_state)
    assert fresh.batches == 13
    for x, y in zip(expected, _take(fresh, 6)):
        _assert_batches_equal(x, y)


def _stream(batches):
    """The training text in order: each full row is inputs plus its last target."""
    return "".join(bytes(np.concatenate([r, t[-1:]]).astype(np.uint8)).decode()
                   for b in batches for r, t in zip(b["inputs"], b["targets"]))


def test_epochs_reshuffle_and_resume_across_epoch_boundaries(small_files):
    num_docs = len(doc_split(small_files, "train"))
    assert 8 <= num_docs < 14
    it = make_train_iterator(small_files, seed=0)
    states, batches = [], []
    for _ in range(24):
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    markers = [int(m) for m in re.findall(r"<(\d+)>", _stream(batches))]
    epochs = [markers[i:i + num_docs] for i in range(0, 3 * num_docs, num_docs)]
    assert len(epochs[2]) == num_docs  # the 24 batches span more than three epochs
    for e in epochs:
        assert sorted(e) == sorted(epochs[0])  # every document once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # ... in a new order each epoch
    # restoring any saved state (including ones taken just before and after an epoch ends)
    # continues exactly
    for step in range(0, 20):
        fresh = make_train_iterator(small_files, seed=0)
        fresh.set_state(states[step])
        for x, y in zip(batches[step:step + 4], _take(fresh, 4)):
            _assert_batches_equal(x, y)


def test_state_from_other_seed_or_config_is_refused(small_files):
    state = make_train_iterator(small_files, seed=0).get_state()
    with pytest.raises(ConfigError, match="seed"):
        make_train_iterator(small_files, seed=1).set_state(state)
    other = DataConfig(**{**vars(small_files), "seq_len": 32})
    with pytest.raises(ConfigError, match="seq_len"):
        make_train_iterator(other, seed=0).set_state(state)


def test_eval_batches():
    a = make_eval_batches(STDLIB, 3)
    b = make_eval_batches(STDLIB, 3)
    assert len(a) == 3
    for x, y in zip(a, b):
        _assert_batches_equal(x, y)
        assert x["inputs"].shape == (4, 64)
    train_rows = {r.tobytes() for r in next(make_train_iterator(STDLIB, seed=0))["inputs"]}
    assert not train_rows & {r.tobytes() for r in a[0]["inputs"]}


def test_eval_small_split_is_padded(small_files):
    val = doc_split(small_files, "validation")
    assert 1 <= len(val) <= 4
    batches = make_eval_batches(small_files, 50)
    assert 1 <= len(batches) < 50 and all(b["inputs"].shape == (2, 16) for b in batches)
    # all validation text, in stored order, exactly once; then padding (token 0, segment 0)
    expected = "".join(bytes(val.records[i].astype(np.uint8)).decode() for i in range(len(val)))
    rows = [(b["inputs"][r], b["targets"][r], b["segment_ids"][r]) for b in batches for r in range(2)]
    got = "".join(bytes(np.concatenate([i, t[-1:]]).astype(np.uint8)).decode() for i, t, s in rows if s.any())
    assert got.rstrip("\x00") == expected
    last = batches[-1]
    assert (last["segment_ids"] == 0).any()
    np.testing.assert_array_equal(last["loss_mask"][last["segment_ids"] == 0], 0)
    with pytest.raises(ValueError):
        make_eval_batches(small_files, 0)


def test_unigram_bits_per_byte(tmp_path):
    (tmp_path / "doc0.txt").write_text("ab" * 500)  # two equally likely bytes: exactly 1 bit/byte
    cfg = DataConfig(source="files", paths=(str(tmp_path / "doc0.txt"),))
    assert unigram_bits_per_byte(cfg) == pytest.approx(1.0)
    bpb = unigram_bits_per_byte(STDLIB)
    assert 3.0 < bpb < 6.0
    assert unigram_bits_per_byte(DataConfig(source="mqar")) is None


def test_logs_sizes(tmp_path, caplog):
    (tmp_path / "doc0.txt").write_text("hello world")
    cfg = DataConfig(source="files", paths=(str(tmp_path),))
    with caplog.at_level(logging.INFO, logger="chimera.data"):
        make_train_iterator(cfg, seed=0)
    text = " ".join(r.getMessage() for r in caplog.records if r.name == "chimera.data")
    # one document: cut in two (the last 2 tokens are validation), see test_data_edge_cases.py
    assert "files/train: 1 documents, 9 tokens" in text and "files/validation: 1 documents, 2 tokens" in text

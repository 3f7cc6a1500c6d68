"""MQAR: layout of an example, the loss mask, determinism, split separation, power-law gaps."""
import numpy as np

from train.config import DataConfig, MQARConfig
from train.data import build_tokenizer, get_tokenizer, make_eval_batches, make_train_iterator, task_vocab_size
from train.data.mqar import MQARExamples, num_query_slots


def _check_example(ex, n, V, T):
    inp, tgt, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
    for k in ("inputs", "targets", "segment_ids", "positions"):
        assert ex[k].shape == (T,) and ex[k].dtype == np.int32
    assert mask.shape == (T,) and mask.dtype == np.float32
    np.testing.assert_array_equal(ex["segment_ids"], np.ones(T, np.int32))
    np.testing.assert_array_equal(ex["positions"], np.arange(T))
    np.testing.assert_array_equal(tgt[:-1], inp[1:])
    keys, values = inp[0:2 * n:2], inp[1:2 * n:2]
    assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
    assert np.all((keys >= 1) & (keys < V // 2)) and np.all((values >= V // 2) & (values < V))
    # query region: each key exactly once at an even offset, followed by its value, zeros elsewhere
    region = np.concatenate([inp[2 * n:], tgt[-1:]])
    nonzero = np.flatnonzero(region)
    assert len(nonzero) == 2 * n
    query_pos = 2 * n + nonzero[0::2]
    np.testing.assert_array_equal(nonzero[1::2], nonzero[0::2] + 1)
    assert np.all((query_pos - 2 * n) % 2 == 0)
    assert sorted(inp[query_pos].tolist()) == sorted(keys.tolist())
    pair = dict(zip(keys.tolist(), values.tolist()))
    # the answer positions are exactly the query-key positions and the targets there are the values
    np.testing.assert_array_equal(np.flatnonzero(mask), query_pos)
    np.testing.assert_array_equal(tgt[query_pos], [pair[k] for k in inp[query_pos].tolist()])
    np.testing.assert_array_equal(mask[mask != 1], 0)


def test_example_structure():
    for n, V, T in [(8, 64, 64), (4, 8192, 256), (3, 12, 12)]:  # (3, 12, 12): the tightest legal fit
        cfg = MQARConfig(vocab_size=V, num_kv_pairs=n, num_train_examples=50, num_eval_examples=50)
        for split in ("train", "validation"):
            ex = MQARExamples(cfg, T, split)
            for i in range(len(ex)):
                _check_example(ex[i], n, V, T)


def test_deterministic_and_splits_disjoint():
    cfg = MQARConfig(vocab_size=64, num_kv_pairs=4, num_train_examples=300, num_eval_examples=300)
    train, train2, val = (MQARExamples(cfg, 32, "train"), MQARExamples(cfg, 32, "train"),
                          MQARExamples(cfg, 32, "validation"))
    for i in (0, 7, 299):
        np.testing.assert_array_equal(train[i]["inputs"], train2[i]["inputs"])
    train_set = {train[i]["inputs"].tobytes() for i in range(len(train))}
    val_set = {val[i]["inputs"].tobytes() for i in range(len(val))}
    assert len(train_set) == 300 and not train_set & val_set


def _gap_histogram(power_a, n=2, T=128, count=1500):
    cfg = MQARConfig(vocab_size=256, num_kv_pairs=n, power_a=power_a, num_train_examples=count)
    ex = MQARExamples(cfg, T, "train")
    gaps = np.concatenate([(ex.tokens(i)[1] - 2 * n) // 2 + 1 for i in range(count)])
    assert gaps.min() >= 1  # queries come strictly after the key/value block
    return np.bincount(gaps, minlength=num_query_slots(T, n) + 1)[1:]


def test_gaps_follow_power_law():
    def slope(h):
        g = np.arange(1, len(h) + 1)
        keep = h > 0
        return np.polyfit(np.log(g[keep]), np.log(h[keep]), 1)[0]
    # frequency of gap g ~ g^(a - 1): slope about -1 for a = 0.01, flat for a = 1
    assert -1.2 < slope(_gap_histogram(0.01)) < -0.75
    assert abs(slope(_gap_histogram(1.0))) < 0.15


def test_mqar_pipeline(tmp_path):
    cfg = DataConfig(source="mqar", seq_len=64, batch_size=4,
                     mqar=MQARConfig(vocab_size=128, num_kv_pairs=4, num_train_examples=10, num_eval_examples=6))
    assert task_vocab_size(cfg) == 128
    tok = get_tokenizer(cfg)  # ids as numbers; each id counts as one byte
    assert tok.vocab_size == 128 and tok.decode([3, 70]) == "3 70" and tok.token_bytes.sum() == 128
    tok.save(tmp_path)
    np.testing.assert_array_equal(build_tokenizer(str(tmp_path)).encode("5 9"), [5, 9])
    it = make_train_iterator(cfg, seed=0)
    seen = []
    for _ in range(5):  # 20 rows: two epochs of 10 examples
        b = next(it)
        assert b["inputs"].shape == (4, 64)
        np.testing.assert_array_equal(b["loss_mask"].sum(1), [4] * 4)
        seen += [r.tobytes() for r in b["inputs"]]
    assert len(set(seen[:10])) == 10 and set(seen[:10]) == set(seen[10:])  # each epoch: all examples once
    assert seen[:10] != seen[10:]  # ... in a new order
    evals = make_eval_batches(cfg, 5)
    assert len(evals) == 2  # 6 examples -> 2 batches of 4, the last with 2 padding rows
    np.testing.assert_array_equal(evals[1]["loss_mask"][2:], 0)
    ref = MQARExamples(cfg.mqar, 64, "validation")
    np.testing.assert_array_equal(evals[0]["targets"][1], ref[1]["targets"])

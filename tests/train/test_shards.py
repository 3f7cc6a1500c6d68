"""data.source=shards: prepared shards read back exactly, packed as the in-memory packer packs,
split between hosts without overlap, resumed exactly (also on another number of hosts or
workers), mixed in proportion, and refused with errors that name the file when they are
missing, corrupt or made with another tokenizer."""
import json
import shutil

import grain
import numpy as np
import pytest

from train.config import ConfigError, DataConfig
from train.data import make_eval_batches, make_train_iterator
from train.data.documents import tokenized_corpus
from train.data.files_source import file_texts
from train.data.packing import pack_documents
from train.data.shards import PackedRows, ShardError, ShardSet
from train.data.tokenizer import build_tokenizer
from train.loop import run
from train.prepare_data import prepare

from test_loop import run_killed_after, small, train_losses  # tests/train/ is on sys.path


def write_corpus(d, n, seed, words=("alpha", "beta", "gamma", "délta", "ε", "🦊", "\n")):
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        (d / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words, size=int(rng.integers(3, 400)))))
    return d


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two shard directories of different text (the second all "zz"), with records of at most
    100 tokens so that long documents span several records."""
    root = tmp_path_factory.mktemp("shards")
    a = write_corpus(root / "a", 60, 0)
    b = write_corpus(root / "b", 20, 1, words=("zz",))
    prepare(root / "sa", "files", [str(a)], shard_mb=0.02, record_tokens=100)
    prepare(root / "sb", "files", [str(b)], shard_mb=0.02, record_tokens=100)
    return root


def cfg(root, *dirs, **kw):
    kw.setdefault("seq_len", 32)
    kw.setdefault("batch_size", 8)
    return DataConfig(source="shards", paths=tuple(str(root / d) for d in (dirs or ("sa",))), **kw)


def test_shards_read_back_the_documents_and_pack_as_the_in_memory_packer(prepared):
    want = tokenized_corpus("files", file_texts([str(prepared / "a")], "text"), build_tokenizer("byte"), 0.05)
    for split, docs in (("train", want.train), ("validation", want.validation)):
        s = ShardSet(prepared / "sa", split)
        got = s.documents()
        assert len(got) == len(docs.records) and len(s) > len(got)  # some documents span records
        for g, w in zip(got, docs.records):
            np.testing.assert_array_equal(g, w)
    # rows in storage order are exactly grain's concat-then-split packing of the same documents
    rows = PackedRows(ShardSet(prepared / "sa", "train"), seq_len=32)
    ref = pack_documents(grain.MapDataset.source(list(want.train.records)).to_iter_dataset(), 32)
    n = 0
    for r, row in zip(range(len(rows)), ref):
        mine = rows[r]
        for k in row:
            np.testing.assert_array_equal(mine[k], row[k], err_msg=f"row {r} {k}")
        n += 1
    assert n == len(rows) == want.train.num_tokens // 33


@pytest.mark.parametrize("dirs", [("sa",), ("sa", "sb")])
def test_two_hosts_read_disjoint_rows_that_make_up_the_global_batch(prepared, dirs):
    c = cfg(prepared, *dirs, mixture=(0.5,) * len(dirs))
    whole = make_train_iterator(c, seed=3)
    hosts = [make_train_iterator(c, seed=3, host_rows=(lo, lo + 4)) for lo in (0, 4)]
    seen = set()
    for _ in range(6):
        g = next(whole)
        parts = [next(h) for h in hosts]
        assert all(p["inputs"].shape == (4, 32) for p in parts)
        for k in g:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])
        if len(dirs) == 1:  # (the rows of sb are all alike: "zz zz ...")
            rows = [r.tobytes() for p in parts for r in p["inputs"]]
            assert len(set(rows)) == 8 and not seen & set(rows)  # no row twice, within or across steps
            seen |= set(rows)
    assert sum(h.local_tokens for h in hosts).tolist() == whole.local_tokens.tolist()


def test_a_resumed_iterator_continues_exactly_on_any_host_count_and_workers(prepared):
    c = cfg(prepared, "sa", "sb")
    it = make_train_iterator(c, seed=0)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    want = [next(it) for _ in range(3)]
    for rows in ((0, 8), (0, 2), (6, 8)):
        other = make_train_iterator(c, seed=0, host_rows=rows)
        other.set_state(state)
        for w in want:
            np.testing.assert_array_equal(next(other)["inputs"], w["inputs"][rows[0]:rows[1]])
    with pytest.raises(ConfigError, match="seed: saved 0 vs now 1"):
        make_train_iterator(c, seed=1).set_state(state)
    with pytest.raises(ConfigError, match="batch_size"):
        make_train_iterator(cfg(prepared, "sa", "sb", batch_size=4), seed=0).set_state(state)
    with pytest.raises(ConfigError, match="mixture"):
        make_train_iterator(cfg(prepared, "sa", "sb", mixture=(1.0, 1.0)), seed=0).set_state(state)


def test_worker_processes_give_the_same_batches(prepared):
    plain = make_train_iterator(cfg(prepared), seed=0, host_rows=(2, 4))
    workers = make_train_iterator(cfg(prepared, workers=2), seed=0, host_rows=(2, 4))
    try:
        for _ in range(4):
            a, b = next(plain), next(workers)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    finally:
        workers.close()


def test_a_mixture_draws_rows_in_proportion_to_its_weights(prepared):
    for weights in ((0.75, 0.25), (0.1, 0.9)):
        it = make_train_iterator(cfg(prepared, "sa", "sb", mixture=weights, batch_size=10), seed=0)
        from_b = 0
        for _ in range(40):
            batch = next(it)
            from_b += int(np.isin(batch["inputs"], [ord("z"), ord(" ")]).all(axis=1).sum())  # "zz zz": sb
        share = it.local_tokens / it.local_tokens.sum()
        np.testing.assert_allclose(share, weights, atol=0.02)
        assert abs(from_b / 400 - weights[1]) < 0.03
        assert it.source_names == ("sa", "sb")
    # without weights: in proportion to the directories' training tokens
    it = make_train_iterator(cfg(prepared, "sa", "sb"), seed=0)
    tokens = [ShardSet(prepared / d, "train").num_tokens for d in ("sa", "sb")]
    for _ in range(40):
        next(it)
    np.testing.assert_allclose(it.local_tokens / it.local_tokens.sum(), np.divide(tokens, sum(tokens)), atol=0.02)


def test_validation_rows_are_fixed_and_can_come_from_a_separate_shard_set(prepared):
    a = make_eval_batches(cfg(prepared), 2)
    b = make_eval_batches(cfg(prepared), 2, host_rows=(4, 8))
    assert len(a) == 2 and a[0]["inputs"].shape == (8, 32)
    np.testing.assert_array_equal(a[1]["inputs"][4:], b[1]["inputs"])
    val = ShardSet(prepared / "sa", "validation")
    assert {r.tobytes() for batch in a for r in batch["inputs"]} <= {
        PackedRows(val, 32, partial=True)[i]["inputs"].tobytes() for i in range(len(PackedRows(val, 32, partial=True)))}
    sep = make_eval_batches(cfg(prepared, eval_paths=(str(prepared / "sb"),)), 1)
    assert (sep[0]["inputs"][sep[0]["segment_ids"] > 0] == ord("z")).mean() > 0.5  # "zz zz ..."
    # a small source does not shorten the others: each gives its share, or all it has
    small = len(PackedRows(ShardSet(prepared / "sb", "validation"), 32, partial=True))
    big = len(PackedRows(val, 32, partial=True))
    assert small < 20 < big
    mixed = make_eval_batches(cfg(prepared, "sa", "sb", mixture=(0.5, 0.5)), 5)
    assert sum(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in mixed) == small + 20


def test_missing_corrupt_or_unfinished_shards_are_named(prepared, tmp_path):
    def broken(how):
        d = tmp_path / how
        shutil.copytree(prepared / "sa", d)
        f = d / "train-00001.array_record"
        if how == "missing":
            f.unlink()
        elif how == "truncated":
            f.write_bytes(f.read_bytes()[:100])
        elif how == "garbled":
            raw = bytearray(f.read_bytes())
            raw[200:260] = bytes(60)
            f.write_bytes(bytes(raw))
        elif how == "unfinished":
            (d / "metadata.json").unlink()
        elif how == "index":
            (d / "train-00001.index.npy").write_bytes(b"nope")
        return d

    for how, match in (("missing", "train-00001.array_record is missing"),
                       ("truncated", "train-00001.array_record is corrupt"),
                       ("unfinished", "metadata.json is missing.*stopped before the end"),
                       ("index", "train-00001.index.npy is unreadable")):
        broken(how)
        with pytest.raises(ShardError, match=match):
            make_train_iterator(cfg(tmp_path, how), seed=0)
    # damage inside a record: found when the record is read, naming the file and record
    s = ShardSet(broken("garbled"), "train")
    with pytest.raises(ShardError, match=r"train-00001.array_record: record \d+"):
        for i in range(len(s)):
            s.record(i)
    with pytest.raises(ShardError, match="shard directory .*nowhere does not exist"):
        make_train_iterator(cfg(tmp_path, "nowhere"), seed=0)


def test_a_tokenizer_mismatch_names_the_metadata_file(prepared, tmp_path):
    tok = tmp_path / "tok.json"
    from train.train_tokenizer import main as train_tok
    assert train_tok(["--source", "files", "--paths", str(prepared / "a"), "--vocab-size", "280",
                      "--out", str(tok)]) == 0
    with pytest.raises(ShardError, match=r"sa/metadata.json was tokenized with 'byte'.*data.tokenizer="):
        make_train_iterator(cfg(prepared, tokenizer=str(tok)), seed=0)


@pytest.mark.parametrize("overrides, match", [
    (dict(mixture=(1.0,)), r"data.mixture=\[1.0\] must hold one finite weight >= 0 per directory"),
    (dict(mixture=(0.0, 0.0)), "not all zero"),
    (dict(workers=-1), "data.workers must be >= 0"),
])
def test_config_errors_name_the_field(prepared, overrides, match):
    with pytest.raises(ConfigError, match=match):
        cfg(prepared, "sa", "sb", **overrides).check()
    with pytest.raises(ConfigError, match="data.workers is set but data.source='stdlib'"):
        DataConfig(workers=2).check()


def test_a_killed_run_on_shards_resumes_on_the_same_rows(prepared, tmp_path, monkeypatch):
    args = ["data.source=shards", f"data.paths={prepared / 'sa'},{prepared / 'sb'}", "data.mixture=0.6,0.4",
            "train.steps=8", "train.checkpoint_every=3", "optimizer.warmup_steps=0", "model.pattern=attn",
            "model.num_layers=1", "train.eval_batches=1"]
    run(small(*args), tmp_path / "straight")
    run_killed_after(small(*args), tmp_path / "split", monkeypatch, 5)  # the last checkpoint is step 3
    run(small(*args), tmp_path / "split")
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert a == b  # every step's loss exactly: the same rows in the same order
    recs = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if r["kind"] == "train"][-1]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    want = [r for r in straight if r["kind"] == "train"][-1]
    assert last["tokens/sa"] == want["tokens/sa"] and last["tokens/sb"] == want["tokens/sb"]
    assert last["tokens/sa"] + last["tokens/sb"] == 8 * 4 * 64


def test_eval_suites_that_need_documents_get_them_from_shards(prepared):
    from train.data.pipeline import doc_split
    from train.evals.niah import haystack_pool
    c = cfg(prepared)
    split = doc_split(c, "validation")
    want = tokenized_corpus("files", file_texts([str(prepared / "a")], "text"), build_tokenizer("byte"), 0.05)
    assert len(split) == len(want.validation.records)
    for i in range(len(split)):
        np.testing.assert_array_equal(split.to_tokens(split.records[i]), want.validation.records[i])
    pool = haystack_pool(c, build_tokenizer("byte"), 3000, seed=0)
    assert len(pool) >= 3000 and set(np.unique(pool)) <= set(np.unique(np.concatenate(list(split.records)))) | {10}

"""python -m train.prepare_data: tokenized ArrayRecord shards that round-trip exactly, split as
the data pipeline splits, resumable after a kill, idempotent, and never overwritten."""
import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from train.config import ConfigError
from train.data.documents import tokenized_corpus
from train.data.files_source import file_texts
from train.data.tokenizer import build_tokenizer
from train.prepare_data import main, prepare


def read_shard(path, dtype) -> list[np.ndarray]:
    r = ArrayRecordReader(str(path))
    out = [np.frombuffer(b, np.dtype(dtype).newbyteorder("<")) for b in r.read_all()]
    r.close()
    return out


def split_tokens(out, meta, split) -> list[np.ndarray]:
    return [t for s in meta["splits"][split]["shards"] for t in read_shard(out / s["file"], meta["plan"]["dtype"])]


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(23):
        words = rng.choice(["alpha", "beta", "gamma", "délta", "ε", "🦊", "\n"], size=int(rng.integers(5, 60)))
        (d / f"doc{i:02d}.txt").write_text(" ".join(words))
    (d / "empty.txt").write_text("")
    return d


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_shards_hold_exactly_the_pipelines_documents(corpus, tmp_path, tokenizer):
    if tokenizer == "bpe":
        from train.train_tokenizer import main as train_tok
        assert train_tok(["--source", "files", "--paths", str(corpus), "--vocab-size", "280",
                          "--out", str(tmp_path / "tok.json")]) == 0
        tokenizer = str(tmp_path / "tok.json")
    out = tmp_path / "shards"
    meta = prepare(out, "files", [str(corpus)], tokenizer=tokenizer, val_fraction=0.3, shard_mb=1e-3, workers=2)
    want = tokenized_corpus("files", file_texts([str(corpus)], "text"), build_tokenizer(tokenizer), 0.3)
    for split, docs in (("train", want.train), ("validation", want.validation)):
        got = split_tokens(out, meta, split)
        assert len(got) == len(docs.records) > 0
        for i, a in enumerate(got):
            np.testing.assert_array_equal(a, docs.records[i])
        assert meta["splits"][split]["tokens"] == sum(map(len, got))
        assert meta["splits"][split]["bytes"] == docs.num_bytes
    assert meta["plan"]["split"] == "by_name" and len(meta["splits"]["train"]["shards"]) > 1
    assert meta["plan"]["tokenizer"]["sha256"] is None if tokenizer == "byte" else len(meta["plan"]["tokenizer"]["sha256"]) == 64


def test_a_single_document_is_cut_as_the_pipeline_cuts_it(corpus, tmp_path):
    one = [str(corpus / "doc03.txt")]
    meta = prepare(tmp_path / "one", "files", one)
    want = tokenized_corpus("files", file_texts(one, "text"), build_tokenizer("byte"), 0.05)
    assert meta["plan"]["split"] == "cut"
    for split, docs in (("train", want.train), ("validation", want.validation)):
        (got,) = split_tokens(tmp_path / "one", meta, split)
        np.testing.assert_array_equal(got, docs.records[0])
        assert meta["splits"][split]["bytes"] == docs.num_bytes


def files_of(out):
    return sorted(p for p in out.rglob("*") if p.is_file())


def test_rerun_writes_nothing_and_a_killed_run_resumes(corpus, tmp_path):
    out = tmp_path / "shards"
    meta = prepare(out, "files", [str(corpus)], shard_mb=5e-4)
    stamp = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files_of(out)}
    assert prepare(out, "files", [str(corpus)], shard_mb=5e-4) == meta
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files_of(out)} == stamp
    # a kill during job 2: no metadata, job 2 not marked done, its shard cut short under its
    # temporary name, and job 3 never started
    (out / "metadata.json").unlink()
    lost = out / meta["splits"]["train"]["shards"][2]["file"]
    for job in (2, 3):
        (out / "done" / f"{job:05d}.json").unlink()
    lost.rename(lost.with_name(lost.name + ".tmp"))
    lost.with_name(lost.name + ".tmp").write_bytes(b"half")
    (out / meta["splits"]["train"]["shards"][3]["file"]).unlink()
    assert prepare(out, "files", [str(corpus)], shard_mb=5e-4) == meta
    assert {p: p.read_bytes() for p in files_of(out)} == {p: b for p, (_, b) in stamp.items()}
    kept = out / meta["splits"]["train"]["shards"][0]["file"]
    assert kept.stat().st_mtime_ns == stamp[kept][0]  # finished jobs are not written again


def test_another_input_or_setting_is_refused_and_nothing_changes(corpus, tmp_path, capsys):
    out = tmp_path / "shards"
    prepare(out, "files", [str(corpus)])
    before = {p: p.read_bytes() for p in files_of(out)}
    (corpus / "doc00.txt").write_text("changed text")
    with pytest.raises(ConfigError, match=r"prepared from another plan \(differs in corpus_sha256\)"):
        prepare(out, "files", [str(corpus)])
    assert main(["--source", "files", "--paths", str(corpus), "--record-tokens", "7", "--out", str(out)]) == 2
    assert "differs in corpus_sha256, record_tokens" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in files_of(out)} == before
    for args, match in [(["--source", "files"], "--source files needs --paths"),
                        (["--docs-per-shard", "0"], "--docs-per-shard must be >= 1"),
                        (["--val-fraction", "1.5"], "--val-fraction must be in"),
                        (["--tokenizer", str(tmp_path / "nope.json")], "data.tokenizer=")]:
        assert main(args + ["--out", str(tmp_path / "new")]) == 2
        assert match in capsys.readouterr().err


def test_cli_prints_the_counts(corpus, tmp_path, capsys):
    assert main(["--source", "files", "--paths", str(corpus), "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "s" / "metadata.json").read_text())
    assert f"train: {meta['splits']['train']['documents']} documents" in out and "uint16" in out


def test_parquet_arrow_and_a_datasets_directory_are_read_by_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.data.shards import ShardSet
    texts = [f"row {i}: " + "word " * (i % 7) for i in range(40)]
    d = tmp_path / "in"
    (d / "hf").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts[:20], "id": list(range(20))}), d / "a.parquet")
    # what datasets.Dataset.save_to_disk writes: Arrow IPC stream files and two json files
    with pa.ipc.new_stream(d / "hf" / "data-00000-of-00001.arrow", pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": texts[20:]}))
    (d / "hf" / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (d / "hf" / "dataset_info.json").write_text("{}")
    meta = prepare(tmp_path / "out", "files", [str(d)], val_fraction=0.2, workers=1)
    got = ShardSet(tmp_path / "out", "all").documents()
    want = tokenized_corpus("files", file_texts([str(d)], "text"), build_tokenizer("byte"), 0.2)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["validation"]["documents"] == 40
    assert sorted(bytes(g.astype(np.uint8)).decode() for g in got) == sorted(texts)
    assert [bytes(g.astype(np.uint8)).decode() for g in ShardSet(tmp_path / "out", "train").documents()] == [
        bytes(np.asarray(t, np.uint8)).decode() for t in want.train.records]
    with pytest.raises(ConfigError, match=r"data.text_key='body' is not a column of .*a.parquet"):
        prepare(tmp_path / "out2", "files", [str(d)], text_key="body")


def test_a_tfds_dataset_keeps_its_splits(tiny_tfds, tmp_path):
    from train.data.shards import ShardSet
    meta = prepare(tmp_path / "out", "tfds", tfds_name="chimera_tiny_docs", tfds_data_dir=tiny_tfds, docs_per_shard=8)
    assert meta["plan"]["split"] == "tfds" and len(meta["splits"]["train"]["shards"]) == 4
    for split, ids in (("train", range(30)), ("validation", range(100, 106))):
        docs = [bytes(g.astype(np.uint8)).decode() for g in ShardSet(tmp_path / "out", split).documents()]
        assert sorted(docs) == sorted(f"<{i}> " + "words " * (i % 5) for i in ids)


def test_a_second_writer_of_the_same_out_is_refused(corpus, tmp_path):
    from train.run_lock import RunDirBusy, RunLock
    with RunLock(tmp_path / "s", doing="being prepared", instead="use another --out"):
        with pytest.raises(RunDirBusy, match=r"s is being prepared by pid \d+.*or use another --out"):
            prepare(tmp_path / "s", "files", [str(corpus)])
    assert prepare(tmp_path / "s", "files", [str(corpus)])["splits"]["train"]["documents"] > 0


def test_large_jsonl_and_parquet_files_are_cut_into_jobs_that_read_as_the_whole_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.data.files_source import file_parts
    from train.data.shards import ShardSet
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(1)
    lines = []
    for i in range(300):  # blank lines and a CRLF part shift the line numbers that keys hold
        lines.append(json.dumps({"text": f"line {i} " + "ab " * int(rng.integers(0, 30))}))
        if i % 37 == 0:
            lines.append("")
    (d / "big.jsonl").write_bytes(("\n".join(lines[:150]) + "\r\n" + "\n".join(lines[150:]) + "\n").encode())
    pq.write_table(pa.table({"text": [f"row {i} " + "cd " * (i % 11) for i in range(500)]}), d / "big.parquet",
                   row_group_size=60)
    assert len(file_parts(d / "big.jsonl", 4000)) > 3 and len(file_parts(d / "big.parquet", 4000)) == 3
    meta = prepare(tmp_path / "out", "files", [str(d)], shard_mb=4000 / 2**20, val_fraction=0.2, workers=1)
    assert len(meta["splits"]["train"]["shards"]) > 6
    want = tokenized_corpus("files", file_texts([str(d)], "text"), build_tokenizer("byte"), 0.2)
    for split, docs in (("train", want.train), ("validation", want.validation)):
        got = ShardSet(tmp_path / "out", split).documents()
        assert len(got) == len(docs.records)
        for g, w in zip(got, docs.records):
            np.testing.assert_array_equal(g, w)

"""train.eval: the command line on a trained run (same numbers as the loop's final eval), other
data through data.* overrides, MQAR recall accuracy, and clear errors."""
import json
import re

import numpy as np
import pytest

from train.artifacts import load_config
from train.config import ConfigError
from train.data.tokenizer import ByteTokenizer, IdTokenizer
from train.eval import check_same_tokenizer, eval_data_config, main

KEYS = {"run_dir", "step", "batches", "overrides", "data", "metrics"}


def test_eval_equals_the_loops_final_eval_and_writes_json(text_run_dir, capsys):
    assert main([str(text_run_dir)]) == 0
    out = capsys.readouterr().out
    path = text_run_dir / "eval" / "step30.json"  # the default place for the run's own data
    assert f"wrote {path}" in out
    assert re.search(r"step 30, 2 batches of 4 x 64 \(stdlib\): loss \d\.\d{4}, perplexity .*bits/byte .*accuracy",
                     out), out
    record = json.loads(path.read_text())
    assert set(record) == KEYS
    assert record["step"] == 30 and record["batches"] == 2 and record["overrides"] == []
    assert record["data"] == json.loads((text_run_dir / "config.json").read_text())["data"]
    got = record["metrics"]
    assert set(got) == {"loss", "perplexity", "bits_per_byte", "accuracy", "tokens"}
    want = json.loads((text_run_dir / "summary.json").read_text())["eval"]
    assert got["tokens"] == want["tokens"]
    for k in ("loss", "perplexity", "bits_per_byte", "accuracy"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)


@pytest.mark.slow
def test_other_data_older_checkpoint_and_out_file(text_run_dir, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("def f(x):\n")  # 10 bytes: 9 scored next-byte targets
    (docs / "b.txt").write_text("    return x + 1  # one\n")  # 24 bytes: 23 targets
    out = tmp_path / "o" / "e.json"
    args = [str(text_run_dir), "data.source=files", f"data.paths={docs}", "--step", "15", "--out", str(out)]
    # both files hash to train: the held-out share is the last 5% (2 tokens) of each document
    assert main(args + ["--batches", "1"]) == 0
    assert json.loads(out.read_text())["metrics"]["tokens"] == 2
    assert main(args + ["--all-documents", "data.seq_len=48", "--batches", "1"]) == 0
    record = json.loads(out.read_text())
    assert record["step"] == 15 and record["batches"] == 1
    assert record["data"]["source"] == "files" and record["data"]["seq_len"] == 48
    assert record["metrics"]["tokens"] == 9 + 23
    # without --out, evaluations on other data get their own file beside the standard one
    assert main([str(text_run_dir), "data.seq_len=32", "--batches", "1"]) == 0
    assert re.search(r"eval/step30-[0-9a-f]{8}\.json", capsys.readouterr().out)


def test_mqar_eval_reports_recall_accuracy(mqar_run_dir, tmp_path, capsys):
    assert main([str(mqar_run_dir), "--out", str(tmp_path / "m.json")]) == 0
    assert "accuracy" in capsys.readouterr().out
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert set(m) == {"loss", "perplexity", "accuracy", "tokens"}  # no bits per byte: not text
    assert 0.0 <= m["accuracy"] <= 1.0
    assert m["tokens"] == 8 * 4  # 8 eval examples, 4 queries each: only the answers are scored


@pytest.mark.parametrize("override, match", [
    ("model.d_model=8", "only data.key=value overrides"),
    ("train.steps=3", "only data.key=value overrides"),
    ("data.seq_len", "only data.key=value overrides"),
    ("data.seq_lne=3", "did you mean 'seq_len'"),
    ("data.source=mqar", "not the run's tokenizer"),
])
def test_bad_overrides_are_refused(text_run_dir, capsys, override, match):
    assert main([str(text_run_dir), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err


def test_overrides_touch_only_data(text_run_dir):
    cfg = load_config(text_run_dir)
    new = eval_data_config(cfg, ["data.seq_len=512", "data.batch_size=3"])  # 3: not a multiple of anything
    assert (new.data.seq_len, new.data.batch_size) == (512, 3)
    assert new.model == cfg.model and new.train == cfg.train and new.optimizer == cfg.optimizer
    with pytest.raises(ConfigError, match="only data"):
        eval_data_config(cfg, ["runtime.remat=full"])


def test_the_tokenizer_must_stay_the_runs(text_run_dir, tmp_path):
    data = load_config(text_run_dir).data
    check_same_tokenizer(ByteTokenizer(), data)
    with pytest.raises(ConfigError, match=r"gives the 'byte' tokenizer, 256 ids; .* trained with the 'ids'"):
        check_same_tokenizer(IdTokenizer(256), data)
    hf = tmp_path / "tok.json"  # a word-level HF tokenizer: another vocabulary
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.save(str(hf))
    data = eval_data_config(load_config(text_run_dir), [f"data.tokenizer={hf}"]).data
    with pytest.raises(ConfigError, match=r"data.tokenizer='.*tok.json' is not .* gives the 'hf' tokenizer, 3 ids"):
        check_same_tokenizer(ByteTokenizer(), data)


def test_missing_run_dir(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err

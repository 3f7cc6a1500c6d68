"""python -m train.train_tokenizer: a byte-level BPE trained on the training split only, written
once, deterministic, loadable as data.tokenizer."""
import json

import numpy as np
import pytest

from train.config import ConfigError
from train.data.documents import is_validation
from train.data.tokenizer import build_tokenizer
from train.train_tokenizer import main, train_bpe, training_texts

TEXT = ("def add(a, b):\n    return a + b\n\n" * 20 + "the quick brown fox jumps over the lazy dog. " * 30)


@pytest.fixture
def corpus(tmp_path):
    """Text and JSONL documents under one directory; returns (dir, the validation keys' texts)."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(12):
        (d / f"doc{i}.txt").write_text(f"document {i}: " + TEXT)
    (d / "more.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} " + TEXT[:300]}) for i in range(5)))
    return d


def test_trains_on_the_training_split_only(corpus):
    from train.data.files_source import file_texts
    docs = file_texts([str(corpus)], "text")
    held = [text for key, text in docs if is_validation(key, 0.3)]
    assert held and len(held) < len(docs)
    texts = training_texts("files", [str(corpus)], val_fraction=0.3)
    assert len(texts) == len(docs) - len(held) and not set(held) & set(texts)
    # one document, on either side of the split by name: its tail is held out instead (as the
    # data pipeline does)
    one = corpus / "doc0.txt"
    for fraction in (0.25, 0.95):  # doc0.txt: train at 0.25, validation at 0.95
        (head,) = training_texts("files", [str(one)], val_fraction=fraction)
        text = one.read_text()
        assert text.startswith(head) and len(head) == len(text) - round(len(text) * fraction)


def test_cli_writes_a_deterministic_tokenizer_every_command_can_load(corpus, tmp_path, capsys):
    out = tmp_path / "tok" / "tokenizer.json"
    args = ["--source", "files", "--paths", str(corpus), "--vocab-size", "300", "--out"]
    assert main(args + [str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(args + [str(tmp_path / "again.json")]) == 0
    assert out.read_bytes() == (tmp_path / "again.json").read_bytes()
    tok = build_tokenizer(str(out))
    assert tok.kind == "hf" and tok.vocab_size == 300
    text = "def add(a, b):\n    return a + b  # ünïcödé ✓ \x00 🦊"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # merges learnt, nothing lost
    assert tok.token_bytes[ids].sum() == len(text.encode())  # bits per byte count every byte once
    assert tok.encode("").size == 0


def test_refusals_name_the_argument_and_write_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "tokenizer.json"
    out.write_text("keep me")
    assert main(["--source", "files", "--paths", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 2
    assert "exists; it is never overwritten" in capsys.readouterr().err and out.read_text() == "keep me"
    for args, match in [(["--vocab-size", "256"], "--vocab-size must be an int > 256"),
                        (["--vocab-size", "300", "--source", "files"], "--source files needs --paths"),
                        (["--vocab-size", "300", "--min-frequency", "0"], "--min-frequency must be >= 1")]:
        assert main(args + ["--out", str(tmp_path / "new.json")]) == 2
        assert match in capsys.readouterr().err
        assert not (tmp_path / "new.json").exists()
    with pytest.raises(ConfigError, match="choose one of"):
        training_texts("parquet")


def test_more_merges_compress_more():
    texts = [TEXT] * 3
    sizes = [len(train_bpe(texts, v).encode(TEXT).ids) for v in (260, 400)]
    assert sizes[1] < sizes[0] < len(TEXT.encode())
    assert np.all(np.diff(sizes) < 0)

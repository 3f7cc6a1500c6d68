"""Tokenizers: byte-level, a tiny HF byte-level BPE and a tiny SentencePiece model, trained here."""
import json

import numpy as np
import pytest

from train.config import ConfigError
from train.data.tokenizer import ByteTokenizer, build_tokenizer

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Zoë's café serves crème brûlée — naïve façade, 日本語 too.",
    "for i in range(10):\n    print(i * i)\n",
] * 20
SAMPLE = "Zoë writes: def f(x):\n    return x + 1  # 日本"


def _check_common(tok, text=SAMPLE):
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1 and len(ids) > 0
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.token_bytes.shape == (tok.vocab_size,) and tok.token_bytes.dtype == np.int32
    assert tok.decode(ids) == text
    return ids


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(d / "sp"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
                                   minloglevel=2)
    return d / "sp.model"


def test_byte_tokenizer(tmp_path):
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256
    ids = _check_common(tok)
    np.testing.assert_array_equal(ids, np.frombuffer(SAMPLE.encode("utf-8"), np.uint8))
    np.testing.assert_array_equal(tok.token_bytes, np.ones(256, np.int32))
    # invalid UTF-8 from a model decodes with replacement characters instead of raising
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"
    saved = tok.save(tmp_path)
    assert json.loads(saved.read_text())["kind"] == "byte"
    assert isinstance(build_tokenizer(str(tmp_path)), ByteTokenizer)


def test_hf_bpe(hf_path, tmp_path):
    tok = build_tokenizer(str(hf_path))
    assert tok.vocab_size == 300
    ids = _check_common(tok)
    assert len(ids) < len(SAMPLE.encode("utf-8"))  # merges happened
    # byte-level: the token byte lengths add up to the exact UTF-8 length, even for tokens that
    # hold part of a multi-byte character
    assert tok.token_bytes[ids].sum() == len(SAMPLE.encode("utf-8"))
    assert tok.token_bytes[tok._tok.token_to_id("<|endoftext|>")] == 0
    batch = tok.encode_batch(CORPUS[:3])
    for text, got in zip(CORPUS[:3], batch):
        np.testing.assert_array_equal(got, tok.encode(text))
    tok.save(tmp_path)
    again = build_tokenizer(str(tmp_path))
    np.testing.assert_array_equal(again.encode(SAMPLE), ids)


def test_sentencepiece(sp_path, tmp_path):
    tok = build_tokenizer(str(sp_path))
    text = "The quick brown fox: def add(a, b)"
    ids = _check_common(tok, text)
    assert len(ids) < len(text)
    # "▁" counts as a space; SentencePiece adds one leading "▁" (dummy prefix) to a text
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8")) + 1
    # an unseen character falls back to byte pieces of one byte each
    assert tok.decode(tok.encode("ß")) == "ß"
    tok.save(tmp_path)
    np.testing.assert_array_equal(build_tokenizer(str(tmp_path)).encode(text), ids)


@pytest.mark.parametrize("name, content", [("nope.json", None), ("vocab.txt", "abc"), ("bad.json", "{not json"),
                                           ("bad.model", "not a model"), ("emptydir", "")])
def test_bad_specs(tmp_path, name, content):
    path = tmp_path / name
    if name == "emptydir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*accepted"):
        build_tokenizer(str(path))

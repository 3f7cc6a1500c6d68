"""Tokenizer files Hugging Face can read, written beside an export.

A run with an HF tokenizer gets its tokenizer.json plus a tokenizer_config.json
(PreTrainedTokenizerFast). The byte tokenizer has no file format of its own in HF, so it is
written as an equivalent `tokenizers` byte-level BPE with no merges whose ids are the byte values
(encode(text) = its UTF-8 bytes). SentencePiece runs get their tokenizer.model copied (load it
with sentencepiece) and synthetic-task id tokenizers nothing HF can read. No BOS/EOS ids are
declared: the models were trained on documents separated by segment ids, not special tokens.
"""
from __future__ import annotations

import json
from pathlib import Path


def byte_tokenizer_json() -> str:
    """A `tokenizers` file equivalent to the byte tokenizer: byte-level BPE without merges whose
    vocabulary maps the printable stand-in of byte b (GPT-2's byte alphabet) to id b."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from train.data.tokenizer import _byte_level_alphabet
    tok = Tokenizer(models.BPE(vocab=_byte_level_alphabet(), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def write_hf_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json where HF can read the run's tokenizer (see the
    module docstring); nothing for SentencePiece and id tokenizers beyond Tokenizer.save."""
    if tokenizer.kind == "byte":
        (out / "tokenizer.json").write_text(byte_tokenizer_json())
    elif tokenizer.kind != "hf":
        return
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
          "add_bos_token": False, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")

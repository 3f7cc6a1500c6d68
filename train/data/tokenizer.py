"""Tokenizers behind one small interface: byte-level, HF `tokenizer.json`, SentencePiece `.model`.

`build_tokenizer(spec)` reads `data.tokenizer`:
  "byte"               256 ids, a text encodes to its UTF-8 bytes
  path/to/x.json       a Hugging Face `tokenizers` file (`Tokenizer.from_file`)
  path/to/x.model      a SentencePiece model
  path/to/run_dir      a directory into which `Tokenizer.save` wrote one of the above

Every tokenizer has `vocab_size`, `encode(text) -> int32 [n]`, `decode(ids) -> str`,
`token_bytes -> int32 [vocab_size]` (UTF-8 bytes each id stands for, for bits per byte) and
`save(dir)` (copies its files into a run directory so the run can be decoded later).

Synthetic tasks (mqar) have no text; `IdTokenizer(vocab)` stands in for them: ids print as
numbers and every id counts as one "byte", so bits per byte there reads as bits per token.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from train.config import ConfigError

__all__ = ["Tokenizer", "ByteTokenizer", "IdTokenizer", "HFTokenizer", "SentencePieceTokenizer",
           "build_tokenizer", "tokenizer_identity"]

ACCEPTED = ('"byte", a path to a Hugging Face tokenizer .json file, a SentencePiece .model file, '
            'or a directory holding one written by Tokenizer.save')

# File names used by `save`; `build_tokenizer(dir)` looks for them in this order.
HF_FILE, SP_FILE = "tokenizer.json", "tokenizer.model"
BYTE_FILE, IDS_FILE = "tokenizer_byte.json", "tokenizer_ids.json"
SAVED_FILES = (HF_FILE, SP_FILE, BYTE_FILE, IDS_FILE)


class Tokenizer:
    """Interface. `token_bytes[i]` is 0 for ids that stand for no text (control, special, unk)."""
    kind: str
    vocab_size: int
    token_bytes: np.ndarray

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write this tokenizer into `directory`; returns the written file."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    kind = "byte"
    vocab_size = 256

    def __init__(self):
        self.token_bytes = np.ones(256, np.int32)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte tokenizer ids must be in [0, 256), got range [{ids.min()}, {ids.max()}]")
        # A model can emit byte sequences that are not valid UTF-8; show them, do not fail.
        return bytes(ids.astype(np.uint8)).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / BYTE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": "byte", "vocab_size": 256}) + "\n")
        return path


class IdTokenizer(Tokenizer):
    """Token ids of a synthetic task, written as decimal numbers separated by spaces."""
    kind = "ids"

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)
        self.token_bytes = np.ones(self.vocab_size, np.int32)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray([int(t) for t in text.split()], np.int32)

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in np.asarray(ids).reshape(-1))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / IDS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": "ids", "vocab_size": self.vocab_size}) + "\n")
        return path


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 style byte-level BPE: the printable character that stands for each byte.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 are given
    the code points 256, 257, ... in byte order, so that every byte is a visible character.
    """
    printable = [b for b in range(256)
                 if ord("!") <= b <= ord("~") or ord("\xa1") <= b <= ord("\xac") or ord("\xae") <= b <= 255]
    keep = set(printable)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` file. Special tokens are never added by `encode`."""
    kind = "hf"

    def __init__(self, path: Path):
        import tokenizers
        self.path = Path(path)
        self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(max(vocab.values(), default=-1) + 1, self._tok.get_vocab_size(True))
        self.token_bytes = self._token_bytes(vocab)

    def _token_bytes(self, vocab: dict[str, int]) -> np.ndarray:
        import tokenizers.decoders as dec
        out = np.zeros(self.vocab_size, np.int32)
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        alphabet = _byte_level_alphabet() if isinstance(self._tok.decoder, dec.ByteLevel) else None
        for token, i in vocab.items():
            if i in special:
                continue
            if alphabet is not None and all(c in alphabet for c in token):
                # Byte-level tokens can hold half a UTF-8 character: count bytes, not decoded text.
                out[i] = len(token)
            else:  # other models (WordPiece, Unigram, ...): length of what the id decodes to
                out[i] = len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # Batches run on the library's own (Rust) thread pool; the `_fast` variant skips offset
        # tracking, which we never use (1.7x faster on the stdlib corpus).
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encs = encode(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / HF_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, path)
        return path


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model. `encode` adds no BOS/EOS (documents are separated by segment ids)."""
    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece as spm
        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = int(self._sp.get_piece_size())
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i):
                continue
            if self._sp.is_byte(i):  # byte-fallback pieces look like "<0x41>"
                out[i] = 1
            else:  # "▁" (U+2581) marks a space
                out[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self.token_bytes = out

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SP_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, path)
        return path


def build_tokenizer(spec: str) -> Tokenizer:
    """Build the tokenizer named by `data.tokenizer` (see the module docstring)."""
    if spec == "byte":
        return ByteTokenizer()
    if not spec:
        raise ConfigError(f"data.tokenizer is empty; accepted: {ACCEPTED}")
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in SAVED_FILES:
            if (path / name).is_file():
                return build_tokenizer(str(path / name))
        raise ConfigError(f"data.tokenizer={spec!r} is a directory without {HF_FILE}, {SP_FILE}, "
                          f"{BYTE_FILE} or {IDS_FILE}; accepted: {ACCEPTED}")
    if not path.is_file():
        raise ConfigError(f"data.tokenizer={spec!r}: no such file; accepted: {ACCEPTED}")
    if path.suffix not in (".json", ".model"):
        raise ConfigError(f"data.tokenizer={spec!r} has unknown extension {path.suffix!r}; accepted: {ACCEPTED}")
    if path.name == BYTE_FILE:
        return ByteTokenizer()
    if path.name == IDS_FILE:
        return IdTokenizer(json.loads(path.read_text())["vocab_size"])
    try:
        return HFTokenizer(path) if path.suffix == ".json" else SentencePieceTokenizer(path)
    except Exception as e:  # the libraries raise bare Exception / RuntimeError on bad files
        raise ConfigError(f"data.tokenizer={spec!r} could not be loaded ({type(e).__name__}: {e}); "
                          f"accepted: {ACCEPTED}") from e


def tokenizer_identity(spec: str) -> dict:
    """What names a tokenizer exactly, wherever its file lies: {spec, kind, vocab_size, sha256},
    sha256 being that of its tokenizer.json / .model file (None for the byte tokenizer)."""
    import hashlib
    tok = build_tokenizer(spec)
    ident = {"spec": spec, "kind": tok.kind, "vocab_size": int(tok.vocab_size), "sha256": None}
    if tok.kind in ("hf", "sentencepiece"):
        path = Path(spec)
        if path.is_dir():
            path = next(path / n for n in SAVED_FILES if (path / n).is_file())
        ident["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return ident

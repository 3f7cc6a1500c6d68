"""Document collections: flat token storage, a stable hash split, and the per-split record.

A document source hands the pipeline a `DocSplit` per split: a random-access sequence of
records plus `to_tokens(record) -> int32 [n]`. In-memory sources (stdlib, files) tokenize once
at load and store every document of a split in one flat array (`TokenDocs`); lazy sources
(tfds) keep their records and tokenize inside the grain map.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Sequence

import numpy as np

from train.data.tokenizer import Tokenizer

__all__ = ["TokenDocs", "TokenPieces", "DocSplit", "Corpus", "is_validation", "tokenized_corpus"]


class TokenDocs:
    """Documents stored flat. tokens: int32 [N]; offsets: int64 [D + 1]; doc i = tokens[o[i]:o[i+1]]."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self.tokens = np.asarray(tokens, np.int32)
        self.offsets = np.asarray(offsets, np.int64)
        assert self.offsets[0] == 0 and self.offsets[-1] == len(self.tokens)

    @classmethod
    def from_arrays(cls, docs: Sequence[np.ndarray]) -> "TokenDocs":
        lengths = np.fromiter((len(d) for d in docs), np.int64, count=len(docs))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(list(docs)).astype(np.int32) if len(docs) else np.zeros(0, np.int32)
        return cls(tokens, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")
        i %= len(self)
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


class TokenPieces:
    """The documents of a TokenDocs cut into consecutive pieces of at most `max_len` tokens.

    Shuffling pieces instead of whole documents is what makes training rows independent: a
    packed row is max_len tokens, so with whole documents shuffled, a 700 kB file would fill
    thousands of consecutive rows and the model would see one file for hundreds of steps.
    Piece i is tokens[starts[i]:ends[i]].
    """

    def __init__(self, docs: TokenDocs, max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.tokens = docs.tokens
        lengths = np.diff(docs.offsets)
        counts = -(-lengths // max_len)  # pieces per document (0 for an empty one)
        doc_of_piece = np.repeat(np.arange(len(lengths)), counts)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        k = np.arange(len(doc_of_piece)) - np.repeat(first, counts)  # piece index inside its doc
        self.starts = docs.offsets[doc_of_piece] + k * max_len
        self.ends = np.minimum(self.starts + max_len, docs.offsets[doc_of_piece + 1])

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"piece {i} out of range [0, {len(self)})")
        i %= len(self)
        return self.tokens[self.starts[i]:self.ends[i]]


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class DocSplit:
    """One split of a text source.

    records: random-access sequence (len, [i]) of whatever the source stores.
    to_tokens: record -> int32 [n] token ids; runs inside the grain map (lazily).
    num_tokens / num_bytes: totals when known at load time (None for lazy sources).
    keys: the split key of each record (its file path, `path:line`, ...), when known.
    """
    source: str
    split: str
    records: Sequence[Any]
    to_tokens: Callable[[Any], np.ndarray] = _identity
    num_tokens: int | None = None
    num_bytes: int | None = None
    keys: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def describe(self) -> str:
        extra = "" if self.num_tokens is None else f", {self.num_tokens:,} tokens, {self.num_bytes:,} bytes"
        return f"{self.source}/{self.split}: {len(self):,} documents{extra}"


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: DocSplit
    validation: DocSplit


def is_validation(key: str, val_fraction: float) -> bool:
    """Stable split by name: the same key lands in the same split on every machine and run.

    Uses the first 8 bytes of SHA-1 (not Python's salted `hash`) as a uniform number in [0, 1).
    """
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


def tokenized_corpus(source: str, keyed_texts: Sequence[tuple[str, str]], tokenizer: Tokenizer,
                     val_fraction: float) -> Corpus:
    """Tokenize (key, text) documents once and split them by `is_validation(key)`.

    Documents that tokenize to nothing are dropped: they would only add empty segments.
    """
    keys = [k for k, _ in keyed_texts]
    texts = [t for _, t in keyed_texts]
    tokens = tokenizer.encode_batch(texts) if texts else []
    nbytes = [len(t.encode("utf-8")) for t in texts]
    parts: dict[str, list[int]] = {"train": [], "validation": []}
    for i, key in enumerate(keys):
        if len(tokens[i]):
            parts["validation" if is_validation(key, val_fraction) else "train"].append(i)

    def make(split: str) -> DocSplit:
        idx = parts[split]
        docs = TokenDocs.from_arrays([tokens[i] for i in idx])
        return DocSplit(source, split, docs, num_tokens=docs.num_tokens, num_bytes=sum(nbytes[i] for i in idx),
                        keys=tuple(keys[i] for i in idx))

    return Corpus(train=make("train"), validation=make("validation"))

"""Document collections: flat token storage, a stable hash split, and the per-split record.

A document source hands the pipeline a `DocSplit` per split: a random-access sequence of
records plus `to_tokens(record) -> int32 [n]`. In-memory sources (stdlib, files) tokenize once
at load and store every document of a split in one flat array (`TokenDocs`); lazy sources
(tfds) keep their records and tokenize inside the grain map.

In-memory corpora are split by a hash of each document's name; when that leaves a split empty
(a corpus of one or a few documents), each document is cut instead: its last `val_fraction`
share of tokens is validation (see `tokenized_corpus`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Callable, Sequence

import numpy as np

from train.config import ConfigError
from train.data.tokenizer import Tokenizer

log = logging.getLogger("chimera.data")

# val_fraction above this means "every document is validation" (how `train.eval --all-documents`
# asks for all of them, since the config refuses 1.0): an empty train split is then intended.
ALL_VALIDATION = 1.0 - 1e-6
# A document cut in two gives each side at least this many tokens: one input and its target.
MIN_PIECE = 2

__all__ = ["TokenDocs", "TokenPieces", "DocSplit", "Corpus", "is_validation", "validation_flags", "cut_point",
           "source_texts", "tokenized_corpus"]


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
    keys: the split key of each record (its file path, `path:line`, ...), when known; a document
      cut between the splits has keys `key[:i]` (train) and `key[i:]` (validation), i in tokens.
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


def validation_flags(keys: Sequence[str], val_fraction: float) -> list[bool] | None:
    """Which documents the split by name sends to validation, or None when that would leave a
    split empty and every document is cut instead (`cut_point`). An empty train split is kept when
    val_fraction > ALL_VALIDATION (every document asked for as validation)."""
    val = [is_validation(k, val_fraction) for k in keys]
    return val if splits_by_name(sum(val), len(val), val_fraction) else None


def splits_by_name(n_validation: int, n: int, val_fraction: float) -> bool:
    """Whether a split by name that sends n_validation of n documents to validation is kept
    (else every document is cut): both splits non-empty, or an empty train split asked for
    with val_fraction > ALL_VALIDATION. The one rule of the pipeline and prepare_data."""
    if n == 0:
        return True
    return 0 < n_validation and (n_validation < n or val_fraction > ALL_VALIDATION)


def cut_point(num_tokens: int, num_bytes: int, val_fraction: float) -> tuple[int, int]:
    """Where a cut document splits: (tokens that stay in train, bytes that go to validation).
    Bytes are apportioned by token share: which bytes each token stands for is not kept."""
    held = held_out_tokens(num_tokens, val_fraction)
    return num_tokens - held, (round(num_bytes * held / num_tokens) if held else 0)


def source_texts(source: str, paths: Sequence[str] = (), text_key: str = "text") -> list[tuple[str, str]]:
    """(key, text) documents of an in-memory text source: "stdlib" or "files"."""
    if source == "stdlib":
        from train.data.stdlib_source import stdlib_texts
        return stdlib_texts()
    if source == "files":
        from train.data.files_source import file_texts
        return file_texts(paths, text_key)
    raise ConfigError(f"source {source!r} has no in-memory texts; accepted: stdlib, files")


def held_out_tokens(n: int, val_fraction: float) -> int:
    """Tokens at the end of an n-token document that go to validation when documents are cut:
    the `val_fraction` share, rounded, but at least MIN_PIECE and leaving MIN_PIECE for train;
    0 when the document is too short to give both sides MIN_PIECE."""
    if n < 2 * MIN_PIECE:
        return 0
    return min(max(round(n * val_fraction), MIN_PIECE), n - MIN_PIECE)


def _doc_split(source: str, split: str, docs: Sequence[tuple[str, np.ndarray, int]]) -> DocSplit:
    """DocSplit of (key, tokens, num_bytes) documents."""
    flat = TokenDocs.from_arrays([t for _, t, _ in docs])
    return DocSplit(source, split, flat, num_tokens=flat.num_tokens, num_bytes=sum(b for _, _, b in docs),
                    keys=tuple(k for k, _, _ in docs))


def _cut_documents(source: str, docs: Sequence[tuple[str, np.ndarray, int]], val_fraction: float,
                   empty: str) -> Corpus:
    """Split inside the documents: the last `held_out_tokens` of each go to validation.

    Only for corpora whose hash split left the `empty` split empty. Documents too short to cut
    stay whole in train. Raises ConfigError when nothing can be held out at all.
    """
    train, val = [], []
    for key, tokens, nbytes in docs:
        cut, val_bytes = cut_point(len(tokens), nbytes, val_fraction)
        if cut == len(tokens):
            train.append((key, tokens, nbytes))
            continue
        train.append((f"{key}[:{cut}]", tokens[:cut], nbytes - val_bytes))
        val.append((f"{key}[{cut}:]", tokens[cut:], val_bytes))
    total = sum(len(t) for _, t, _ in docs)
    n = f"{len(docs)} document{'s' if len(docs) != 1 else ''}"
    if not val:
        raise ConfigError(f"data.source={source!r}: too little text for a train and a validation split "
                          f"({n}, first {docs[0][0]}, {total} tokens; a document needs >= {2 * MIN_PIECE} "
                          f"tokens to be cut in two); give more or longer documents")
    log.warning("data.source=%r: the split by document name leaves %s empty (%s, data.val_fraction=%g); "
                "validation is the last %g%% of each document's tokens instead (%d of %d tokens)",
                source, empty, n, val_fraction, 100 * val_fraction, sum(len(t) for _, t, _ in val), total)
    return Corpus(train=_doc_split(source, "train", train), validation=_doc_split(source, "validation", val))


def tokenized_corpus(source: str, keyed_texts: Sequence[tuple[str, str]], tokenizer: Tokenizer,
                     val_fraction: float) -> Corpus:
    """Tokenize (key, text) documents once and split them by `is_validation(key)`.

    When that leaves train or validation empty (one document, or a few that all hash to one
    side), every document is cut instead (`_cut_documents`) and a warning says so. An empty
    train split is kept when val_fraction > ALL_VALIDATION (every document asked for as
    validation). Documents that tokenize to nothing are dropped: they would only add empty
    segments.
    """
    keys = [k for k, _ in keyed_texts]
    texts = [t for _, t in keyed_texts]
    tokens = tokenizer.encode_batch(texts) if texts else []
    docs = [(key, toks, len(text.encode("utf-8"))) for key, toks, text in zip(keys, tokens, texts) if len(toks)]
    val = validation_flags([key for key, _, _ in docs], val_fraction)
    if val is None:
        return _cut_documents(source, docs, val_fraction, "train" if all(
            is_validation(key, val_fraction) for key, _, _ in docs) else "validation")
    train_docs = [d for d, v in zip(docs, val) if not v]
    val_docs = [d for d, v in zip(docs, val) if v]
    return Corpus(train=_doc_split(source, "train", train_docs),
                  validation=_doc_split(source, "validation", val_docs))

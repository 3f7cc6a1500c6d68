"""Prepared shards (`python -m train.prepare_data`) read as packed rows, at random access.

A `ShardSet` is one split of one prepared directory: its ArrayRecord files, read through grain's
`ArrayRecordDataSource`, and the per-record index (tokens, starts a document) from the
`*.index.npy` files, which is all that is held in memory (9 bytes per record: the cumulative
token offset and the document-start flag).

`PackedRows` lays a ShardSet's tokens end to end, in storage order, and cuts them into rows of
L = seq_len + 1 tokens: row r is tokens [r L, (r + 1) L) of that stream. Because the cumulative
record lengths are known, any row is read directly (a binary search, then the records it
overlaps: about L / (mean document length) + 1 of them, each read whole), so a row is a pure
function of its index: grain can shuffle rows with its
index shuffle, slice them per host and hand them to worker processes, and an iterator's position
is just the number of batches drawn. Inside a row the pieces of documents get segment ids
1, 2, ... and positions restarting at 0, exactly as the in-memory packer (train.data.packing)
gives them; a document that continues from the previous row starts a new piece. Training rows
are whole (the last < L tokens of a set are left out); evaluation rows include the last partial
row, padded with segment 0.

Every file is checked when a set is opened (present, its record count equal to its index's,
the index's token count equal to metadata.json's), and a record that cannot be read or decodes
to the wrong length raises ShardError naming the file and record.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from train.config import ConfigError
from train.data.packing import row_to_example

__all__ = ["ShardError", "ShardSet", "ShardDocuments", "PackedRows", "open_shard_set", "content_plan", "shard_fingerprint",
           "FORMAT", "META_FILE"]

log = logging.getLogger("chimera.data")

FORMAT = "chimera-shards/2"  # written by train.prepare_data
META_FILE = "metadata.json"


class ShardError(ConfigError):
    """A shard directory that is missing, incomplete, corrupt, or does not fit the config."""


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    if not path.is_file():
        hint = (" (plan.json is there: python -m train.prepare_data was stopped before the end; run it again "
                "to finish)" if (directory / "plan.json").is_file() else
                "; make one with python -m train.prepare_data --out DIR")
        raise ShardError(f"{path} is missing: {directory} is not a finished shard directory{hint}")
    try:
        meta = json.loads(path.read_text())
        fmt = meta["plan"]["format"]
        if not all(isinstance(meta["splits"][sp]["shards"], list) for sp in ("train", "validation")):
            raise TypeError("splits.<split>.shards is not a list")
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{path} is not a shard metadata file ({type(e).__name__}: {e})") from None
    if fmt != FORMAT:
        raise ShardError(f"{path} has format {fmt!r}; this version reads {FORMAT!r}: prepare the shards again "
                         "with python -m train.prepare_data")
    return meta


def content_plan(plan: dict) -> dict:
    """A prepare plan less where things lie (input paths, the tokenizer's path, the tfds data
    directory): what identifies the content, with the corpus's and tokenizer's SHA-256."""
    out = {k: v for k, v in plan.items() if k != "paths"}
    out["tokenizer"] = {k: v for k, v in plan["tokenizer"].items() if k != "spec"}
    if out.get("tfds"):
        out["tfds"] = {k: v for k, v in plan["tfds"].items() if k != "data_dir"}
    return out


def shard_fingerprint(meta: dict) -> str:
    """What identifies a prepared set's content: a hash of its content plan. A moved directory,
    or the same tokenizer file elsewhere, still resumes."""
    return hashlib.sha256(json.dumps(content_plan(meta["plan"]), sort_keys=True).encode()).hexdigest()[:16]


class ShardSet:
    """One split ("train", "validation", or "all" for both) of one prepared directory.

    files: absolute shard paths in order; starts bool [R] (record begins a document); offsets
    int64 [R + 1] (cumulative tokens: record i holds offsets[i + 1] - offsets[i]); num_tokens,
    num_bytes, num_documents.
    """

    def __init__(self, directory: str | Path, split: str):
        directory = Path(directory)
        if not directory.is_dir():
            raise ShardError(f"shard directory {directory} does not exist")
        self.directory, self.split = directory, split
        self.meta = _read_meta(directory)
        self.name = directory.absolute().name
        self.fingerprint = shard_fingerprint(self.meta)
        splits = ("train", "validation") if split == "all" else (split,)
        shards = [s for sp in splits for s in self.meta["splits"][sp]["shards"]]
        self.num_tokens = sum(self.meta["splits"][sp]["tokens"] for sp in splits)
        self.num_bytes = sum(self.meta["splits"][sp]["bytes"] for sp in splits)
        self.num_documents = sum(self.meta["splits"][sp]["documents"] for sp in splits)
        self.dtype = np.dtype(self.meta["plan"]["dtype"]).newbyteorder("<")
        self.files = [str((directory / s["file"]).absolute()) for s in shards]
        index = [self._check_shard(directory, s) for s in shards]
        index = np.concatenate(index) if index else np.zeros((0, 2), np.int32)
        self.starts = index[:, 1].astype(bool)
        self.offsets = np.concatenate([[0], np.cumsum(index[:, 0], dtype=np.int64)])
        del index
        # first_record[k]: the first record of shard file k (to name the file of a bad record)
        self.first_record = np.concatenate([[0], np.cumsum([s["records"] for s in shards], dtype=np.int64)])
        self._source = None  # the ArrayRecordDataSource, opened on first read in each process

    def _check_shard(self, directory: Path, shard: dict) -> np.ndarray:
        path, ipath = directory / shard["file"], directory / shard["index"]
        for p in (path, ipath):
            if not p.is_file():
                raise ShardError(f"shard file {p} is missing (listed in {directory / META_FILE}); prepare the "
                                 "shards again with python -m train.prepare_data")
        try:
            index = np.load(ipath, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any unreadable index
            raise ShardError(f"shard index {ipath} is unreadable ({type(e).__name__}: {e})") from None
        if index.ndim != 2 or index.shape != (shard["records"], 2) or int(index[:, 0].sum()) != shard["tokens"]:
            raise ShardError(f"shard index {ipath} does not match {directory / META_FILE} (shape {index.shape}, "
                             f"expected {shard['records']} records of {shard['tokens']} tokens in all)")
        from array_record.python.array_record_module import ArrayRecordReader
        try:
            reader = ArrayRecordReader(str(path))
            n = reader.num_records()
            reader.close()
        except Exception as e:  # noqa: BLE001 - riegeli's errors for truncated or garbled files
            raise ShardError(f"shard file {path} is corrupt ({type(e).__name__}: {str(e)[:200]})") from None
        if n != shard["records"]:
            raise ShardError(f"shard file {path} holds {n} records; {directory / META_FILE} says {shard['records']}")
        return index

    def __len__(self) -> int:
        return len(self.starts)

    def __getstate__(self) -> dict:  # worker processes open their own readers
        return {**self.__dict__, "_source": None}

    def record(self, i: int) -> np.ndarray:
        """Record i's tokens, int32 [offsets[i + 1] - offsets[i]]."""
        if self._source is None:
            import grain
            self._source = grain.sources.ArrayRecordDataSource(self.files)
        try:
            raw = self._source[int(i)]
        except Exception as e:  # noqa: BLE001 - riegeli's checksum and I/O errors
            raise ShardError(f"shard file {self._file_of(i)}: record {i} is unreadable ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
        n = int(self.offsets[i + 1] - self.offsets[i])
        if len(raw) != n * self.dtype.itemsize:
            raise ShardError(f"shard file {self._file_of(i)}: record {i} has {len(raw)} bytes; its index says "
                             f"{n} tokens of {self.dtype.itemsize} bytes")
        return np.frombuffer(raw, self.dtype).astype(np.int32)

    def _file_of(self, i: int) -> str:
        """The shard file holding record i (for error messages)."""
        return self.files[int(np.searchsorted(self.first_record, i, side="right")) - 1]

    def documents(self) -> "ShardDocuments":
        """The set's documents, whole, at random access (for eval suites, tests, inspection)."""
        return ShardDocuments(self)


class ShardDocuments:
    """Documents of a ShardSet: len, [d] -> int32 tokens (its records joined)."""

    def __init__(self, shards: ShardSet):
        self.shards = shards
        self.heads = np.concatenate([np.flatnonzero(shards.starts), [len(shards)]])

    def __len__(self) -> int:
        return len(self.heads) - 1

    def __getitem__(self, d: int) -> np.ndarray:
        if not 0 <= d < len(self):
            raise IndexError(f"document {d} out of range [0, {len(self)})")
        return np.concatenate([self.shards.record(i) for i in range(self.heads[d], self.heads[d + 1])])


def open_shard_set(directory: str, split: str, tokenizer_identity: dict[str, Any] | None = None) -> ShardSet:
    """ShardSet of `directory` for `split`; with tokenizer_identity, refuses shards made with
    another tokenizer (kind, vocabulary size or file hash differ), naming the metadata file."""
    s = ShardSet(directory, split)
    if tokenizer_identity is not None:
        theirs = s.meta["plan"]["tokenizer"]
        differ = [k for k in ("kind", "vocab_size", "sha256") if theirs.get(k) != tokenizer_identity.get(k)]
        if differ:
            raise ShardError(
                f"{s.directory / META_FILE} was tokenized with {theirs['spec']!r} ({theirs['kind']}, vocab "
                f"{theirs['vocab_size']}), but data.tokenizer={tokenizer_identity['spec']!r} differs in "
                f"{', '.join(differ)}: set data.tokenizer to the tokenizer the shards were prepared with")
    return s


class PackedRows:
    """Rows of a ShardSet, at random access (see the module docstring).

    row(r) / [r] -> Batch row: inputs, targets, segment_ids, positions int32 [T], loss_mask
    float32 [T], and source int32 [] (`source_id`, for per-source token counts in mixtures).
    partial: include the last, shorter row (padded); for evaluation.
    """

    def __init__(self, shards: ShardSet, seq_len: int, source_id: int = 0, partial: bool = False):
        self.shards, self.T, self.source_id = shards, seq_len, source_id
        L = seq_len + 1
        self._len = -(-shards.num_tokens // L) if partial else shards.num_tokens // L

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        if not 0 <= r < self._len:
            raise IndexError(f"row {r} out of range [0, {self._len})")
        L, s = self.T + 1, self.shards
        start, end = r * L, min((r + 1) * L, s.num_tokens)
        i = int(np.searchsorted(s.offsets, start, side="right")) - 1
        tokens, new_piece = np.zeros(L, np.int32), np.zeros(L, bool)
        at = start
        while at < end:
            a, b = at - s.offsets[i], min(end, s.offsets[i + 1]) - s.offsets[i]
            rec = s.record(i)
            tokens[at - start:at - start + b - a] = rec[a:b]
            new_piece[at - start] = at == start or (a == 0 and s.starts[i])
            at += b - a
            i += 1
        n = end - start
        seg = np.cumsum(new_piece).astype(np.int32)
        seg[n:] = 0
        idx = np.arange(L)
        pos = (idx - np.maximum.accumulate(np.where(new_piece, idx, 0))).astype(np.int32)
        pos[n:] = 0
        row = {"tokens": tokens, "tokens_segment_ids": seg, "tokens_positions": pos}
        return {**row_to_example(row), "source": np.int32(self.source_id)}


def describe(sets: Sequence[ShardSet]) -> str:
    return "; ".join(f"{s.directory} [{s.split}]: {s.num_documents:,} documents, {s.num_tokens:,} tokens, "
                     f"{len(s.files)} shard(s)" for s in sets)

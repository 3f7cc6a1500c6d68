"""Pack variable-length documents into rows of seq_len + 1 tokens, then into Batch rows.

grain's `ConcatThenSplitIterDataset` does the packing: documents are laid end to end and cut
at row boundaries, so a document longer than the room left in a row continues in the next
row(s) as a new piece. Every row is full except the very last one of a finite stream. Inside a
row each piece gets segment id 1, 2, ... (0 = padding) and positions restarting at 0.

(`FirstFitPackIterDataset` was the other candidate; it needs documents cut beforehand and
leaves padding in every row, so it wastes compute on text corpora.)

A packed row (tok, seg, pos, each [T + 1]) becomes a Batch row of length T:
  inputs = tok[:T], targets = tok[1:], segment_ids = seg[:T], positions = pos[:T],
  loss_mask = (seg[1:] == seg[:T]) & (seg[:T] != 0)
so no position is asked to predict the first token of another document, nor padding.
"""
from __future__ import annotations

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

__all__ = ["pack_rows", "pack_documents", "row_to_example", "empty_example", "EXAMPLE_KEYS"]

EXAMPLE_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _nonempty(tokens: np.ndarray) -> bool:
    return len(tokens) > 0


def _as_feature(tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": np.asarray(tokens, np.int32)}


def row_to_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed row {tokens, tokens_segment_ids, tokens_positions} [T + 1] -> Batch row [T]."""
    tok, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
    T = len(tok) - 1
    return {
        "inputs": tok[:T].astype(np.int32),
        "targets": tok[1:].astype(np.int32),
        "segment_ids": seg[:T].astype(np.int32),
        "positions": pos[:T].astype(np.int32),
        "loss_mask": ((seg[1:] == seg[:T]) & (seg[:T] != 0)).astype(np.float32),
    }


def empty_example(seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding Batch row (segment 0, loss_mask 0), to fill the last eval batch."""
    out = {k: np.zeros(seq_len, np.int32) for k in EXAMPLE_KEYS}
    out["loss_mask"] = np.zeros(seq_len, np.float32)
    return out


def pack_rows(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """docs: IterDataset of int32 [n] token arrays -> packed rows
    {tokens, tokens_segment_ids, tokens_positions}, each int32 [seq_len + 1]."""
    return ConcatThenSplitIterDataset(docs.filter(_nonempty).map(_as_feature),
                                      length_struct={"tokens": seq_len + 1})


def pack_documents(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """docs: IterDataset of int32 [n] token arrays -> IterDataset of Batch rows of length seq_len."""
    return pack_rows(docs, seq_len).map(row_to_example)

"""Multi-query associative recall (MQAR), after Zoology (Arora et al. 2023).

One example is a row of seq_len + 1 tokens (n = num_kv_pairs, V = vocab_size):

    k1 v1 k2 v2 ... kn vn | 0 0 kj vj 0 0 ki vi ... 0
    '---- 2n tokens ------' '------- query region ---'

Keys are distinct draws from [1, V/2), values distinct draws from [V/2, V). The query region is
cut into S = (seq_len + 1 - 2n) // 2 two-token slots; each key is asked once, in its own slot,
followed by its value. Slot g (1-based, the "gap" after the key/value block) is chosen with
probability proportional to g^(power_a - 1), the power law of Zoology, so most queries come soon
after the context and a few come late. Every other token is 0.

As a Batch row: inputs = row[:T], targets = row[1:]; the model must predict v at the position of
the query key, so loss_mask is 1 there and 0 everywhere else (keys and values in the context
are random and unpredictable). One segment per row, positions 0..T-1.

Example i of a split is generated from (MQAR_SEED, split, i) alone, so the dataset is
random access and identical in every run; the iterator's seed only changes the order.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from train.config import MQARConfig

__all__ = ["MQAR_SEED", "num_query_slots", "gap_probabilities", "mqar_row", "MQARExamples"]

MQAR_SEED = 0x4D514152  # "MQAR": fixed so that train/eval sets do not depend on the run seed
_SPLIT_IDS = {"train": 0, "validation": 1}  # distinct seed streams: train and eval never share an rng


def num_query_slots(seq_len: int, num_kv_pairs: int) -> int:
    return (seq_len + 1 - 2 * num_kv_pairs) // 2


def gap_probabilities(num_slots: int, power_a: float) -> np.ndarray:
    """p[g - 1] ∝ g^(power_a - 1) for gaps g = 1..num_slots. float64 [num_slots], sums to 1."""
    g = np.arange(1, num_slots + 1, dtype=np.float64)
    p = g ** (power_a - 1.0)
    return p / p.sum()


def mqar_row(rng: np.random.Generator, seq_len: int, vocab_size: int, num_kv_pairs: int,
             gap_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One example: (tokens int32 [seq_len + 1], query_key_positions int64 [n], ascending)."""
    n, half = num_kv_pairs, vocab_size // 2
    keys = rng.choice(half - 1, size=n, replace=False) + 1
    values = rng.choice(vocab_size - half, size=n, replace=False) + half
    tokens = np.zeros(seq_len + 1, np.int32)
    tokens[0:2 * n:2] = keys
    tokens[1:2 * n:2] = values
    slots = rng.choice(len(gap_p), size=n, replace=False, p=gap_p)  # 0-based: gap = slot + 1
    query_pos = 2 * n + 2 * slots
    tokens[query_pos] = keys
    tokens[query_pos + 1] = values
    return tokens, np.sort(query_pos)


class MQARExamples:
    """Random-access MQAR split. [i] -> dict of inputs/targets/segment_ids/positions int32 [T]
    and loss_mask float32 [T]."""

    def __init__(self, cfg: MQARConfig, seq_len: int, split: Literal["train", "validation"]):
        self.cfg, self.seq_len, self.split = cfg, seq_len, split
        self._split_id = _SPLIT_IDS[split]
        self._len = cfg.num_train_examples if split == "train" else cfg.num_eval_examples
        self._gap_p = gap_probabilities(num_query_slots(seq_len, cfg.num_kv_pairs), cfg.power_a)

    def __len__(self) -> int:
        return self._len

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(row int32 [T + 1], query-key positions [n]) of example i."""
        if not 0 <= i < self._len:
            raise IndexError(f"MQAR {self.split} example {i} out of range [0, {self._len})")
        rng = np.random.default_rng([MQAR_SEED, self._split_id, int(i)])
        return mqar_row(rng, self.seq_len, self.cfg.vocab_size, self.cfg.num_kv_pairs, self._gap_p)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        row, query_pos = self.tokens(i)
        T = self.seq_len
        loss_mask = np.zeros(T, np.float32)
        loss_mask[query_pos] = 1.0
        return {
            "inputs": row[:T],
            "targets": row[1:],
            "segment_ids": np.ones(T, np.int32),
            "positions": np.arange(T, dtype=np.int32),
            "loss_mask": loss_mask,
        }

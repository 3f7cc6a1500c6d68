"""The `mqar` suite: recall accuracy over a grid of (key/value pairs, sequence length), trained
sizes and larger ones (Zoology's protocol).

Accuracy counts the answer positions only (the loss_mask of train.data.mqar.MQARExamples: the
value after each queried key), by argmax of the logits. Each cell uses NUM_EXAMPLES examples of
the validation split; seed s takes examples [s * N, (s + 1) * N), so seed 0 at the trained size
is the run's own eval set. The default grid (`default_grid`):

    num_kv_pairs in {n/2, n, 2n, 4n} x seq_len in {T, 2T}     (n, T: the run's data.mqar / data.seq_len)

keeping only cells where the example can be built: seq_len >= 4 * kv (room for every query)
and vocab_size >= 4 * kv (distinct keys and values).

Record: results = {"cells": [{num_kv_pairs, seq_len, examples, answers, correct, accuracy,
trained_len}], "num_examples", "trained": {num_kv_pairs, seq_len}, "vocab_size"};
summary = {"mqar/acc@kv<kv>_T<T>" per cell, "mqar/acc_mean" (cells at the trained length),
"mqar/acc_mean_all"}.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from train.config import Config, MQARConfig
from train.data.mqar import MQARExamples
from train.evals.common import logits_fn, make_record, pad_rows, require_mqar, rows_per_call

__all__ = ["NUM_EXAMPLES", "check", "default_grid", "cell_examples", "score_cell", "run"]

NUM_EXAMPLES = 256
# Rows per forward call; a multiple of 8 so that NUM_EXAMPLES splits without a ragged batch.
BATCH_ROWS = 64

# batch dict -> predicted next-token ids int [B, T] (argmax of the logits).
PredictFn = Callable[[dict], np.ndarray]


def check(cfg: Config) -> None:
    require_mqar(cfg, "mqar")


def default_grid(mqar: MQARConfig, seq_len: int) -> list[tuple[int, int]]:
    """[(num_kv_pairs, seq_len)] cells, sorted: kv in {n/2, n, 2n, 4n} x T in {T, 2T}, valid only."""
    n = mqar.num_kv_pairs
    kvs = sorted({max(1, n // 2), n, 2 * n, 4 * n})
    return [(kv, T) for T in (seq_len, 2 * seq_len) for kv in kvs
            if T >= 4 * kv and mqar.vocab_size >= 4 * kv]


def cell_examples(mqar: MQARConfig, num_kv_pairs: int, seq_len: int, num: int, seed: int) -> dict[str, np.ndarray]:
    """Validation examples [seed * num, (seed + 1) * num) of one cell, stacked: each key [num, T]."""
    cfg = dataclasses.replace(mqar, num_kv_pairs=num_kv_pairs, num_eval_examples=(seed + 1) * num)
    examples = MQARExamples(cfg, seq_len, "validation")
    rows = [examples[i] for i in range(seed * num, (seed + 1) * num)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def score_cell(predict: PredictFn, batch: dict[str, np.ndarray], rows: int) -> tuple[int, int]:
    """(correct, answers) over the answer positions (loss_mask == 1) of `batch` ([N, T] arrays),
    `rows` rows per predict call (the last call padded; the padding is not scored)."""
    correct = answers = 0
    n = len(batch["inputs"])
    for i in range(0, n, rows):
        part = {k: pad_rows(v[i:i + rows], min(rows, n)) for k, v in batch.items()}
        pred = np.asarray(predict(part))[:min(rows, n - i)]
        mask = part["loss_mask"][:len(pred)] > 0
        correct += int((pred == part["targets"][:len(pred)])[mask].sum())
        answers += int(mask.sum())
    return correct, answers


def _model_predict(model) -> PredictFn:
    logits = logits_fn(model)
    argmax = jax.jit(lambda x: jnp.argmax(x, axis=-1))
    return lambda batch: argmax(logits({k: jnp.asarray(v) for k, v in batch.items()}))


def evaluate_grid(predict: PredictFn, mqar: MQARConfig, trained_len: int, grid: list[tuple[int, int]],
                  num: int, seed: int) -> list[dict]:
    """One result dict per cell of `grid` (see the module docstring)."""
    cells = []
    for kv, T in grid:
        batch = cell_examples(mqar, kv, T, num, seed)
        correct, answers = score_cell(predict, batch, min(BATCH_ROWS, rows_per_call(T)))
        cells.append({"num_kv_pairs": kv, "seq_len": T, "examples": num, "answers": answers,
                      "correct": correct, "accuracy": correct / max(answers, 1), "trained_len": T == trained_len})
    return cells


def summarize(cells: list[dict]) -> dict[str, float]:
    summary = {f"mqar/acc@kv{c['num_kv_pairs']}_T{c['seq_len']}": c["accuracy"] for c in cells}
    trained = [c["accuracy"] for c in cells if c["trained_len"]]
    summary["mqar/acc_mean"] = float(np.mean(trained)) if trained else float("nan")
    summary["mqar/acc_mean_all"] = float(np.mean([c["accuracy"] for c in cells])) if cells else float("nan")
    return summary


def run(loaded, *, seed: int = 0, grid: list[tuple[int, int]] | None = None, num_examples: int = NUM_EXAMPLES,
        predict: PredictFn | None = None) -> dict:
    """The suite on a LoadedRun. `grid`, `num_examples` and `predict` (batch -> argmax ids
    [B, T]) replace the defaults, for tests and custom studies."""
    t0 = time.perf_counter()
    check(loaded.cfg)
    data = loaded.cfg.data
    grid = default_grid(data.mqar, data.seq_len) if grid is None else list(grid)
    predict = predict or _model_predict(loaded.model)
    cells = evaluate_grid(predict, data.mqar, data.seq_len, grid, num_examples, seed)
    results = {"cells": cells, "num_examples": num_examples, "vocab_size": data.mqar.vocab_size,
               "trained": {"num_kv_pairs": data.mqar.num_kv_pairs, "seq_len": data.seq_len}}
    return make_record("mqar", loaded, seed, t0, results, summarize(cells))

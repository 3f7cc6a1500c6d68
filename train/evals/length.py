"""The `length` suite: how loss, decode speed and cache memory change with context length.

For each factor k in FACTORS (1x, 2x, 4x the trained data.seq_len T):

  loss / bits per byte   on the run's validation batches with data.seq_len = k T (as
                         `python -m train.eval RUN data.seq_len=...` builds them), overall and
                         per position bucket: NUM_BUCKETS equal ranges of the token's position
                         in its document piece (the position the model sees), [0, k T).
                         Rows per batch: data.batch_size // k (at least 1), train.eval_batches
                         batches, so every length reads about the same number of tokens; at 1x
                         these are exactly the standard eval's batches, so the buckets add up
                         to its loss.
  decode_tok_s           batch-1 greedy one-token steps (train.generate.Decoder's step, one
                         host sync per token) at the last DECODE_TOKENS positions of a cache of
                         k T positions; the first two steps (the first compiles) not timed.
  cache_bytes            bytes of model.init_cache(1, k T): one sequence's decode state.

Record: results = {"train_seq_len", "num_buckets", "decode_tokens", "lengths": [{factor,
seq_len, rows, tokens, loss, bits_per_byte, accuracy, decode_tok_s, cache_bytes,
buckets: [{start, end, tokens, loss, bits_per_byte}]}]}; summary = {"length/loss@<k>x",
"length/bpb@<k>x", "length/bpb_last@<k>x" (the last bucket), "length/decode_tok_s@<k>x",
"length/cache_bytes@<k>x"}.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train.config import Config, DataConfig
from train.data import make_eval_batches
from train.evals.common import cache_nbytes, decode_step_fn, make_record, require_text, text_data

__all__ = ["FACTORS", "NUM_BUCKETS", "DECODE_TOKENS", "check", "length_data", "bucket_edges", "bucket_sums",
           "evaluate_buckets", "decode_tokens_per_s", "run"]

FACTORS = (1, 2, 4)
NUM_BUCKETS = 8
DECODE_TOKENS = 32
_SUMS = ("ce_sum", "tokens", "bytes", "correct")


def check(cfg: Config) -> None:
    require_text(cfg, "length")


def length_data(data: DataConfig, factor: int) -> DataConfig:
    """The data section for k = factor: seq_len k T, batch_size // k rows (at least 1)."""
    return dataclasses.replace(data, seq_len=factor * data.seq_len, batch_size=max(1, data.batch_size // factor))


def bucket_edges(seq_len: int, num_buckets: int) -> list[int]:
    """[num_buckets + 1] position edges: bucket j holds positions p with p * K // L == j."""
    return [-(-j * seq_len // num_buckets) for j in range(num_buckets + 1)]


def bucket_sums(graphdef, state, batch: dict, token_bytes, num_buckets: int) -> dict:
    """Sums per position bucket over the scored tokens of one batch ([B, L] arrays):
    ce_sum, tokens, bytes, correct, each float32 [num_buckets]."""
    model = nnx.merge(graphdef, state)
    logits, _ = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    targets = batch["targets"]
    # The same cross-entropy as models.lm_loss, so the bucket sums add up to the eval loss.
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    L = targets.shape[1]
    bucket = jnp.clip(batch["positions"] * num_buckets // L, 0, num_buckets - 1)
    # [B, L, K]: 1 where a scored token falls in bucket k.
    w = (bucket[..., None] == jnp.arange(num_buckets)) * batch["loss_mask"].astype(jnp.float32)[..., None]
    per_token = {"ce_sum": ce, "tokens": jnp.ones_like(ce), "bytes": token_bytes[targets].astype(jnp.float32),
                 "correct": (jnp.argmax(logits, -1) == targets).astype(jnp.float32)}
    return {k: jnp.einsum("bl,blk->k", v, w) for k, v in per_token.items()}


def _metrics(s: dict) -> dict:
    """tokens, loss, bits_per_byte, accuracy from sums; None where no token was scored."""
    tokens = float(s["tokens"])
    if tokens == 0:
        return {"tokens": 0.0, "loss": None, "bits_per_byte": None, "accuracy": None}
    return {"tokens": tokens, "loss": float(s["ce_sum"]) / tokens,
            "bits_per_byte": float(s["ce_sum"]) / math.log(2) / max(float(s["bytes"]), 1.0),
            "accuracy": float(s["correct"]) / tokens}


def _num(x) -> float:
    return math.nan if x is None else float(x)


def evaluate_buckets(model, batches: list[dict], token_bytes: np.ndarray, num_buckets: int = NUM_BUCKETS) -> dict:
    """Overall metrics (tokens, loss, bits_per_byte, accuracy) and a list of per-bucket
    {start, end, tokens, loss, bits_per_byte} over `batches` (all of one shape [B, L])."""
    graphdef, state = nnx.split(model)
    step = jax.jit(functools.partial(bucket_sums, graphdef), static_argnums=(3,))
    tb = jnp.asarray(token_bytes)
    sums = {k: np.zeros(num_buckets) for k in _SUMS}
    for batch in batches:
        out = jax.device_get(step(state, batch, tb, num_buckets))
        for k in _SUMS:
            sums[k] += np.asarray(out[k], np.float64)
    edges = bucket_edges(batches[0]["inputs"].shape[1], num_buckets)
    buckets = []
    for j in range(num_buckets):
        m = _metrics({k: sums[k][j] for k in _SUMS})
        buckets.append({"start": edges[j], "end": edges[j + 1], "tokens": m["tokens"], "loss": m["loss"],
                        "bits_per_byte": m["bits_per_byte"]})
    return {**_metrics({k: sums[k].sum() for k in _SUMS}), "buckets": buckets}


def decode_tokens_per_s(model, seq_len: int, num_tokens: int) -> float | None:
    """Greedy batch-1 decode speed (tokens/s) at the end of a cache of seq_len positions:
    num_tokens one-token steps (train.generate.Decoder's step, a host sync per token as the
    generate command does) at positions seq_len - num_tokens .., the first two (the first
    compiles) not timed. None when fewer than 3 steps fit.

    The cache starts empty rather than holding a prefilled prompt: caches have a fixed size, so
    a step costs the same either way, and no prefill has to be compiled per length."""
    if num_tokens < 3 or num_tokens > seq_len:
        return None
    step = decode_step_fn(model)
    cache = model.init_cache(1, seq_len)
    token = jnp.zeros((1,), jnp.int32)
    start = seq_len - num_tokens
    for position in range(start, seq_len):
        if position == start + 2:
            t0 = time.perf_counter()
        token, cache = step(token, jnp.int32(position), cache)
        token = np.asarray(token)
    return (num_tokens - 2) / (time.perf_counter() - t0)


def run(loaded, *, seed: int = 0, factors=FACTORS, num_buckets: int = NUM_BUCKETS,
        decode_tokens: int = DECODE_TOKENS) -> dict:
    """The suite on a LoadedRun. The data are the fixed validation batches: `seed` is recorded
    but changes nothing."""
    t0 = time.perf_counter()
    check(loaded.cfg)
    data = text_data(loaded.cfg, loaded.run_dir)
    token_bytes = loaded.tokenizer.token_bytes
    lengths = []
    for k in factors:
        dk = length_data(data, k)
        batches = make_eval_batches(dk, loaded.cfg.train.eval_batches)
        entry = {"factor": k, "seq_len": dk.seq_len, "rows": sum(len(b["inputs"]) for b in batches),
                 **evaluate_buckets(loaded.model, batches, token_bytes, num_buckets)}
        entry["decode_tok_s"] = decode_tokens_per_s(loaded.model, dk.seq_len, min(decode_tokens, dk.seq_len))
        entry["cache_bytes"] = cache_nbytes(loaded.model, 1, dk.seq_len)
        lengths.append(entry)
    summary = {}
    for e in lengths:
        k = e["factor"]
        summary.update({f"length/loss@{k}x": _num(e["loss"]), f"length/bpb@{k}x": _num(e["bits_per_byte"]),
                        f"length/bpb_last@{k}x": _num(e["buckets"][-1]["bits_per_byte"]),
                        f"length/decode_tok_s@{k}x": _num(e["decode_tok_s"]),
                        f"length/cache_bytes@{k}x": e["cache_bytes"]})
    results = {"train_seq_len": loaded.cfg.data.seq_len, "num_buckets": num_buckets, "decode_tokens": decode_tokens,
               "lengths": lengths}
    return make_record("length", loaded, seed, t0, results, summary)

"""Pieces shared by the eval suites: applicability checks, the run's own data, jitted forward
and greedy decoding, cache sizes, and the record every suite returns.

    gen = greedy_generator(run.model)
    new_ids = gen(prompts, 6)                 # prompts int32 [B, n] -> int32 [B, 6]
    rec = make_record("niah", run, seed, t0, results, summary)

Nothing here knows about a particular suite.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.config import Config, ConfigError, DataConfig

__all__ = ["require_text", "require_mqar", "text_data", "make_record", "logits_fn", "greedy_generator",
           "GenerateFn", "decode_step_fn", "cache_nbytes", "pad_rows", "rows_per_call"]

# Prompt ids int32 [B, n] and a number of new tokens m -> greedy continuation int32 [B, m].
GenerateFn = Callable[[np.ndarray, int], np.ndarray]

# Rows x positions of one forward call: bounds the [B, T, V] logits (64k x V x 4 bytes) whatever
# the batch a caller asks for.
MAX_TOKENS_PER_CALL = 65536
# Prompt tokens per cached forward call during prefill (see _prefill).
PREFILL_CHUNK = 128


# ----------------------------------------------------------------------------- applicability

def require_text(cfg: Config, suite: str) -> None:
    """ConfigError (one line) unless the run was trained on text."""
    if cfg.data.source == "mqar":
        raise ConfigError(f"suite {suite!r} needs a model trained on text (data.source stdlib, files or tfds); "
                          "this run was trained on mqar, which has no text (use --suite mqar)")


def require_mqar(cfg: Config, suite: str) -> None:
    """ConfigError (one line) unless the run was trained on MQAR."""
    if cfg.data.source != "mqar":
        raise ConfigError(f"suite {suite!r} needs a model trained on data.source=mqar; this run was trained on "
                          f"{cfg.data.source!r} text (use --suite niah or length)")


def text_data(cfg: Config, run_dir) -> DataConfig:
    """The run's data section, reading its tokenizer from the copy saved in the run directory
    (the original data.tokenizer path may have moved since training)."""
    data = cfg.data
    if data.tokenizer != "byte":
        data = dataclasses.replace(data, tokenizer=str(run_dir))
    return data


# ----------------------------------------------------------------------------- record

def make_record(suite: str, loaded, seed: int, t0: float, results: dict, summary: dict) -> dict:
    """The JSON record of one suite. `summary` is flat: metric name -> float; metrics that
    could not be measured (NaN: e.g. every cell of a task skipped) are left out, since JSON has
    no NaN and a report table shows a missing key as blank."""
    flat = {k: float(v) for k, v in summary.items() if math.isfinite(float(v))}
    return {"suite": suite, "step": int(loaded.step), "seed": int(seed),
            "elapsed_s": round(time.perf_counter() - t0, 3), "results": results, "summary": flat}


# ----------------------------------------------------------------------------- batching

def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x [b, ...] with b <= rows -> [rows, ...], the extra rows copies of the last one (so a
    short final chunk keeps the compiled shape; callers drop the copies' results)."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])


def _chunked(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, chunk: int) -> np.ndarray:
    """fn over x [N, ...] in chunks of `chunk` rows (the last padded), results concatenated [N, ...]."""
    out = []
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk]
        out.append(np.asarray(fn(pad_rows(part, min(chunk, len(x)))))[:len(part)])
    return np.concatenate(out)


def rows_per_call(seq_len: int) -> int:
    return max(1, MAX_TOKENS_PER_CALL // max(seq_len, 1))


# ----------------------------------------------------------------------------- model calls

def _merge_call(graphdef, state, tokens, positions, cache=None):
    """tokens, positions [B, T] -> (logits [B, T, V] float32, cache); one document per row."""
    model = nnx.merge(graphdef, state)
    return model(tokens, positions=positions, segment_ids=jnp.ones_like(tokens), cache=cache)


def logits_fn(model: nnx.Module) -> Callable:
    """Jitted `f(batch) -> logits [B, T, V]` for a Batch dict (inputs, positions, segment_ids)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, inputs, positions, segment_ids):
        return nnx.merge(graphdef, state)(inputs, positions=positions, segment_ids=segment_ids)[0]

    return lambda batch: f(state, batch["inputs"], batch["positions"], batch["segment_ids"])


def _prefill(graphdef, state, prompts, cache, chunk: int):
    """Feed prompts [B, n] into `cache` in pieces: n // chunk whole chunks (one scan), then the
    remainder. -> (logits of the last position [B, V], cache).

    Why pieces: one big cached call attends from n queries to all n + cache keys densely; chunks
    of `chunk` queries cost about half on CPU (measured 2.1x at 60 x 512 on the tiny preset) and
    bound the score matrix. Whole chunks come first so that recurrent memories stay on their
    chunk grid (layers/memory/decode.prefill runs grid-aligned chunks in parallel)."""
    B, n = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), prompts.shape)
    whole = n - n % chunk
    last = None
    if whole:
        def body(cache, piece):
            tokens, pos = piece
            logits, cache = _merge_call(graphdef, state, tokens, pos, cache)
            return cache, logits[:, -1]

        # [B, whole] -> [whole // chunk, B, chunk]: the scan runs over the leading axis.
        split = lambda a: a[:, :whole].reshape(B, whole // chunk, chunk).transpose(1, 0, 2)
        cache, lasts = jax.lax.scan(body, cache, (split(prompts), split(positions)))
        last = lasts[-1]
    if whole < n:
        logits, cache = _merge_call(graphdef, state, prompts[:, whole:], positions[:, whole:], cache)
        last = logits[:, -1]
    return last, cache


def _greedy(graphdef, state, prompts, max_new: int, chunk: int):
    """Prefill prompts [B, n] into a fresh cache, then max_new - 1 greedy steps in one scan.
    -> int32 [B, max_new]. The whole decode is one XLA program: no host round trip per token."""
    B, n = prompts.shape
    cache = nnx.merge(graphdef, state).init_cache(B, n + max_new)
    last, cache = _prefill(graphdef, state, prompts, cache, chunk)
    first = jnp.argmax(last, axis=-1).astype(jnp.int32)

    def step(carry, position):
        token, cache = carry
        tokens = token[:, None]
        logits, cache = _merge_call(graphdef, state, tokens, jnp.full(tokens.shape, position, jnp.int32), cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return (nxt, cache), nxt

    _, rest = jax.lax.scan(step, (first, cache), n + jnp.arange(max_new - 1, dtype=jnp.int32))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def greedy_generator(model: nnx.Module, prefill_chunk: int = PREFILL_CHUNK) -> GenerateFn:
    """`gen(prompts int32 [B, n], max_new) -> int32 [B, max_new]`, greedy (argmax) decoding
    through the model's decode caches: the tokens of train.generate's Decoder at temperature 0,
    with the prompt fed in chunks of `prefill_chunk`. Compiles once per (rows, n, max_new);
    large batches are split into calls of at most MAX_TOKENS_PER_CALL prompt tokens."""
    graphdef, state = nnx.split(model)
    run = jax.jit(functools.partial(_greedy, graphdef), static_argnums=(2, 3))

    def gen(prompts: np.ndarray, max_new: int) -> np.ndarray:
        prompts = np.asarray(prompts, np.int32)
        if max_new < 1:
            raise ValueError(f"max_new must be >= 1, got {max_new}")
        return _chunked(lambda p: run(state, jnp.asarray(p), max_new, prefill_chunk), prompts,
                        rows_per_call(prompts.shape[1]))

    return gen


def decode_step_fn(model: nnx.Module) -> Callable:
    """Jitted greedy one-token step, as train.generate.Decoder's: `step(token [B], position,
    cache) -> (next token [B], cache)`, the cache donated (updated in place)."""
    graphdef, state = nnx.split(model)

    def step(state, token, position, cache):
        tokens = token[:, None]
        logits, cache = _merge_call(graphdef, state, tokens, jnp.full(tokens.shape, position, jnp.int32), cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    jitted = jax.jit(step, donate_argnums=(3,))
    return lambda token, position, cache: jitted(state, token, position, cache)


def cache_nbytes(model: nnx.Module, batch: int, max_len: int) -> int:
    """Bytes of model.init_cache(batch, max_len), from shapes only (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(shapes)))

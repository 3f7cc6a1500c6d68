"""A KV cache for softmax attention, optionally a ring buffer (sliding window).

The cache stores, per slot, k/v plus the segment id and position of the token held there
(segment 0 = empty). Attention masks by positions and segments only, so slot order does not
matter and a sliding-window layer needs just `window` slots, overwritten in ring order.

A full-attention cache must be made big enough for every token it will see (`init_cache`'s
max_len): writing more wraps it like a ring, which silently turns it into a window. Nothing
inside jit can raise on that, so the caller sizes it (train/generate.py uses prompt + new tokens).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def init_kv_cache(batch: int, size: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """Empty cache: k, v [B, S, Hkv, D]; segment_ids, positions [B, S]; index () next write."""
    return {
        "k": jnp.zeros((batch, size, kv_heads, head_dim), dtype),
        "v": jnp.zeros((batch, size, kv_heads, head_dim), dtype),
        "segment_ids": jnp.zeros((batch, size), jnp.int32),
        "positions": jnp.zeros((batch, size), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def kv_cache_update(cache: dict, k, v, segment_ids, positions):
    """Append T new tokens. Returns (keys to attend to, new cache).

    k, v: [B, T, Hkv, D]; segment_ids, positions: [B, T]. The keys to attend to are the old
    cache followed by the new tokens ([B, S + T, ...]), so a prefill longer than a ring buffer
    still sees all of its own tokens; the new cache keeps the last S of them.

    One token (a decode step): written in place at slot index % S, and the keys to attend to
    are the updated cache itself ([B, S, ...]): no copy of the cache per token. The slot it
    overwrites held the token S steps back, which a ring of S = window slots no longer shows
    to this query (and a full cache holds nothing there), so the keys are the same set.
    """
    size = cache["k"].shape[1]
    t = k.shape[1]
    if t == 1:
        slot = cache["index"] % size
        new = {"index": cache["index"] + 1}
        for name, val in (("k", k), ("v", v), ("segment_ids", segment_ids),
                          ("positions", positions)):
            new[name] = jax.lax.dynamic_update_slice_in_dim(
                cache[name], val.astype(cache[name].dtype), slot, axis=1)
        return {n: new[n] for n in ("k", "v", "segment_ids", "positions")}, new
    keys = {
        "k": jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1),
        "v": jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1),
        "segment_ids": jnp.concatenate([cache["segment_ids"], segment_ids.astype(jnp.int32)], axis=1),
        "positions": jnp.concatenate([cache["positions"], positions.astype(jnp.int32)], axis=1),
    }
    keep = min(t, size)  # only the last `size` new tokens can survive in the cache
    slots = (cache["index"] + (t - keep) + jnp.arange(keep)) % size
    new = {name: cache[name].at[:, slots].set(keys[name][:, -keep:]) for name in keys}
    new["index"] = cache["index"] + t
    return keys, new

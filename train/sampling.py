"""Next-token sampling as pure functions: greedy, temperature, top-k, top-p (nucleus).

    settings = SamplingSettings(temperature=0.8, top_k=40, top_p=0.95)   # validated here
    token = sample(key, logits, settings)          # logits [B, V] -> token ids int32 [B]

Order of the filters (as in most LM toolkits): divide by the temperature, keep the k largest
logits, then keep the smallest prefix of those (sorted by probability) whose mass reaches p.
Temperature 0 is greedy: the argmax, with no randomness (the key is ignored).

The settings are Python values, static under `jax.jit`: one compile per setting, and no branch
on traced values. Everything here is jit-able and works on any batch of rows; one key serves a
whole batch (`jax.random.categorical` draws independently per row).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

__all__ = ["SamplingSettings", "top_k_filter", "top_p_filter", "sample", "describe"]


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """temperature >= 0 (0 = greedy); top_k None or >= 1; top_p in (0, 1] (1 = no filter)."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None (no limit), got {k!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def describe(s: SamplingSettings) -> str:
    """One line for logs: "greedy" or "temperature 0.8, top_k 40, top_p 0.95"."""
    if s.greedy:
        return "greedy (temperature 0)"
    parts = [f"temperature {s.temperature:g}"]
    if s.top_k is not None:
        parts.append(f"top_k {s.top_k}")
    if s.top_p < 1.0:
        parts.append(f"top_p {s.top_p:g}")
    return ", ".join(parts)


def top_k_filter(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest logits of each row, sorted descending, and their token ids.

    logits [B, V] -> (values [B, k'], ids int32 [B, k']) with k' = min(k, V). Returning the ids
    (rather than masking the rest to -inf) keeps exactly k candidates even when logits tie.
    """
    k = min(int(k), logits.shape[-1])
    values, ids = jax.lax.top_k(logits, k)
    return values, ids.astype(jnp.int32)


def top_p_filter(sorted_logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter on logits sorted descending along the last axis: the smallest prefix
    whose probability mass reaches p stays, the rest becomes -inf. The first (most likely)
    token always stays, so at least one candidate survives for any p in (0, 1].

    sorted_logits [B, n] -> [B, n] float32.
    """
    x = sorted_logits.astype(jnp.float32)
    probs = jax.nn.softmax(x, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly better tokens
    keep = mass_before < p
    keep = keep.at[..., 0].set(True)  # exact even if rounding made mass_before[0] != 0
    return jnp.where(keep, x, -jnp.inf)


def sample(key: jax.Array, logits: jax.Array, settings: SamplingSettings) -> jax.Array:
    """Draw one token id per row. logits [B, V] (any float dtype) -> int32 [B]."""
    logits = logits.astype(jnp.float32)
    if settings.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits / settings.temperature
    if settings.top_k is None and settings.top_p >= 1.0:
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
    # top-p needs the candidates sorted; top_k with k = V is a full sort.
    values, ids = top_k_filter(x, settings.top_k or x.shape[-1])
    if settings.top_p < 1.0:
        values = top_p_filter(values, settings.top_p)
    choice = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(ids, choice[..., None], axis=-1)[..., 0]

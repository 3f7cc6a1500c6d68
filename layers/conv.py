"""Short depthwise causal convolution over time, document-aware, with a decode cache.

    y_t[c] = b[c] + sum_{j=0}^{W-1} w[j, c] * x_{t-j}[c]      (x_{t-j} counts only if it is a
                                                            non-padding token of t's document)

Linear-attention mixers (Mamba2's x/B/C path, optional q/k/v convolutions of GLA, RetNet, ...)
use it to give each token a little local context before the recurrence. A token never sees a
token of another document, so a packed row computes every document exactly as if it were alone
(zero left padding at each document start). Documents follow the convention of the
chunked-linear-attention op (`pallas_kernels/chunked_linear_attention/common.py`): a change to a
nonzero segment id starts a new document; id 0 is padding.

Decode cache: the last W - 1 inputs and their segment ids, so a chunk of new tokens continues
the convolution exactly (and a new document arriving mid-decode does not see the old one).

Shapes: B batch, T time, C channels, W kernel width.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.sharding import param
from pallas_kernels.chunked_linear_attention.common import resets


def init_conv_cache(batch: int, width: int, channels: int, dtype) -> dict:
    """Empty history: x [B, W-1, C] zeros, segment_ids [B, W-1] zeros (padding: never seen)."""
    return {"x": jnp.zeros((batch, width - 1, channels), dtype),
            "segment_ids": jnp.zeros((batch, width - 1), jnp.int32)}


ACTIVATIONS = {None: None, "silu": jax.nn.silu}


def causal_conv1d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, segment_ids: jax.Array,
                  cache: dict | None = None, activation: str | None = None) -> tuple[jax.Array, dict | None]:
    """Depthwise causal convolution of x [B, T, C] with kernel [W, C] (tap j multiplies x_{t-j}),
    then `activation` (None or "silu") if given.

    segment_ids [B, T] int. cache: None (the row starts here) or {"x": [B, W-1, C],
    "segment_ids": [B, W-1]} holding the tokens just before x. Returns (y [B, T, C] in x.dtype,
    new cache or None). The gradient is hand-written (`_conv`): the backward pass saves only the
    input and recomputes the convolution, where autodiff kept every tap's masked shifted copy
    and mask (13 arrays of the input's size at W = 4).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"conv activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    b, t, c = x.shape
    w = kernel.shape[0]
    hist = w - 1
    if cache is None:
        hx = jnp.zeros((b, hist, c), x.dtype)
        hs = jnp.zeros((b, hist), jnp.int32)
    else:
        hx, hs = cache["x"].astype(x.dtype), cache["segment_ids"].astype(jnp.int32)
    xe = jnp.concatenate([hx, x], axis=1)  # [B, W-1+T, C]
    se = jnp.concatenate([hs, segment_ids.astype(jnp.int32)], axis=1)
    doc = jnp.cumsum(resets(se).astype(jnp.int32), axis=1)  # document number per token
    valid = se != 0
    # seen[j, b, t]: x_{t-j} is a non-padding token of t's document. [W, B, T]: no channel dim.
    seen = jnp.stack([valid[:, hist - j:hist - j + t] & (doc[:, hist - j:hist - j + t] == doc[:, hist:])
                      for j in range(w)])
    bias = jnp.zeros((c,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    y = _conv(activation, xe, kernel.astype(x.dtype), bias, seen)
    new_cache = None
    if cache is not None:
        new_cache = {"x": xe[:, xe.shape[1] - hist:].astype(cache["x"].dtype),
                     "segment_ids": se[:, se.shape[1] - hist:]}
    return y, new_cache


def _shifted(xe: jax.Array, j: int, t: int) -> jax.Array:
    """x_{t-j} for t in [0, T): xe [B, W-1+T, C] holds W-1 history tokens first."""
    hist = xe.shape[1] - t
    return xe[:, hist - j:hist - j + t]


def _pre_activation(xe, kern, bias, seen):
    """z [B, T, C] float32 = bias + sum_j seen_j * x_{t-j} * kern[j]. W is 2..4: a few shifted
    multiply-adds (one fusion) beat a generic conv on CPU."""
    t = seen.shape[2]
    z = jnp.zeros(xe.shape[:1] + (t, xe.shape[2]), jnp.float32) + bias
    for j in range(kern.shape[0]):
        z = z + jnp.where(seen[j][..., None], _shifted(xe, j, t) * kern[j], 0).astype(jnp.float32)
    return z


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(activation, xe, kern, bias, seen):
    """y [B, T, C] in xe.dtype = act(z), z = `_pre_activation`."""
    z = _pre_activation(xe, kern, bias, seen)
    act = ACTIVATIONS[activation]
    return (z if act is None else act(z)).astype(xe.dtype)


def _conv_fwd(activation, xe, kern, bias, seen):
    return _conv(activation, xe, kern, bias, seen), (xe, kern, bias, seen)


def _conv_bwd(activation, res, dy):
    xe, kern, bias, seen = res
    w, t = kern.shape[0], seen.shape[2]
    hist = xe.shape[1] - t
    dz = dy.astype(jnp.float32)
    if activation == "silu":  # silu'(z) = s (1 + z (1 - s)), s = sigmoid(z): z recomputed
        z = _pre_activation(xe, kern, bias, seen)
        s = jax.nn.sigmoid(z)
        dz = dz * s * (1.0 + z * (1.0 - s))
    masked = [jnp.where(seen[j][..., None], dz, 0.0) for j in range(w)]  # dz_t where x_{t-j} counts
    # x_{t-j} feeds z_t through kern[j]: dxe at index (hist - j + t) gets masked_j[t] * kern[j].
    dxe = sum(jnp.pad(masked[j] * kern[j].astype(jnp.float32), ((0, 0), (hist - j, j), (0, 0)))
              for j in range(w))
    dkern = jnp.stack([jnp.sum(masked[j] * _shifted(xe, j, t).astype(jnp.float32), axis=(0, 1))
                       for j in range(w)])
    return dxe.astype(xe.dtype), dkern.astype(kern.dtype), jnp.sum(dz, axis=(0, 1)), None


_conv.defvjp(_conv_fwd, _conv_bwd)


class CausalConv1d(nnx.Module):
    """Depthwise causal conv1d over time (see module docstring); kernel [W, C] float32.

    Initialised like PyTorch's Conv1d (uniform in +-1/sqrt(fan_in), fan_in = W for depthwise);
    the bias starts at zero. `axes` names the channel dim for sharding (e.g. "heads").
    """

    def __init__(self, channels: int, width: int, *, bias: bool = True, axes: str | None = "heads",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if width < 2:
            raise ValueError(f"conv width must be >= 2, got {width}")
        bound = 1.0 / math.sqrt(width)
        self.kernel = param(jax.random.uniform(rngs.params(), (width, channels), jnp.float32, -bound, bound),
                            (None, axes))
        self.bias = param(jnp.zeros((channels,), jnp.float32), (axes,)) if bias else None
        self.width, self.channels, self.dtype = width, channels, dtype

    def __call__(self, x: jax.Array, segment_ids: jax.Array, cache: dict | None = None,
                 activation: str | None = None):
        """x [B, T, C] -> (act(conv(x)) [B, T, C], new cache or None); activation None or "silu"
        (fused: the backward pass recomputes the conv rather than keeping its output)."""
        return causal_conv1d(x.astype(self.dtype), self.kernel[...],
                             None if self.bias is None else self.bias[...], segment_ids, cache,
                             activation)

    def init_cache(self, batch: int, dtype) -> dict:
        return init_conv_cache(batch, self.width, self.channels, dtype)

    def flops_per_token(self) -> float:
        return 2.0 * self.width * self.channels

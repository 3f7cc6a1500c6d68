"""Score options shared by the softmax-attention ops (pallas_kernels/attention and
pallas_kernels/block_sparse_attention), checked the same way by both:

    score         "softmax", or "sigmoid": weights sigmoid(s + sigmoid_bias) per visible key
    sigmoid_bias  a static finite Python float, used (and allowed non-zero) only with sigmoid
    sinks         None, or float [H]: one learned logit per query head in the softmax
                  denominator (softmax only)
"""
from __future__ import annotations

import math
import numbers

import jax.numpy as jnp

SCORES = ("softmax", "sigmoid")


def check_score_options(score, sigmoid_bias, sinks, heads: int) -> None:
    """Raise ValueError naming the argument when the score options are impossible for `heads`
    query heads."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
    if not isinstance(sigmoid_bias, numbers.Real) or isinstance(sigmoid_bias, bool) \
            or not math.isfinite(sigmoid_bias):
        raise ValueError(f"sigmoid_bias must be a finite Python float (static), got "
                         f"{sigmoid_bias!r}")
    if score == "softmax" and sigmoid_bias != 0:
        raise ValueError(f"sigmoid_bias={sigmoid_bias} is only used with score='sigmoid'")
    if sinks is None:
        return
    if score == "sigmoid":
        raise ValueError("sinks only exist for score='softmax' (a sink joins the softmax "
                         "denominator; sigmoid weights have none)")
    dtype = getattr(sinks, "dtype", None)
    if tuple(getattr(sinks, "shape", ())) != (heads,) or dtype is None \
            or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"sinks must be a float array [H] = [{heads}] (one logit per query "
                         f"head); got {getattr(sinks, 'dtype', type(sinks).__name__)}"
                         f"{list(getattr(sinks, 'shape', ()))}")

"""layers/conv.py: the short causal conv against a loop over tokens, its hand-written gradient
against autodiff of that loop, and what its backward pass keeps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from layers.conv import causal_conv1d


def loop_conv(x, kernel, bias, seg, activation, hist_x=None, hist_seg=None):
    """The module docstring's equation token by token: y_t = act(b + sum_j w_j x_{t-j}), x_{t-j}
    counted only if it is a non-padding token of t's document (a change to a nonzero id starts a
    document; padding, id 0, stays in the document before it)."""
    if hist_x is not None:
        x = jnp.concatenate([hist_x, x], axis=1)
        seg = jnp.concatenate([hist_seg, seg], axis=1)
    h = 0 if hist_x is None else hist_x.shape[1]
    b, t_all, c = x.shape
    w = kernel.shape[0]
    rows = []
    for r in range(b):
        start = [0] * t_all  # first index of each token's document
        for i in range(1, t_all):
            same = int(seg[r, i]) in (0, int(seg[r, i - 1]))
            start[i] = start[i - 1] if same else i
        out = []
        for i in range(h, t_all):
            acc = jnp.zeros((c,), jnp.float32) + (0.0 if bias is None else bias)
            for j in range(w):
                s = i - j
                if s >= 0 and int(seg[r, s]) != 0 and start[s] == start[i]:
                    acc = acc + kernel[j] * x[r, s]
            out.append(jax.nn.silu(acc) if activation == "silu" else acc)
        rows.append(jnp.stack(out))
    return jnp.stack(rows)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_cache", [False, True])
def test_conv_matches_the_token_loop_and_its_gradients(activation, with_cache):
    rng = np.random.default_rng(0)
    b, t, c, w = 2, 11, 3, 4
    x = jnp.asarray(rng.normal(size=(b, t, c)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(w, c)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(c,)), jnp.float32)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6]], jnp.int32)
    cache = None
    if with_cache:  # history: row 0 continues document 1 after padding-free tokens, row 1 starts anew
        cache = {"x": jnp.asarray(rng.normal(size=(b, w - 1, c)), jnp.float32),
                 "segment_ids": jnp.asarray([[1, 1, 1], [4, 4, 4]], jnp.int32)}
    hx, hs = (cache["x"], cache["segment_ids"]) if cache else (None, None)

    y, new_cache = causal_conv1d(x, kernel, bias, seg, cache, activation)
    np.testing.assert_allclose(y, loop_conv(x, kernel, bias, seg, activation, hx, hs), rtol=1e-5, atol=1e-5)
    if with_cache:
        np.testing.assert_array_equal(new_cache["x"], x[:, -(w - 1):])

    ct = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    ours = jax.grad(lambda *a: jnp.sum(causal_conv1d(a[0], a[1], a[2], seg, cache, activation)[0] * ct),
                    argnums=(0, 1, 2))(x, kernel, bias)
    ref = jax.grad(lambda *a: jnp.sum(loop_conv(a[0], a[1], a[2], seg, activation, hx, hs) * ct),
                   argnums=(0, 1, 2))(x, kernel, bias)
    for a, r in zip(ours, ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_backward_keeps_only_the_input():
    """No per-tap shifted copy or [B, T, C] mask is saved: at most the input itself (and the
    [W, B, T] masks, which have no channel dim)."""
    b, t, c, w = 1, 64, 32, 4
    x = jnp.ones((b, t, c), jnp.float32)
    kernel, seg = jnp.ones((w, c), jnp.float32), jnp.ones((b, t), jnp.int32)
    res = saved_residuals(lambda x, k: jnp.sum(causal_conv1d(x, k, None, seg, None, "silu")[0]), x, kernel)
    big = [aval for aval, _ in res if np.prod(aval.shape) >= b * t * c]
    assert len(big) <= 1, big


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="conv activation"):
        causal_conv1d(jnp.ones((1, 4, 2)), jnp.ones((2, 2)), None, jnp.ones((1, 4), jnp.int32), None, "relu")

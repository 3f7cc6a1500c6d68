"""Pallas Triton chunked linear attention (pallas_kernels/chunked_linear_attention/gpu.py).

Two kinds of checks, both on a CPU-only host:
* numerics in Pallas interpret mode against the token-by-token reference, forward and
  gradients of every input (one jitted fwd+vjp per case, random cotangents on o and the final
  state): per-head, per-channel and no decay, GQA, ragged T, packed segments with padding,
  initial state, bf16 inputs, extreme per-channel decays;
* lowering of forward and backward for a real H100 Triton target through an abstract device
  (pallas_kernels/lowering.py), which runs the Pallas -> Triton IR lowering and so catches
  what interpret mode cannot (non-power-of-two arrays, primitives without a Triton rule).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch, lowering
from pallas_kernels.chunked_linear_attention import api, gpu, reference

F32 = jnp.float32
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


def _inputs(*, b=2, t=45, h=4, g=2, dk=16, dv=16, decay="scalar", dtype=F32, s0=True,
            segments=True, seed=0):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(b, t, h, dk), dtype)
    k = jnp.asarray(r.randn(b, t, g, dk), dtype)
    v = jnp.asarray(r.randn(b, t, g, dv), dtype)
    log_decay = {"none": None,
                 "scalar": -jnp.asarray(r.rand(b, t, h) * 0.7, F32),
                 "vector": -jnp.asarray(r.rand(b, t, h, dk) * 0.7, F32)}[decay]
    state = jnp.asarray(r.randn(b, h, dk, dv), F32) if s0 else None
    seg = None
    if segments:
        # Row 0: leading padding, three documents, trailing padding. Row 1: one document
        # after a padding gap mid-row (so the initial state meets a reset and padding).
        ids = np.ones((b, t), np.int32)
        ids[0, :3] = 0
        ids[0, 10:25] = 2
        ids[0, 25:] = 3
        ids[0, -4:] = 0
        ids[1, 20:23] = 0
        seg = jnp.asarray(ids)
    return (q, k, v, log_decay, state), seg


def _fwd_vjp(fn, args, seg, *, chunk, seed=1):
    """jit(o, final state and the vjp of (o, state) with random cotangents) of fn."""
    def run(*args):
        (o, s), vjp = jax.vjp(lambda *a: fn(*a, seg, scale=0.3, chunk_size=chunk), *args)
        r = np.random.RandomState(seed)
        do = jnp.asarray(r.randn(*o.shape), F32).astype(o.dtype)
        ds = jnp.asarray(r.randn(*s.shape), F32)
        return o, s, vjp((do, ds))
    return jax.jit(run)(*args)


def _assert_close(name, got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.isfinite(got).all(), name
    err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
    assert err <= tol, f"{name}: max error {err:.2e} (relative to max |ref|) > {tol}"


def _check(args, seg, *, chunk, tol):
    gpu_fn = lambda *a, **kw: gpu.chunked_linear_attention(*a, interpret=True, **kw)
    o, s, grads = _fwd_vjp(gpu_fn, args, seg, chunk=chunk)
    ref_args = tuple(None if a is None else a.astype(F32) for a in args)
    o_ref, s_ref, grads_ref = _fwd_vjp(reference.chunked_linear_attention, ref_args, seg,
                                       chunk=chunk)
    assert o.dtype == args[0].dtype and s.dtype == F32
    _assert_close("o", o, o_ref, tol)
    _assert_close("final_state", s, s_ref, tol)
    for name, a, got, want in zip(("dq", "dk", "dv", "dlog_decay", "dinitial_state"), args,
                                  grads, grads_ref):
        if a is None:
            continue
        assert got.dtype == a.dtype, (name, got.dtype, a.dtype)
        _assert_close(name, got, want, tol)


# The conformance suite (test_chunked_linear_attention.py) covers the common cases in the
# default tier; the ones it shares are `slow` here.
@pytest.mark.parametrize("decay,chunk,kw", [
    pytest.param("scalar", 16, dict(), marks=pytest.mark.slow),   # GQA, segments, s0, T=45
    ("vector", 32, dict()),                                       # per-channel, same features
    pytest.param("none", 64, dict(t=70, h=2, g=2, dk=32, segments=False),
                 marks=pytest.mark.slow),                         # plain linear attention
    ("scalar", 32, dict(t=70, h=2, g=1, dv=32, s0=False)),       # MQA, V != K, no state
])
def test_matches_reference_fp32(decay, chunk, kw):
    args, seg = _inputs(decay=decay, **kw)
    _check(args, seg, chunk=chunk, tol=2e-5)


@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_matches_reference_bf16(decay):
    args, seg = _inputs(decay=decay, dtype=jnp.bfloat16, t=40, h=2, g=1)
    _check(args, seg, chunk=16, tol=2e-2)


def test_extreme_per_channel_decay_stays_exact():
    """Log decays down to -300 in one step: every exponent stays <= 0 (no inf / nan) and the
    result matches the reference up to fp32 rounding of the chunk-local cumulative decay."""
    r = np.random.RandomState(3)
    b, t, h, d = 1, 40, 2, 16
    q, k, v = (jnp.asarray(r.randn(b, t, h, d), F32) for _ in range(3))
    g = -jnp.asarray(np.where(r.rand(b, t, h, d) < 0.2, 300 * r.rand(b, t, h, d),
                              0.3 * r.rand(b, t, h, d)), F32)
    f = lambda impl, **kw: (lambda g: impl.chunked_linear_attention(
        q, k, v, g, None, None, scale=0.25, chunk_size=32, **kw))
    o, s = f(gpu, interpret=True)(g)
    o_ref, s_ref = f(reference)(g)
    _assert_close("o", o, o_ref, 2e-4)
    _assert_close("final_state", s, s_ref, 2e-4)
    loss = lambda fn: (lambda g: jnp.sum(fn(g)[0]) + jnp.sum(fn(g)[1]))
    dg = jax.jit(jax.grad(loss(f(gpu, interpret=True))))(g)
    dg_ref = jax.jit(jax.grad(loss(f(reference))))(g)
    _assert_close("dlog_decay", dg, dg_ref, 5e-4)


def test_through_api_dispatch():
    args, seg = _inputs(decay="scalar", t=20, h=2, g=2, s0=False)
    q, k, v, g, _ = args
    o, s = api.chunked_linear_attention(q, k, v, g, segment_ids=seg, implementation="gpu",
                                        interpret=True, chunk_size=16)
    o_ref, s_ref = api.chunked_linear_attention(q, k, v, g, segment_ids=seg,
                                                implementation="reference")
    _assert_close("o", o, o_ref, 2e-5)
    _assert_close("final_state", s, s_ref, 2e-5)
    assert dispatch.last(api.OP).implementation == "reference"
    api.chunked_linear_attention(q, k, v, g, implementation="gpu", interpret=True)
    assert dispatch.last(api.OP).implementation == "gpu"


def test_refusals():
    (q, k, v, g, s0), _ = _inputs(t=8, s0=True, segments=False)
    call = lambda *a, **kw: gpu.chunked_linear_attention(*a, scale=0.3, **kw)
    with pytest.raises(NotImplementedError, match="GPU backend"):   # CPU, not interpret
        call(q, k, v, g, s0, None, chunk_size=16)
    with pytest.raises(NotImplementedError, match="head dims"):
        call(q[..., :12], k[..., :12], v, g, None, None, chunk_size=16, interpret=True)
    # chunk_size is a hint, clamped to 16..64: any power of two is served.
    o8, _ = call(q, k, v, g, s0, None, chunk_size=8, interpret=True)
    o128, _ = call(q, k, v, g, s0, None, chunk_size=128, interpret=True)
    _assert_close("o", o8, o128, 1e-6)
    # With implementation=None on CPU the dispatcher skips "gpu" and serves the call.
    api.chunked_linear_attention(q, k, v, g)
    assert dispatch.last(api.OP).implementation != "gpu"


# ----------------------------------------------------------------------------- lowering

def _lowered(decay, d, dtype, *, grad, b=2, t=256, h=4, g=2):
    reason = lowering.available()
    if reason:
        pytest.skip(reason)
    spec = jax.ShapeDtypeStruct
    decay_shape = {"none": None, "scalar": (b, t, h), "vector": (b, t, h, d)}[decay]
    shapes = [spec((b, t, h, d), dtype), spec((b, t, g, d), dtype), spec((b, t, g, d), dtype),
              None if decay_shape is None else spec(decay_shape, F32),
              spec((b, h, d, d), F32), spec((b, t), jnp.int32)]

    def fwd(q, k, v, log_decay, s0, seg):
        return gpu.chunked_linear_attention(q, k, v, log_decay, s0, seg, scale=d ** -0.5,
                                            chunk_size=64)

    def loss(*a):
        o, s = fwd(*a)
        return jnp.sum(o.astype(F32) ** 2) + jnp.sum(s)

    argnums = (0, 1, 2, 4) if decay == "none" else (0, 1, 2, 3, 4)
    f = jax.grad(loss, argnums=argnums) if grad else fwd
    return lowering.lower_for_gpu(f, *shapes)


@pytest.mark.parametrize("decay", ["scalar", "vector"])
@pytest.mark.parametrize("d", [64, 128])
def test_lowers_for_h100_bf16(decay, d):
    text = _lowered(decay, d, jnp.bfloat16, grad=True)
    # forward, dq, dk, dv: four Triton kernels (the backward reuses no forward kernel)
    assert text.count(lowering.TRITON_CALL) == 4, text.count(lowering.TRITON_CALL)
    assert _lowered(decay, d, jnp.bfloat16, grad=False).count(lowering.TRITON_CALL) == 1


@pytest.mark.parametrize("dtype,decay,d", [(F32, "vector", 256), (jnp.float16, "scalar", 16),
                                           (jnp.bfloat16, "none", 128)])
def test_lowers_for_h100_other_dtypes(dtype, decay, d):
    assert _lowered(decay, d, dtype, grad=True, t=100).count(lowering.TRITON_CALL) == 4

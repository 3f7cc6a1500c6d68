"""Pallas Triton delta rule (pallas_kernels/delta_rule/gpu.py).

Two kinds of checks, both on a CPU-only host:
* numerics in Pallas interpret mode against the token-by-token reference, forward and
  gradients of every input (one jitted fwd+vjp per case, random cotangents on o and the final
  state): per-head decay and none, GQA / MQA, ragged T, packed segments with padding gaps,
  initial state, bf16 inputs, chunks 16 / 32 / 64 (one, two and four 16-row blocks of the
  triangular inverse), beta across (0, 2);
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
from pallas_kernels.delta_rule import api, common, gpu, reference

F32 = jnp.float32
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


def _inputs(*, b=2, t=45, h=4, g=2, dk=16, dv=32, decay=True, dtype=F32, s0=True,
            segments=True, decay_scale=0.5, seed=0):
    """q, k L2-normalised (as api.py passes them), beta in (0.05, 1.95), g in (-decay_scale, 0]."""
    r = np.random.RandomState(seed)
    q = common.l2_normalize(jnp.asarray(r.randn(b, t, h, dk), dtype))
    k = common.l2_normalize(jnp.asarray(r.randn(b, t, g, dk), dtype))
    v = jnp.asarray(r.randn(b, t, g, dv), dtype)
    beta = jnp.asarray(0.05 + 1.9 * r.rand(b, t, h), F32)
    log_decay = -jnp.asarray(r.rand(b, t, h) * decay_scale, F32) if decay else None
    state = jnp.asarray(r.randn(b, h, dk, dv), F32) if s0 else None
    seg = None
    if segments:
        # Row 0: leading padding, three documents, trailing padding. Row 1: one document
        # around a padding gap mid-row (the initial state meets padding, then a reset).
        ids = np.ones((b, t), np.int32)
        ids[0, :3] = 0
        ids[0, 10:25] = 2
        ids[0, 25:] = 3
        ids[0, -4:] = 0
        ids[1, 20:23] = 0
        ids[1, 23:] = 4
        seg = jnp.asarray(ids)
    return (q, k, v, beta, log_decay, state), seg


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
    gpu_fn = lambda *a, **kw: gpu.delta_rule(*a, interpret=True, **kw)
    o, s, grads = _fwd_vjp(gpu_fn, args, seg, chunk=chunk)
    ref_args = tuple(None if a is None else a.astype(F32) for a in args)
    o_ref, s_ref, grads_ref = _fwd_vjp(reference.delta_rule, ref_args, seg, chunk=chunk)
    assert o.dtype == args[0].dtype and s.dtype == F32
    _assert_close("o", o, o_ref, tol)
    _assert_close("final_state", s, s_ref, tol)
    names = ("dq", "dk", "dv", "dbeta", "dlog_decay", "dinitial_state")
    for name, a, got, want in zip(names, args, grads, grads_ref, strict=True):
        if a is None:
            assert got is None, name
            continue
        assert got.dtype == a.dtype, (name, got.dtype, a.dtype)
        _assert_close(name, got, want, tol)


@pytest.mark.parametrize("chunk,kw", [
    (16, dict()),                                                   # GQA, segments, s0, T=45
    (64, dict(t=70, h=2, g=1, dk=32, dv=16)),                       # MQA, 4 inverse blocks
    pytest.param(32, dict(t=40, h=2, g=2, decay=False, s0=False),   # DeltaNet, no state
                 marks=pytest.mark.slow),
    pytest.param(64, dict(t=150, h=2, g=2, dk=64, dv=64, segments=False, decay_scale=3.0),
                 marks=pytest.mark.slow),                           # long, strong decay
    pytest.param(32, dict(t=70, decay=False, segments=False), marks=pytest.mark.slow),
])
def test_matches_reference_fp32(chunk, kw):
    args, seg = _inputs(**kw)
    _check(args, seg, chunk=chunk, tol=2e-5)


@pytest.mark.parametrize("chunk,kw", [
    (32, dict(decay=False, s0=False)),                   # DeltaNet, no state, 2 inverse blocks
    pytest.param(64, dict(), marks=pytest.mark.slow),
])
def test_matches_reference_bf16(chunk, kw):
    args, seg = _inputs(dtype=jnp.bfloat16, t=40, h=2, g=1, **kw)
    _check(args, seg, chunk=chunk, tol=2e-2)


def test_through_api_dispatch():
    (q, k, v, beta, g, _), seg = _inputs(t=20, h=2, g=2, s0=False)
    call = lambda impl, **kw: api.delta_rule(q, k, v, beta, g, segment_ids=seg, chunk_size=16,
                                             implementation=impl, **kw)
    o, s = call("gpu", interpret=True)
    assert dispatch.last(api.OP).implementation == "gpu"
    o_ref, s_ref = call("reference")
    _assert_close("o", o, o_ref, 2e-5)
    _assert_close("final_state", s, s_ref, 2e-5)


def test_refusals_and_chunk_hint():
    (q, k, v, beta, g, s0), _ = _inputs(t=20, h=2, g=1, segments=False)
    call = lambda *a, **kw: gpu.delta_rule(*a, scale=0.3, **kw)
    with pytest.raises(NotImplementedError, match="GPU backend"):   # CPU, not interpret
        call(q, k, v, beta, g, s0, None, chunk_size=16)
    with pytest.raises(NotImplementedError, match="head dims"):
        call(q[..., :12], k[..., :12], v, beta, g, None, None, chunk_size=16, interpret=True)
    with pytest.raises(NotImplementedError, match="head dims"):
        call(q, k, v[..., :8], beta, g, None, None, chunk_size=16, interpret=True)
    # chunk_size is a hint, clamped to 16..64 and to the sequence: any power of two is
    # served (8 -> 16 here; the numerics tests cover 16, 32 and 64).
    o8, s8 = call(q, k, v, beta, g, s0, None, chunk_size=8, interpret=True)
    o_ref, s_ref = reference.delta_rule(q, k, v, beta, g, s0, None, scale=0.3, chunk_size=8)
    _assert_close("o", o8, o_ref, 2e-5)
    _assert_close("final_state", s8, s_ref, 2e-5)
    # With implementation=None on CPU the dispatcher skips "gpu" and serves the call.
    api.delta_rule(q, k, v, beta, g)
    assert dispatch.last(api.OP).implementation != "gpu"


# ----------------------------------------------------------------------------- lowering

def _kernels(d, dtype, *, grad, decay=True, s0=True, b=2, t=256, h=4, g=2):
    """(number of Triton custom calls, kernel names in program order) of the forward (or of
    jax.grad of a loss of o and the final state) lowered for an abstract H100."""
    reason = lowering.available()
    if reason:
        pytest.skip(reason)
    spec = jax.ShapeDtypeStruct
    shapes = [spec((b, t, h, d), dtype), spec((b, t, g, d), dtype), spec((b, t, g, d), dtype),
              spec((b, t, h), F32), spec((b, t, h), F32) if decay else None,
              spec((b, h, d, d), F32) if s0 else None, spec((b, t), jnp.int32)]

    def fwd(q, k, v, beta, log_decay, state, seg):
        return gpu.delta_rule(q, k, v, beta, log_decay, state, seg, scale=d ** -0.5,
                              chunk_size=64)

    def loss(*a):
        o, s = fwd(*a)
        return jnp.sum(o.astype(F32) ** 2) + jnp.sum(s)

    argnums = tuple(i for i in range(6) if shapes[i] is not None)
    f = jax.grad(loss, argnums=argnums) if grad else fwd
    kernels = lowering.triton_kernels(f, *shapes)   # every TRITON_CALL custom call
    return len(kernels), [kernel.name.removeprefix("delta_rule_") for kernel in kernels]


FWD = ["intra", "state", "output"]
BWD = FWD + ["intra", "state", "dstate", "grad_wy", "grad_o"]   # recomputes T, W, U~, h, U


@pytest.mark.parametrize("d", [64, 128])
def test_lowers_for_h100_bf16(d):
    assert _kernels(d, jnp.bfloat16, grad=False) == (3, FWD)
    assert _kernels(d, jnp.bfloat16, grad=True) == (8, BWD)


@pytest.mark.parametrize("dtype,d,kw", [(F32, 256, dict(t=100)),
                                        (jnp.float16, 16, dict(t=320, decay=False)),
                                        (jnp.bfloat16, 32, dict(t=45, s0=False))])
def test_lowers_for_h100_other_cases(dtype, d, kw):
    assert _kernels(d, dtype, grad=True, **kw) == (8, BWD)

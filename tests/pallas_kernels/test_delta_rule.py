"""Conformance suite of `pallas_kernels.delta_rule`, run for every implementation.

The reference (a token scan) is first checked against a float64 numpy loop written from the
definition. Every registered implementation ("xla", and the Pallas "gpu" / "tpu" ones in
interpret mode on CPU) is then checked against the reference: lengths that are not a multiple
of the chunk, packed documents with padding, initial states, DeltaNet (no decay) and Gated
DeltaNet (per-head decay), shared k/v heads, float32 and bfloat16, gradients of every input,
strong decays, beta in (0, 2) (negative eigenvalues), token-by-token decode and split prefill
equal to one parallel call; then stability: keys of huge or tiny norm before normalisation,
beta at the ends of its range, and 8K-token sequences.

Pallas implementations run in interpret mode, which is slow on 2 cores: one float32 case runs in
the default tier, the rest in `slow` (their own test files cover the kernel-specific cases,
bf16 included, in the default tier).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.delta_rule import common, reference, xla
from pallas_kernels.delta_rule.api import OP, PALLAS, decode_step, delta_rule

IMPLS = dispatch.implementations(OP)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    t: int
    heads: int = 2
    kv_heads: int = 2
    decay: bool = True  # False: DeltaNet (log_decay None); True: Gated DeltaNet
    layout: str = "packed"  # "single": one document per row; "packed": several + padding
    initial: bool = True
    chunk: int = 16
    dk: int = 16
    dv: int = 32
    b: int = 2
    gate_bias: float = 2.0  # log_decay = log_sigmoid(N(0,1) + bias); lower = stronger decay
    beta_max: float = 1.0  # beta = beta_max * sigmoid(N(0, 1)); 2.0: negative eigenvalues

    def __str__(self):
        return self.name


CASES = [
    Case("gdn_packed_ragged", t=45),
    Case("deltanet_packed_ragged_gqa", t=45, heads=4, kv_heads=2, decay=False),
    Case("gdn_single_mqa_no_initial_chunk32", t=70, heads=4, kv_heads=1, layout="single",
         initial=False, chunk=32),
    Case("deltanet_short_chunk64", t=5, chunk=64, b=1, decay=False),
    Case("gdn_strong_decay", t=40, gate_bias=-6.0),
    Case("deltanet_negative_eigenvalues", t=45, decay=False, beta_max=2.0),
]


def _params(cases, pallas_default=()):
    """(impl, case) pairs; Pallas implementations go to `slow` but for the cases named in
    `pallas_default`."""
    return [pytest.param(impl, case, id=f"{impl}-{case}",
                         marks=[pytest.mark.slow] if impl in PALLAS and case.name not in pallas_default else [])
            for impl in IMPLS for case in cases]


def _impls_pallas_slow():
    return [pytest.param(i, marks=pytest.mark.slow) if i in PALLAS else i for i in IMPLS]


def packed_segments(rng: np.random.Generator, b: int, t: int, layout: str) -> np.ndarray:
    """int32 [b, t]: documents of random lengths and (packed) a padding tail of zeros; row 0
    also has a padding gap between two documents."""
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        if layout == "single":
            seg[row] = 1
            continue
        end = t - int(rng.integers(0, t // 5 + 1))
        cursor, doc = 0, 1
        while cursor < end:
            length = min(int(rng.integers(1, max(2, t // 2))), end - cursor)
            seg[row, cursor:cursor + length] = doc
            cursor, doc = cursor + length, doc + 1
    if layout == "packed" and t > 8:
        seg[0, t // 2: t // 2 + 2] = 0
    return seg


def make_inputs(case: Case, dtype=jnp.float32, seed: int = 0):
    """((q, k, v) in dtype, beta, log_decay, initial state, segment ids); q and k of arbitrary
    norm (the op normalises them)."""
    rng = np.random.default_rng(seed)
    b, t, h, g = case.b, case.t, case.heads, case.kv_heads
    q = rng.normal(size=(b, t, h, case.dk))
    k = rng.normal(size=(b, t, g, case.dk))
    v = rng.normal(size=(b, t, g, case.dv))
    beta = case.beta_max * jax.nn.sigmoid(jnp.asarray(rng.normal(size=(b, t, h)), jnp.float32))
    log_decay = jax.nn.log_sigmoid(jnp.asarray(rng.normal(size=(b, t, h)) + case.gate_bias,
                                               jnp.float32)) if case.decay else None
    s0 = jnp.asarray(rng.normal(size=(b, h, case.dk, case.dv)), jnp.float32) if case.initial else None
    seg = jnp.asarray(packed_segments(rng, b, t, case.layout))
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)), beta, log_decay, s0, seg


def run(impl, case, q, k, v, beta, log_decay, s0, seg):
    return delta_rule(q, k, v, beta, log_decay, initial_state=s0, segment_ids=seg,
                      chunk_size=case.chunk, implementation=impl, interpret=impl in PALLAS)


def host(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


def assert_close(got, want, tol, name=""):
    """max |got - want| <= tol * max |want| (relative to the array's scale, as fla's tests)."""
    got, want = host(got), host(want)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{name}: not finite"
    scale = max(np.abs(want).max(), 1e-6)
    err = np.abs(got - want).max() / scale
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------- numpy loop

def loop_delta_rule(q, k, v, beta, log_decay, s0, seg, scale):
    """The recurrence one (row, head, token) at a time in float64, from the definition, with
    q and k normalised here: S = exp(g) (I - beta k k^T) S + beta k v^T, o = scale q S."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    b, t, h, dk = q.shape
    group = h // k.shape[2]
    out = np.zeros((b, t, h, v.shape[-1]))
    final = np.zeros((b, h, dk, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            s = np.zeros((dk, v.shape[-1])) if s0 is None else np.array(s0[bi, hi], np.float64)
            for ti in range(t):
                if seg is not None and ti > 0 and seg[bi, ti] != 0 and seg[bi, ti] != seg[bi, ti - 1]:
                    s = np.zeros_like(s)  # a new document
                if seg is not None and seg[bi, ti] == 0:
                    continue  # padding: no write, no erase, no decay, output 0
                kt, vt = k[bi, ti, hi // group], v[bi, ti, hi // group]
                bt = float(beta[bi, ti, hi])
                a = 1.0 if log_decay is None else float(np.exp(np.float64(log_decay[bi, ti, hi])))
                s = a * (np.eye(dk) - bt * np.outer(kt, kt)) @ s + bt * np.outer(kt, vt)
                out[bi, ti, hi] = scale * q[bi, ti, hi] @ s
            final[bi, hi] = s
    return out, final


@pytest.mark.parametrize("decay", [False, True])
def test_reference_matches_numpy_loop(decay):
    case = Case("loop", t=11, heads=4, kv_heads=2, decay=decay, dk=4, dv=3, beta_max=2.0)
    (q, k, v), beta, g, s0, _ = make_inputs(case, seed=3)
    seg = np.array([[1, 1, 1, 2, 2, 0, 0, 2, 3, 3, 0], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]], np.int32)
    want_o, want_s = loop_delta_rule(q, k, v, host(beta), None if g is None else host(g), host(s0), seg, 0.7)
    o, s = delta_rule(q, k, v, beta, g, initial_state=s0, segment_ids=jnp.asarray(seg), scale=0.7,
                      implementation="reference")
    np.testing.assert_allclose(host(o), want_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host(s), want_s, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- conformance

@functools.partial(jax.jit, static_argnums=(0, 1))
def _value_and_grads(impl, case, q, k, v, beta, log_decay, s0, seg, w_o, w_s):
    """(o, final state) and the gradients of sum(o * w_o) + sum(state * w_s) with respect to
    (q, k, v, beta, log_decay, initial state): one compiled program per implementation and case."""
    args = (q, k, v, beta, log_decay, s0)
    (o, s), vjp = jax.vjp(lambda *a: run(impl, case, *a, seg), *args)
    return (o, s), vjp((w_o.astype(o.dtype), w_s))


def _cotangents(case, seed=5):
    rng = np.random.default_rng(seed)
    h = case.heads
    return (jnp.asarray(rng.normal(size=(case.b, case.t, h, case.dv)), jnp.float32),
            jnp.asarray(rng.normal(size=(case.b, h, case.dk, case.dv)), jnp.float32))


GRAD_NAMES = ("dq", "dk", "dv", "dbeta", "dlog_decay", "dinitial_state")


@pytest.mark.parametrize("impl,case", _params(CASES, pallas_default=(CASES[0].name,)))
def test_float32_forward_and_gradients(impl, case):
    q_k_v, beta, g, s0, seg = make_inputs(case)
    w = _cotangents(case)
    (o, s), grads = _value_and_grads(impl, case, *q_k_v, beta, g, s0, seg, *w)
    (want_o, want_s), want_grads = _value_and_grads("reference", case, *q_k_v, beta, g, s0, seg, *w)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert_close(o, want_o, 1e-5, "o")
    assert_close(s, want_s, 1e-5, "final state")
    for name, got, want in zip(GRAD_NAMES, grads, want_grads):
        if want is not None:
            assert_close(got, want, 1e-4, name)
    pad = host(seg) == 0
    assert (host(o)[pad] == 0).all(), "padding tokens must output exactly 0"


@pytest.mark.parametrize("impl,case", _params(CASES[:2]))
def test_bfloat16_forward_and_gradients(impl, case):
    q_k_v, beta, g, s0, seg = make_inputs(case, jnp.bfloat16)
    w = _cotangents(case)
    (o, s), grads = _value_and_grads(impl, case, *q_k_v, beta, g, s0, seg, *w)
    # The same bf16 values in float32 through the reference: only the implementation's
    # rounding differs.
    f32 = [x.astype(jnp.float32) for x in q_k_v]
    (want_o, want_s), want_grads = _value_and_grads("reference", case, *f32, beta, g, s0, seg, *w)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert_close(o, want_o, 2e-2, "o")
    assert_close(s, want_s, 2e-2, "final state")
    for name, got, want in zip(GRAD_NAMES, grads, want_grads):
        if want is not None:
            assert_close(got, want, 3e-2, name)


@pytest.mark.parametrize("impl", _impls_pallas_slow())
@pytest.mark.parametrize("decay", [False, True])
def test_decode_and_split_prefill_equal_one_call(impl, decay):
    """A prefill of 13 tokens, the rest one token at a time through `decode_step` (and a second
    prefill continuing from the first's state) equal one call over the whole sequence."""
    case = Case("decode", t=29, heads=4, kv_heads=2, decay=decay, layout="single")
    (q, k, v), beta, g, s0, _ = make_inputs(case, seed=7)
    cut = lambda x, sl: None if x is None else x[:, sl]  # noqa: E731
    full_o, full_s = run(impl, case, q, k, v, beta, g, s0, None)
    split = 13
    head, tail = slice(None, split), slice(split, None)
    o1, s = run(impl, case, *(cut(x, head) for x in (q, k, v, beta, g)), s0, None)
    o2, s2 = run(impl, case, *(cut(x, tail) for x in (q, k, v, beta, g)), s, None)
    assert_close(jnp.concatenate([o1, o2], axis=1), full_o, 1e-5, "split prefill o")
    assert_close(s2, full_s, 1e-5, "split prefill state")
    outs = [o1]
    for t in range(split, case.t):
        o_t, s = decode_step(q[:, t], k[:, t], v[:, t], beta[:, t], None if g is None else g[:, t], s)
        outs.append(o_t[:, None])
    assert_close(jnp.concatenate(outs, axis=1), full_o, 1e-5, "decoded o")
    assert_close(s, full_s, 1e-5, "decoded state")


def test_every_registered_implementation_is_exercised():
    assert {"reference", "xla"} <= set(IMPLS)


# ----------------------------------------------------------------------------- stability

STABLE = Case("stability", t=70, heads=2, kv_heads=1, layout="single", chunk=64)


@pytest.mark.parametrize("impl,case", _params([STABLE]))
@pytest.mark.parametrize("key_scale", [1e2, 1e4])
def test_keys_of_large_norm_are_normalised(impl, case, key_scale):
    """Keys (and queries) 1e2 or 1e4 times larger before normalisation: the op's output is that
    of unit-norm keys, finite, gradients included. Without normalisation the WY system's
    entries would be up to ~1e9 and its inverse would overflow (fla issue #537)."""
    (q, k, v), beta, g, s0, seg = make_inputs(case, seed=11)
    w = _cotangents(case)
    (o, s), grads = _value_and_grads(impl, case, q * key_scale, k * key_scale, v, beta, g, s0, seg, *w)
    (want_o, want_s), _ = _value_and_grads("reference", case, q, k, v, beta, g, s0, seg, *w)
    assert_close(o, want_o, 1e-4, "o")
    assert_close(s, want_s, 1e-4, "final state")
    for name, got in zip(GRAD_NAMES, grads):
        if got is not None:
            assert np.isfinite(host(got)).all(), f"{name} not finite"


@pytest.mark.parametrize("impl,case", _params([STABLE]))
@pytest.mark.parametrize("beta_value", [1e-6, 1.0, 1.999])
def test_beta_at_the_ends_of_its_range(impl, case, beta_value):
    """beta -> 0 (no write), beta = 1 (exact overwrite: the erase makes I - k k^T singular)
    and beta -> 2 (a reflection, negative eigenvalue -1): the chunked WY forms stay as
    accurate as at moderate beta, gradients included."""
    (q, k, v), _, g, s0, seg = make_inputs(case, seed=12)
    # Repeated keys make the intra-chunk system as coupled as it gets.
    k = k.at[:, 1::2].set(k[:, ::2][:, : k[:, 1::2].shape[1]])
    beta = jnp.full((case.b, case.t, case.heads), beta_value, jnp.float32)
    w = _cotangents(case)
    (o, s), grads = _value_and_grads(impl, case, q, k, v, beta, g, s0, seg, *w)
    (want_o, want_s), want_grads = _value_and_grads("reference", case, q, k, v, beta, g, s0, seg, *w)
    assert_close(o, want_o, 1e-4, "o")
    assert_close(s, want_s, 1e-4, "final state")
    for name, got, want in zip(GRAD_NAMES, grads, want_grads):
        if want is not None:
            assert_close(got, want, 1e-3, name)


@pytest.mark.parametrize("impl", [p for p in _impls_pallas_slow() if p != "reference"])
@pytest.mark.parametrize("decay", [False, True])
def test_long_sequence_stays_finite_and_matches(impl, decay):
    """T = 8192 in one document (DeltaNet with no decay keeps every token's influence): the
    chunked form's states, carried across 128 chunks, match the token scan."""
    case = Case("long", t=8192, heads=2, kv_heads=2, decay=decay, layout="single", chunk=64,
                b=1, dk=16, dv=16)
    (q, k, v), beta, g, s0, seg = make_inputs(case, seed=13)
    o, s = run(impl, case, q, k, v, beta, g, s0, seg)
    want_o, want_s = run("reference", case, q, k, v, beta, g, s0, seg)
    assert_close(o, want_o, 1e-4, "o")
    assert_close(s, want_s, 1e-4, "final state")


# ----------------------------------------------------------------------------- xla: the WY inverse

def _wy_system(c: int, beta_max: float, seed: int = 0) -> np.ndarray:
    """A strictly lower A [3, c, c] (float64) of the WY form: beta_i exp(G_i - G_j) k_i . k_j,
    unit keys with every other key repeated (the most coupled system), beta up to beta_max."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(3, c, 8))
    k[:, 1::2] = k[:, ::2]
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = beta_max / (1 + np.exp(-rng.normal(size=(3, c))))
    g = np.cumsum(-0.05 * rng.random(size=(3, c)), axis=-1)
    decay = np.exp(np.minimum(g[:, :, None] - g[:, None, :], 0.0))
    return np.tril(beta[:, :, None] * (k @ np.swapaxes(k, -1, -2)) * decay, -1)


@pytest.mark.parametrize("c", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("beta_max", [1.0, 1.999])
def test_xla_unit_lower_solve_equals_the_exact_solve(c, beta_max):
    """The blocked substitution (diagonal blocks by substitution, merged by matmuls) equals the
    float64 inverse of I + A; the solve X = (I + A)^-1 R and its VJP (d R = T^T dX,
    dA = -strict_lower(dR X^T)) equal their float64 values."""
    a = _wy_system(c, beta_max)
    rng = np.random.default_rng(1)
    rhs, dx = rng.normal(size=(*a.shape[:-1], 24)), rng.normal(size=(*a.shape[:-1], 24))
    t_exact = np.linalg.inv(np.eye(c) + a)
    x_exact = t_exact @ rhs
    drhs_exact = np.swapaxes(t_exact, -1, -2) @ dx
    da_exact = -np.tril(drhs_exact @ np.swapaxes(x_exact, -1, -2), -1)
    a32, rhs32 = jnp.asarray(a, jnp.float32), jnp.asarray(rhs, jnp.float32)
    assert_close(xla.unit_lower_inverse(a32), t_exact, 2e-6, "inverse")
    x, vjp = jax.vjp(xla.unit_lower_solve, a32, rhs32)
    da, drhs = vjp(jnp.asarray(dx, jnp.float32))
    assert_close(x, x_exact, 2e-6, "solve")
    assert_close(drhs, drhs_exact, 2e-6, "d rhs")
    assert_close(da, da_exact, 2e-6, "d a")


def test_xla_has_no_triangular_solve_forward_or_backward():
    """XLA:CPU runs a batched `triangular_solve` as a slow per-matrix loop (and far slower still
    under load): neither the xla path nor its gradient may contain one."""
    case = Case("no_solve", t=70, chunk=64)
    q_k_v, beta, g, s0, seg = make_inputs(case)
    args = (*q_k_v, beta, g, s0)

    def loss(*a):
        o, s = run("xla", case, *a, seg)
        return jnp.sum(o) + jnp.sum(s)

    for fn in (lambda *a: run("xla", case, *a, seg), jax.grad(loss, argnums=tuple(range(6)))):
        assert "triangular_solve" not in str(jax.make_jaxpr(fn)(*args))
        assert "triangular_solve" not in jax.jit(fn).lower(*args).as_text()


# ----------------------------------------------------------------------------- dispatch, errors

def test_cpu_prefers_xla_and_logs_the_choice():
    q_k_v, beta, g, s0, seg = make_inputs(CASES[0])
    delta_rule(*q_k_v, beta, g, initial_state=s0, segment_ids=seg)
    assert dispatch.last(OP).implementation == "xla"


@pytest.mark.parametrize("name", PALLAS)
def test_named_pallas_backend_without_its_platform_fails_loudly(name):
    if name not in IMPLS:
        pytest.skip(f"{name} is not registered in this installation")
    q_k_v, beta, g, _, _ = make_inputs(CASES[0])
    with pytest.raises(NotImplementedError, match=name):
        delta_rule(*q_k_v, beta, g, implementation=name)


def test_l2_normalize_keeps_zero_vectors_zero_with_finite_gradients():
    x = jnp.zeros((3, 8)).at[0].set(jnp.arange(8.0))
    y = host(common.l2_normalize(x))
    assert np.isclose(np.linalg.norm(y[0]), 1.0, atol=1e-6) and (y[1:] == 0).all()
    grad = jax.grad(lambda x: common.l2_normalize(x).sum())(x)
    assert np.isfinite(host(grad)).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(implementation="nope"), "unknown implementation"),
    (dict(interpret=True), "interpret=True needs"),
    (dict(chunk_size=48), "chunk_size must be a power of two"),
    (dict(scale=0.0), "scale must be > 0"),
    (dict(initial_state=jnp.zeros((2, 2, 16, 16))), "initial_state must be"),
    (dict(segment_ids=jnp.zeros((2, 3), jnp.int32)), "segment_ids must be"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    q_k_v, beta, g, _, _ = make_inputs(CASES[0])
    with pytest.raises(ValueError, match=match):
        delta_rule(*q_k_v, beta, g, **kwargs)


def test_bad_shapes_name_the_argument():
    (q, k, v), beta, g, _, _ = make_inputs(CASES[1])
    with pytest.raises(ValueError, match="kv heads"):
        delta_rule(q[:, :, :3], k, v, beta[:, :, :3])
    with pytest.raises(ValueError, match="beta must be"):
        delta_rule(q, k, v, beta[..., :3])
    with pytest.raises(ValueError, match="log_decay must be None .DeltaNet. or"):
        delta_rule(q, k, v, beta, jnp.zeros((*beta.shape, q.shape[-1])))  # per channel: not this op
    with pytest.raises(ValueError, match="v .* must be"):
        delta_rule(q, k, v[:, :-1], beta)
    with pytest.raises(ValueError, match="decode_step takes"):
        decode_step(q[:, 0], k[:, 0], v[:, 0], beta, None, jnp.zeros((2, 4, 16, 32)))

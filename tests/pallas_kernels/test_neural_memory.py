"""Test-time memory (Titans / Miras): the chunk-parallel XLA form against the token reference.

Covered: every bias (dot, l2, lp, huber) x retention (none, decay, lq_norm, kl_softmax) x
algorithm (gd, gd_momentum) x gradient point (undecayed, decayed) x read mode (after_write,
chunk_lagged), for the linear memory (plain, and with TTT-Linear's residual + LayerNorm
readout) and a 2-layer MLP memory (residual + LayerNorm), each in dual form (the closed form:
no per-token weights; not for the mapped retentions lq_norm / kl_softmax) and with materialised
per-token weights (`vmap(grad)`); the dual form directly against `vmap(grad)`; per-chunk
gates; lengths that are not a multiple of the chunk,
packed documents with padding, a carried initial state; the gated delta rule equivalence at
chunk_size 1; padding contributing nothing; document resets; gradients against the reference.
The default tier runs a covering subset; the full product is `slow`.
"""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.delta_rule.api import delta_rule
from pallas_kernels.neural_memory import api, common, reference, xla
from pallas_kernels.neural_memory.common import MemorySpec

B, T, H, K = 2, 11, 2, 4
SEG = np.array([[1, 1, 1, 1, 1, 2, 2, 0, 0, 3, 3],  # a document mid-chunk, a padding gap
                [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 0]], np.int32)  # trailing padding


@dataclasses.dataclass(frozen=True)
class Case:
    spec: MemorySpec
    path: str = "dual"  # xla path: "dual" (not for lq_norm / kl_softmax) or "materialized"
    name: str = "linear"  # the arch as spec_for knows it

    def __str__(self):
        s = self.spec
        return "-".join((self.name, s.bias, s.retention, s.algorithm, s.gradient_at, s.read, self.path))


def spec_for(arch, bias, retention, algorithm, gradient_at, read, chunk=4):
    """arch "linear_ln" is the linear memory with TTT-Linear's readout x + LN(x W)."""
    norm = arch != "linear"
    return MemorySpec(arch=arch.removesuffix("_ln"), depth=2, expansion=2, residual=norm,
                      layernorm=norm, bias=bias, p=3.0, retention=retention, algorithm=algorithm,
                      gradient_at=gradient_at, chunk_size=chunk, read=read)


def all_cases():
    axes = (("dot", "l2", "lp", "huber"), ("none", "decay", "lq_norm", "kl_softmax"),
            ("gd", "gd_momentum"), ("undecayed", "decayed"), ("after_write", "chunk_lagged"))
    for arch, path in (("linear", "dual"), ("linear", "materialized"), ("linear_ln", "dual"),
                       ("mlp", "dual"), ("mlp", "materialized")):
        for combo in itertools.product(*axes):
            spec = spec_for(arch, *combo)
            if not (path == "dual" and spec.mapped):  # mapped retentions have no dual form
                yield Case(spec, path, arch)


# Default tier: every value of every axis at least once, on each path.
DEFAULT = {
    "linear-l2-decay-gd_momentum-undecayed-after_write-dual",
    "linear-dot-none-gd-undecayed-chunk_lagged-dual",
    "linear-lp-decay-gd-decayed-after_write-dual",
    "linear-lp-none-gd_momentum-undecayed-after_write-materialized",
    "linear-l2-lq_norm-gd-decayed-after_write-materialized",
    "linear_ln-l2-none-gd-undecayed-after_write-dual",
    "mlp-l2-decay-gd_momentum-undecayed-after_write-dual",
    "mlp-huber-none-gd-decayed-chunk_lagged-dual",
    "mlp-lp-decay-gd-decayed-after_write-dual",
    "mlp-l2-decay-gd_momentum-undecayed-after_write-materialized",
    "mlp-huber-kl_softmax-gd_momentum-undecayed-after_write-materialized",
    "mlp-lp-lq_norm-gd-undecayed-chunk_lagged-materialized",
}
CASES = [pytest.param(c, id=str(c), marks=[] if str(c) in DEFAULT else [pytest.mark.slow])
         for c in all_cases()]


def make_inputs(spec: MemorySpec, seed=0, t=T, dv=K):
    """(q, k, v) with unit-norm q, k; the gates the spec uses (others None)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k, v = unit(f(B, t, H, K)), unit(f(B, t, H, K)), f(B, t, H, dv)
    theta = jax.nn.sigmoid(f(B, t, H))
    alpha = jax.nn.sigmoid(f(B, t, H) - 2.0) if spec.decay else None
    eta = jax.nn.sigmoid(f(B, t, H) + 1.0) if spec.momentum else None
    delta = 0.3 * jax.nn.softplus(f(B, t, H)) if spec.bias == "huber" else None
    return (q, k, v, theta, alpha, eta, delta)


def make_state(spec, dv=K, seed=1):
    """Initial weights W0 [H, ...] and a carried state [B, H, ...] different from W0."""
    w0 = common.init_weights(spec, jax.random.key(seed), H, K, dv, std=0.3)
    state = common.start_state(spec, w0, None, B)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 8))
    state = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state)
    return w0, state


def run(impl, spec, args, w0, state, seg, path="dual"):
    if impl == "reference":
        return reference.neural_memory(spec, *args, initial_weights=w0, initial_state=state,
                                       segment_ids=seg)
    return xla.neural_memory(spec, *args, initial_weights=w0, initial_state=state,
                             segment_ids=seg, dual=path == "dual")


_run = jax.jit(run, static_argnums=(0, 1, 6))


def host(x):
    return np.asarray(x, np.float64)


def assert_tree_close(got, want, atol=1e-5, rtol=1e-5):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.isfinite(host(a)).all()
        np.testing.assert_allclose(host(a), host(b), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("field,value,match", [
    ("arch", "conv", "arch"), ("depth", 1, "depth"), ("expansion", 0, "expansion"),
    ("activation", "relu", "activation"), ("bias", "kl", "bias"), ("p", 0.5, "p must"),
    ("eps", 0.0, "eps"), ("retention", "elastic_net", "retention"), ("retention", "x", "retention"),
    ("q", 0.5, "q must"),
    ("decay_granularity", "channel", "decay_granularity"), ("algorithm", "muon", "algorithm"),
    ("gradient_at", "x", "gradient_at"), ("chunk_size", 0, "chunk_size"), ("read", "before", "read"),
])
def test_spec_rejects_with_field_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        MemorySpec(**{field: value})


def test_arguments_rejected_with_their_name():
    spec = spec_for("linear", "huber", "decay", "gd", "undecayed", "after_write")
    q, k, v, theta, alpha, eta, delta = make_inputs(spec)
    w0, _ = make_state(spec)
    with pytest.raises(ValueError, match="alpha"):
        xla.neural_memory(spec, q, k, v, theta, None, None, delta, initial_weights=w0)
    with pytest.raises(ValueError, match="eta"):
        xla.neural_memory(spec, q, k, v, theta, alpha, theta, delta, initial_weights=w0)
    with pytest.raises(ValueError, match="delta"):
        xla.neural_memory(spec, q, k, v, theta, alpha, None, None, initial_weights=w0)
    with pytest.raises(ValueError, match="initial_weights"):
        xla.neural_memory(spec, q, k, v, theta, alpha, None, delta, initial_weights=(w0[0][0],))
    with pytest.raises(ValueError, match="residual"):
        xla.neural_memory(dataclasses.replace(spec, residual=True), q, k, v[..., :3], theta,
                          alpha, None, delta, initial_weights=w0)


# ----------------------------------------------------------------------------- conformance

@pytest.mark.parametrize("case", CASES)
def test_xla_matches_reference(case):
    """Ragged T (11 = 2 chunks of 4 + 3), packed documents with padding, a carried state."""
    spec = case.spec
    args = make_inputs(spec)
    w0, state = make_state(spec)
    seg = jnp.asarray(SEG)
    o, s = _run("xla", spec, args, w0, state, seg, case.path)
    want_o, want_s = _run("reference", spec, args, w0, state, seg, case.path)
    assert o.shape == (B, T, H, K) and o.dtype == jnp.float32
    # The MLP memory's LayerNorm backward amplifies float32 rounding (up to ~7e-5 seen with the
    # l_p bias); test_float64_agreement shows the two forms agree to 1e-10 in float64.
    tol = 1e-4 if case.spec.arch == "mlp" else 1e-5
    assert_tree_close(o, want_o, atol=tol, rtol=tol)
    # States grow large with momentum and kl_softmax's logits (|M| ~ 50): their rounding
    # scales with them.
    scale = max(1.0, max(np.abs(host(x)).max() for x in jax.tree.leaves(want_s)) / 10)
    assert_tree_close(s, want_s, atol=3 * tol * scale, rtol=tol)
    assert (host(o)[SEG == 0] == 0).all()


@pytest.mark.parametrize("name", [
    pytest.param("mlp-lp-decay-gd-decayed-chunk_lagged-materialized", marks=pytest.mark.slow),
    pytest.param("mlp-l2-decay-gd_momentum-undecayed-after_write-materialized", marks=pytest.mark.slow),
    pytest.param("linear_ln-huber-decay-gd_momentum-decayed-after_write-dual", marks=pytest.mark.slow),
    pytest.param("mlp-l2-kl_softmax-gd_momentum-decayed-after_write-materialized", marks=pytest.mark.slow),
    pytest.param("mlp-huber-decay-gd_momentum-decayed-after_write-dual", marks=pytest.mark.slow),
])
def test_float64_agreement(name, monkeypatch):
    """With every float32 of the op switched to float64, xla and reference agree to 1e-10: the
    float32 differences above are rounding, not a different function."""
    for module in (common, reference, xla):
        monkeypatch.setattr(module, "F32", jnp.float64)
    arch, bias, retention, algorithm, gradient_at, read, path = name.split("-")
    spec = spec_for(arch, bias, retention, algorithm, gradient_at, read)
    with jax.enable_x64(True):
        to64 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float64), tree)
        args, (w0, state) = to64(make_inputs(spec)), to64(make_state(spec))
        seg = jnp.asarray(SEG)
        got = run("xla", spec, args, w0, state, seg, path)
        want = run("reference", spec, args, w0, state, seg, path)
        assert got[0].dtype == jnp.float64
        assert_tree_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("arch,path", [("linear", "dual"), ("mlp", "materialized")])
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunk_sizes(arch, path, chunk):
    """b = 1 (online GD), b not a power of two, b > T (one ragged chunk)."""
    spec = spec_for(arch, "l2", "decay", "gd_momentum", "undecayed", "after_write", chunk=chunk)
    args = make_inputs(spec)
    w0, state = make_state(spec)
    seg = jnp.asarray(SEG)
    tol = 1e-4 if arch == "mlp" else 1e-5
    assert_tree_close(_run("xla", spec, args, w0, state, seg, path),
                      _run("reference", spec, args, w0, state, seg, path), atol=3 * tol, rtol=tol)


@pytest.mark.parametrize("gradient_at", ["decayed", "undecayed"])
def test_chunk_size_one_is_the_gated_delta_rule(gradient_at):
    """Linear memory, l2 bias, decay, plain GD, b = 1, W0 = 0 equals Gated DeltaNet
        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = q_t S_t.
    "decayed" (decay first, gradient on the decayed memory) is exactly the gated delta rule's
    order: beta = theta, g = log(1 - alpha). Titans' "undecayed" order,
        M_t = ((1 - alpha) I - theta k k^T) M_{t-1} + theta k v^T,
    equals it only after a change of variables: k' = k / (1 - alpha), beta = theta (1 - alpha),
    g = log(1 - alpha) (then exp(g) beta k' k'^T = theta k k^T and beta k' = theta k)."""
    spec = MemorySpec(arch="linear", bias="l2", retention="decay", algorithm="gd",
                      gradient_at=gradient_at, chunk_size=1)
    q, k, v, theta, alpha, _, _ = make_inputs(spec, seed=2, dv=3)
    seg = jnp.asarray(SEG)
    w0 = (jnp.zeros((H, K, 3)),)
    lam = 1.0 - alpha
    if gradient_at == "decayed":
        k_gdn, beta = k, theta
    else:
        k_gdn, beta = k / lam[..., None], theta * lam
    want_o, want_s = delta_rule(q, k_gdn, v, beta, jnp.log(lam), segment_ids=seg, scale=1.0,
                                qk_l2norm=False, implementation="reference")
    for impl in ("reference", "xla"):
        o, s = _run(impl, spec, (q, k, v, theta, alpha, None, None), w0, None, seg, "dual")
        assert_tree_close(o, want_o)
        assert_tree_close(s.weights[0], want_s)


@pytest.mark.parametrize("arch", ["linear_ln", "mlp"])
@pytest.mark.parametrize("bias", ["dot", "l2", "lp", "huber"])
@pytest.mark.parametrize("retention", ["none", "decay"])
def test_closed_form_equals_vmap_grad(arch, bias, retention, request):
    """The dual form (per-layer outer products, no per-token weights) against per-token
    weights from `vmap(grad)`, both xla, for every bias and retention that has a dual form.
    Two in the default tier; the rest (and the same pairs via the reference) are slow."""
    if f"{arch}-{bias}-{retention}" not in ("mlp-huber-decay", "linear_ln-lp-none"):
        request.applymarker(pytest.mark.slow)
    spec = spec_for(arch, bias, retention, "gd_momentum", "decayed", "after_write")
    args = make_inputs(spec)
    w0, state = make_state(spec)
    seg = jnp.asarray(SEG)
    assert_tree_close(_run("xla", spec, args, w0, state, seg, "dual"),
                      _run("xla", spec, args, w0, state, seg, "materialized"), atol=1e-4, rtol=1e-4)


def test_chunk_gates_hold_the_anchor_tokens_values():
    """gate_granularity "chunk": every token uses theta / alpha / eta of the token that set its
    anchor (its chunk's first token, or its document's first token if later), by a loop here;
    the op then equals the per-token op given those held gates, and delta stays per token."""
    spec = spec_for("mlp", "huber", "decay", "gd_momentum", "undecayed", "after_write", chunk=4)
    chunked = dataclasses.replace(spec, gate_granularity="chunk")
    want_src = np.zeros_like(SEG)
    for r in range(B):
        for t in range(T):
            doc_start = max(j for j in range(t + 1)
                            if j == 0 or (SEG[r, j] != SEG[r, j - 1] and SEG[r, j] != 0))
            want_src[r, t] = max(t - t % 4, doc_start)
    src = np.asarray(common.anchor_tokens(chunked, T, jnp.asarray(SEG)))
    np.testing.assert_array_equal(src, want_src)
    assert want_src[0, 5] == 5 and want_src[0, 6] == 5 and want_src[0, 9] == 9  # mid-chunk docs
    q, k, v, theta, alpha, eta, delta = make_inputs(spec)
    hold = lambda g: jnp.take_along_axis(g, jnp.asarray(want_src)[..., None], axis=1)
    w0, state = make_state(spec)
    seg = jnp.asarray(SEG)
    for impl in ("reference", "xla"):
        got = _run(impl, chunked, (q, k, v, theta, alpha, eta, delta), w0, state, seg, "dual")
        want = _run(impl, spec, (q, k, v, hold(theta), hold(alpha), hold(eta), delta), w0, state,
                    seg, "dual")
        assert_tree_close(got, want, atol=1e-6)
        per_token = _run(impl, spec, (q, k, v, theta, alpha, eta, delta), w0, state, seg, "dual")
        assert np.abs(host(got[0]) - host(per_token[0])).max() > 1e-4


def test_lp_with_p_2_is_l2():
    """(r^2 + eps)^(p/2) / p at p = 2 is |r|^2 / 2 + const: the same gradients."""
    l2 = spec_for("linear", "l2", "decay", "gd_momentum", "undecayed", "after_write")
    args = make_inputs(l2)
    w0, state = make_state(l2)
    seg = jnp.asarray(SEG)
    want = _run("xla", l2, args, w0, state, seg, "dual")
    got = _run("xla", dataclasses.replace(l2, bias="lp", p=2.0), args, w0, state, seg, "dual")
    assert_tree_close(got, want, atol=1e-6)


def test_padding_contributes_nothing():
    """Whatever q, k, v and gates padding tokens carry, outputs and state are unchanged."""
    spec = spec_for("linear", "l2", "decay", "gd_momentum", "undecayed", "after_write")
    args = make_inputs(spec)
    noise = make_inputs(spec, seed=7)
    pad = jnp.asarray(SEG == 0)
    mixed = tuple(None if a is None else jnp.where(pad.reshape(B, T, *([1] * (a.ndim - 2))), n, a)
                  for a, n in zip(args, noise))
    w0, state = make_state(spec)
    seg = jnp.asarray(SEG)
    assert_tree_close(_run("xla", spec, mixed, w0, state, seg, "dual"),
                      _run("xla", spec, args, w0, state, seg, "dual"), atol=1e-6)


def test_document_on_the_grid_equals_the_document_alone():
    """A document that starts at a multiple of the chunk restarts from W0 with zero momentum:
    its outputs equal those of the same tokens run alone, whatever came before."""
    spec = spec_for("linear", "l2", "decay", "gd_momentum", "undecayed", "after_write")
    args = make_inputs(spec)
    w0, state = make_state(spec)
    seg = jnp.asarray(np.array([[1] * 4 + [2] * 7, [3] * 8 + [4] * 3], np.int32))
    o, _ = _run("xla", spec, args, w0, state, seg, "dual")
    tail = lambda x, s: None if x is None else x[:, s:]
    for row, start in ((0, 4), (1, 8)):
        alone, _ = _run("xla", spec, tuple(tail(a, start) for a in args), w0, None, None, "dual")
        np.testing.assert_allclose(host(o)[row, start:], host(alone)[row], atol=1e-5, rtol=1e-5)


def test_chunk_lagged_reads_the_anchor():
    """chunk_lagged: the first chunk reads the carried weights; after_write differs there."""
    spec = spec_for("linear", "l2", "decay", "gd", "undecayed", "chunk_lagged")
    args = make_inputs(spec)
    w0, state = make_state(spec)
    o, _ = _run("xla", spec, args, w0, state, None, "dual")
    want = jnp.einsum("bthk,bhkv->bthv", args[0], state.weights[0])
    np.testing.assert_allclose(host(o)[:, :4], host(want)[:, :4], atol=1e-6)
    after, _ = _run("xla", dataclasses.replace(spec, read="after_write"), args, w0, state, None, "dual")
    assert np.abs(host(after)[:, :4] - host(o)[:, :4]).max() > 1e-3


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("arch,bias,path", [
    ("linear", "l2", "dual"),
    pytest.param("linear", "huber", "dual", marks=pytest.mark.slow),
    pytest.param("linear_ln", "lp", "dual", marks=pytest.mark.slow),
    pytest.param("mlp", "l2", "materialized", marks=pytest.mark.slow),
])
def test_gradients_match_reference(arch, bias, path):
    """d/d(q, k, v, theta, alpha, eta, delta, W0) of a weighted sum of the outputs and the
    final state, xla against autodiff of the reference."""
    spec = spec_for(arch, bias, "decay", "gd_momentum", "undecayed", "after_write", chunk=4)
    args = make_inputs(spec)
    w0, _ = make_state(spec)
    seg = jnp.asarray(SEG)
    w_o = jnp.asarray(np.random.default_rng(9).normal(size=(B, T, H, K)), jnp.float32)

    def loss(impl, inputs, w0):
        o, s = run(impl, spec, inputs, w0, None, seg, path)
        return jnp.sum(o * w_o) + sum(jnp.sum(x) for x in jax.tree.leaves(s))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    got = grad("xla", args, w0)
    want = grad("reference", args, w0)
    assert_tree_close(got, want, atol=5e-5, rtol=1e-4)


def test_api_dispatches_to_xla_and_names_reference():
    spec = spec_for("linear", "l2", "decay", "gd_momentum", "undecayed", "after_write")
    args = make_inputs(spec)
    w0, state = make_state(spec)
    seg = jnp.asarray(SEG)
    o, s = jax.jit(lambda *a: api.neural_memory(spec, *a, initial_weights=w0,
                                                initial_state=state, segment_ids=seg))(*args)
    assert dispatch.last(api.OP).implementation == "xla"
    want = _run("reference", spec, args, w0, state, seg, "dual")
    assert_tree_close((o, s), want, atol=3e-5)
    with pytest.raises(ValueError, match="implementation"):
        api.neural_memory(spec, *args, initial_weights=w0, implementation="gpu")

"""Pallas Mosaic (TPU) kernels of the delta rule, on a CPU-only machine.

* The triangular inverse of the WY form against numpy, for every supported chunk size.
* Numerics in interpret mode against the token-by-token reference: forward outputs and final
  state, and the vjp of q, k, v, beta, log_decay and the initial state (random cotangents for o
  and the final state), for no / per-head decay, shared kv heads, ragged T, packed documents
  with padding gaps, an initial state, float32 and bfloat16, beta up to 2.
* Refusals: off TPU without interpret, unsupported chunk sizes and head dims; the dispatcher
  falls back past "tpu" on CPU and serves an explicit "tpu" request in interpret mode.
* Lowering for TPU: `jax.export` with platforms=["tpu"] runs the Pallas -> Mosaic lowering on
  CPU, forward and backward; the exported module must hold the expected Mosaic custom calls.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.delta_rule import api, common, reference, tpu, tpu_kernels

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    decay: bool
    chunk: int
    t: int = 70
    heads: int = 4
    kv_heads: int = 2
    dk: int = 16
    dv: int = 32
    dtype: str = "float32"
    segments: bool = True
    initial_state: bool = True
    beta_max: float = 1.0     # beta = beta_max * sigmoid(.): 2 allows negative eigenvalues
    decay_gain: float = 1.0   # multiplies the log decay: large values test overflow-free math

    def __str__(self):
        return self.name


# The conformance suite (test_delta_rule.py) runs this implementation on its own small cases
# (chunks 16 and 32) in the default tier; here the default case is chunk 64 (four 16-row
# inverse blocks merged) with every feature at once, the rest `slow`.
_SLOW = pytest.mark.slow
CASES = [
    Case("gated_gqa_ragged_packed_init_c64_beta2", decay=True, chunk=64, beta_max=2.0),
    pytest.param(Case("gated_gqa_packed_c32_strong_decay", decay=True, chunk=32,
                      decay_gain=20.0), marks=_SLOW),
    # one chunk, shorter than the chunk: the first grid step is also the last
    pytest.param(Case("deltanet_mha_single_doc_t_lt_chunk", decay=False, chunk=16, t=11,
                      heads=2, kv_heads=2, dk=8, dv=16, segments=False, initial_state=False),
                 marks=_SLOW),
    pytest.param(Case("deltanet_gqa_packed_init_c16", decay=False, chunk=16, t=45), marks=_SLOW),
    pytest.param(Case("gated_bf16_mqa_c32", decay=True, chunk=32, heads=2, kv_heads=1,
                      dtype="bfloat16"), marks=_SLOW),
]


def make_inputs(case: Case, b: int = 2, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 6)
    dt = jnp.dtype(case.dtype)
    # the op receives L2-normalised q and k (api.py normalises them before dispatch)
    q = common.l2_normalize(jax.random.normal(ks[0], (b, case.t, case.heads, case.dk))).astype(dt)
    k = common.l2_normalize(jax.random.normal(ks[1], (b, case.t, case.kv_heads, case.dk)))
    k = k.astype(dt)
    v = jax.random.normal(ks[2], (b, case.t, case.kv_heads, case.dv)).astype(dt)
    beta = case.beta_max * jax.nn.sigmoid(jax.random.normal(ks[3], (b, case.t, case.heads)))
    decay = None
    if case.decay:
        decay = case.decay_gain * jax.nn.log_sigmoid(
            2.0 * jax.random.normal(ks[4], (b, case.t, case.heads)) + 1.5)
    s0 = (jax.random.normal(ks[5], (b, case.heads, case.dk, case.dv))
          if case.initial_state else None)
    seg = None
    if case.segments:
        # row 0: three documents and a padding gap; row 1: leading padding, two documents, a
        # padding tail (documents and padding both straddle chunk edges)
        t = case.t
        row0 = np.ones(t, np.int32)
        row0[t // 7: t // 2] = 2
        row0[t // 2: t // 2 + 3] = 0
        row0[t // 2 + 3:] = 3
        row1 = np.full(t, 4, np.int32)
        row1[: min(5, t - 1)] = 0
        row1[t // 3:] = 5
        row1[t - t // 5:] = 0
        seg = jnp.asarray(np.stack([row0, row1]))
    return q, k, v, beta, decay, s0, seg


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _vjp(fn, case, q, k, v, beta, decay, s0, seg):
    """(o, final state, grads of q, k, v, beta, decay, s0) for fixed random cotangents, jitted."""
    b = q.shape[0]
    co = jax.random.normal(jax.random.key(7), (b, case.t, case.heads, case.dv)).astype(q.dtype)
    cs = jax.random.normal(jax.random.key(8), (b, case.heads, case.dk, case.dv))

    @jax.jit
    def run(q, k, v, beta, decay, s0):
        out, pull = jax.vjp(lambda *a: fn(*a, seg), q, k, v, beta, decay, s0)
        return out, pull((co, cs))

    return run(q, k, v, beta, decay, s0)


@pytest.mark.parametrize("chunk", tpu.CHUNK_SIZES)
def test_unit_lower_inverse(chunk):
    rng = np.random.default_rng(chunk)
    keys = rng.normal(size=(chunk, 8))
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    beta = rng.uniform(0.0, 2.0, size=(chunk, 1))
    a = np.tril(beta * (keys @ keys.T), -1).astype(np.float32)  # the WY system's A
    t = jax.jit(tpu_kernels.unit_lower_inverse)(jnp.asarray(a))
    expect = np.linalg.inv(np.eye(chunk) + a.astype(np.float64))
    np.testing.assert_allclose(np.asarray(t), expect, atol=1e-4 * np.abs(expect).max())
    assert not np.triu(np.asarray(t), 1).any()  # exactly lower triangular


@pytest.mark.parametrize("case", CASES, ids=str)
def test_interpret_matches_reference(case: Case):
    q, k, v, beta, decay, s0, seg = make_inputs(case)
    opts = dict(scale=0.7 / np.sqrt(case.dk), chunk_size=case.chunk)
    tpu_fn = lambda *a: tpu.delta_rule(*a, **opts, interpret=True)
    ref_fn = lambda *a: reference.delta_rule(*a, **opts)
    (o, s), grads = _vjp(tpu_fn, case, q, k, v, beta, decay, s0, seg)
    (ro, rs), rgrads = _vjp(ref_fn, case, q, k, v, beta, decay, s0, seg)

    assert o.dtype == q.dtype and o.shape == ro.shape
    assert s.dtype == F32 and s.shape == rs.shape
    tol = 1e-4 if case.dtype == "float32" else 2e-2
    assert np.isfinite(np.asarray(o, np.float32)).all()
    assert _rel(o, ro) < tol, "o"
    assert _rel(s, rs) < tol, "final state"
    if seg is not None:  # padding outputs are exactly zero
        assert not np.asarray(o, np.float32)[np.asarray(seg) == 0].any()
    names = ("q", "k", "v", "beta", "log_decay", "initial_state")
    for name, g, rg in zip(names, grads, rgrads):
        if rg is None:
            assert g is None, name
            continue
        assert g.shape == rg.shape and g.dtype == rg.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert _rel(g, rg) < tol, name


# ----------------------------------------------------------------------------- refusals, dispatch

def test_refusals():
    q, k, v, beta, decay, s0, seg = make_inputs(CASES[0])
    if jax.default_backend() != "tpu":
        with pytest.raises(NotImplementedError, match="TPU backend"):
            tpu.delta_rule(q, k, v, beta, decay, s0, seg, scale=0.3, chunk_size=32)
    for chunk in (8, 128):
        with pytest.raises(NotImplementedError, match="chunk_size"):
            tpu.delta_rule(q, k, v, beta, decay, s0, seg, scale=0.3, chunk_size=chunk,
                           interpret=True)
    odd = jnp.zeros(q.shape[:3] + (12,), q.dtype)
    with pytest.raises(NotImplementedError, match="head dim K=12"):
        tpu.delta_rule(odd, jnp.zeros(k.shape[:3] + (12,)), v, beta, None, None, seg,
                       scale=0.3, chunk_size=32, interpret=True)


def test_dispatch():
    case = Case("dispatch", decay=True, chunk=16, t=20, heads=2, kv_heads=1)
    q, k, v, beta, decay, s0, seg = make_inputs(case)

    def call(q, k, v, beta, decay, s0, seg, **options):
        return api.delta_rule(q, k, v, beta, decay, initial_state=s0, segment_ids=seg,
                              chunk_size=16, **options)

    o, s = jax.jit(lambda *a: call(*a, implementation="tpu", interpret=True))(
        q, k, v, beta, decay, s0, seg)
    assert dispatch.last(api.OP).implementation == "tpu"
    ro, rs = jax.jit(lambda *a: call(*a, implementation="reference"))(
        q, k, v, beta, decay, s0, seg)
    assert _rel(o, ro) < 1e-4 and _rel(s, rs) < 1e-4
    if jax.default_backend() != "tpu":
        # selection happens at trace time: eval_shape is enough and compiles nothing
        jax.eval_shape(call, q, k, v, beta, decay, s0, seg)
        assert dispatch.last(api.OP).implementation != "tpu"
        with pytest.raises(NotImplementedError, match="explicitly"):
            jax.eval_shape(lambda *a: call(*a, implementation="tpu"), q, k, v, beta, decay,
                           s0, seg)


# ----------------------------------------------------------------------------- TPU lowering on CPU

@pytest.mark.parametrize("decay,d,dtype,chunk", [
    (True, 64, "bfloat16", 64), (True, 128, "bfloat16", 64),
    (False, 128, "bfloat16", 32), (True, 64, "float32", 16),
])
def test_lowers_for_tpu(decay, d, dtype, chunk):
    b, t, h, g = 2, 256, 4, 2
    sds = jax.ShapeDtypeStruct
    dt = jnp.dtype(dtype)
    args = (sds((b, t, h, d), dt), sds((b, t, g, d), dt), sds((b, t, g, d), dt),
            sds((b, t, h), F32), sds((b, t, h), F32) if decay else None,
            sds((b, h, d, d), F32), sds((b, t), jnp.int32))

    def forward(q, k, v, beta, decay, s0, seg):
        # `chunked` skips the platform check so that TPU code is staged on this CPU machine
        return tpu.chunked(q, k, v, beta, decay, s0, seg, scale=d ** -0.5, chunk_size=chunk)

    def loss(*a):
        o, s = forward(*a)
        return jnp.sum(o.astype(F32) ** 2) + jnp.sum(s ** 2)

    wrt = (0, 1, 2, 3, 4, 5) if decay else (0, 1, 2, 3, 5)
    fwd_text = jax.export.export(jax.jit(forward), platforms=["tpu"])(*args).mlir_module()
    assert fwd_text.count("tpu_custom_call") == 1
    bwd_text = jax.export.export(jax.jit(jax.grad(loss, wrt)),
                                 platforms=["tpu"])(*args).mlir_module()
    # forward (its outputs feed the loss) + the states sweep + the reverse gradient sweep
    assert bwd_text.count("tpu_custom_call") == 3

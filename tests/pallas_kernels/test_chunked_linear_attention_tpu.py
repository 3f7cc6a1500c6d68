"""Pallas Mosaic (TPU) kernels of chunked linear attention, on a CPU-only machine.

* Numerics in interpret mode against the token-by-token reference: forward outputs and final
  state, and the vjp of every input (random cotangents for o and the final state), for no /
  per-head / per-channel decay, shared kv heads, ragged T, packed documents with padding, an
  initial state, float32 and bfloat16.
* Refusals: off TPU without interpret, unsupported chunk sizes and head dims; the dispatcher
  falls back past "tpu" on CPU and serves an explicit "tpu" request in interpret mode.
* Lowering for TPU: `jax.export` with platforms=["tpu"] runs the real Pallas -> Mosaic lowering
  on CPU, forward and backward; the exported module must hold Mosaic custom calls.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.chunked_linear_attention import api, reference, tpu

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    decay: str            # "none" | "scalar" | "channel"
    chunk: int
    t: int = 70
    heads: int = 4
    kv_heads: int = 2
    dk: int = 16
    dv: int = 8
    dtype: str = "float32"
    segments: bool = True
    initial_state: bool = True
    decay_gain: float = 1.0  # multiplies the log decay: large values test overflow-free math

    def __str__(self):
        return self.name


# The conformance suite (test_chunked_linear_attention.py) runs this implementation on its own
# cases in the default tier; here only the strong-decay case is default, the rest `slow`.
_SLOW = pytest.mark.slow
CASES = [
    pytest.param(Case("scalar_gqa_ragged_packed_init", "scalar", chunk=32), marks=_SLOW),
    # chunk 64 = four 16-token sub-chunks: reference-gate matmuls and the exact diagonal path;
    # gain 20 makes within-chunk decays of hundreds of nats, exp(+G) would overflow
    Case("channel_gqa_strong_decay_c64", "channel", chunk=64, decay_gain=20.0),
    # one chunk, shorter than the chunk: the first grid step is also the last
    pytest.param(Case("none_mha_single_doc_t_lt_chunk", "none", chunk=16, t=11, heads=2,
                      kv_heads=2, dk=8, dv=16, segments=False, initial_state=False), marks=_SLOW),
    # (per-head decay in bfloat16 is in the conformance suite, test_chunked_linear_attention.py)
    pytest.param(Case("channel_bf16_mqa", "channel", chunk=32, heads=2, kv_heads=1,
                      dtype="bfloat16"), marks=_SLOW),
]


def make_inputs(case: Case, b: int = 2, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 6)
    dt = jnp.dtype(case.dtype)
    q = jax.random.normal(ks[0], (b, case.t, case.heads, case.dk)).astype(dt)
    k = jax.random.normal(ks[1], (b, case.t, case.kv_heads, case.dk)).astype(dt)
    v = jax.random.normal(ks[2], (b, case.t, case.kv_heads, case.dv)).astype(dt)
    decay = None
    if case.decay != "none":
        shape = (b, case.t, case.heads) + ((case.dk,) if case.decay == "channel" else ())
        decay = case.decay_gain * jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], shape) + 1.5)
    s0 = (jax.random.normal(ks[4], (b, case.heads, case.dk, case.dv))
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
    return q, k, v, decay, s0, seg


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _vjp(fn, case, q, k, v, decay, s0, seg):
    """(o, final state, grads of q, k, v, decay, s0) for fixed random cotangents, jitted."""
    b = q.shape[0]
    co = jax.random.normal(jax.random.key(7), (b, case.t, case.heads, case.dv)).astype(q.dtype)
    cs = jax.random.normal(jax.random.key(8), (b, case.heads, case.dk, case.dv))

    @jax.jit
    def run(q, k, v, decay, s0):
        out, pull = jax.vjp(lambda *a: fn(*a, seg), q, k, v, decay, s0)
        return out, pull((co, cs))

    return run(q, k, v, decay, s0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_interpret_matches_reference(case: Case):
    q, k, v, decay, s0, seg = make_inputs(case)
    scale = 0.7 / np.sqrt(case.dk)
    opts = dict(scale=scale, chunk_size=case.chunk)
    tpu_fn = lambda *a: tpu.chunked_linear_attention(*a, **opts, interpret=True)
    ref_fn = lambda *a: reference.chunked_linear_attention(*a, **opts)
    (o, s), grads = _vjp(tpu_fn, case, q, k, v, decay, s0, seg)
    (ro, rs), rgrads = _vjp(ref_fn, case, q, k, v, decay, s0, seg)

    assert o.dtype == q.dtype and o.shape == ro.shape
    assert s.dtype == F32 and s.shape == rs.shape
    tol = 1e-4 if case.dtype == "float32" else 2.5e-2
    assert np.isfinite(np.asarray(o, np.float32)).all()
    assert _rel(o, ro) < tol, "o"
    assert _rel(s, rs) < tol, "final state"
    if seg is not None:  # padding outputs are exactly zero
        assert not np.asarray(o, np.float32)[np.asarray(seg) == 0].any()
    for name, g, rg in zip(("q", "k", "v", "log_decay", "initial_state"), grads, rgrads):
        if rg is None:
            assert g is None, name
            continue
        assert g.shape == rg.shape and g.dtype == rg.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert _rel(g, rg) < tol, name


# ----------------------------------------------------------------------------- refusals, dispatch

def test_refusals():
    q, k, v, decay, s0, seg = make_inputs(CASES[0].values[0])
    if jax.default_backend() != "tpu":
        with pytest.raises(NotImplementedError, match="TPU backend"):
            tpu.chunked_linear_attention(q, k, v, decay, s0, seg, scale=0.3, chunk_size=32)
    with pytest.raises(NotImplementedError, match="chunk_size"):
        tpu.chunked_linear_attention(q, k, v, decay, s0, seg, scale=0.3, chunk_size=8,
                                     interpret=True)
    odd = jnp.zeros(q.shape[:3] + (12,), q.dtype)
    with pytest.raises(NotImplementedError, match="head dim K=12"):
        tpu.chunked_linear_attention(odd, jnp.zeros(k.shape[:3] + (12,)), v, None, None, seg,
                                     scale=0.3, chunk_size=32, interpret=True)


def test_dispatch():
    case = Case("dispatch", "scalar", chunk=16, t=20, heads=2, kv_heads=1)
    q, k, v, decay, s0, seg = make_inputs(case)

    def call(q, k, v, decay, s0, seg, **options):
        return api.chunked_linear_attention(q, k, v, decay, initial_state=s0, segment_ids=seg,
                                            chunk_size=16, **options)

    o, s = jax.jit(lambda *a: call(*a, implementation="tpu", interpret=True))(
        q, k, v, decay, s0, seg)
    assert dispatch.last(api.OP).implementation == "tpu"
    ro, rs = reference.chunked_linear_attention(q, k, v, decay, s0, seg, scale=0.25,
                                                chunk_size=16)
    assert _rel(o, ro) < 1e-4 and _rel(s, rs) < 1e-4
    if jax.default_backend() != "tpu":
        # selection happens at trace time: eval_shape is enough and compiles nothing
        jax.eval_shape(call, q, k, v, decay, s0, seg)
        choice = dispatch.last(api.OP)
        assert choice.implementation != "tpu"
        with pytest.raises(NotImplementedError, match="explicitly"):
            jax.eval_shape(lambda *a: call(*a, implementation="tpu"), q, k, v, decay, s0, seg)


# ----------------------------------------------------------------------------- TPU lowering on CPU

@pytest.mark.parametrize("decay,d,dtype", [
    ("scalar", 64, "bfloat16"), ("scalar", 128, "bfloat16"),
    ("channel", 64, "bfloat16"), ("channel", 128, "bfloat16"),
    ("none", 128, "bfloat16"), ("channel", 64, "float32"),
])
def test_lowers_for_tpu(decay, d, dtype):
    b, t, h, g, chunk = 2, 256, 4, 2, 64
    sds = jax.ShapeDtypeStruct
    dt = jnp.dtype(dtype)
    args = (sds((b, t, h, d), dt), sds((b, t, g, d), dt), sds((b, t, g, d), dt),
            None if decay == "none" else sds((b, t, h) + ((d,) if decay == "channel" else ()), F32),
            sds((b, h, d, d), F32), sds((b, t), jnp.int32))

    def forward(q, k, v, decay, s0, seg):
        # `chunked` skips the platform check so that TPU code is staged on this CPU machine
        return tpu.chunked(q, k, v, decay, s0, seg, scale=d ** -0.5, chunk_size=chunk)

    def loss(q, k, v, decay, s0, seg):
        o, s = forward(q, k, v, decay, s0, seg)
        return jnp.sum(o.astype(F32) ** 2) + jnp.sum(s ** 2)

    wrt = (0, 1, 2, 4) if decay == "none" else (0, 1, 2, 3, 4)
    fwd_text = jax.export.export(jax.jit(forward), platforms=["tpu"])(*args).mlir_module()
    assert fwd_text.count("tpu_custom_call") == 1
    bwd_text = jax.export.export(jax.jit(jax.grad(loss, wrt)),
                                 platforms=["tpu"])(*args).mlir_module()
    # forward (whose state feeds the decay gradient) + dq sweep + dk/dv reverse sweep
    assert bwd_text.count("tpu_custom_call") == 3

"""Pallas Mosaic (TPU) kernels of block-sparse attention, on a CPU-only machine.

* Numerics in interpret mode against the dense masked reference (reference.py): o, lse and the
  vjp of q, k, v and sinks for random cotangents of o AND lse (lse is a differentiable output).
  Default tier: a causal sliding window with GQA, packed documents with padding gaps, ragged T,
  sinks and soft-cap; and sigmoid scores. `slow`: bf16, Tq != Tk with per-head layouts and a
  random pattern, per-row document-causal layouts with MQA and Dv != D, rows with nothing
  visible and no sink (o = 0, lse = -inf), a layout passed as a traced jit argument, and TPU
  interpret mode (simulated DMAs, two cores, race detection).
* Refusals: off TPU without interpret, block sizes / head dims Mosaic cannot tile, VMEM and
  SMEM budgets; the dispatcher falls back past "tpu" on CPU and selects an explicit "tpu"
  request in interpret mode.
* Lowering for TPU: `jax.export` with platforms=["tpu"] runs the Pallas -> Mosaic lowering on
  CPU, forward and backward, softmax and sigmoid. Mosaic's own compilation (layout inference,
  vector relayouts, VMEM allocation) happens in libtpu on a TPU and is not exercised here.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.block_sparse_attention import api, masks, reference, tpu
from pallas_kernels.block_sparse_attention.layout import BlockLayout

F32 = jnp.float32
_SLOW = pytest.mark.slow


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    mask: str = "causal_window"   # key of _mask
    tq: int = 200
    tk: int | None = None         # None: tq
    heads: int = 4
    kv_heads: int = 2
    d: int = 128
    dv: int = 128
    score: str = "softmax"
    sinks: bool = True
    softcap: float | None = None
    segments: bool = True
    dtype: str = "float32"
    traced_layout: bool = False   # the layout is an argument of the jitted function

    def __str__(self):
        return self.name


def _mask(case: Case, seg):
    if case.mask == "causal_window":
        return masks.Causal() & masks.SlidingWindow(150)
    if case.mask == "per_head_random":   # Hl = H: a full head and random patterns
        rng = np.random.default_rng(1)
        tk = case.tk or case.tq
        rand = [masks.NumpyMask(rng.random((case.tq, tk)) < 0.3) for _ in range(case.heads - 1)]
        return masks.PerHead([masks.Full(), *rand])
    if case.mask == "documents":         # Bl = B: document-causal from the segment ids
        return masks.DocumentCausal(seg)
    raise ValueError(case.mask)


def _segments(b: int, t: int) -> np.ndarray:
    # row 0: two documents, a padding gap, a third document; row 1: leading padding, two
    # documents (segments and padding straddle the 128-token block edges)
    seg = np.ones((b, t), np.int32)
    seg[0, t // 3: 2 * t // 3] = 2
    seg[0, 2 * t // 3: 2 * t // 3 + 5] = 0
    seg[0, 2 * t // 3 + 5:] = 3
    seg[1, :7] = 0
    seg[1, 3 * t // 4:] = 4
    return seg


CASES = [
    Case("causal_window_gqa_packed_ragged_sinks_softcap", softcap=20.0),
    Case("sigmoid_gqa_packed_ragged_softcap", score="sigmoid", sinks=False, softcap=8.0),
    pytest.param(Case("bf16_causal_window_gqa_sinks", dtype="bfloat16"), marks=_SLOW),
    pytest.param(Case("per_head_gqa_random_tq_ne_tk", mask="per_head_random", tq=130, tk=300,
                      segments=False), marks=_SLOW),
    pytest.param(Case("documents_mqa_dv256", mask="documents", tq=256, kv_heads=1, dv=256,
                      sinks=False), marks=_SLOW),
    # segments give rows with nothing visible (padding): o = 0, lse = -inf without sinks
    pytest.param(Case("empty_rows_no_sinks_softcap", sinks=False, softcap=3.0), marks=_SLOW),
    pytest.param(Case("sigmoid_bf16_traced_layout", score="sigmoid", sinks=False,
                      dtype="bfloat16", traced_layout=True), marks=_SLOW),
    pytest.param(Case("traced_layout_documents", mask="documents", tq=256, traced_layout=True),
                 marks=_SLOW),
]


def make_inputs(case: Case, b: int = 2, seed: int = 0):
    tk = case.tk or case.tq
    rng = np.random.default_rng(seed)   # host RNG: nothing to compile
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    dt = jnp.dtype(case.dtype)
    q = normal(b, case.tq, case.heads, case.d).astype(dt)
    k = normal(b, tk, case.kv_heads, case.d).astype(dt)
    v = normal(b, tk, case.kv_heads, case.dv).astype(dt)
    sinks = normal(case.heads) if case.sinks else None
    seg = _segments(b, case.tq) if case.segments else np.ones((b, case.tq), np.int32)
    kv_seg = seg if tk == case.tq else np.ones((b, tk), np.int32)
    layout = masks.build_layout(_mask(case, seg), case.tq, tk, 128, 128)
    return q, k, v, sinks, jnp.asarray(seg), jnp.asarray(kv_seg), layout


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _check_lse(lse, rlse):
    """Equal -inf rows (nothing visible, no sink), the rest close."""
    lse, rlse = np.asarray(lse), np.asarray(rlse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(rlse))
    fin = np.isfinite(rlse)
    np.testing.assert_allclose(lse[fin], rlse[fin], atol=1e-5, rtol=1e-5)


def _vjp(fn, case: Case, q, k, v, sinks, seg, kv_seg, layout):
    """(o, lse, grads of q, k, v, sinks) for fixed random cotangents of o and lse, jitted."""
    b, tq, h = q.shape[:3]
    rng = np.random.default_rng(7)
    co = jnp.asarray(rng.standard_normal((b, tq, h, case.dv), np.float32)).astype(q.dtype)
    cl = jnp.asarray(rng.standard_normal((b, h, tq), np.float32))
    opts = dict(score=case.score, sigmoid_bias=-0.5, logit_softcap=case.softcap,
                scale=0.8 / np.sqrt(case.d))

    def run(q, k, v, sinks, layout):
        out, pull = jax.vjp(lambda q, k, v, s: fn(q, k, v, layout, seg, kv_seg, s, **opts),
                            q, k, v, sinks)
        return out, pull((co, cl))

    if case.traced_layout:
        return jax.jit(run)(q, k, v, sinks, jax.tree.map(jnp.asarray, layout))
    return jax.jit(lambda *a: run(*a, layout))(q, k, v, sinks)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_interpret_matches_reference(case: Case):
    q, k, v, sinks, seg, kv_seg, layout = make_inputs(case)
    tpu_fn = lambda *a, **kw: tpu.block_sparse_attention(*a, **kw, interpret=True)
    (o, lse), grads = _vjp(tpu_fn, case, q, k, v, sinks, seg, kv_seg, layout)
    (ro, rlse), rgrads = _vjp(reference.block_sparse_attention, case, q, k, v, sinks, seg,
                              kv_seg, layout)
    assert o.dtype == q.dtype and o.shape == ro.shape
    assert lse.dtype == F32 and lse.shape == rlse.shape
    tol = 1e-5 if case.dtype == "float32" else 2e-2
    assert np.isfinite(np.asarray(o, np.float32)).all()
    assert _rel(o, ro) < tol, "o"
    if case.score == "softmax":
        _check_lse(lse, rlse)
        if not case.sinks and case.segments:
            assert np.isneginf(np.asarray(lse)).any()   # the case does have empty rows
    pad = np.asarray(seg) == 0   # padding queries see nothing: exactly zero output
    assert not np.asarray(o, np.float32)[pad].any()
    for name, g, rg in zip(("q", "k", "v", "sinks"), grads, rgrads):
        if rg is None:
            assert g is None, name
            continue
        assert g.shape == rg.shape and g.dtype == rg.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert _rel(g, rg) < (1e-5 if case.dtype == "float32" else 3e-2), name


@_SLOW
def test_tpu_interpret_mode_two_cores():
    """TPU interpret mode (pltpu.InterpretParams) simulates the DMAs of the pipeline and here two
    cores splitting the "parallel" grid axes, fills uninitialised memory with NaN, raises on
    out-of-bounds reads and on races between the cores."""
    from jax.experimental.pallas import tpu as pltpu
    case = Case("tpu_interpret_mode", softcap=20.0)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2,
                                   uninitialized_memory="nan")
    q, k, v, sinks, seg, kv_seg, layout = make_inputs(case)
    tpu_fn = lambda *a, **kw: tpu.block_sparse_attention(*a, **kw, interpret=params)
    (o, lse), grads = _vjp(tpu_fn, case, q, k, v, sinks, seg, kv_seg, layout)
    (ro, rlse), rgrads = _vjp(reference.block_sparse_attention, case, q, k, v, sinks, seg,
                              kv_seg, layout)
    assert _rel(o, ro) < 1e-5
    _check_lse(lse, rlse)
    for name, g, rg in zip(("q", "k", "v", "sinks"), grads, rgrads):
        assert _rel(g, rg) < 1e-5, name


def test_prefetch_fetch_ids():
    from pallas_kernels.block_sparse_attention import tpu_kernels
    ids = jnp.asarray([-1, -1, 2, -1, 0, -1, -1, 1], jnp.int32)
    np.testing.assert_array_equal(tpu_kernels.fetch_ids(ids), [0, 0, 2, 2, 0, 0, 0, 1])


# ----------------------------------------------------------------------------- refusals, dispatch

def _shapes(b=1, t=256, h=2, kvh=1, d=128, dv=128, dtype=F32):
    sds = jax.ShapeDtypeStruct
    return (sds((b, t, h, d), dtype), sds((b, t, kvh, d), dtype), sds((b, t, kvh, dv), dtype))


def test_refusals():
    seg = jnp.ones((1, 256), jnp.int32)
    opts = dict(score="softmax", sigmoid_bias=0.0, logit_softcap=None, scale=0.1)

    def refuse(match, shapes, block_q=128, block_k=128, interpret=True):
        layout = masks.build_layout(masks.Causal(), 256, 256, block_q, block_k)
        with pytest.raises(NotImplementedError, match=match):
            # eval_shape: a refusal must come before any work, at trace time
            jax.eval_shape(lambda q, k, v: tpu.block_sparse_attention(
                q, k, v, layout, seg, seg, None, **opts, interpret=interpret), *shapes)

    if jax.default_backend() != "tpu":
        refuse("TPU backend", _shapes(), interpret=False)
    refuse("block_q=64", _shapes(), block_q=64)
    refuse("block_k=32", _shapes(), block_k=32)
    refuse("head dim D=64", _shapes(d=64))
    refuse("head dim Dv=96", _shapes(dv=96))
    refuse("head dim D=384", _shapes(d=384))
    refuse("VMEM", _shapes(d=256, dv=256), block_q=512, block_k=512)
    # per-row, per-head lists of a large batch overflow SMEM (shapes only: nothing is built)
    sds = jax.ShapeDtypeStruct
    lists = (sds((8, 16, 256, 64), jnp.int32), sds((8, 16, 256), jnp.int32),
             sds((8, 16, 256, 64), jnp.int32))
    big = BlockLayout(*lists, *lists, sds((3, 128, 128), jnp.bool_), block_q=128,
                      block_k=128, q_len=32768, kv_len=32768)
    big_seg = sds((8, 32768), jnp.int32)
    with pytest.raises(NotImplementedError, match="SMEM"):
        jax.eval_shape(lambda q, k, v, lay, seg: tpu.block_sparse_attention(
            q, k, v, lay, seg, seg, None, **opts, interpret=True),
            *_shapes(8, 32768, 16, 4), big, big_seg)
    # the same checks without the platform check (the export path)
    layout = masks.build_layout(masks.Causal(), 256, 256, 128, 64)
    with pytest.raises(NotImplementedError, match="block_k=64"):
        jax.eval_shape(lambda q, k, v: tpu.mosaic_attention(q, k, v, layout, seg, seg, None,
                                                            **opts), *_shapes())


def test_dispatch():
    # selection happens at trace time: eval_shape is enough and compiles nothing (the numerics
    # of interpret mode are tested above)
    case = Case("dispatch", tq=128, heads=2, kv_heads=1, sinks=False)
    q, k, v, _, seg, _, layout = make_inputs(case)

    def call(q, k, v, seg, **options):
        return api.block_sparse_attention(q, k, v, layout, segment_ids=seg, **options)

    o, lse = jax.eval_shape(lambda *a: call(*a, implementation="tpu", interpret=True),
                            q, k, v, seg)
    assert dispatch.last(api.OP).implementation == "tpu"
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == (2, 2, 128)
    if jax.default_backend() != "tpu":
        jax.eval_shape(call, q, k, v, seg)
        assert dispatch.last(api.OP).implementation != "tpu"
        with pytest.raises(NotImplementedError, match="explicitly"):
            jax.eval_shape(lambda *a: call(*a, implementation="tpu"), q, k, v, seg)


# ----------------------------------------------------------------------------- TPU lowering on CPU

@pytest.mark.parametrize("score,dtype", [("softmax", "bfloat16"), ("sigmoid", "float32")])
def test_lowers_for_tpu(score, dtype):
    """Forward and gradient through `jax.export(platforms=["tpu"])`: softmax in bf16 with sinks,
    GQA, segments and a layout passed as a (traced) argument; sigmoid in fp32 with soft-cap."""
    b, t, h, kvh, d = 2, 384, 4, 2, 128
    sds = jax.ShapeDtypeStruct
    sigmoid = score == "sigmoid"
    layout = masks.build_layout(masks.Causal() & masks.SlidingWindow(200), t, t, 128, 128)
    layout_sds = jax.tree.map(lambda x: sds(x.shape, x.dtype), layout)
    args = (*_shapes(b, t, h, kvh, d, d, jnp.dtype(dtype)), sds((b, t), jnp.int32),
            None if sigmoid else sds((h,), F32), layout_sds)

    def forward(q, k, v, seg, sinks, layout):
        # `mosaic_attention` skips the platform check so that TPU code is staged on this CPU
        return tpu.mosaic_attention(q, k, v, layout, seg, seg, sinks, score=score,
                                    sigmoid_bias=-1.0, logit_softcap=10.0 if sigmoid else None,
                                    scale=d ** -0.5)

    def loss(q, k, v, seg, sinks, layout):
        o, lse = forward(q, k, v, seg, sinks, layout)
        return jnp.sum(o.astype(F32) ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    wrt = (0, 1, 2) if sigmoid else (0, 1, 2, 4)
    fwd_text = jax.export.export(jax.jit(forward), platforms=["tpu"])(*args).mlir_module()
    assert fwd_text.count("tpu_custom_call") == 1
    bwd_text = jax.export.export(jax.jit(jax.grad(loss, wrt)),
                                 platforms=["tpu"])(*args).mlir_module()
    # forward (its outputs feed the loss) + dq + dkv
    assert bwd_text.count("tpu_custom_call") == 3

"""Pallas Triton block-sparse attention (pallas_kernels/block_sparse_attention/gpu.py).

Three kinds of checks, all on a CPU-only host:
* numerics in Pallas interpret mode against the dense reference (reference.py), forward (o,
  lse) and the gradients of q, k, v and sinks through both outputs (one jitted fwd + vjp per
  case, random cotangents on o and lse): causal, sliding-window, per-head (Hl = H) and
  per-row (Bl = B, document-causal) layouts, device-built top-k layouts (layout.from_topk),
  packed segments with padding, ragged T, cross attention, GQA / MQA, sigmoid, soft-cap,
  sinks, empty rows, bf16 / fp16, and kernel tiles smaller than the layout blocks (several
  programs per block, several steps per listed block). The api's conformance suite
  (test_block_sparse_attention.py) runs its cases through this implementation as well;
* lowering of forward and backward for a real H100 Triton target through an abstract device
  (pallas_kernels/lowering.py), which runs the Pallas -> Triton IR lowering and so catches
  what interpret mode cannot (non-power-of-two values, primitives without a Triton rule);
* refusals (NotImplementedError, so that dispatch falls back).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lowering
from pallas_kernels.block_sparse_attention import api, gpu, masks, reference
from pallas_kernels.block_sparse_attention import layout as layout_lib

F32 = jnp.float32
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


def _segments(b: int, t: int) -> np.ndarray:
    """Row 0: leading padding, three documents, trailing padding. Other rows: one document
    around a padding gap."""
    ids = np.ones((b, t), np.int32)
    ids[0, :3] = 0
    ids[0, t // 4: t // 2] = 2
    ids[0, t // 2:] = 3
    ids[0, -4:] = 0
    ids[1:, t // 2: t // 2 + 3] = 0
    return ids


def _inputs(*, b=2, tq=45, tk=None, h=4, kvh=2, d=16, dv=16, dtype=F32, seed=0,
            segments=True):
    tk = tq if tk is None else tk
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(b, tq, h, d), dtype)
    k = jnp.asarray(r.randn(b, tk, kvh, d), dtype)
    v = jnp.asarray(r.randn(b, tk, kvh, dv), dtype)
    sinks = jnp.asarray(r.randn(h), F32)
    if segments and tq == tk:
        q_seg = kv_seg = jnp.asarray(_segments(b, tq))
    elif segments:   # cross attention: a few documents drawn at random, some padding
        q_seg = jnp.asarray(r.randint(0, 3, (b, tq)), jnp.int32)
        kv_seg = jnp.asarray(r.randint(0, 3, (b, tk)), jnp.int32)
    else:
        q_seg, kv_seg = jnp.ones((b, tq), jnp.int32), jnp.ones((b, tk), jnp.int32)
    return (q, k, v, sinks), q_seg, kv_seg


def _fwd_vjp(fn, args, *, seed=1):
    """jit(o, lse and the vjp of (o, lse) w.r.t. (q, k, v, sinks)) with random cotangents
    (zero where lse = -inf: rows with nothing visible)."""
    def run(*args):
        (o, lse), vjp = jax.vjp(fn, *args)
        r = np.random.RandomState(seed)
        do = jnp.asarray(r.randn(*o.shape), F32).astype(o.dtype)
        dlse = jnp.where(jnp.isfinite(lse), jnp.asarray(r.randn(*lse.shape), F32), 0.0)
        return o, lse, vjp((do, dlse))
    return jax.jit(run)(*args)


def _assert_close(name, got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert not np.isnan(got).any(), name
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=name)
    finite = np.isfinite(want)
    scale = max(1.0, np.abs(want[finite]).max(initial=0.0))
    err = np.abs(np.where(finite, got, 0.0) - np.where(finite, want, 0.0)).max(initial=0.0)
    err /= scale
    assert err <= tol, f"{name}: max error {err:.2e} (relative to max |ref|) > {tol}"


def _check(lay, args, q_seg, kv_seg, *, score="softmax", sinks=False, softcap=None,
           bias=0.0, tol=2e-5):
    opts = {"score": score, "sigmoid_bias": bias, "logit_softcap": softcap, "scale": 0.3}

    def fn(impl, **kw):
        def f(q, k, v, s):
            return impl(q, k, v, lay, q_seg, kv_seg, s if sinks else None, **opts, **kw)
        return f

    o, lse, grads = _fwd_vjp(fn(gpu.block_sparse_attention, interpret=True), args)
    ref_args = tuple(a.astype(F32) for a in args)
    o_ref, lse_ref, grads_ref = _fwd_vjp(fn(reference.block_sparse_attention), ref_args)
    assert o.dtype == args[0].dtype and lse.dtype == F32
    _assert_close("o", o, o_ref, tol)
    if score == "softmax":
        _assert_close("lse", lse, lse_ref, tol)
    for name, a, got, want in zip(("dq", "dk", "dv"), args, grads, grads_ref):
        assert got.dtype == a.dtype, name
        _assert_close(name, got, want, 2 * tol)
    if sinks:
        _assert_close("dsinks", grads[3], grads_ref[3], 2 * tol)
    return o, lse


SMALL_TILES = (16, 16, 16, 16)   # several programs per layout block, several steps per block


# ----------------------------------------------------------------------------- numerics

def test_causal_packed_ragged_gqa_sinks_softcap_small_tiles(monkeypatch):
    """Shared layout (Hl = Bl = 1) of 32-blocks walked by 16-tiles: T = 45 (ragged), packed
    documents with padding, H = 4 over K = 2, sinks and soft-cap."""
    monkeypatch.setattr(gpu, "TILES", SMALL_TILES)
    args, q_seg, kv_seg = _inputs()
    lay = masks.build_layout(masks.Causal(), 45, 45, 32, 32)
    _check(lay, args, q_seg, kv_seg, sinks=True, softcap=5.0)


def test_sigmoid_per_head_and_row_layout():
    """Hl = H and Bl = B (per-head sliding windows & documents) with GQA, sigmoid score."""
    args, q_seg, kv_seg = _inputs(tq=40, dv=32)
    seg = np.asarray(q_seg)
    mask = masks.PerHead([masks.SlidingWindow(w) for w in (4, 9, 17, 40)]) \
        & masks.DocumentCausal(seg)
    lay = masks.build_layout(mask, 40, 40, 16, 16)
    assert (lay.rows, lay.heads) == (2, 4)
    _check(lay, args, q_seg, kv_seg, score="sigmoid", bias=-1.0, softcap=4.0)


@pytest.mark.slow
@pytest.mark.parametrize("tiles", [None, SMALL_TILES])
def test_sliding_window_mqa_sinks(monkeypatch, tiles):
    if tiles:
        monkeypatch.setattr(gpu, "TILES", tiles)
    args, q_seg, kv_seg = _inputs(tq=70, h=2, kvh=1, d=32, dv=16)
    lay = masks.build_layout(masks.SlidingWindow(20), 70, 70, 32, 16)
    _check(lay, args, q_seg, kv_seg, sinks=True)


@pytest.mark.slow
def test_per_head_layout_gqa_softmax_small_tiles(monkeypatch):
    """Per-head lists walked head by head in the dkv kernel (Hl = H, G = 2)."""
    monkeypatch.setattr(gpu, "TILES", SMALL_TILES)
    args, q_seg, kv_seg = _inputs(tq=64)
    mask = masks.PerHead([masks.SlidingWindow(w) for w in (1, 13, 33, 64)])
    _check(masks.build_layout(mask, 64, 64, 32, 32), args, q_seg, kv_seg, sinks=True)


@pytest.mark.slow
def test_empty_rows_with_and_without_sinks():
    """A random mask with empty rows (o = 0, lse = -inf without sinks; lse = sink with)."""
    rng = np.random.default_rng(3)
    a = rng.random((4, 48, 48)) < 0.3
    a[:, ::5] = False
    lay = masks.build_layout(masks.NumpyMask(a), 48, 48, 16, 16)
    args, q_seg, kv_seg = _inputs(tq=48, segments=False)
    o, lse = _check(lay, args, q_seg, kv_seg)
    assert np.isneginf(np.asarray(lse)[:, :, ::5]).all()
    assert (np.asarray(o)[:, ::5] == 0).all()
    _check(lay, args, q_seg, kv_seg, sinks=True)


@pytest.mark.slow
def test_cross_attention_full():
    args, q_seg, kv_seg = _inputs(tq=30, tk=53, dv=32)
    lay = masks.build_layout(masks.Full(), 30, 53, 16, 32)
    _check(lay, args, q_seg, kv_seg, sinks=True, softcap=3.0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype):
    args, q_seg, kv_seg = _inputs(tq=64, dtype=dtype)
    lay = masks.build_layout(masks.SlidingWindow(24), 64, 64, 16, 16)
    _check(lay, args, q_seg, kv_seg, sinks=True, softcap=6.0, tol=2e-2)


def _topk_blocks(seed, bl, hl, nq, nk, s):
    """Random top-k choices [Bl, Hl, nq, S] with duplicates and unused (-1) slots."""
    r = np.random.RandomState(seed)
    kb = r.randint(-1, nk, (bl, hl, nq, s)).astype(np.int32)
    kb[..., 0] = np.arange(nq)   # own block (bq = bk): always kept when causal
    return kb


@pytest.mark.slow
def test_topk_layout_built_on_device():
    """layout.from_topk inside jit (traced lists), per-head choices, causal."""
    args, q_seg, kv_seg = _inputs(tq=60)
    kb = jnp.asarray(_topk_blocks(0, 1, 4, 4, 4, 3))

    def fn(impl, **kw):
        def f(q, k, v, s):
            lay = layout_lib.from_topk(kb, block_q=16, block_k=16, q_len=60, kv_len=60)
            return impl(q, k, v, lay, q_seg, kv_seg, s, score="softmax", sigmoid_bias=0.0,
                        logit_softcap=None, scale=0.3, **kw)
        return f

    o, lse, grads = _fwd_vjp(fn(gpu.block_sparse_attention, interpret=True), args)
    o_ref, lse_ref, grads_ref = _fwd_vjp(fn(reference.block_sparse_attention), args)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv", "dsinks"),
                               (o, lse, *grads), (o_ref, lse_ref, *grads_ref)):
        _assert_close(name, got, want, 4e-5)


# ----------------------------------------------------------------------------- lowering

def _lower(fn, specs, *, grad):
    """Kernel names of fn (or of jax.grad of a loss of its outputs) lowered for an abstract
    H100; asserts the Triton custom call is in the StableHLO text."""
    reason = lowering.available()
    if reason:
        pytest.skip(reason)

    def loss(q, k, v, s, *rest):
        o, lse = fn(q, k, v, s, *rest)
        return jnp.sum(o.astype(F32) ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    f = jax.grad(loss, argnums=(0, 1, 2, 3)) if grad else fn
    assert lowering.TRITON_CALL in lowering.lower_for_gpu(f, *specs)
    return [kernel.name.removeprefix("block_sparse_attention_")
            for kernel in lowering.triton_kernels(f, *specs)]


def _specs(b, t, h, kvh, d, dv, dtype):
    spec = jax.ShapeDtypeStruct
    return [spec((b, t, h, d), dtype), spec((b, t, kvh, d), dtype),
            spec((b, t, kvh, dv), dtype), spec((h,), F32), spec((b, t), jnp.int32)]


def _op(lay, **opts):
    opts = {"score": "softmax", "sigmoid_bias": 0.0, "logit_softcap": None, "scale": 0.1,
            **opts}
    sinks = opts.pop("sinks", opts["score"] == "softmax")

    def fn(q, k, v, s, seg):
        return gpu.block_sparse_attention(q, k, v, lay, seg, seg, s if sinks else None, **opts)
    return fn


@pytest.mark.parametrize("score,block", [("softmax", 128), ("sigmoid", 64)])
def test_lowers_for_h100(score, block):
    """bf16, D = 128, causal + sliding window, GQA, T not a block multiple."""
    lay = masks.build_layout(masks.SlidingWindow(300), 700, 700, block, block)
    fn = _op(lay, score=score, logit_softcap=30.0)
    specs = _specs(2, 700, 4, 2, 128, 128, jnp.bfloat16)
    assert _lower(fn, specs, grad=False) == ["fwd"]
    assert _lower(fn, specs, grad=True) == ["fwd", "dq", "dkv"]


def test_lowers_for_h100_topk_layout():
    """A device-built layout (from_topk under jit, traced lists), per-head (Hl = H), MQA."""
    spec = jax.ShapeDtypeStruct
    b, t, h = 1, 512, 2
    kb_spec = spec((1, h, t // 64, 4), jnp.int32)

    def fn(q, k, v, s, seg, kb):
        lay = layout_lib.from_topk(kb, block_q=64, block_k=64, q_len=t, kv_len=t)
        return _op(lay)(q, k, v, s, seg)

    specs = [*_specs(b, t, h, 1, 64, 64, jnp.bfloat16), kb_spec]
    assert _lower(fn, specs, grad=True) == ["fwd", "dq", "dkv"]


@pytest.mark.parametrize("dtype,d,dv,h,kvh,block", [
    (F32, 128, 128, 4, 4, 64), (jnp.float16, 16, 32, 1, 1, 16), (jnp.bfloat16, 256, 256, 6, 2, 128),
    (jnp.bfloat16, 64, 64, 3, 1, 256)])
def test_lowers_for_h100_other_cases(dtype, d, dv, h, kvh, block):
    """fp32 (3-pass tf32) / fp16 / wide heads / MQA with 3 heads (a non-power-of-two group)
    / blocks larger than the tiles, with a per-row and per-head layout."""
    t = 300
    seg = np.ones((2, t), np.int32)
    seg[1, 100:] = 2
    mask = masks.PerHead([masks.SlidingWindow(50 * (i + 1)) for i in range(h)]) \
        & masks.DocumentCausal(seg)
    lay = masks.build_layout(mask, t, t, block, block)
    specs = _specs(2, t, h, kvh, d, dv, dtype)
    assert _lower(_op(lay, logit_softcap=20.0), specs, grad=True) == ["fwd", "dq", "dkv"]


# ----------------------------------------------------------------------------- refusals

def test_refusals():
    (q, k, v, _), q_seg, kv_seg = _inputs(tq=32)
    opts = {"score": "softmax", "sigmoid_bias": 0.0, "logit_softcap": None, "scale": 0.3}
    lay = masks.build_layout(masks.Causal(), 32, 32, 16, 16)
    call = lambda q, k, v, lay, **kw: gpu.block_sparse_attention(q, k, v, lay, q_seg, kv_seg,
                                                                 None, **opts, **kw)
    with pytest.raises(NotImplementedError, match="GPU backend"):   # CPU, not interpret
        call(q, k, v, lay)
    with pytest.raises(NotImplementedError, match="block_q=8"):
        call(q, k, v, masks.build_layout(masks.Causal(), 32, 32, 8, 16), interpret=True)
    with pytest.raises(NotImplementedError, match="block_k=24"):
        call(q, k, v, masks.build_layout(masks.Causal(), 32, 32, 16, 24), interpret=True)
    with pytest.raises(NotImplementedError, match="head dims"):
        call(q[..., :8].repeat(3, -1), k[..., :8].repeat(3, -1), v, lay, interpret=True)
    with pytest.raises(NotImplementedError, match="head dims"):
        call(q, k, v[..., :8], lay, interpret=True)
    # One list per kv head (Hl = K = 2 of H = 4): xla serves it, the Triton kernels do not.
    per_kv = masks.build_layout(masks.PerHead([masks.Causal()] * 2), 32, 32, 16, 16)
    with pytest.raises(NotImplementedError, match="one list per kv head"):
        call(q, k, v, per_kv, interpret=True)
    # Named explicitly through the api without interpret on CPU: the refusal propagates.
    with pytest.raises(NotImplementedError, match="GPU backend"):
        api.block_sparse_attention(q, k, v, lay, segment_ids=q_seg, implementation="gpu")

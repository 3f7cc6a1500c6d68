"""Conformance suite of `pallas_kernels.block_sparse_attention`, run for every implementation.

The reference (dense masked attention over `layout.dense_mask`) is first checked against a
straightforward dense formula written here from the mask *itself* (the mask evaluated on the
whole [Tq, Tk] grid, not the block layout), with gradients. Every other registered
implementation ("xla", and the Pallas "gpu" / "tpu" ones in interpret mode on CPU) is then
checked against the reference, forward (o, lse) and gradients of q, k, v, sinks through both
outputs: causal, sliding window, chunked local, sink window, document-causal, per-head, random
NumPy masks, unions and intersections; packed segments with padding, ragged lengths, GQA / MQA,
both score functions, soft-cap, sinks, empty rows, bfloat16, cross attention (Tq != Tk), layouts
per batch row and per head, token-granular blocks (block_q = 1). Then `merge` of two disjoint
branches against one call over their union, jit with the layout as an argument or a constant,
and the errors.

Pallas implementations run in interpret mode, which is slow on 2 cores: one small case each in
the default tier, the rest in `slow`. A case an implementation refuses (NotImplementedError:
e.g. Triton's power-of-two blocks, Mosaic's 128-multiples) is skipped with its reason.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.api import OP, PALLAS, block_sparse_attention, merge
from pallas_kernels.block_sparse_attention.layout import BlockLayout

IMPLS = dispatch.implementations(OP)
OTHERS = tuple(i for i in IMPLS if i != "reference")


def packed_segments(rng: np.random.Generator, b: int, t: int) -> np.ndarray:
    """int32 [b, t]: documents of random lengths, a padding tail, and in row 0 a padding gap."""
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        end = t - int(rng.integers(0, t // 5 + 1))
        cursor, doc = 0, 1
        while cursor < end:
            length = min(int(rng.integers(1, max(2, t // 2))), end - cursor)
            seg[row, cursor:cursor + length] = doc
            cursor, doc = cursor + length, doc + 1
    seg[0, t // 2: t // 2 + 2] = 0
    return seg


def random_mask(seed: int, heads: int, tq: int, tk: int, density: float = 0.3) -> masks.Mask:
    """A NumpyMask [H, Tq, Tk] (or [Tq, Tk] for heads == 1) with some rows left empty."""
    rng = np.random.default_rng(seed)
    a = rng.random((heads, tq, tk)) < density
    a[:, ::7] = False  # empty rows: o = 0, lse = -inf
    return masks.NumpyMask(a if heads > 1 else a[0])


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    mask: Callable  # (seg [B, T] or None, heads) -> Mask
    tq: int = 45
    tk: int | None = None  # None: Tq
    b: int = 2
    heads: int = 4
    kv_heads: int = 2
    d: int = 16
    dv: int = 16
    block_q: int = 16
    block_k: int = 16
    segments: bool = True  # packed documents with padding (self-attention) / random ids (cross)
    score: str = "softmax"
    sigmoid_bias: float = 0.0
    softcap: float | None = None
    sinks: bool = False
    dtype: str = "float32"

    @property
    def kv_len(self) -> int:
        return self.tq if self.tk is None else self.tk

    def __str__(self):
        return self.name


window = lambda w: (lambda seg, h: masks.SlidingWindow(w))
CASES = [
    # Default tier: each case combines several features.
    Case("window_packed_ragged_gqa_sinks", window(20), sinks=True),
    Case("perhead_and_docs_mqa_softcap_bq16_bk8", lambda seg, h: masks.PerHead(
        [masks.SlidingWindow(w) for w in (3, 9, 17, 50)][:h]) & masks.DocumentCausal(seg),
         tq=50, kv_heads=1, block_k=8, softcap=5.0, dv=8),
    Case("sigmoid_chunked_or_sinkwindow_bias", lambda seg, h: masks.ChunkedLocal(16)
         | masks.SinkWindow(3, 6), tq=61, score="sigmoid", sigmoid_bias=-1.5, softcap=4.0),
    Case("bf16_cross_full_tq_ne_tk_sinks", lambda seg, h: masks.Full(), tq=30, tk=53, dv=32,
         sinks=True, dtype="bfloat16"),
    Case("token_routing_bq1_perhead_random_empty_rows",
         lambda seg, h: random_mask(1, h, 40, 40), tq=40, block_q=1, segments=False),
    # One list per kv head (Hl = K = 2 of H = 4): a GQA group shares its lists (NSA's selection).
    Case("token_routing_bq1_per_kv_head_windows", lambda seg, h: masks.PerHead(
        [masks.SlidingWindow(6), masks.SlidingWindow(20)]), tq=40, block_q=1, block_k=8),
    # slow tier: the rest of the matrix.
    Case("cross_full_tq_ne_tk", lambda seg, h: masks.Full(), tq=30, tk=53, dv=32, sinks=True),
    Case("bf16_causal_gqa", lambda seg, h: masks.Causal(), tq=70, dtype="bfloat16"),
    Case("causal_single_doc_no_gqa", lambda seg, h: masks.Causal(), kv_heads=4, segments=False),
    Case("sinkwindow_softcap_sinks", lambda seg, h: masks.SinkWindow(4, 10), tq=66,
         softcap=3.0, sinks=True),
    Case("document_causal_rows_sigmoid", lambda seg, h: masks.DocumentCausal(seg), tq=57,
         score="sigmoid"),
    Case("perhead_no_gqa_bq8_bk16", lambda seg, h: masks.PerHead(
        [masks.SlidingWindow(w) for w in (1, 5, 16, 33)][:h]), kv_heads=4, block_q=8),
    Case("perhead_rows_random_and_causal", lambda seg, h: random_mask(2, h, 45, 45, 0.6)
         & masks.DocumentCausal(seg), kv_heads=1, sinks=True),
    Case("random_shared_empty_rows_sinks", lambda seg, h: random_mask(3, 1, 45, 45), sinks=True,
         segments=False),
    Case("chunked_local_bq32_bk16_mqa", lambda seg, h: masks.ChunkedLocal(20), tq=64,
         block_q=32, kv_heads=1),
    Case("token_routing_bq1_bk8_sigmoid_window", window(12), tq=33, block_q=1, block_k=8,
         score="sigmoid", sigmoid_bias=0.5),
    Case("bf16_sinks_softcap_window", window(24), tq=64, sinks=True, softcap=6.0,
         dtype="bfloat16"),
    Case("bf16_cross_sigmoid", lambda seg, h: masks.Full(), tq=20, tk=47, score="sigmoid",
         dtype="bfloat16"),
    Case("blocks_larger_than_t", window(5), tq=9, block_q=16, block_k=32),
    Case("pallas_friendly_window_gqa", window(40), tq=70, d=32, dv=32, sinks=True),
    Case("tpu_blocks_128_causal", lambda seg, h: masks.Causal(), tq=140, heads=2, kv_heads=1,
         d=128, dv=128, block_q=128, block_k=128, sinks=True),
]
DEFAULT = {c.name for c in CASES[:6]}
PALLAS_DEFAULT = {"gpu": "window_packed_ragged_gqa_sinks", "tpu": "tpu_blocks_128_causal"}
CASE = {c.name: c for c in CASES}


def _marks(impl: str, case: Case):
    if impl in PALLAS:
        return [] if PALLAS_DEFAULT.get(impl) == case.name else [pytest.mark.slow]
    return [] if case.name in DEFAULT else [pytest.mark.slow]


# ----------------------------------------------------------------------------- inputs

@functools.lru_cache(maxsize=None)
def make(case: Case, seed: int = 0):
    """(inputs dict, layout, visible bool [B, H, Tq, Tk] from the mask itself)."""
    rng = np.random.default_rng(seed)
    b, tq, tk, h, kh = case.b, case.tq, case.kv_len, case.heads, case.kv_heads
    dtype = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.normal(size=(b, tq, h, case.d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, tk, kh, case.d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, tk, kh, case.dv)), dtype)
    seg = kv_seg = None
    if case.segments and tq == tk:
        seg = packed_segments(rng, b, tq)
    elif case.segments:  # cross attention: ids drawn from a few documents, some padding
        seg = rng.integers(0, 3, size=(b, tq)).astype(np.int32)
        kv_seg = rng.integers(0, 3, size=(b, tk)).astype(np.int32)
    mask = case.mask(seg, h)
    layout = masks.build_layout(mask, tq, tk, case.block_q, case.block_k)
    vis = mask(np.arange(tq)[:, None], np.arange(tk)[None, :])  # [Bm, Hm, Tq, Tk]
    if vis.shape[1] not in (1, h):  # one mask per kv head: its query heads share it
        vis = np.repeat(vis, h // vis.shape[1], axis=1)
    vis = np.broadcast_to(vis, (b, h, tq, tk))
    sq = np.ones((b, tq), np.int32) if seg is None else seg
    sk = sq if kv_seg is None else kv_seg
    vis = vis & (sq[:, None, :, None] == sk[:, None, None, :]) & (sq != 0)[:, None, :, None]
    inputs = dict(q=q, k=k, v=v, sinks=jnp.asarray(rng.normal(size=(h,)), jnp.float32),
                  seg=seg, kv_seg=kv_seg,
                  do=jnp.asarray(rng.normal(size=(b, tq, h, case.dv)), jnp.float32),
                  dlse=jnp.asarray(rng.normal(size=(b, h, tq)), jnp.float32))
    return inputs, layout, vis


def call(impl, case: Case, layout, q, k, v, sinks, seg, kv_seg):
    """The op as the tests call it: (o, lse) with lse zeros for sigmoid (so vjp works)."""
    o, lse = block_sparse_attention(
        q, k, v, layout, segment_ids=seg, kv_segment_ids=kv_seg, score=case.score,
        sigmoid_bias=case.sigmoid_bias, logit_softcap=case.softcap,
        sinks=sinks if case.sinks else None, implementation=impl, interpret=impl in PALLAS)
    assert (lse is None) == (case.score == "sigmoid")
    return o, (jnp.zeros(o.shape[:1] + o.shape[2:3] + o.shape[1:2], jnp.float32)
               if lse is None else lse)


def value_and_grads(fn, inputs):
    """(o, lse) of fn(q, k, v, sinks) and the gradients (dq, dk, dv, dsinks) of
    sum(o * do) + sum(lse * dlse) (dlse masked where lse = -inf), in one jitted program."""
    @jax.jit
    def run(q, k, v, sinks, do, dlse):
        (o, lse), vjp = jax.vjp(fn, q, k, v, sinks)
        dlse = jnp.where(jnp.isfinite(lse), dlse, 0.0)
        return (o, lse), vjp((do.astype(o.dtype), dlse))
    x = inputs
    return run(x["q"], x["k"], x["v"], x["sinks"], x["do"], x["dlse"])


@functools.lru_cache(maxsize=None)
def reference_results(case: Case):
    """value_and_grads of the reference on `make(case)` (compiled once per case)."""
    inputs, layout, _ = make(case)
    x = inputs
    return value_and_grads(lambda q, k, v, s: call("reference", case, layout, q, k, v, s,
                                                   x["seg"], x["kv_seg"]), inputs)


def host(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


def assert_close(got, want, tol, name=""):
    """max |got - want| <= tol * max(1, max |want|); same -inf pattern (lse of empty rows)."""
    got, want = host(got), host(want)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert not np.isnan(got).any(), f"{name}: NaN"
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=name)
    finite = np.isfinite(want)
    scale = max(np.abs(want[finite]).max(initial=0.0), 1.0)
    err = np.abs(np.where(finite, got, 0.0) - np.where(finite, want, 0.0)).max(initial=0.0) / scale
    assert err <= tol, f"{name}: error {err:.2e} > {tol:.0e} (scale {scale:.2g})"


def assert_results_close(got, want, case: Case, tol: float):
    (o, lse), grads = got
    (want_o, want_lse), want_grads = want
    assert o.dtype == jnp.dtype(case.dtype) and lse.dtype == jnp.float32
    assert_close(o, want_o, tol, "o")
    if case.score == "softmax":
        assert_close(lse, want_lse, tol, "lse")
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        assert g.dtype == jnp.dtype(case.dtype), name
        assert_close(g, w, 2 * tol, name)
    if case.sinks:
        assert_close(grads[3], want_grads[3], 2 * tol, "dsinks")


# ----------------------------------------------------------------------------- reference

def dense_formula(case: Case, vis, q, k, v, sinks):
    """Attention written directly from the definition over the dense visibility `vis`
    [B, H, Tq, Tk] (float32): rows with nothing visible (and no sink) output 0, lse -inf."""
    h, dtype = q.shape[2], q.dtype
    group = h // k.shape[2]
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if case.softcap is not None:
        s = case.softcap * jnp.tanh(s / case.softcap)
    if case.score == "sigmoid":
        p = jnp.where(vis, jax.nn.sigmoid(s + case.sigmoid_bias), 0.0)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, v)
        return o.astype(dtype), jnp.zeros(p.shape[:3], jnp.float32)
    row_ok = jnp.asarray(vis.any(-1) | case.sinks)  # [B, H, Tq]
    # Rows that see nothing get finite dummy logits (their results are replaced below), so
    # that softmax and logsumexp never see a row of -inf.
    s = jnp.where(row_ok[..., None], jnp.where(vis, s, -jnp.inf), 0.0)
    if case.sinks:
        sink_col = jnp.broadcast_to(sinks[None, :, None, None], s.shape[:3] + (1,))
        s = jnp.concatenate([s, sink_col], axis=-1)
    p = jax.nn.softmax(s, axis=-1)[..., :vis.shape[-1]]
    lse = jax.nn.logsumexp(s, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v)
    o = jnp.where(jnp.transpose(row_ok, (0, 2, 1))[..., None], o, 0.0)
    return o.astype(dtype), jnp.where(row_ok, lse, -jnp.inf)


REF_DEFAULT = {"window_packed_ragged_gqa_sinks", "sigmoid_chunked_or_sinkwindow_bias",
               "token_routing_bq1_perhead_random_empty_rows"}


def _ref_params():
    return [pytest.param(c, id=c.name, marks=[] if c.name in REF_DEFAULT else [pytest.mark.slow])
            for c in CASES]


@pytest.mark.parametrize("case", _ref_params())
def test_reference_matches_dense_formula(case):
    inputs, _, vis = make(case)
    got = reference_results(case)
    want = value_and_grads(lambda q, k, v, s: dense_formula(case, vis, q, k, v, s), inputs)
    # Same float32 math in a different order; bf16 results may round 1 ulp apart.
    assert_results_close(got, want, case, 1e-2 if case.dtype == "bfloat16" else 2e-5)


# ----------------------------------------------------------------------------- conformance

def _skip_refused(impl, case, error):
    """Skip a case an implementation refuses by design (e.g. Mosaic needs 128-blocks), but fail
    when xla, or a Pallas implementation on its default-tier case, refuses: a refusal there would
    otherwise turn the only default-tier numerics check of that implementation into a skip."""
    if impl == "xla" or PALLAS_DEFAULT.get(impl) == case.name:
        pytest.fail(f"{impl} must serve case {case.name}, but refused it: {error}")
    pytest.skip(f"{impl} refuses this case: {error}")


def _params():
    return [pytest.param(impl, case, id=f"{impl}-{case}", marks=_marks(impl, case))
            for impl in OTHERS for case in CASES]


@pytest.mark.parametrize("impl,case", _params())
def test_matches_reference(impl, case):
    inputs, layout, _ = make(case)
    x = inputs
    try:
        got = value_and_grads(lambda q, k, v, s: call(impl, case, layout, q, k, v, s, x["seg"],
                                                      x["kv_seg"]), inputs)
    except NotImplementedError as e:
        _skip_refused(impl, case, e)
    assert_results_close(got, reference_results(case), case,
                         2e-2 if case.dtype == "bfloat16" else 2e-5)


def _impl_params(default=("xla",)):
    return [pytest.param(i, marks=[] if i in default else [pytest.mark.slow]) for i in IMPLS]


MERGE_CASE = Case("merge", lambda seg, h: masks.SinkWindow(4, 10), tq=48, d=32, dv=32,
                  sinks=True)


@pytest.mark.parametrize("impl", _impl_params(default=("reference",)))
def test_merge_of_disjoint_branches_equals_union(impl):
    """Sink window = (first 4 keys, outside the window) | (window of 10): the two disjoint
    branches merged with `merge` equal one call over the union, values and gradients through
    o and lse (the sink logit joins one branch). Every implementation's lse and its gradient
    are checked by test_matches_reference already; the default tier checks `merge` itself."""
    case = MERGE_CASE
    inputs, _, _ = make(case)
    t, seg = case.tq, inputs["seg"]
    idx_q, idx_k = np.arange(t)[:, None], np.arange(t)[None, :]
    sink_part = masks.NumpyMask((idx_k < 4) & (idx_k <= idx_q) & (idx_q - idx_k >= 10))
    branches = [masks.build_layout(m, t, t, 16, 16) for m in (sink_part, masks.SlidingWindow(10))]

    def merged(q, k, v, s):
        parts = [block_sparse_attention(q, k, v, lay, segment_ids=seg, sinks=s if n else None,
                                        implementation=impl, interpret=impl in PALLAS)
                 for n, lay in enumerate(branches)]
        return merge(parts)

    try:
        got = value_and_grads(merged, inputs)
    except NotImplementedError as e:
        _skip_refused(impl, case, e)
    assert_results_close(got, reference_results(case), case, 2e-5)


def test_merge_of_empty_rows_is_zero_and_finite():
    o = jnp.ones((1, 3, 2, 4))
    lse = jnp.full((1, 2, 3), -jnp.inf).at[0, 0, 0].set(0.5)  # one row seen by one branch

    @jax.jit
    def run(o1, o2, lse1, lse2):
        (m_o, m_lse), vjp = jax.vjp(lambda *a: merge([a[:2], a[2:]]), o1, lse1, o2, lse2)
        return m_o, m_lse, vjp((jnp.ones_like(m_o), jnp.ones_like(m_lse)))

    m_o, m_lse, grads = run(o, 2 * o, lse, jnp.full_like(lse, -jnp.inf))
    want_o = np.zeros((1, 3, 2, 4))
    want_o[0, 0, 0] = 1.0
    np.testing.assert_array_equal(host(m_o), want_o)
    np.testing.assert_array_equal(np.isneginf(host(m_lse)), np.isneginf(host(lse)))
    assert all(np.isfinite(host(g)).all() for g in grads)


@pytest.mark.parametrize("impl", _impl_params())
def test_jit_with_layout_as_argument(impl):
    """The layout as a pytree argument of a jitted function (its arrays traced, as a layout
    built on device would be). A layout of numpy arrays closed over (constants) is what every
    test_matches_reference call compiles."""
    case = CASE["tpu_blocks_128_causal" if impl == "tpu" else "window_packed_ragged_gqa_sinks"]
    inputs, layout, _ = make(case)
    x = inputs
    device_layout = jax.tree.map(jnp.asarray, layout)
    assert isinstance(device_layout, BlockLayout)

    @jax.jit
    def as_argument(q, k, v, lay):
        return block_sparse_attention(q, k, v, lay, segment_ids=x["seg"], sinks=x["sinks"],
                                      implementation=impl, interpret=impl in PALLAS)

    try:
        o, lse = as_argument(x["q"], x["k"], x["v"], device_layout)
    except NotImplementedError as e:
        _skip_refused(impl, case, e)
    (want_o, want_lse), _ = reference_results(case)
    assert_close(o, want_o, 2e-5, "o")
    assert_close(lse, want_lse, 2e-5, "lse")


def test_default_implementation_on_cpu_is_xla_and_sigmoid_returns_no_lse():
    q = jnp.ones((1, 16, 2, 16))
    layout = masks.build_layout(masks.Causal(), 16, 16, 16, 16)
    o, lse = jax.jit(lambda q: block_sparse_attention(q, q, q, layout, score="sigmoid"))(q)
    assert lse is None and o.shape == q.shape
    assert dispatch.last(OP).implementation == "xla"


# ----------------------------------------------------------------------------- errors

def _args(t=32, h=4, kv_heads=2, mask=None, tk=None):
    tk = t if tk is None else tk
    q = jnp.zeros((2, t, h, 16))
    k = jnp.zeros((2, tk, kv_heads, 16))
    v = jnp.zeros((2, tk, kv_heads, 8))
    layout = masks.build_layout(mask or masks.Causal(), t, tk, 16, 16)
    return q, k, v, layout


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v, lay: dict(q=q[0]), r"\bq must be a 4-d array"),
    (lambda q, k, v, lay: dict(k=k[..., :8]), r"\bk .* must be \[B, Tk, K, D\]"),
    (lambda q, k, v, lay: dict(k=jnp.zeros((2, 32, 3, 16)), v=jnp.zeros((2, 32, 3, 8))),
     r"kv heads of k \(3\)"),
    (lambda q, k, v, lay: dict(v=v[:, :5]), r"\bv .* must be \[B, Tk, K, Dv\]"),
    (lambda q, k, v, lay: dict(k=k.astype(jnp.bfloat16)), r"q, k, v must share a dtype"),
    (lambda q, k, v, lay: dict(q=q.astype(jnp.int32)), r"\bq dtype int32"),
    (lambda q, k, v, lay: dict(layout=masks.build_layout(masks.Causal(), 40, 40, 16, 16)),
     r"layout\.q_len = 40, but the queries have Tq = 32"),
    (lambda q, k, v, lay: dict(layout=masks.build_layout(masks.Causal(), 32, 32, 16, 16)
                               .__class__(**{**vars(lay), "kv_counts": lay.kv_counts[..., :1]})),
     r"layout\.kv_counts must have shape \[1, 1, 2\]"),
    (lambda q, k, v, lay: dict(layout=masks.build_layout(
        masks.PerHead([masks.Causal()] * 3), 32, 32, 16, 16)), r"layout\.kv_blocks has 3 heads"),
    (lambda q, k, v, lay: dict(layout=masks.build_layout(
        masks.DocumentCausal(np.ones((3, 32), np.int32)), 32, 32, 16, 16)), r"layout\.kv_blocks has 3 rows"),
    (lambda q, k, v, lay: dict(layout="causal"), r"layout must be a BlockLayout"),
    (lambda q, k, v, lay: dict(segment_ids=jnp.ones((2, 31), jnp.int32)), r"segment_ids must be int"),
    (lambda q, k, v, lay: dict(segment_ids=jnp.ones((2, 32))), r"segment_ids must be int"),
    (lambda q, k, v, lay: dict(kv_segment_ids=jnp.ones((2, 32), jnp.int32)),
     r"kv_segment_ids given without segment_ids"),
    (lambda q, k, v, lay: dict(score="relu"), r"score must be one of"),
    (lambda q, k, v, lay: dict(score="sigmoid", sinks=jnp.zeros(4)), r"sinks only exist for"),
    (lambda q, k, v, lay: dict(sinks=jnp.zeros(3)), r"sinks must be a float array \[H\]"),
    (lambda q, k, v, lay: dict(sigmoid_bias=1.0), r"sigmoid_bias=1.0 is only used"),
    (lambda q, k, v, lay: dict(score="sigmoid", sigmoid_bias=jnp.float32(1.0)),
     r"sigmoid_bias must be a finite Python float"),
    (lambda q, k, v, lay: dict(logit_softcap=0.0), r"logit_softcap must be None or a finite float > 0"),
    (lambda q, k, v, lay: dict(logit_softcap=float("inf")), r"logit_softcap must be None or a finite"),
    (lambda q, k, v, lay: dict(scale=-1.0), r"scale must be > 0"),
    (lambda q, k, v, lay: dict(implementation="xla", interpret=True), r"interpret=True needs"),
    (lambda q, k, v, lay: dict(interpret=True), r"interpret=True needs"),
    (lambda q, k, v, lay: dict(implementation="cuda"), r"unknown implementation 'cuda'"),
])
def test_errors_name_the_argument(change, match):
    q, k, v, layout = _args()
    kwargs = dict(q=q, k=k, v=v, layout=layout)
    kwargs.update(change(q, k, v, layout))
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"),
                               kwargs.pop("layout"), **kwargs)


def test_cross_attention_segment_errors():
    q, k, v, layout = _args(t=32, tk=48, mask=masks.Full())
    with pytest.raises(ValueError, match=r"kv_segment_ids is None.*Tq = 32 != Tk = 48"):
        block_sparse_attention(q, k, v, layout, segment_ids=jnp.ones((2, 32), jnp.int32))
    with pytest.raises(ValueError, match=r"kv_segment_ids must be int \[B, T\] = \[2, 48\]"):
        block_sparse_attention(q, k, v, layout, segment_ids=jnp.ones((2, 32), jnp.int32),
                               kv_segment_ids=jnp.ones((2, 32), jnp.int32))


def test_merge_errors():
    o, lse = jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="pairs must hold at least one"):
        merge([])
    with pytest.raises(ValueError, match=r"pairs\[1\] must be \(o, lse\)"):
        merge([(o, lse), (o, None)])
    with pytest.raises(ValueError, match=r"pairs\[1\]: o must be"):
        merge([(o, lse), (o, lse[:, :1])])

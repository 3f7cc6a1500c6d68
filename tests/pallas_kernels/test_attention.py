"""Conformance suite of `pallas_kernels.attention`: one set of tests run for every implementation.

The reference is checked against a loop-by-loop numpy softmax / sigmoid (with sinks and a value
head dim Dv != D) on tiny cases; every registered implementation is then checked against the
reference (forward in float32 and bfloat16, gradients including d sinks, padding, decode
against a KV cache, the log-sum-exp of `attention_with_lse`), and the blocked path is checked
never to build a [Tq, Tk] array. The score options (sinks, sigmoid, Dv) ride on a few extra
parametrised cases of each test, not on a full cross product, to keep the default tier short.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.attention import reference
from pallas_kernels.attention.api import OP, attention, attention_with_lse

# The Pallas implementations run in interpret mode here and have their own shape rules:
# tests/pallas_kernels/test_attention_pallas.py checks them against the reference.
IMPLS = tuple(i for i in dispatch.implementations(OP) if i not in pw.PALLAS)
slow = pytest.mark.slow


# ----------------------------------------------------------------------------- inputs

@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    t: int
    heads: int
    kv_heads: int
    window: int | None = None
    softcap: float | None = None
    block_q: int = 64
    block_k: int = 64
    b: int = 2
    d: int = 16
    layout: str = "packed"  # "single": one document per row; "packed": several + padding tail
    q_gain: float = 1.0  # larger logits, so that the soft-cap matters
    dv: int | None = None  # value head dim (None: d)
    sinks: bool = False  # one learned sink logit per query head
    score: str = "softmax"
    sigmoid_bias: float = 0.0

    def __str__(self):
        return self.name


CASES = [
    Case("mha_ragged_packed", t=200, heads=2, kv_heads=2),
    Case("gqa_window37", t=200, heads=4, kv_heads=2, window=37),
    Case("mqa_softcap_bq32_bk64", t=130, heads=4, kv_heads=1, softcap=2.0, block_q=32,
         block_k=64, q_gain=3.0),
    Case("window1", t=100, heads=2, kv_heads=1, window=1, block_q=32, block_k=32),
    Case("window_eq_block_bq64_bk32", t=100, heads=2, kv_heads=2, window=32, block_q=64,
         block_k=32),
    Case("window_ge_t", t=100, heads=2, kv_heads=2, window=150, block_q=32, block_k=64),
    Case("single_doc_short", t=7, heads=3, kv_heads=3, layout="single", block_q=128,
         block_k=128),
    # Coprime block sizes put every block-range bound (causal and window, both passes) exactly
    # on some block edge, so an off-by-one in the skipping arithmetic drops a visible key.
    Case("coprime_blocks_window20", t=120, heads=2, kv_heads=1, window=20, block_q=17,
         block_k=16, layout="single"),
]
# The score options, each on a ragged, packed (GQA / MQA) case.
SINKS_CASE = Case("sinks_gqa_dv24", t=150, heads=4, kv_heads=2, dv=24, sinks=True)
SIGMOID_CASE = Case("sigmoid_mqa_softcap_dv8", t=130, heads=4, kv_heads=1, dv=8, score="sigmoid",
                    sigmoid_bias=-2.0, softcap=2.0, block_q=32, block_k=64, q_gain=3.0)
OPTION_CASES = [
    SINKS_CASE,
    SIGMOID_CASE,
    pytest.param(Case("sinks_softcap_window_coprime", t=120, heads=2, kv_heads=1, window=20,
                      softcap=1.5, block_q=17, block_k=16, layout="single", sinks=True,
                      q_gain=2.0), marks=slow),
]
# Option sets of the tests that build their own inputs (decode, padding, memory).
OPTIONS = {
    "plain": {},
    "sinks_dv": dict(sinks=True, dv=24),
    "sigmoid": dict(score="sigmoid", sigmoid_bias=-1.0, dv=8),
}


def packed_ids(rng: np.random.Generator, b: int, t: int, layout: str):
    """Segment ids and positions [b, t]: documents of random lengths, positions restarting at 0,
    and (packed) a padding tail of segment 0."""
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for row in range(b):
        if layout == "single":
            seg[row], pos[row] = 1, np.arange(t)
            continue
        end = t - int(rng.integers(0, t // 6 + 1))
        cursor, doc = 0, 1
        while cursor < end:
            length = min(int(rng.integers(1, max(2, t // 2))), end - cursor)
            seg[row, cursor:cursor + length] = doc
            pos[row, cursor:cursor + length] = np.arange(length)
            cursor, doc = cursor + length, doc + 1
    return jnp.asarray(seg), jnp.asarray(pos)


def make_inputs(case: Case, dtype=jnp.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(case.b, case.t, case.heads, case.d)) * case.q_gain
    k = rng.normal(size=(case.b, case.t, case.kv_heads, case.d))
    v = rng.normal(size=(case.b, case.t, case.kv_heads, case.dv or case.d))
    seg, pos = packed_ids(rng, case.b, case.t, case.layout)
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)), seg, pos


def make_sinks(case: Case) -> jax.Array | None:
    """float32 [H] sink logits around the typical logit (None without sinks), so that the sink
    takes a sizeable share of the weight without swamping the keys."""
    if not case.sinks:
        return None
    return jnp.asarray(np.random.default_rng(7).normal(size=case.heads) + 1.0, jnp.float32)


def score_options(case: Case, sinks=None) -> dict:
    """The case's score keyword arguments; sinks: an explicit array (e.g. a traced one) or None
    for `make_sinks(case)`."""
    return dict(sinks=make_sinks(case) if sinks is None else sinks, score=case.score,
                sigmoid_bias=case.sigmoid_bias)


def run(impl, case: Case, q, k, v, seg, pos, sinks=None, **kw):
    return attention(q, k, v, segment_ids=seg, positions=pos, window=case.window,
                     logit_softcap=case.softcap, implementation=impl, block_q=case.block_q,
                     block_k=case.block_k, **score_options(case, sinks), **kw)


def run_with_lse(impl, case: Case, q, k, v, seg, pos, **kv_ids):
    """`attention_with_lse` with the case's options, compiled as one program (cheaper than
    dispatching it op by op); kv_ids: kv_segment_ids / kv_positions for a cache."""
    def f(q, k, v, seg, pos, kv_ids):
        return attention_with_lse(q, k, v, segment_ids=seg, positions=pos, window=case.window,
                                  logit_softcap=case.softcap, implementation=impl,
                                  block_q=case.block_q, block_k=case.block_k,
                                  **score_options(case), **kv_ids)
    return jax.jit(f)(q, k, v, seg, pos, kv_ids)


def with_impls(plain_rows, option_rows) -> list:
    """Parameter rows (impl, *row): every implementation on `plain_rows`, every one but the
    reference on `option_rows`. Those tests compare an implementation with the reference, and
    the reference's score options are checked against the numpy loop, so a reference row of
    them would only compare the reference with itself. Rows may be pytest.param (marks kept)."""
    def with_impl(impl, row):
        if isinstance(row, type(pytest.param(None))):
            return pytest.param(impl, *row.values, marks=row.marks)
        return (impl, *row)
    return ([with_impl(impl, row) for impl in IMPLS for row in plain_rows]
            + [with_impl(impl, row) for impl in IMPLS if impl != "reference"
               for row in option_rows])


def host(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


# ----------------------------------------------------------------------------- numpy loop

def loop_attention(q, k, v, seg_q, pos_q, seg_k, pos_k, window, softcap, scale, sinks=None,
                   score="softmax", sigmoid_bias=0.0):
    """Attention one (batch, query, head) at a time, straight from the definition.

    Returns (out [B, Tq, H, Dv], lse [B, Tq, H]) in float64: softmax over the visible logits and
    the head's sink (a logit with no value); sigmoid: sum of sigmoid(logit + bias) * value and
    lse = log of the summed weights. A query with nothing (not even a sink) has 0 and 0.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, tq, h, v.shape[-1]))
    lse = np.zeros((b, tq, h))
    for bi in range(b):
        for i in range(tq):
            for hi in range(h):
                logits, values = [], []
                for j in range(k.shape[1]):
                    same = seg_q[bi, i] == seg_k[bi, j] and seg_k[bi, j] != 0
                    causal = pos_k[bi, j] <= pos_q[bi, i]
                    inside = window is None or pos_q[bi, i] - pos_k[bi, j] < window
                    if same and causal and inside:
                        s = scale * float(q[bi, i, hi] @ k[bi, j, hi // g])
                        if softcap is not None:
                            s = softcap * math.tanh(s / softcap)
                        logits.append(s)
                        values.append(v[bi, j, hi // g])
                if score == "sigmoid":
                    weights = [1.0 / (1.0 + math.exp(-(s + sigmoid_bias))) for s in logits]
                    for w, val in zip(weights, values):
                        out[bi, i, hi] += w * val
                    if weights:
                        lse[bi, i, hi] = math.log(sum(weights))
                    continue
                extra = [] if sinks is None else [float(sinks[hi])]
                if logits or extra:
                    top = max(logits + extra)
                    total = sum(math.exp(s - top) for s in logits + extra)
                    for s, val in zip(logits, values):
                        out[bi, i, hi] += math.exp(s - top) / total * val
                    lse[bi, i, hi] = top + math.log(total)
    return out, lse


@pytest.mark.parametrize("window,softcap,cross,options", [
    (None, None, False, "plain"), (3, None, False, "plain"), (None, 0.7, False, "plain"),
    (2, 1.5, True, "plain"), (None, None, False, "sinks_dv"), (3, 1.5, True, "sinks_dv"),
    (None, None, False, "sigmoid"), (2, 0.7, True, "sigmoid")])
def test_reference_matches_numpy_loop(window, softcap, cross, options):
    rng = np.random.default_rng(1)
    opts = OPTIONS[options]
    b, t, h, kvh, d = 2, 9, 4, 2, 4
    dv = opts.get("dv", d)
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    seg_q = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3, 3]], np.int32)
    pos_q = np.array([[0, 1, 2, 0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
    if cross:  # a shuffled cache of 6 slots (decode), one empty
        tk = 6
        seg_k = np.array([[2, 2, 0, 2, 1, 2], [3, 3, 3, 3, 3, 3]], np.int32)
        pos_k = np.array([[3, 0, 5, 2, 1, 1], [8, 2, 6, 7, 4, 5]], np.int32)
    else:
        tk, seg_k, pos_k = t, seg_q, pos_q
    k = rng.normal(size=(b, tk, kvh, d)).astype(np.float32)
    v = rng.normal(size=(b, tk, kvh, dv)).astype(np.float32)
    sinks = rng.normal(size=h).astype(np.float32) if opts.get("sinks") else None
    score, bias = opts.get("score", "softmax"), opts.get("sigmoid_bias", 0.0)
    scale = 0.8
    want, want_lse = loop_attention(q, k, v, seg_q, pos_q, seg_k, pos_k, window, softcap,
                                    scale, sinks, score, bias)
    got, lse = reference.attention_with_lse(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg_q), jnp.asarray(pos_q),
        jnp.asarray(seg_k), jnp.asarray(pos_k), window=window, logit_softcap=softcap,
        scale=scale, sinks=None if sinks is None else jnp.asarray(sinks), score=score,
        sigmoid_bias=bias)
    assert got.shape == (b, t, h, dv)
    np.testing.assert_allclose(host(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(host(lse), want_lse, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- conformance

def _sinks_arg(case: Case) -> jax.Array:
    """The sinks to differentiate: the case's, or zeros (unused) for a case without sinks."""
    return make_sinks(case) if case.sinks else jnp.zeros((case.heads,), jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _value_and_grads(impl, case, q, k, v, seg, pos, w, sinks):
    """Output and (dq, dk, dv, dsinks) of sum(out * w): one compiled program (faster than
    eager). sinks [H] are used (and differentiated) only when the case has sinks."""
    def f(q, k, v, sinks):
        return run(impl, case, q, k, v, seg, pos, sinks=sinks if case.sinks else None)
    out, vjp = jax.vjp(f, q, k, v, sinks)
    return out, vjp(w.astype(out.dtype))


def _out_weights(case: Case) -> jax.Array:
    """Random cotangent of the output [B, T, H, Dv]."""
    shape = (case.b, case.t, case.heads, case.dv or case.d)
    return jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("case", CASES + OPTION_CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_float32_forward_and_gradients(impl, case):
    (q, k, v), seg, pos = make_inputs(case)
    w, sinks = _out_weights(case), _sinks_arg(case)
    out, grads = _value_and_grads(impl, case, q, k, v, seg, pos, w, sinks)
    want_out, want_grads = _value_and_grads("reference", case, q, k, v, seg, pos, w, sinks)
    assert out.dtype == jnp.float32 and out.shape == w.shape
    np.testing.assert_allclose(host(out), host(want_out), rtol=1e-5, atol=1e-5)
    names = ("q", "k", "v", "sinks") if case.sinks else ("q", "k", "v")
    for name, g, r in zip(names, grads, want_grads):
        np.testing.assert_allclose(host(g), host(r), rtol=5e-5, atol=5e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("case", CASES[1:3] + [pytest.param(c, marks=slow)
                                              for c in (SINKS_CASE, SIGMOID_CASE)], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_forward_and_gradients(impl, case):
    (q, k, v), seg, pos = make_inputs(case, jnp.bfloat16)
    w, sinks = _out_weights(case), _sinks_arg(case)
    out, grads = _value_and_grads(impl, case, q, k, v, seg, pos, w, sinks)
    # The same bf16 values attended in float32: only the implementation's rounding differs.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want_out, want_grads = _value_and_grads("reference", case, *f32, seg, pos, w, sinks)
    assert out.dtype == jnp.bfloat16
    # Sigmoid outputs are sums of unnormalised weights, so scale by the largest output.
    tol = 2e-2 * max(1.0, np.abs(host(want_out)).max())
    np.testing.assert_allclose(host(out), host(want_out), rtol=2e-2, atol=tol)
    names = ("q", "k", "v", "sinks") if case.sinks else ("q", "k", "v")
    for name, g, r in zip(names, grads, want_grads):
        assert g.dtype == (jnp.float32 if name == "sinks" else jnp.bfloat16)
        tol = 3e-2 * np.abs(host(r)).max()
        np.testing.assert_allclose(host(g), host(r), rtol=0, atol=tol, err_msg=f"d{name}")


@pytest.mark.parametrize("impl,options", [
    pytest.param(impl, options, marks=slow if (impl, options) == ("reference", "sigmoid") else ())
    for impl in IMPLS for options in OPTIONS])
def test_padding_outputs_zero_with_finite_gradients(impl, options):
    case = Case("padding", t=70, heads=2, kv_heads=1, window=16, block_q=32, block_k=32, b=3,
                **OPTIONS[options])
    (q, k, v), seg, pos = make_inputs(case)
    seg = seg.at[2].set(0)  # a row that is all padding
    pad = host(seg) == 0
    sinks = _sinks_arg(case)
    w = jnp.ones(_out_weights(case).shape)
    out, (dq, dk, dv, dsinks) = _value_and_grads(impl, case, q, k, v, seg, pos, w, sinks)
    assert np.all(host(out)[pad] == 0.0)
    for g in (dq, dk, dv, dsinks):
        assert np.all(np.isfinite(host(g)))
    # Padding neither receives nor sends gradient.
    assert np.all(host(dq)[pad] == 0.0)
    assert np.all(host(dk)[pad] == 0.0) and np.all(host(dv)[pad] == 0.0)


@pytest.mark.parametrize("options", [pytest.param("plain", marks=slow), "sinks_dv", "sigmoid"])
@pytest.mark.parametrize("impl", [name for name in IMPLS if name != "reference"])
def test_lse_matches_reference_in_blocked_and_decode_form(impl, options):
    """`attention_with_lse`: the self-attention (blocked) form and a decode-form call (a few
    queries against the whole sequence as a cache) give the reference's lse; padding queries
    (no visible key) give output 0 and lse = their sink's logit (softmax with sinks), else 0."""
    case = Case("lse", t=90, heads=4, kv_heads=2, window=30, softcap=3.0, block_q=32, block_k=32,
                q_gain=2.0, **OPTIONS[options])
    (q, k, v), seg, pos = make_inputs(case, seed=6)
    seg = seg.at[:, -5:].set(0)  # a padding tail in every row
    want_out, want_lse = run_with_lse("reference", case, q, k, v, seg, pos)
    out, lse = run_with_lse(impl, case, q, k, v, seg, pos)
    np.testing.assert_allclose(host(out), host(want_out), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host(lse), host(want_lse), rtol=1e-5, atol=1e-5)
    pad = host(seg) == 0
    sinks = make_sinks(case)
    assert np.all(host(out)[pad] == 0.0)
    np.testing.assert_array_equal(host(lse)[pad], np.broadcast_to(
        0.0 if sinks is None else host(sinks), lse.shape)[pad])
    i = slice(60, 62)  # two queries (Tq * G = 4 rows: the decode forward)
    out, lse = run_with_lse(impl, case, q[:, i], k, v, seg[:, i], pos[:, i],
                            kv_segment_ids=seg, kv_positions=pos)
    np.testing.assert_allclose(host(out), host(want_out)[:, i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host(lse), host(want_lse)[:, i], rtol=1e-5, atol=1e-5)


def test_sigmoid_lse_does_not_underflow():
    """Weights far below float32's smallest normal still give their log total, not log 0."""
    case = Case("tiny_weights", t=24, heads=2, kv_heads=1, score="sigmoid", sigmoid_bias=-120.0,
                block_q=8, block_k=8)
    (q, k, v), seg, pos = make_inputs(case)
    lses = [host(run_with_lse(impl, case, q, k, v, seg, pos)[1]) for impl in IMPLS]
    seen = host(seg) != 0
    for lse in lses:
        assert np.all(np.isfinite(lse)) and np.all(lse[seen] < -100)
        np.testing.assert_allclose(lse, lses[0], rtol=1e-5)


# ----------------------------------------------------------------------------- decode

def _decode_slots(rng, t, window, cache_kind, chunk):
    """Which token each cache slot holds at each decode step (steps start every `chunk` tokens).

    Returns the first query index of each step, the token held by each cache slot
    [steps, S] and whether the slot is filled [steps, S]. "linear": S == t slots, token u in
    slot u; "ring": S == window slots, token u in slot perm[u % S] (shuffled slot order).
    """
    steps = list(range(0, t, chunk))
    size = t if cache_kind == "linear" else window
    perm = rng.permutation(size)
    slot_of = (lambda u: u) if cache_kind == "linear" else (lambda u: perm[u % size])
    slots = np.empty((len(steps), size), np.int64)
    filled = np.zeros((len(steps), size), bool)
    for n, s in enumerate(steps):
        last = min(s + chunk, t) - 1
        first = 0 if cache_kind == "linear" else max(0, last - size + 1)
        for u in range(first, last + 1):
            slots[n, slot_of(u)] = u
            filled[n, slot_of(u)] = True
    return steps, slots, filled


@pytest.mark.parametrize("impl,cache_kind,chunk,blocks,options", with_impls([
    ("linear", 1, (16, 16), "plain"),  # one KV block (bk grows to the cache: one query block)
    ("linear", 1, (1, 8), "plain"),  # several KV blocks
    ("linear", 4, (2, 8), "plain"),  # several new tokens per step: several query and KV blocks
    ("ring", 1, (1, 4), "plain"),  # shuffled ring buffer of `window` slots, two KV blocks
], [
    ("linear", 1, (1, 8), "sinks_dv"),  # the score options in the decode forward ...
    ("ring", 1, (1, 4), "sigmoid"),
    pytest.param("linear", 4, (2, 8), "sinks_dv", marks=slow),  # ... and in the blocked forward
]))
def test_decode_with_cache_matches_parallel(impl, cache_kind, chunk, blocks, options):
    rng = np.random.default_rng(3)
    b, t, h, kvh, d = 2, 40, 4, 2, 16
    window = 8 if cache_kind == "ring" else None
    case = Case("decode", t=t, heads=h, kv_heads=kvh, window=window, block_q=16, block_k=16, b=b,
                **OPTIONS[options])
    dv = case.dv or d
    (q, k, v), seg, pos = make_inputs(case, seed=4)
    parallel = host(run(impl, case, q, k, v, seg, pos))

    steps, slots, filled = _decode_slots(rng, t, window, cache_kind, chunk)
    n, size = slots.shape
    garbage = lambda *shape: rng.normal(size=shape).astype(np.float32) * 10
    kc, vc = garbage(n, b, size, kvh, d), garbage(n, b, size, kvh, dv)
    sc = np.zeros((n, b, size), np.int32)
    pc = rng.integers(0, t, size=(n, b, size)).astype(np.int32)
    kn, vn, sn, pn = (np.asarray(x) for x in (k, v, seg, pos))
    for i in range(n):
        for slot in np.flatnonzero(filled[i]):
            u = slots[i, slot]
            kc[i, :, slot], vc[i, :, slot] = kn[:, u], vn[:, u]
            sc[i, :, slot], pc[i, :, slot] = sn[:, u], pn[:, u]
    qn = np.asarray(q)
    q_new = np.stack([qn[:, s:s + chunk] for s in steps])  # [n, b, chunk, h, d]
    s_new = np.stack([sn[:, s:s + chunk] for s in steps])
    p_new = np.stack([pn[:, s:s + chunk] for s in steps])
    # Every step in one call: batch row (step, b) holds that step's new token(s) and the cache
    # as it stood then. Rows are independent, so this is the same as decoding step by step.
    flat = lambda x: jnp.asarray(x.reshape(n * b, *x.shape[2:]))
    out = attention(flat(q_new), flat(kc), flat(vc), segment_ids=flat(s_new),
                    positions=flat(p_new), kv_segment_ids=flat(sc), kv_positions=flat(pc),
                    window=window, implementation=impl, block_q=blocks[0], block_k=blocks[1],
                    **score_options(case))
    out = host(out).reshape(n, b, chunk, h, dv)
    for i, s in enumerate(steps):
        np.testing.assert_allclose(out[i], parallel[:, s:s + chunk], rtol=1e-5, atol=1e-5,
                                   err_msg=f"step {s}")


@pytest.mark.parametrize("impl,tq,blocks,options", with_impls([
    (2, (128, 16), "plain"),  # decode form
    (6, (4, 16), "plain"),  # blocked form
], [
    (2, (128, 16), "sinks_dv"),  # the decode form's backward with d sinks
    pytest.param(6, (4, 16), "sigmoid", marks=slow),
]))
def test_gradients_against_a_shuffled_cache(impl, tq, blocks, options):
    rng = np.random.default_rng(5)
    b, tk, h, kvh, d = 2, 40, 4, 2, 16
    opts = OPTIONS[options]
    dv = opts.get("dv", d)
    q = jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, tk, kvh, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, tk, kvh, dv)), jnp.float32)
    seg = jnp.asarray(rng.integers(1, 3, size=(b, tq)), jnp.int32)
    pos = jnp.asarray(rng.integers(10, 30, size=(b, tq)), jnp.int32)
    kseg = jnp.asarray(rng.integers(0, 3, size=(b, tk)), jnp.int32)  # 0: empty slots
    kpos = jnp.asarray(rng.permuted(np.tile(np.arange(tk), (b, 1)), axis=1), jnp.int32)
    w = jnp.asarray(rng.normal(size=(b, tq, h, dv)), jnp.float32)
    sinks = jnp.asarray(rng.normal(size=h), jnp.float32)
    has_sinks = opts.get("sinks", False)
    score = dict(score=opts.get("score", "softmax"), sigmoid_bias=opts.get("sigmoid_bias", 0.0))

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(impl, q, k, v, sinks):
        def f(q, k, v, sinks):
            return attention(q, k, v, segment_ids=seg, positions=pos, kv_segment_ids=kseg,
                             kv_positions=kpos, window=12, logit_softcap=3.0,
                             sinks=sinks if has_sinks else None, implementation=impl,
                             block_q=blocks[0], block_k=blocks[1], **score)
        out, vjp = jax.vjp(f, q, k, v, sinks)
        return out, vjp(w)

    out, grads = value_and_grads(impl, q, k, v, sinks)
    want_out, want_grads = value_and_grads("reference", q, k, v, sinks)
    np.testing.assert_allclose(host(out), host(want_out), rtol=1e-5, atol=1e-5)
    names = ("q", "k", "v", "sinks") if has_sinks else ("q", "k", "v")
    for name, g, r in zip(names, grads, want_grads):
        np.testing.assert_allclose(host(g), host(r), rtol=5e-5, atol=5e-5, err_msg=f"d{name}")


# ----------------------------------------------------------------------------- dispatch

@pytest.fixture
def refusing_xla():
    """Temporarily replace the "xla" implementation by one that refuses every call."""
    original = dispatch.get(OP, "xla")

    def refuse(*args, **kwargs):
        raise NotImplementedError("refused for the test")

    dispatch.register(OP, "xla", refuse)
    try:
        yield
    finally:
        dispatch.register(OP, "xla", original)


def test_explicit_implementation_never_falls_back(refusing_xla):
    (q, k, v), seg, pos = make_inputs(CASES[0])
    with pytest.raises(NotImplementedError, match=r"'xla'.*refused for the test"):
        attention(q, k, v, segment_ids=seg, positions=pos, implementation="xla")


def test_default_falls_back_and_records_the_choice(refusing_xla, caplog):
    case = Case("fallback", t=33, heads=2, kv_heads=1)  # a signature no other test logs
    (q, k, v), seg, pos = make_inputs(case)
    with caplog.at_level("INFO", logger="chimera.kernels"):
        got = run(None, case, q, k, v, seg, pos)
        run(None, case, q, k, v, seg, pos)
    choice = dispatch.last(OP)
    assert choice.implementation == "reference"
    assert choice.skipped == (("xla", "refused for the test"),)
    assert "'reference'" in dispatch.describe(OP)
    assert dispatch.last(OP, choice.signature) == choice
    assert sum("'reference'" in r.getMessage() for r in caplog.records) == 1  # logged once
    np.testing.assert_allclose(host(got), host(run("reference", case, q, k, v, seg, pos)))


def test_default_prefers_xla():
    case = CASES[0]
    (q, k, v), seg, pos = make_inputs(case)
    run(None, case, q, k, v, seg, pos)
    assert dispatch.last(OP).implementation == "xla"


def test_unknown_implementation_lists_accepted_names():
    (q, k, v), seg, pos = make_inputs(CASES[0])
    with pytest.raises(ValueError, match=r"'pallas'.*reference.*xla"):
        attention(q, k, v, segment_ids=seg, positions=pos, implementation="pallas")


def test_signature_records_the_score_options():
    """Calls that differ only in their score options are told apart in the dispatch log."""
    case = Case("signature", t=5, heads=2, kv_heads=1, dv=3, score="sigmoid", sigmoid_bias=-1.5)
    (q, k, v), seg, pos = make_inputs(case)
    trace = lambda case: jax.make_jaxpr(  # dispatch happens (and is recorded) while tracing
        lambda q, k, v: run("reference", case, q, k, v, seg, pos))(q, k, v)
    trace(case)
    sig = dict(dispatch.last(OP).signature)
    assert (sig["score"], sig["sigmoid_bias"], sig["sinks"]) == ("sigmoid", -1.5, False)
    assert sig["v"] == "float32[2,5,1,3]"
    trace(dataclasses.replace(case, score="softmax", sigmoid_bias=0.0, sinks=True))
    sig = dict(dispatch.last(OP).signature)
    assert (sig["score"], sig["sigmoid_bias"], sig["sinks"]) == ("softmax", 0.0, True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=0), "window"),
    (dict(logit_softcap=-1.0), "logit_softcap"),
    (dict(block_q=0), "block_q"),
    (dict(kv_positions=jnp.zeros((2, 200), jnp.int32)), "kv_segment_ids"),
    (dict(v=jnp.zeros((2, 199, 2, 16))), "^v "),
    (dict(score="relu"), "score"),
    (dict(sigmoid_bias=1.0), "sigmoid_bias"),
    (dict(score="sigmoid", sigmoid_bias=float("nan")), "sigmoid_bias"),
    (dict(score="sigmoid", sinks=jnp.zeros(2)), "sinks"),
    (dict(sinks=jnp.zeros(3)), "sinks"),
    (dict(sinks=jnp.zeros(2, jnp.int32)), "sinks"),
    (dict(scale=0.0), "scale"),
])
def test_invalid_arguments_raise_value_error(kwargs, match):
    (q, k, v), seg, pos = make_inputs(CASES[0])
    v = kwargs.pop("v", v)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, segment_ids=seg, positions=pos, **kwargs)


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("impl,materialises,options", [
    ("xla", False, "plain"), ("reference", True, "plain"), ("xla", False, "sinks_dv"),
    ("xla", False, "sigmoid")])
def test_no_tq_by_tk_array_in_forward_or_backward(impl, materialises, options,
                                                  largest_intermediate):
    b, t, h, kvh, d = 1, 2048, 2, 1, 16
    opts = dict(OPTIONS[options])
    dv = opts.pop("dv", d)
    if opts.pop("sinks", False):
        opts["sinks"] = jnp.zeros((h,), jnp.float32)
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    k = jax.ShapeDtypeStruct((b, t, kvh, d), jnp.float32)
    v = jax.ShapeDtypeStruct((b, t, kvh, dv), jnp.float32)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    sinks = opts.pop("sinks", None)

    def loss(q, k, v, sinks, seg, pos):
        out = attention(q, k, v, segment_ids=seg, positions=pos, sinks=sinks,
                        implementation=impl, block_q=128, block_k=128, **opts)
        return out.sum()

    def with_lse(q, k, v, sinks, seg, pos):  # forward only, its own passes
        return attention_with_lse(q, k, v, segment_ids=seg, positions=pos, sinks=sinks,
                                  implementation=impl, block_q=128, block_k=128, **opts)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2) if sinks is None else (0, 1, 2, 3))
    for fn in (grad, with_lse):
        jaxpr = jax.make_jaxpr(fn)(q, k, v, sinks, ids, ids)
        per_batch_head = largest_intermediate(jaxpr.jaxpr) / (b * h)
        assert (per_batch_head >= t * t) == materialises, per_batch_head

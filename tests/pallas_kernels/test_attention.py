"""Conformance suite of `pallas_kernels.attention`: one set of tests run for every implementation.

The reference is checked against a loop-by-loop numpy softmax on tiny cases; every registered
implementation is then checked against the reference (forward in float32 and bfloat16,
gradients, padding, decode against a KV cache), and the blocked path is checked never to build
a [Tq, Tk] array.
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
from pallas_kernels.attention import reference
from pallas_kernels.attention.api import OP, attention

IMPLS = dispatch.implementations(OP)


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
    v = rng.normal(size=(case.b, case.t, case.kv_heads, case.d))
    seg, pos = packed_ids(rng, case.b, case.t, case.layout)
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)), seg, pos


def run(impl, case: Case, q, k, v, seg, pos, **kw):
    return attention(q, k, v, segment_ids=seg, positions=pos, window=case.window,
                     logit_softcap=case.softcap, implementation=impl, block_q=case.block_q,
                     block_k=case.block_k, **kw)


def host(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


# ----------------------------------------------------------------------------- numpy loop

def loop_attention(q, k, v, seg_q, pos_q, seg_k, pos_k, window, softcap, scale):
    """Attention one (batch, query, head) at a time, straight from the definition."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros_like(q)
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
                if logits:
                    w = np.exp(np.array(logits) - max(logits))
                    out[bi, i, hi] = (w[:, None] * np.array(values)).sum(0) / w.sum()
    return out


@pytest.mark.parametrize("window,softcap,cross", [
    (None, None, False), (3, None, False), (None, 0.7, False), (2, 1.5, True)])
def test_reference_matches_numpy_loop(window, softcap, cross):
    rng = np.random.default_rng(1)
    b, t, h, kvh, d = 2, 9, 4, 2, 4
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
    v = rng.normal(size=(b, tk, kvh, d)).astype(np.float32)
    scale = 0.8
    want = loop_attention(q, k, v, seg_q, pos_q, seg_k, pos_k, window, softcap, scale)
    got = reference.attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg_q), jnp.asarray(pos_q),
        jnp.asarray(seg_k), jnp.asarray(pos_k), window=window, logit_softcap=softcap,
        scale=scale)
    np.testing.assert_allclose(host(got), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- conformance

@functools.partial(jax.jit, static_argnums=(0, 1))
def _value_and_grads(impl, case, q, k, v, seg, pos, w):
    """Output and (dq, dk, dv) of sum(out * w): one compiled program (faster than eager)."""
    out, vjp = jax.vjp(lambda q, k, v: run(impl, case, q, k, v, seg, pos), q, k, v)
    return out, vjp(w.astype(out.dtype))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_float32_forward_and_gradients(impl, case):
    (q, k, v), seg, pos = make_inputs(case)
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    out, grads = _value_and_grads(impl, case, q, k, v, seg, pos, w)
    want_out, want_grads = _value_and_grads("reference", case, q, k, v, seg, pos, w)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    np.testing.assert_allclose(host(out), host(want_out), rtol=1e-5, atol=1e-5)
    for name, g, r in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(host(g), host(r), rtol=5e-5, atol=5e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("case", CASES[1:3], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_forward_and_gradients(impl, case):
    (q, k, v), seg, pos = make_inputs(case, jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    out, grads = _value_and_grads(impl, case, q, k, v, seg, pos, w)
    # The same bf16 values attended in float32: only the implementation's rounding differs.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want_out, want_grads = _value_and_grads("reference", case, *f32, seg, pos, w)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(host(out), host(want_out), rtol=2e-2, atol=2e-2)
    for name, g, r in zip("qkv", grads, want_grads):
        assert g.dtype == jnp.bfloat16
        tol = 3e-2 * np.abs(host(r)).max()
        np.testing.assert_allclose(host(g), host(r), rtol=0, atol=tol, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_outputs_zero_with_finite_gradients(impl):
    case = Case("padding", t=70, heads=2, kv_heads=1, window=16, block_q=32, block_k=32, b=3)
    (q, k, v), seg, pos = make_inputs(case)
    seg = seg.at[2].set(0)  # a row that is all padding
    pad = host(seg) == 0
    out, (dq, dk, dv) = _value_and_grads(impl, case, q, k, v, seg, pos, jnp.ones_like(q))
    assert np.all(host(out)[pad] == 0.0)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(host(g)))
    # Padding neither receives nor sends gradient.
    assert np.all(host(dq)[pad] == 0.0)
    assert np.all(host(dk)[pad] == 0.0) and np.all(host(dv)[pad] == 0.0)


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


@pytest.mark.parametrize("cache_kind,chunk,blocks", [
    ("linear", 1, (16, 16)),  # one KV block (bk grows to the cache for a single query block)
    ("linear", 1, (1, 8)),  # several KV blocks
    ("linear", 4, (2, 8)),  # several new tokens per step: several query and KV blocks
    ("ring", 1, (1, 4)),  # shuffled ring buffer of `window` slots, two KV blocks
])
@pytest.mark.parametrize("impl", IMPLS)
def test_decode_with_cache_matches_parallel(impl, cache_kind, chunk, blocks):
    rng = np.random.default_rng(3)
    b, t, h, kvh, d = 2, 40, 4, 2, 16
    window = 8 if cache_kind == "ring" else None
    case = Case("decode", t=t, heads=h, kv_heads=kvh, window=window, block_q=16, block_k=16, b=b)
    (q, k, v), seg, pos = make_inputs(case, seed=4)
    parallel = host(run(impl, case, q, k, v, seg, pos))

    steps, slots, filled = _decode_slots(rng, t, window, cache_kind, chunk)
    n, size = slots.shape
    garbage = lambda *shape: rng.normal(size=shape).astype(np.float32) * 10
    kc, vc = garbage(n, b, size, kvh, d), garbage(n, b, size, kvh, d)
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
                    window=window, implementation=impl, block_q=blocks[0], block_k=blocks[1])
    out = host(out).reshape(n, b, chunk, h, d)
    for i, s in enumerate(steps):
        np.testing.assert_allclose(out[i], parallel[:, s:s + chunk], rtol=1e-5, atol=1e-5,
                                   err_msg=f"step {s}")


@pytest.mark.parametrize("tq,blocks", [(2, (128, 16)), (6, (4, 16))])  # decode form, blocked form
@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_against_a_shuffled_cache(impl, tq, blocks):
    rng = np.random.default_rng(5)
    b, tk, h, kvh, d = 2, 40, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, tk, kvh, d)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(rng.integers(1, 3, size=(b, tq)), jnp.int32)
    pos = jnp.asarray(rng.integers(10, 30, size=(b, tq)), jnp.int32)
    kseg = jnp.asarray(rng.integers(0, 3, size=(b, tk)), jnp.int32)  # 0: empty slots
    kpos = jnp.asarray(rng.permuted(np.tile(np.arange(tk), (b, 1)), axis=1), jnp.int32)
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(impl, q, k, v):
        def f(q, k, v):
            return attention(q, k, v, segment_ids=seg, positions=pos, kv_segment_ids=kseg,
                             kv_positions=kpos, window=12, logit_softcap=3.0,
                             implementation=impl, block_q=blocks[0], block_k=blocks[1])
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(w)

    out, grads = value_and_grads(impl, q, k, v)
    want_out, want_grads = value_and_grads("reference", q, k, v)
    np.testing.assert_allclose(host(out), host(want_out), rtol=1e-5, atol=1e-5)
    for name, g, r in zip("qkv", grads, want_grads):
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


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=0), "window"),
    (dict(logit_softcap=-1.0), "logit_softcap"),
    (dict(block_q=0), "block_q"),
    (dict(kv_positions=jnp.zeros((2, 200), jnp.int32)), "kv_segment_ids"),
])
def test_invalid_arguments_raise_value_error(kwargs, match):
    (q, k, v), seg, pos = make_inputs(CASES[0])
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, segment_ids=seg, positions=pos, **kwargs)


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("impl,materialises", [("xla", False), ("reference", True)])
def test_no_tq_by_tk_array_in_forward_or_backward(impl, materialises, largest_intermediate):
    b, t, h, kvh, d = 1, 2048, 2, 1, 16
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, t, kvh, d), jnp.float32)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, seg, pos):
        out = attention(q, k, v, segment_ids=seg, positions=pos, implementation=impl,
                        block_q=128, block_k=128)
        return out.sum()

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, kv, kv, ids, ids)
    per_batch_head = largest_intermediate(jaxpr.jaxpr) / (b * h)
    assert (per_batch_head >= t * t) == materialises, per_batch_head

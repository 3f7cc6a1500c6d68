import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import layers.catalog  # noqa: F401  (registers the mixers)
from layers.attention.mixer import Attention
from layers.kv_cache import init_kv_cache, kv_cache_update
from layers.norm import rms_norm
from layers.registry import LayerContext
from layers.rope import apply_rope
from pallas_kernels.attention import reference
from train.config import AttentionConfig, RuntimeConfig


def test_rms_norm_matches_formula():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16))
    scale = jnp.linspace(0.5, 2.0, 16)
    want = np.asarray(x) / np.sqrt((np.asarray(x) ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(scale)
    np.testing.assert_allclose(np.asarray(rms_norm(x, scale, 1e-6)), want, rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 2, 32))
    k = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 2, 32))

    def score(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]]), 10_000.0)
        rk = apply_rope(k, jnp.array([[pk]]), 10_000.0)
        return np.asarray((rq * rk).sum(-1))

    np.testing.assert_allclose(score(5, 3), score(105, 103), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(apply_rope(q, jnp.zeros((1, 1), jnp.int32), 1e4)), np.asarray(q))
    assert not np.allclose(score(5, 3), score(5, 4))


def _mixer(cfg: AttentionConfig, d=64, impl=None, dtype=jnp.float32):
    ctx = LayerContext(d_model=d, dtype=dtype, runtime=RuntimeConfig(attention_impl=impl, attention_block_q=16,
                                                                      attention_block_k=16),
                       init_std=0.1, out_std=0.1)
    return Attention(cfg, ctx, rngs=nnx.Rngs(params=0))


@nnx.jit
def _step(m, x, pos, seg, cache):
    return m(x, positions=pos, segment_ids=seg, cache=cache)


def _packed_inputs(b=2, lens=(11, 20, 6), d=64, seed=0):
    t = sum(lens)
    x = jax.random.normal(jax.random.PRNGKey(seed), (b, t, d))
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])
    pos = np.concatenate([np.arange(n) for n in lens])
    return x, jnp.asarray(np.tile(seg, (b, 1)), jnp.int32), jnp.asarray(np.tile(pos, (b, 1)), jnp.int32)


CASES = {
    "mha": AttentionConfig(num_heads=4),
    "gqa_window": AttentionConfig(num_heads=4, num_kv_heads=2, window=5),
    "mqa_qknorm_softcap": AttentionConfig(num_heads=4, num_kv_heads=1, qk_norm=True, logit_softcap=5.0),
    "gqa_window_conv": AttentionConfig(num_heads=4, num_kv_heads=2, window=5, conv_size=3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_mixer_decode_equals_parallel(name):
    """Token-by-token decode through the KV cache (a ring buffer for windows) equals the
    parallel pass over the same document."""
    cfg = CASES[name]
    m = _mixer(cfg)
    x, seg, pos = _packed_inputs()
    y, _ = m(x, positions=pos, segment_ids=seg)
    doc = slice(11, 31)  # the second document, decoded alone
    cache = m.init_cache(x.shape[0], 32)
    if cfg.window:
        assert cache["k"].shape[1] == cfg.window
    outs = []
    for t in range(doc.start, doc.stop):
        o, cache = _step(m, x[:, t:t + 1], pos[:, t:t + 1], seg[:, t:t + 1], cache)
        outs.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y[:, doc]), rtol=1e-4, atol=1e-5)


def test_attention_mixer_prefill_then_decode():
    cfg = AttentionConfig(num_heads=4, num_kv_heads=2, window=6)
    m = _mixer(cfg)
    x, seg, pos = _packed_inputs(lens=(20,))
    y, _ = m(x, positions=pos, segment_ids=seg)
    cache = m.init_cache(2, 32)
    o1, cache = _step(m, x[:, :13], pos[:, :13], seg[:, :13], cache)  # prefill longer than the window
    outs = [o1]
    for t in range(13, 20):
        o, cache = _step(m, x[:, t:t + 1], pos[:, t:t + 1], seg[:, t:t + 1], cache)
        outs.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_attention_qkv_conv_is_a_causal_depthwise_filter_per_document():
    """conv_size=W: q/k/v projections are filtered over time, q_t = sum_j w_j * (x_{t-j} W_q),
    within the document (written out here with numpy), before RoPE; a document of a packed row
    computes as if it were alone."""
    cfg = AttentionConfig(num_heads=2, num_kv_heads=1, conv_size=3)
    m = _mixer(cfg, d=16)
    x, seg, pos = _packed_inputs(b=1, lens=(5, 7), d=16)
    captured = {}

    def capture(u):
        y, _ = m.conv(u, seg)
        captured["in"], captured["out"] = np.asarray(u), np.asarray(y)
        return y

    from layers.attention.mixer import project_heads
    project_heads(m, x, pos, conv=capture)
    u, w = captured["in"][0], np.asarray(m.conv.kernel[...])
    want = np.zeros_like(u)
    starts = {5: 5, **{t: 0 for t in range(5)}, **{t: 5 for t in range(5, 12)}}
    for t in range(12):
        for j in range(3):
            if t - j >= starts[t]:
                want[t] += w[j] * u[t - j]
    np.testing.assert_allclose(captured["out"][0], want, rtol=1e-5, atol=1e-6)
    y, _ = m(x, positions=pos, segment_ids=seg)
    y2, _ = m(x[:, 5:], positions=pos[:, 5:], segment_ids=seg[:, 5:])
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y[:, 5:]), rtol=1e-5, atol=1e-6)
    assert m.conv.kernel.shape == (3, (2 + 2 * 1) * 8)


def test_attention_mixer_implementations_agree_with_grads():
    cfg = AttentionConfig(num_heads=4, num_kv_heads=2, window=7)
    x, seg, pos = _packed_inputs()

    def loss(m, x):
        y, _ = m(x, positions=pos, segment_ids=seg)
        return (y ** 2).sum()

    results = []
    for impl in ("reference", "xla"):
        m = _mixer(cfg, impl=impl)
        results.append(nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(m, x))
    (l0, (gm0, gx0)), (l1, (gm1, gx1)) = results
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gx0), np.asarray(gx1), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(gm0), jax.tree.leaves(gm1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_kv_cache_ring_buffer_keeps_last_tokens():
    cache = init_kv_cache(1, 4, 1, 2, jnp.float32)
    k = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1, 1).repeat(2, -1)
    keys, cache = kv_cache_update(cache, k, k, jnp.ones((1, 6), jnp.int32), jnp.arange(6)[None])
    assert keys["k"].shape[1] == 10  # old slots + all new tokens are visible to the prefill
    assert sorted(np.asarray(cache["positions"][0]).tolist()) == [2, 3, 4, 5]
    assert int(cache["index"]) == 6
    _, cache = kv_cache_update(cache, k[:, :1] + 100, k[:, :1], jnp.ones((1, 1), jnp.int32), jnp.array([[6]]))
    assert sorted(np.asarray(cache["positions"][0]).tolist()) == [3, 4, 5, 6]


def test_attention_flops_causal_halving():
    cfg = AttentionConfig(num_heads=4)
    full = Attention.flops_per_token(cfg, 256, 1024)
    win = Attention.flops_per_token(dataclasses.replace(cfg, window=64), 256, 1024)
    proj = 3 * 2 * 256 * 64 * 16
    np.testing.assert_allclose(full - proj, 3 * 4 * 4 * 64 * (1025 / 2))
    assert proj < win < full


def test_bf16_compute_keeps_fp32_params():
    m = _mixer(AttentionConfig(num_heads=4), dtype=jnp.bfloat16)
    x, seg, pos = _packed_inputs()
    y, _ = m(x, positions=pos, segment_ids=seg)
    assert y.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    y32, _ = _mixer(AttentionConfig(num_heads=4))(x, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), atol=0.05, rtol=0.05)


def test_swiglu_and_dense_match_formula():
    from layers.mlp import SwiGLU
    m = SwiGLU(8, 16, std=0.3, out_std=0.3, dtype=jnp.float32, rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 8))
    g, u, d = (np.asarray(l.kernel[...]) for l in (m.gate, m.up, m.down))
    xn = np.asarray(x)
    want = ((xn @ g) / (1 + np.exp(-(xn @ g))) * (xn @ u)) @ d
    np.testing.assert_allclose(np.asarray(m(x)), want, rtol=1e-5, atol=1e-6)


def test_tied_head_is_the_transposed_embedding():
    from layers.linear import Embed
    e = Embed(11, 4, std=1.0, dtype=jnp.float32, rngs=nnx.Rngs(params=0))
    tok = jnp.array([[0, 3, 10]])
    x = e(tok)
    np.testing.assert_allclose(np.asarray(x[0, 1]), np.asarray(e.embedding[...][3]))
    np.testing.assert_allclose(np.asarray(e.attend(x)), np.asarray(x) @ np.asarray(e.embedding[...]).T, rtol=1e-6)


@pytest.mark.parametrize("name", [n if n == "gqa_window" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in CASES])
def test_attention_mixer_through_block_sparse_op(name):
    """runtime.attention_impl="block_sparse" (a causal / window block layout, segment ids on top)
    gives the attention op's output, and its gradients, on packed documents with a ragged tail."""
    cfg = CASES[name]
    x, seg, pos = _packed_inputs()
    seg = seg.at[:, -3:].set(0)  # trailing padding
    outs = []
    for impl in ("xla", "block_sparse"):
        m = _mixer(cfg, impl=impl)
        assert ("block_sparse" in m.describe()) == (impl == "block_sparse")
        loss = lambda x: (m(x, positions=pos, segment_ids=seg)[0] ** 2).sum()
        outs.append((m(x, positions=pos, segment_ids=seg)[0], jax.grad(loss)(x)))
    for a, b in zip(*outs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)

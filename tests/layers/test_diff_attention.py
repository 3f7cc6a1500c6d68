"""Differential attention (layers/attention/diff.py).

The forward equals a per-token, per-head numpy loop of the paper's equations (explicit softmax
maps over the visible keys, lambda from its four vectors, per-head RMSNorm with its learned
scale, the (1 - lambda_init) factor) on packed rows with padding and GQA, full causal and
windowed; gradients are finite and equal those of a dense pure-jnp version; prefill + decode
through the KV cache (a ring buffer when windowed) equals the parallel form; config errors name
the field; an LM with pattern ("diff", "attn") learns. Widths are tiny; the attention op runs
its blocked "xla" implementation with blocks of 8 (T = 19 is ragged) unless a test says otherwise.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import layers.catalog  # noqa: F401  (registers the mixers)
import models
from layers.attention.config import DiffAttentionConfig
from layers.attention.diff import DiffAttention
from layers.registry import LayerContext, build_mixer, mixer_class
from models import lm_loss
from train.config import (DEFAULT_MIXERS, AttentionConfig, Config, ConfigError, ModelConfig, RuntimeConfig,
                          apply_overrides, from_dict, to_dict)

D = 32
EPS = 1e-6
RT = RuntimeConfig(compute_dtype="float32", attention_impl="xla", attention_block_q=8, attention_block_k=8)
GQA = DiffAttentionConfig(num_heads=4, num_kv_heads=2, qk_norm=True)  # D = 32 // 8 = 4
WIN = DiffAttentionConfig(num_heads=2, num_kv_heads=1, window=3, lambda_init=0.5)  # D = 8, MQA


def _mixer(cfg, runtime=RT, seed=0, spread=True):
    """The mixer, with (spread=True) lambda vectors and norm scales far from their init, so that
    lambda differs clearly from lambda_init and every learned scale matters."""
    ctx = LayerContext(d_model=D, dtype=jnp.float32, runtime=runtime, init_std=0.3, out_std=0.3, norm_eps=EPS)
    m = build_mixer(cfg, ctx, rngs=nnx.Rngs(params=seed))
    if spread:
        keys = iter(jax.random.split(jax.random.PRNGKey(100 + seed), 8))
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            var = getattr(m, name)
            var[...] = 0.5 * jax.random.normal(next(keys), var.shape)
        norms = [m.head_norm] + ([m.q_norm, m.k_norm] if cfg.qk_norm else [])
        for norm in norms:
            norm.scale[...] = jax.random.uniform(next(keys), norm.scale.shape, minval=0.5, maxval=1.5)
    return m


def _packed_batch(seed=0):
    """2 rows of T = 19: row 0 holds documents of 7 and 9 tokens then 3 padding tokens; row 1
    one of 4 then one of 15 (which starts mid-block). x [2, T, D], positions, segment ids."""
    seg = np.array([[1] * 7 + [2] * 9 + [0] * 3, [1] * 4 + [2] * 15], np.int32)
    pos = np.array([list(range(7)) + list(range(9)) + [0] * 3, list(range(4)) + list(range(15))], np.int32)
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, seg.shape[1], D))
    return x, jnp.asarray(pos), jnp.asarray(seg)


def _rope(x, pos, theta, xp):
    """Rotate-half RoPE: x [..., T, heads, Dh] at positions [..., T] (numpy or jax.numpy)."""
    half = x.shape[-1] // 2
    freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    ang = pos[..., None].astype(xp.float32 if xp is jnp else np.float64) * freq
    cos, sin = xp.cos(ang)[..., None, :], xp.sin(ang)[..., None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _weights(m):
    """Every parameter of the mixer as a float64 numpy array, by attribute path."""
    return {".".join(map(str, path)): np.asarray(v[...], np.float64)
            for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


# ----------------------------------------------------------------------------- the equations

def numpy_diff_attention(m, x, pos, seg):
    """The equations of the module docstring, one query token and one head at a time."""
    cfg, w = m.cfg, _weights(m)
    h_, k_, d_ = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head(D)
    x, pos, seg = np.asarray(x, np.float64), np.asarray(pos), np.asarray(seg)
    b, t, _ = x.shape
    q = (x @ w["q_proj.kernel"]).reshape(b, t, h_, 2, d_)  # head h's Q1, Q2 adjacent
    k = (x @ w["k_proj.kernel"]).reshape(b, t, k_, 2, d_)
    v = (x @ w["v_proj.kernel"]).reshape(b, t, k_, 2 * d_)
    if cfg.qk_norm:
        q = q / np.sqrt((q ** 2).mean(-1, keepdims=True) + EPS) * w["q_norm.scale"]
        k = k / np.sqrt((k ** 2).mean(-1, keepdims=True) + EPS) * w["k_norm.scale"]
    q = _rope(q.reshape(b, t, 2 * h_, d_), pos, cfg.rope_theta, np).reshape(q.shape)
    k = _rope(k.reshape(b, t, 2 * k_, d_), pos, cfg.rope_theta, np).reshape(k.shape)
    lam = (np.exp(w["lambda_q1"] @ w["lambda_k1"]) - np.exp(w["lambda_q2"] @ w["lambda_k2"]) + cfg.lambda_init)
    heads = np.zeros((b, t, h_, 2 * d_))
    for bi in range(b):
        for i in range(t):
            if seg[bi, i] == 0:
                continue  # padding: no visible key, the op returns 0, and RMSNorm(0) = 0
            vis = [j for j in range(t) if seg[bi, j] == seg[bi, i] and pos[bi, j] <= pos[bi, i]
                   and (cfg.window is None or pos[bi, i] - pos[bi, j] < cfg.window)]
            for h in range(h_):
                g = h // (h_ // k_)
                maps = []
                for which in (0, 1):
                    s = np.array([q[bi, i, h, which] @ k[bi, j, g, which] for j in vis]) / np.sqrt(d_)
                    e = np.exp(s - s.max())
                    maps.append(e / e.sum())
                o = sum((maps[0][n] - lam * maps[1][n]) * v[bi, j, g] for n, j in enumerate(vis))
                o = o / np.sqrt((o ** 2).mean() + EPS) * w["head_norm.scale"]
                heads[bi, i, h] = (1 - cfg.lambda_init) * o
    return heads.reshape(b, t, -1) @ w["o_proj.kernel"]


@nnx.jit
def _forward(m, x, pos, seg):
    return m(x, positions=pos, segment_ids=seg)


@pytest.mark.parametrize("cfg", [GQA, pytest.param(WIN, marks=pytest.mark.slow)], ids=["gqa-qknorm", "window-mqa"])
def test_forward_equals_numpy_loop(cfg):
    """Through the blocked "xla" op (the "reference" op: test_decode_equals_parallel)."""
    m = _mixer(cfg)
    assert abs(float(m.lambda_()) - cfg.lambda_init) > 0.05  # the lambda vectors matter here
    x, pos, seg = _packed_batch()
    y, cache = _forward(m, x, pos, seg)
    assert cache is None and y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y), numpy_diff_attention(m, x, pos, seg), rtol=2e-4, atol=2e-5)


def test_forward_is_not_plain_attention_of_either_map():
    """A check on the check: with lambda = 0 the output changes (the second map is used)."""
    m = _mixer(GQA)
    x, pos, seg = _packed_batch()
    y = np.asarray(_forward(m, x, pos, seg)[0])
    m.lambda_q2[...] = jnp.zeros_like(m.lambda_q2[...])  # lambda = exp(lq1 . lk1) - 1 + 0.8
    y2 = np.asarray(_forward(m, x, pos, seg)[0])
    assert np.abs(y - y2).max() > 1e-3
    np.testing.assert_allclose(y2, numpy_diff_attention(m, x, pos, seg), rtol=2e-4, atol=2e-5)


# ----------------------------------------------------------------------------- gradients

def dense_diff_attention(m, x, pos, seg):
    """Pure-jnp dense version: [T, T] masks and softmaxes, for gradients."""
    cfg = m.cfg
    h_, k_, d_ = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head(D)
    b, t, _ = x.shape
    q = (x @ m.q_proj.kernel[...]).reshape(b, t, h_, 2, d_)
    k = (x @ m.k_proj.kernel[...]).reshape(b, t, k_, 2, d_)
    v = (x @ m.v_proj.kernel[...]).reshape(b, t, k_, 2 * d_)
    if cfg.qk_norm:
        q = q * jax.lax.rsqrt((q ** 2).mean(-1, keepdims=True) + EPS) * m.q_norm.scale[...]
        k = k * jax.lax.rsqrt((k ** 2).mean(-1, keepdims=True) + EPS) * m.k_norm.scale[...]
    q = _rope(q.reshape(b, t, 2 * h_, d_), pos, cfg.rope_theta, jnp).reshape(q.shape)
    k = _rope(k.reshape(b, t, 2 * k_, d_), pos, cfg.rope_theta, jnp).reshape(k.shape)
    k, v = jnp.repeat(k, h_ // k_, axis=2), jnp.repeat(v, h_ // k_, axis=2)
    dpos = pos[:, :, None] - pos[:, None, :]
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (dpos >= 0)
    if cfg.window is not None:
        mask &= dpos < cfg.window
    s = jnp.einsum("bihcd,bjhcd->bhcij", q, k) / np.sqrt(d_)
    p = jax.nn.softmax(jnp.where(mask[:, None, None], s, -1e30), axis=-1) * mask[:, None, None]
    lam = (jnp.exp(m.lambda_q1[...] @ m.lambda_k1[...]) - jnp.exp(m.lambda_q2[...] @ m.lambda_k2[...])
           + cfg.lambda_init)
    o = jnp.einsum("bhij,bjhe->bihe", p[:, :, 0] - lam * p[:, :, 1], v)
    o = o * jax.lax.rsqrt((o ** 2).mean(-1, keepdims=True) + EPS) * m.head_norm.scale[...]
    return ((1 - cfg.lambda_init) * o).reshape(b, t, -1) @ m.o_proj.kernel[...]


@pytest.mark.parametrize("cfg", [GQA, pytest.param(WIN, marks=pytest.mark.slow)], ids=["gqa-qknorm", "window-mqa"])
def test_gradients_equal_dense_version(cfg):
    m = _mixer(cfg)
    x, pos, seg = _packed_batch(seed=1)
    r = jax.random.normal(jax.random.PRNGKey(7), x.shape)
    graphdef, params = nnx.split(m, nnx.Param)

    def loss(params, x, dense):
        mm = nnx.merge(graphdef, params)
        y = dense_diff_attention(mm, x, pos, seg) if dense else mm(x, positions=pos, segment_ids=seg)[0]
        return jnp.sum(y * r)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    (gp, gx), (dp, dx) = grad(params, x, False), grad(params, x, True)
    flat, dflat = dict(nnx.to_flat_state(gp)), dict(nnx.to_flat_state(dp))
    assert set(flat) == set(dflat) and {p[0] for p in flat} >= {"lambda_q1", "lambda_k2", "head_norm"}
    for path, g in flat.items():
        g, want = np.asarray(g[...]), np.asarray(dflat[path][...])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, path  # every parameter is used
        np.testing.assert_allclose(g, want, rtol=2e-4, atol=2e-5 * np.abs(want).max(), err_msg=str(path))
    np.testing.assert_allclose(np.asarray(gx), np.asarray(dx), rtol=2e-4, atol=1e-5)
    assert np.abs(np.asarray(gx)[0, 16:]).max() == 0  # padding tokens reach nothing


# ----------------------------------------------------------------------------- decode

@nnx.jit
def _step(m, x, pos, seg, cache):
    return m(x, positions=pos, segment_ids=seg, cache=cache)


@pytest.mark.parametrize("cfg,impl", [(GQA, "reference"), (WIN, "xla")], ids=["full-gqa", "window3-ring"])
def test_decode_equals_parallel(cfg, impl):
    """Prefill 5 tokens, then one token at a time; row 0's second document starts mid-decode
    and the windowed layer's cache holds only 3 slots. The parallel form is checked against the
    equations too (with the "reference" op for the full-causal case)."""
    m = _mixer(cfg, dataclasses.replace(RT, attention_impl=impl))
    x, pos, seg = _packed_batch(seed=2)
    t = x.shape[1]
    full, _ = _forward(m, x, pos, seg)
    np.testing.assert_allclose(np.asarray(full), numpy_diff_attention(m, x, pos, seg), rtol=2e-4, atol=2e-5)
    cache = m.init_cache(2, t, jnp.float32)
    s = t if cfg.window is None else cfg.window
    hd = cfg.dim_per_head(D)
    assert cache["k"].shape == (2, s, 2 * cfg.kv_heads, hd) and cache["v"].shape == (2, s, cfg.kv_heads, 2 * hd)
    y, cache = _step(m, x[:, :5], pos[:, :5], seg[:, :5], cache)
    outs = [y]
    for i in range(5, t):
        y, cache = _step(m, x[:, i:i + 1], pos[:, i:i + 1], seg[:, i:i + 1], cache)
        outs.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- configs

BAD = [  # (config, field the error must name)
    (DiffAttentionConfig(num_heads=0), "num_heads"),
    (DiffAttentionConfig(num_heads=3), "num_heads"),  # 2 * 3 does not divide 32
    (DiffAttentionConfig(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (DiffAttentionConfig(num_heads=4, head_dim=1), "head_dim"),
    (DiffAttentionConfig(num_heads=4, head_dim=5), "head_dim"),  # odd: RoPE rotates pairs
    (DiffAttentionConfig(window=0), "window"),
    (DiffAttentionConfig(lambda_init=1.0), "lambda_init"),
    (DiffAttentionConfig(lambda_init=-0.1), "lambda_init"),
    (DiffAttentionConfig(rope_theta=0.0), "rope_theta"),
]


@pytest.mark.parametrize("cfg,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_config_errors_name_the_field(cfg, field):
    with pytest.raises(ConfigError, match=rf"model\.mixers\.m\.{field}\b"):
        cfg.check(D, "model.mixers.m")


def test_config_defaults_registry_and_overrides():
    for cfg in (GQA, WIN, DiffAttentionConfig(num_heads=3, head_dim=6)):
        cfg.check(D, "model.mixers.m")
    assert DEFAULT_MIXERS["diff"] == DiffAttentionConfig() and mixer_class(DiffAttentionConfig()) is DiffAttention
    assert DiffAttentionConfig(num_heads=4).dim_per_head(64) == 8  # d / (2 H): the paper's halved heads
    cfg = Config(model=ModelConfig(d_model=64, pattern=("diff", "attn"), mixers={"diff": GQA}))
    cfg.model.check()
    d = json.loads(json.dumps(to_dict(cfg)))
    assert d["model"]["mixers"]["diff"]["kind"] == "diff_attention" and from_dict(Config, d) == cfg
    out = apply_overrides(cfg, ["model.mixers.diff.lambda_init=0.2", "model.mixers.diff.window=16"])
    assert out.model.mixers["diff"] == dataclasses.replace(GQA, lambda_init=0.2, window=16)
    with pytest.raises(ConfigError, match=r"model\.mixers\.diff\.lambda_init"):
        apply_overrides(cfg, ["model.mixers.diff.lambda_init=1.5"])
    with pytest.raises(ConfigError, match=r"model\.mixers\.diff\.num_heads"):
        apply_overrides(cfg, ["model.mixers.diff.num_heads=3", "model.mixers.diff.num_kv_heads=1"])


def test_init_flops_and_describe():
    ctx = LayerContext(d_model=256, dtype=jnp.float32, runtime=RT, init_std=0.02, out_std=0.005)
    m = DiffAttention(DiffAttentionConfig(num_heads=2, num_kv_heads=1), ctx, rngs=nnx.Rngs(params=0))
    w = _weights(m)  # D = 64
    assert w["q_proj.kernel"].shape == (256, 256) and w["k_proj.kernel"].shape == (256, 128)
    assert w["v_proj.kernel"].shape == (256, 128) and w["o_proj.kernel"].shape == (256, 256)
    for name, std in (("q_proj.kernel", 0.02), ("v_proj.kernel", 0.02), ("o_proj.kernel", 0.005)):
        assert abs(w[name].std() / std - 1) < 0.05, name
    lam = np.concatenate([w[n] for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")])
    assert lam.shape == (256,) and abs(lam.std() / 0.1 - 1) < 0.2 and abs(lam.mean()) < 0.03
    np.testing.assert_array_equal(w["head_norm.scale"], np.ones(128))
    assert abs(float(m.lambda_()) - 0.8) < 0.2
    assert m.describe() == ("differential attention H=2 KV=1 D=64 (values 128), full causal, "
                            "lambda_init=0.8, impl=xla (xla blocked, no Pallas kernel)")
    # By hand, d = 32, H = 4, K = 2, D = 4, T = 8: projections 2 * 32 * (32 + 16 + 16 + 32) = 6144;
    # full causal sees 4.5 keys on average; two maps: 2 * (2 H D + 2 H 2 D) = 192 FLOPs per key.
    assert DiffAttention.flops_per_token(GQA, 32, 8) == 3 * (6144 + 192 * 4.5)
    # window 3 at T = 8: (1 + 2 + 3 * 6) / 8 keys; D = 8, H = 2, K = 1.
    assert DiffAttention.flops_per_token(WIN, 32, 8) == 3 * (2 * 32 * (32 + 16 + 16 + 32)
                                                             + 2 * (16 + 32) * 2 * 21 / 8)


# ----------------------------------------------------------------------------- in a model

@pytest.mark.slow  # ~7 s of compiling (the default tier runs "diff" in a model in tests/models/test_decode.py)
def test_lm_with_diff_and_attn_trains():
    """Two layers, unscanned, through the dense "reference" op (the cheapest to compile; the
    blocked path is checked above)."""
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, pattern=("diff", "attn"), scan=False,
                      mixers={"diff": DiffAttentionConfig(num_heads=2, num_kv_heads=1),
                              "attn": AttentionConfig(num_heads=2)})
    model = models.build(cfg, RuntimeConfig(compute_dtype="float32", attention_impl="reference"))
    assert [b.name for b in model.layers()] == ["diff", "attn"]
    assert set(models.flops_per_token(cfg, 32)) == {"diff", "attn", "mlp", "head"}
    t = 24
    tok = jax.random.randint(jax.random.PRNGKey(0), (4, t), 0, 64)
    seg = jnp.asarray(np.tile([1] * 10 + [2] * 14, (4, 1)), jnp.int32)
    pos = jnp.asarray(np.tile(list(range(10)) + list(range(14)), (4, 1)), jnp.int32)
    mask = jnp.ones((4, t), jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-2)

    def loss_fn(params):
        logits, _ = nnx.merge(graphdef, params)(tok[:, :-1], positions=pos[:, :-1], segment_ids=seg[:, :-1])
        return lm_loss(logits, tok[:, 1:], mask[:, 1:])[0]

    @jax.jit
    def step(params, opt):
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss, g

    opt, losses = tx.init(params), []
    for _ in range(8):
        params, opt, loss, g = step(params, opt)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5, losses
    lam_grads = [np.abs(np.asarray(v[...])).max() for p, v in nnx.to_flat_state(g) if "lambda_q1" in p]
    assert lam_grads and min(lam_grads) > 0

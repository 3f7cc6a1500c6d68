"""The softmax-attention mixer's options (layers/attention/mixer.py): output gate, attention
sinks, sigmoid scores, per-kv-head windows and knocking-heads projections.

Each option is checked against the equations written out independently here: a numpy loop per
token and head (explicit softmax with the sink term, sigmoid, gate, windows, knock matrices)
for the forward; a dense pure-jnp version for gradients; decode through the cache (ring buffers
per window) against the parallel form; the block-sparse path against the dense one.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import layers.catalog  # noqa: F401  (registers the mixers)
from layers.attention.mixer import Attention
from layers.config import ConfigError
from layers.registry import LayerContext
from train.config import AttentionConfig, RuntimeConfig

D_MODEL = 32
EPS = 1e-6


def _mixer(cfg: AttentionConfig, impl=None, sparse_impl="xla", seed=0, randomise=True):
    """The mixer at width 32 with blocks of 8; `randomise` moves the sinks and knock matrices
    away from their initial values (0 and I) so that the tests see them act."""
    cfg.check(D_MODEL, "m")
    rt = RuntimeConfig(attention_impl=impl, attention_block_q=8, attention_block_k=8,
                       sparse_attention_impl=sparse_impl)
    ctx = LayerContext(d_model=D_MODEL, dtype=jnp.float32, runtime=rt, init_std=0.3, out_std=0.3,
                       norm_eps=EPS)
    m = Attention(cfg, ctx, rngs=nnx.Rngs(params=seed))
    if randomise:
        rng = np.random.default_rng(seed + 1)
        if m.sinks is not None:
            m.sinks[...] = jnp.asarray(rng.normal(0.0, 1.5, m.sinks.shape), jnp.float32)
        for p in (m.knock_q, m.knock_k, m.knock_v):
            if p is not None:
                p[...] = jnp.asarray(np.eye(m.head_dim) + 0.3 * rng.normal(size=p.shape), jnp.float32)
    return m


@nnx.jit
def _forward(m, x, pos, seg):
    """The parallel form (jitted: one compilation costs less than the ops run one by one)."""
    return m(x, positions=pos, segment_ids=seg)[0]


def _inputs(b=2, lens=(7, 9, 3), pad=2, seed=0):
    """Packed rows: documents of `lens` tokens then `pad` padding tokens (segment 0)."""
    t = sum(lens) + pad
    x = jax.random.normal(jax.random.PRNGKey(seed), (b, t, D_MODEL))
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)] + [np.zeros(pad)])
    pos = np.concatenate([np.arange(n) for n in lens] + [np.arange(pad)])
    return x, jnp.asarray(np.tile(seg, (b, 1)), jnp.int32), jnp.asarray(np.tile(pos, (b, 1)), jnp.int32)


# ----------------------------------------------------------------------------- references

def _weights(m):
    """The mixer's parameters as float64 numpy arrays (None where an option is off)."""
    get = lambda p: None if p is None else np.asarray(p[...], np.float64)
    return dict(
        wq=get(m.q_proj.kernel), wk=get(m.k_proj.kernel), wv=get(m.v_proj.kernel),
        wo=get(m.o_proj.kernel), wg=None if m.gate_proj is None else get(m.gate_proj.kernel),
        sinks=get(m.sinks), tq=get(m.knock_q), tk=get(m.knock_k), tv=get(m.knock_v),
        nq=get(m.q_norm.scale) if m.cfg.qk_norm else None,
        nk=get(m.k_norm.scale) if m.cfg.qk_norm else None)


def _rope_np(x, p, theta):
    """Rotate-half RoPE of one head vector x [D] at position p."""
    d = x.shape[-1]
    ang = p * theta ** (-np.arange(0, d, 2) / d)
    x1, x2 = x[: d // 2], x[d // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)])


def numpy_loop(m, x, seg, pos):
    """The module docstring's equations, token by token and head by head, in float64."""
    cfg, w = m.cfg, _weights(m)
    x, seg, pos = np.asarray(x, np.float64), np.asarray(seg), np.asarray(pos)
    b, t, _ = x.shape
    h, kvh, d = m.heads, m.kv_heads, m.head_dim
    windows = cfg.kv_head_windows()

    def head_vectors(wmat, knock, norm, n):
        out = np.zeros((b, t, n, d))
        for bi in range(b):
            for i in range(t):
                for j in range(n):
                    u = x[bi, i] @ wmat[:, j * d:(j + 1) * d]
                    if knock is not None:
                        u = u @ knock
                    if norm is not None:
                        u = u / np.sqrt(np.mean(u ** 2) + EPS) * norm
                    out[bi, i, j] = u
        return out

    q = head_vectors(w["wq"], w["tq"], w["nq"], h)
    k = head_vectors(w["wk"], w["tk"], w["nk"], kvh)
    v = head_vectors(w["wv"], w["tv"], None, kvh)
    o = np.zeros((b, t, h, d))
    for bi in range(b):
        for i in range(t):
            gate = None
            if w["wg"] is not None:
                gate = (1 / (1 + np.exp(-(x[bi, i] @ w["wg"])))).reshape(h, -1)
            for hh in range(h):
                j = hh // (h // kvh)
                win = windows[j]
                vis = [l for l in range(t) if seg[bi, l] == seg[bi, i] != 0 and pos[bi, l] <= pos[bi, i]
                       and (win is None or pos[bi, i] - pos[bi, l] < win)]
                if not vis:
                    continue
                qi = _rope_np(q[bi, i, hh], pos[bi, i], cfg.rope_theta)
                s = np.array([qi @ _rope_np(k[bi, l, j], pos[bi, l], cfg.rope_theta) for l in vis])
                s = s / math.sqrt(d)
                if cfg.logit_softcap:
                    s = cfg.logit_softcap * np.tanh(s / cfg.logit_softcap)
                if cfg.score == "sigmoid":
                    p = 1 / (1 + np.exp(-(s + cfg.bias)))
                else:
                    top = s.max() if w["sinks"] is None else max(s.max(), w["sinks"][hh])
                    e = np.exp(s - top)
                    denom = e.sum() + (0.0 if w["sinks"] is None else np.exp(w["sinks"][hh] - top))
                    p = e / denom
                o[bi, i, hh] = p @ v[bi, vis, j]
                if gate is not None:
                    o[bi, i, hh] *= gate[hh]
    return o.reshape(b, t, h * d) @ w["wo"]


def _rope_jnp(x, pos, theta):
    d = x.shape[-1]
    ang = pos.astype(jnp.float32)[:, :, None, None] * theta ** (-jnp.arange(0, d, 2) / d)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def dense_jnp(m, x, seg, pos):
    """The same equations with dense [B, H, T, T] arrays in jnp (differentiable, no op calls)."""
    cfg = m.cfg
    b, t, _ = x.shape
    h, kvh, d = m.heads, m.kv_heads, m.head_dim
    g = h // kvh
    heads = lambda u, n: u.reshape(b, t, n, d)
    q, k, v = (heads(x @ p.kernel[...], n) for p, n in ((m.q_proj, h), (m.k_proj, kvh), (m.v_proj, kvh)))
    for name, p in (("q", m.knock_q), ("k", m.knock_k), ("v", m.knock_v)):
        if p is not None:
            u = {"q": q, "k": k, "v": v}[name] @ p[...]
            q, k, v = (u if name == n else a for n, a in zip("qkv", (q, k, v)))
    if cfg.qk_norm:
        rms = lambda u, s: u * jax.lax.rsqrt(jnp.mean(u ** 2, -1, keepdims=True) + EPS) * s
        q, k = rms(q, m.q_norm.scale[...]), rms(k, m.k_norm.scale[...])
    q, k = _rope_jnp(q, pos, cfg.rope_theta), _rope_jnp(k, pos, cfg.rope_theta)
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bihd,blhd->bhil", q, k) / math.sqrt(d)
    if cfg.logit_softcap:
        s = cfg.logit_softcap * jnp.tanh(s / cfg.logit_softcap)
    win = jnp.asarray([t + 1 if w is None else w for w in cfg.kv_head_windows() for _ in range(g)])
    dp = pos[:, :, None] - pos[:, None, :]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (dp >= 0)
    vis = same[:, None] & (dp[:, None] < win[None, :, None, None])
    if cfg.score == "sigmoid":
        p = jnp.where(vis, jax.nn.sigmoid(s + cfg.bias), 0.0)
    else:
        top = jnp.max(jnp.where(vis, s, -jnp.inf), -1)
        if m.sinks is not None:
            top = jnp.maximum(top, m.sinks[...][None, :, None])
        top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))[..., None]
        e = jnp.where(vis, jnp.exp(s - top), 0.0)
        denom = e.sum(-1, keepdims=True)
        if m.sinks is not None:
            denom = denom + jnp.exp(m.sinks[...][None, :, None, None] - top)
        p = e / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("bhil,blhd->bihd", p, v)
    if m.gate_proj is not None:
        o = o * jax.nn.sigmoid(x @ m.gate_proj.kernel[...]).reshape(b, t, h, -1)
    return o.reshape(b, t, h * d) @ m.o_proj.kernel[...]


# ----------------------------------------------------------------------------- forward

BASE = AttentionConfig(num_heads=4, num_kv_heads=2)
OPTIONS = {
    "gate_headwise": dict(gate="headwise"),
    "gate_elementwise": dict(gate="elementwise"),
    "sinks": dict(sinks=True),
    "sinks_softcap_qknorm": dict(sinks=True, logit_softcap=2.0, qk_norm=True),
    "sigmoid": dict(score="sigmoid", sigmoid_bias=-1.0),
    "sigmoid_default_bias": dict(score="sigmoid", sigmoid_length=8),
    # kv heads 0 and 2 share a window: a group that is not contiguous in head order
    "head_windows": dict(num_heads=6, num_kv_heads=3, head_dim=8, head_windows=(3, 0, 3)),
    # groups [0, 3] and [1, 2]: head order (0, 3, 1, 2) is not its own inverse
    "head_windows_permuted": dict(num_heads=4, num_kv_heads=4, head_dim=8, head_windows=(3, 0, 0, 3)),
    "knock_v": dict(knock_heads="v"),
    "knock_qkv": dict(knock_heads="qkv", qk_norm=True),
    "all_softmax": dict(num_heads=6, num_kv_heads=3, head_dim=8, head_windows=(0, 2, 0),
                        gate="elementwise", sinks=True, knock_heads="qkv"),
}


# Default tier: the combined case (gate, sinks, per-head windows, knocking heads together) and
# what it lacks (headwise gate, soft-cap + QK-norm, sigmoid, a permuted grouping); each
# single option alone is in the slow tier.
DEFAULT_OPTIONS = ("gate_headwise", "sinks_softcap_qknorm", "sigmoid", "head_windows_permuted", "all_softmax")


@pytest.mark.parametrize("name", [n if n in DEFAULT_OPTIONS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in OPTIONS])
def test_forward_equals_numpy_loop(name):
    cfg = dataclasses.replace(BASE, **OPTIONS[name])
    m = _mixer(cfg)
    x, seg, pos = _inputs()
    np.testing.assert_allclose(np.asarray(_forward(m, x, pos, seg)), numpy_loop(m, x, seg, pos),
                               rtol=2e-4, atol=2e-5)


def test_reference_sees_each_option():
    """The options change the output (so the equalities above are not vacuous)."""
    x, seg, pos = _inputs()
    plain = numpy_loop(_mixer(BASE), x, seg, pos)
    for name, opts in OPTIONS.items():
        got = numpy_loop(_mixer(dataclasses.replace(BASE, **opts)), x, seg, pos)
        assert np.abs(got - plain).max() > 1e-3, name


def test_knock_heads_at_init_is_plain_attention_exactly():
    x, seg, pos = _inputs()
    plain = _mixer(BASE)
    y0, _ = plain(x, positions=pos, segment_ids=seg)
    m = _mixer(dataclasses.replace(BASE, knock_heads="qkv"), randomise=False)  # "v" is a subset
    y, _ = m(x, positions=pos, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))


def test_parameters_shapes_and_init():
    m = _mixer(dataclasses.replace(BASE, gate="elementwise", sinks=True, knock_heads="qkv"),
               randomise=False)
    assert m.gate_proj.kernel.shape == (D_MODEL, 4 * 8)
    np.testing.assert_array_equal(np.asarray(m.sinks[...]), np.zeros(4))
    for p in (m.knock_q, m.knock_k, m.knock_v):
        np.testing.assert_array_equal(np.asarray(p[...]), np.eye(8))
    assert _mixer(dataclasses.replace(BASE, gate="headwise")).gate_proj.kernel.shape == (D_MODEL, 4)
    v_only = _mixer(dataclasses.replace(BASE, knock_heads="v"), randomise=False)
    assert v_only.knock_q is None and v_only.knock_k is None
    np.testing.assert_array_equal(np.asarray(v_only.knock_v[...]), np.eye(8))
    plain = _mixer(BASE)
    assert plain.gate_proj is None and plain.sinks is None and plain.knock_v is None
    # the options leave the projections drawn from the seed as they were
    np.testing.assert_array_equal(np.asarray(m.o_proj.kernel[...]), np.asarray(plain.o_proj.kernel[...]))


def test_score_options_for_diagnostics():
    m = _mixer(dataclasses.replace(BASE, sinks=True, head_windows=(4, 0), logit_softcap=3.0))
    opts = m.score_options()
    assert opts["score"] == "softmax" and opts["sigmoid_bias"] == 0.0
    assert opts["logit_softcap"] == 3.0 and opts["kv_head_windows"] == (4, None)
    np.testing.assert_array_equal(np.asarray(opts["sinks"]), np.asarray(m.sinks[...]))
    s = _mixer(dataclasses.replace(BASE, score="sigmoid", sigmoid_length=64)).score_options()
    assert s["score"] == "sigmoid" and s["sinks"] is None and s["kv_head_windows"] == (None, None)
    np.testing.assert_allclose(s["sigmoid_bias"], -math.log(64))


def test_gate_is_sown_in_zero_one():
    m = _mixer(dataclasses.replace(BASE, gate="headwise"))
    x, seg, pos = _inputs()
    _, inter = nnx.capture(m, nnx.Intermediate)(x, positions=pos, segment_ids=seg)
    g = np.asarray(inter["gate"][0])
    assert g.shape == (2, x.shape[1], 4, 1) and (g > 0).all() and (g < 1).all()


# ----------------------------------------------------------------------------- gradients

GRAD_CASES = {
    "softmax": dict(gate="elementwise", sinks=True, head_windows=(3, 0), knock_heads="qkv",
                    qk_norm=True, logit_softcap=4.0),
    "sigmoid": dict(gate="headwise", score="sigmoid", sigmoid_bias=-0.5, head_windows=(0, 2),
                    knock_heads="v"),
}


@pytest.mark.parametrize("name", [n if n == "softmax" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in GRAD_CASES])
def test_gradients_equal_dense_jnp(name):
    m = _mixer(dataclasses.replace(BASE, **GRAD_CASES[name]))
    x, seg, pos = _inputs(b=1)
    wt = jax.random.normal(jax.random.PRNGKey(5), (1, x.shape[1], D_MODEL))

    def loss(fn):
        return lambda m, x: (fn(m, x) * wt).sum()

    ours = loss(lambda m, x: m(x, positions=pos, segment_ids=seg)[0])
    ref = loss(lambda m, x: dense_jnp(m, x, seg, pos))
    (l0, (gm0, gx0)) = nnx.jit(nnx.value_and_grad(ours, argnums=(0, 1)))(m, x)
    (l1, (gm1, gx1)) = nnx.jit(nnx.value_and_grad(ref, argnums=(0, 1)))(m, x)
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gx0), np.asarray(gx1), rtol=2e-4, atol=2e-5)
    flat0, flat1 = nnx.to_flat_state(gm0), nnx.to_flat_state(gm1)
    names = {".".join(map(str, path)) for path, _ in flat0}
    for must in ("gate_proj.kernel", "knock_v", "q_proj.kernel"):
        assert any(n.startswith(must) for n in names), names
    assert ("sinks" in names) == (name == "softmax")
    for (p0, a), (p1, b) in zip(flat0, flat1):
        assert p0 == p1
        a, b = np.asarray(a[...]), np.asarray(b[...])
        assert np.isfinite(a).all(), p0
        assert np.abs(a).max() > 0, p0  # every parameter gets a gradient
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=str(p0))


# ----------------------------------------------------------------------------- decode

DECODE = {
    "windows_gate_knock_sinks_conv": dict(head_windows=(3, 0), gate="elementwise", knock_heads="qkv",
                                          sinks=True, conv_size=2),
    "sigmoid_gate": dict(score="sigmoid", sigmoid_bias=-1.0, gate="headwise"),
    "sinks": dict(sinks=True),
    "knock_v": dict(knock_heads="v"),
    "windows_sigmoid": dict(head_windows=(0, 2), score="sigmoid"),
    "windows_mha_groups": dict(num_heads=4, num_kv_heads=4, head_windows=(0, 2, 2, 0)),
}
# tests/models/test_decode.py decodes gate + sinks + head windows + knocking heads in a model in
# the default tier; here the sigmoid and headwise gate case.
DEFAULT_DECODE = ("sigmoid_gate",)


@nnx.jit
def _step(m, x, pos, seg, cache):
    return m(x, positions=pos, segment_ids=seg, cache=cache)


@pytest.mark.parametrize("name", [n if n in DEFAULT_DECODE else pytest.param(n, marks=pytest.mark.slow)
                                  for n in DECODE])
def test_decode_equals_parallel(name):
    """Prefill of one packed stretch, then one token at a time, equals the parallel pass; with
    head_windows each window keeps its own cache, and the rings of the short windows wrap."""
    cfg = dataclasses.replace(BASE, **DECODE[name])
    m = _mixer(cfg)
    x, seg, pos = _inputs(lens=(4, 12), pad=0)  # the second document outlasts every ring
    t = x.shape[1]
    y = _forward(m, x, pos, seg)
    cache = m.init_cache(x.shape[0], t)
    if cfg.head_windows:
        windows = {w for w in cfg.head_windows}
        want = {"full" if w == 0 else f"w{w}" for w in windows} | ({"conv"} if cfg.conv_size else set())
        assert set(cache) == want
        for w in windows - {0}:
            kvs = sum(wj == w for wj in cfg.head_windows)
            assert cache[f"w{w}"]["k"].shape == (2, w, kvs, m.head_dim)
        assert cache["full"]["k"].shape[1] == t
    else:
        assert cache["k"].shape == (2, t, cfg.kv_heads, m.head_dim)  # the layout as before
    p = 6
    o, cache = _step(m, x[:, :p], pos[:, :p], seg[:, :p], cache)
    outs = [o]
    for i in range(p, t):
        o, cache = _step(m, x[:, i:i + 1], pos[:, i:i + 1], seg[:, i:i + 1], cache)
        outs.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- block-sparse

SPARSE = {
    "sinks_head_windows": dict(num_heads=6, num_kv_heads=3, head_dim=8, sinks=True,
                               head_windows=(5, 0, 5), logit_softcap=3.0),
    "sigmoid_head_windows": dict(score="sigmoid", sigmoid_bias=-1.0, head_windows=(0, 3),
                                 gate="headwise"),
}


@pytest.mark.parametrize("grads", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("impl", ["xla", "gpu", "tpu"])
@pytest.mark.parametrize("name", list(SPARSE))
def test_block_sparse_path_equals_dense(name, impl, grads):
    """runtime.attention_impl="block_sparse" (one causal / window layout per window group)
    gives the dense path's output (and input gradients: slow tier)."""
    if impl != "xla" and jax.default_backend() != impl:
        pytest.skip(f"the {impl} kernels need a {impl} device")
    cfg = dataclasses.replace(BASE, **SPARSE[name])
    x, seg, pos = _inputs(lens=(7, 13), pad=3)
    outs = []
    for runtime in (None, "block_sparse"):
        m = _mixer(cfg, impl=runtime, sparse_impl=impl)
        assert ("block_sparse" in m.describe()) == (runtime == "block_sparse")
        fwd = lambda m, x: m(x, positions=pos, segment_ids=seg)[0]
        f = nnx.grad(lambda m, x: (fwd(m, x) ** 2).sum(), argnums=1) if grads else fwd
        outs.append(nnx.jit(f)(m, x))
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=2e-4, atol=2e-5)


# ----------------------------------------------------------------------------- reports

def test_flops_count_gate_knock_and_windows():
    d, t = 256, 1024
    base = AttentionConfig(num_heads=4, num_kv_heads=2)
    f = lambda **kw: Attention.flops_per_token(dataclasses.replace(base, **kw), d, t)
    hd = 64
    np.testing.assert_allclose(f(gate="headwise") - f(), 3 * 2 * d * 4)
    np.testing.assert_allclose(f(gate="elementwise") - f(), 3 * 2 * d * 4 * hd)
    np.testing.assert_allclose(f(knock_heads="v") - f(), 3 * 2 * hd * hd * 2)
    np.testing.assert_allclose(f(knock_heads="qkv") - f(), 3 * 2 * hd * hd * (4 + 2 + 2))
    # head_windows: the mean of the per-head costs
    mixed = f(head_windows=(64, 0))
    np.testing.assert_allclose(mixed, (f(window=64) + f()) / 2)
    assert f(window=64) < mixed < f()
    assert f(score="sigmoid") == f() and f(sinks=True) == f()


def test_describe_names_every_option_and_kernel():
    cfg = dataclasses.replace(BASE, gate="headwise", sinks=True, head_windows=(64, 0),
                              knock_heads="qkv", qk_norm=True)
    text = _mixer(cfg).describe()
    for part in ("gate=headwise", "sinks", "head_windows=[64, full]", "knock_heads=qkv", "qk_norm",
                 "impl=auto: xla (xla blocked"):
        assert part in text, text
    assert "impl=gpu (Pallas Triton)" in _mixer(BASE, impl="gpu").describe()
    sig = _mixer(dataclasses.replace(BASE, score="sigmoid", sigmoid_length=1024)).describe()
    assert "score=sigmoid(b=-6.931)" in sig, sig
    for sparse, kernel in ((None, "Pallas Triton"), ("gpu", "Pallas Triton"), ("tpu", "Pallas Mosaic"),
                           ("xla", "no Pallas kernel")):
        text = _mixer(BASE, impl="block_sparse", sparse_impl=sparse).describe()
        assert f"block_sparse/{sparse or 'auto'}" in text and kernel in text, text
    assert "Pallas Mosaic" in _mixer(BASE, impl="block_sparse", sparse_impl=None).describe()


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw, field", [
    (dict(gate="sigmoid"), "m.gate"),
    (dict(score="relu"), "m.score"),
    (dict(knock_heads="k"), "m.knock_heads"),
    (dict(sinks=True, score="sigmoid"), "m.sinks"),
    (dict(sigmoid_bias=-1.0), "m.sigmoid_bias"),
    (dict(sigmoid_length=64), "m.sigmoid_length"),
    (dict(score="sigmoid", sigmoid_bias=float("nan")), "m.sigmoid_bias"),
    (dict(score="sigmoid", sigmoid_length=0), "m.sigmoid_length"),
    (dict(head_windows=(4, 0), window=8), "m.head_windows"),
    (dict(head_windows=(4, 0, 2)), "m.head_windows"),
    (dict(head_windows=(4, -1)), "m.head_windows"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        dataclasses.replace(BASE, **kw).check(D_MODEL, "m")


# ----------------------------------------------------------------------------- training

@pytest.mark.slow
def test_lm_with_gated_sink_attention_and_swa_trains(trains_briefly):
    log = trains_briefly([
        "model.pattern=attn,swa", "model.num_layers=2",
        "model.mixers.attn.num_heads=2", "model.mixers.attn.gate=headwise",
        "model.mixers.attn.sinks=true", "model.mixers.swa.num_heads=2",
        "model.mixers.swa.window=8"], steps=8)
    assert "gate=headwise" in log and "sinks" in log and "window=8" in log


# ----------------------------------------------------------------------------- GPU lowering

def test_gated_sink_layer_with_head_windows_lowers_to_pallas_triton_for_h100():
    """A dense layer with a gate, sinks and per-head windows (one local, one global kv head),
    trained through runtime.attention_impl="block_sparse" with sparse_attention_impl="gpu":
    its forward and gradient lower for an H100 to the Pallas Triton kernels (fwd, dq, dkv per
    window group), on this CPU-only host (pallas_kernels/lowering.py)."""
    from pallas_kernels import lowering
    if lowering.available():
        pytest.skip(lowering.available())
    cfg = AttentionConfig(num_heads=4, num_kv_heads=2, sinks=True, gate="elementwise",
                          head_windows=(128, 0))
    rt = RuntimeConfig(compute_dtype="bfloat16", attention_impl="block_sparse",
                       attention_block_q=64, attention_block_k=64, sparse_attention_impl="gpu")
    ctx = LayerContext(d_model=256, dtype=jnp.bfloat16, runtime=rt, init_std=0.02, out_std=0.02)
    graphdef, params = nnx.split(Attention(cfg, ctx, rngs=nnx.Rngs(params=0)))
    t = 320
    ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params)(x, positions=ids, segment_ids=jnp.ones_like(ids))
        return jnp.sum(y.astype(jnp.float32) ** 2)

    x = jax.ShapeDtypeStruct((1, t, 256), jnp.bfloat16)
    kernels = [k.name for k in lowering.triton_kernels(jax.grad(loss), params, x)]
    assert sorted(kernels) == sorted(["block_sparse_attention_fwd", "block_sparse_attention_dq",
                                      "block_sparse_attention_dkv"] * 2), kernels

"""Multi-head latent attention (layers/attention/mla.py): the module against the MLA equations
written out independently (a numpy loop per token and head, and a dense jnp version for
gradients), decode through the latent cache (absorbed) against the parallel form, config
errors, and an LM with an MLA layer that trains."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import layers.catalog  # noqa: F401  (registers the mixers)
import models
from layers.attention.mla import MLA, absorbed_attention, absorbed_is_cheaper, expanded_attention
from layers.registry import LayerContext, mixer_class
from models import lm_loss
from train.config import AttentionConfig, ConfigError, ModelConfig, RuntimeConfig
from layers.attention.config import MLAConfig

D = 32
EPS = 1e-6
CASES = {  # v_head_dim != nope + rope in both: the attention op's Dv != D path
    "q_from_x": MLAConfig(num_heads=2, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5),
    "q_lora": MLAConfig(num_heads=3, q_lora_rank=10, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=6, rope_theta=500.0),
}


def _mixer(cfg, seed=0):
    """An MLA mixer whose weights are N(0, 0.3^2) and norm scales 1 + N(0, 0.5^2) (ones would
    hide them), drawn with numpy: eager jax.random costs a compile per shape."""
    ctx = LayerContext(d_model=D, dtype=jnp.float32, init_std=0.3, out_std=0.3, norm_eps=EPS,
                       runtime=RuntimeConfig(compute_dtype="float32", attention_block_q=8, attention_block_k=8))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MLA(cfg, ctx, rngs=nnx.Rngs(params=seed))))
    rng = np.random.default_rng(seed)
    state = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray((1.0 if "norm" in str(path) else 0.0)
                                    + (0.5 if "norm" in str(path) else 0.3) * rng.normal(size=a.shape), a.dtype),
        state)
    return nnx.merge(graphdef, state)


@nnx.jit
def _call(m, x, pos, seg, cache):
    return m(x, positions=pos, segment_ids=seg, cache=cache)


def _packed(rows=((7, 9, 4), (12, 8)), pad=2, seed=0):
    """x [B, T, D] and segment_ids, positions [B, T]: each row packs documents of the given
    lengths and ends in `pad` padding tokens (segment 0)."""
    t = sum(rows[0]) + pad
    seg, pos = np.zeros((len(rows), t), np.int32), np.zeros((len(rows), t), np.int32)
    for b, lens in enumerate(rows):
        assert sum(lens) + pad == t
        seg[b, :sum(lens)] = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])
        pos[b, :sum(lens)] = np.concatenate([np.arange(n) for n in lens])
    x = np.random.default_rng(seed + 50).normal(size=(len(rows), t, D))
    return jnp.asarray(x, jnp.float32), jnp.asarray(seg), jnp.asarray(pos)


# ----------------------------------------------------------------------------- the equations

def _rope(x, pos, theta, xp):
    """Rotate-half RoPE of x [..., p] at integer positions pos (broadcast over x's lead dims)."""
    p = x.shape[-1]
    ang = xp.asarray(pos)[..., None] * theta ** (-xp.arange(0, p, 2) / p)
    c, s = xp.cos(ang), xp.sin(ang)
    x1, x2 = x[..., :p // 2], x[..., p // 2:]
    return xp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _rms(x, scale, xp):
    return x / xp.sqrt((x * x).mean(-1, keepdims=True) + EPS) * scale


def _weights(m):
    """The module's parameters as float64 numpy arrays, by role."""
    g = lambda a: np.asarray(a[...], np.float64)
    w = dict(kv_a=g(m.kv_a_proj.kernel), kv_norm=g(m.kv_a_norm.scale), kv_b=g(m.kv_b_proj.kernel),
             o=g(m.o_proj.kernel))
    if m.cfg.q_lora_rank is None:
        w["q"] = g(m.q_proj.kernel)
    else:
        w.update(q_a=g(m.q_a_proj.kernel), q_norm=g(m.q_a_norm.scale), q_b=g(m.q_b_proj.kernel))
    return w


def _numpy_mla(m, x, seg, pos):
    """MLA token by token and head by head, explicit softmax over the visible keys."""
    cfg, w = m.cfg, _weights(m)
    n, p, v, r = cfg.dims(D)
    h, th = cfg.num_heads, cfg.rope_theta
    x, seg, pos = np.asarray(x, np.float64), np.asarray(seg), np.asarray(pos)
    bsz, t, _ = x.shape
    y = np.zeros((bsz, t, D))
    for b in range(bsz):
        qs, ks, vs = [], [], []
        for i in range(t):
            xi = x[b, i]
            kv = xi @ w["kv_a"]
            c_kv = _rms(kv[:r], w["kv_norm"], np)
            k_r = _rope(kv[r:], pos[b, i], th, np)
            cq = xi if cfg.q_lora_rank is None else _rms(xi @ w["q_a"], w["q_norm"], np)
            q_all = cq @ (w["q"] if cfg.q_lora_rank is None else w["q_b"])
            q_i, k_i, v_i = [], [], []
            for hh in range(h):
                qh = q_all[hh * (n + p):(hh + 1) * (n + p)]
                q_i.append(np.concatenate([qh[:n], _rope(qh[n:], pos[b, i], th, np)]))
                up = c_kv @ w["kv_b"][:, hh * (n + v):(hh + 1) * (n + v)]
                k_i.append(np.concatenate([up[:n], k_r]))
                v_i.append(up[n:])
            qs.append(q_i), ks.append(k_i), vs.append(v_i)
        for i in range(t):
            vis = [j for j in range(t) if seg[b, j] == seg[b, i] != 0 and pos[b, j] <= pos[b, i]]
            o = np.zeros(h * v)
            for hh in range(h):
                if not vis:
                    continue
                s = np.array([qs[i][hh] @ ks[j][hh] for j in vis]) / math.sqrt(n + p)
                e = np.exp(s - s.max())
                a = e / e.sum()
                o[hh * v:(hh + 1) * v] = sum(a_j * vs[j][hh] for a_j, j in zip(a, vis))
            y[b, i] = o @ w["o"]
    return y


def _dense_mla(m, x, seg, pos):
    """The same equations as one vectorised jnp function of the module's params (T x T
    scores, explicit mask), differentiable."""
    cfg = m.cfg
    n, p, v, r = cfg.dims(D)
    h, th = cfg.num_heads, cfg.rope_theta
    b, t, _ = x.shape
    if cfg.q_lora_rank is None:
        q = x @ m.q_proj.kernel[...]
    else:
        q = _rms(x @ m.q_a_proj.kernel[...], m.q_a_norm.scale[...], jnp) @ m.q_b_proj.kernel[...]
    q = q.reshape(b, t, h, n + p)
    q_nope, q_r = q[..., :n], _rope(q[..., n:], pos[:, :, None], th, jnp)
    kv = x @ m.kv_a_proj.kernel[...]
    c_kv = _rms(kv[..., :r], m.kv_a_norm.scale[...], jnp)
    k_r = _rope(kv[..., r:], pos, th, jnp)
    up = (c_kv @ m.kv_b_proj.kernel[...]).reshape(b, t, h, n + v)
    s = (jnp.einsum("bihn,bjhn->bhij", q_nope, up[..., :n])
         + jnp.einsum("bihp,bjp->bhij", q_r, k_r)) / math.sqrt(n + p)
    mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
            & (pos[:, None, :] <= pos[:, :, None]))[:, None]
    a = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1) * mask
    o = jnp.einsum("bhij,bjhv->bihv", a, up[..., n:])
    return o.reshape(b, t, h * v) @ m.o_proj.kernel[...]


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_numpy_loop_over_packed_documents(name):
    m = _mixer(CASES[name])
    x, seg, pos = _packed()
    y, cache = _call(m, x, pos, seg, None)
    assert cache is None and y.shape == x.shape
    want = _numpy_mla(m, x, seg, pos)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
    assert np.abs(want).max() > 0.1  # not vacuously small
    np.testing.assert_array_equal(np.asarray(y)[:, -2:], 0.0)  # padding sees no key


def test_gradients_match_dense_jnp_version():
    m = _mixer(CASES["q_lora"], seed=3)
    x, seg, pos = _packed(seed=3)
    probe = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), jnp.float32)

    def via_module(m, x):
        return (m(x, positions=pos, segment_ids=seg)[0] * probe).sum()

    def via_dense(m, x):
        return (_dense_mla(m, x, seg, pos) * probe).sum()

    (l0, (gm0, gx0)), (l1, (gm1, gx1)) = [nnx.jit(nnx.value_and_grad(f, argnums=(0, 1)))(m, x)
                                          for f in (via_module, via_dense)]
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gx0), np.asarray(gx1), rtol=1e-4, atol=1e-5)
    flat0, flat1 = nnx.to_flat_state(gm0), nnx.to_flat_state(gm1)
    assert [k for k, _ in flat0] == [k for k, _ in flat1] and len(flat0) == 7
    for (path, a), (_, b) in zip(flat0, flat1):
        a, b = np.asarray(a[...]), np.asarray(b[...])
        assert np.isfinite(a).all() and np.abs(a).max() > 0, path
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(path))


# ----------------------------------------------------------------------------- decode

# The decode path does not depend on how queries are projected: one case in the default tier.
@pytest.mark.parametrize("name", [pytest.param("q_from_x", marks=pytest.mark.slow), "q_lora"])
def test_prefill_then_steps_equal_parallel_form(name):
    """Packed rows (a document boundary inside the prefill in one row, after it in the other)
    through the latent cache: a prefill long enough to attend expanded, a 3-token chunk and
    single tokens attending absorbed, against the parallel pass."""
    cfg = CASES[name]
    m = _mixer(cfg, seed=1)
    x, seg, pos = _packed(rows=((6, 12), (13, 5)), pad=0, seed=1)
    y, _ = _call(m, x, pos, seg, None)
    dims = (m.nope, m.rope, m.v_dim, m.rank)
    chunks = [13, 3, 1, 1]
    assert not absorbed_is_cheaper(13, *dims) and absorbed_is_cheaper(3, *dims)
    cache = m.init_cache(2, x.shape[1])
    assert cache["k"].shape == (2, 18, 1, m.rank + m.rope) and cache["v"].shape == (2, 18, 1, 0)
    outs, start = [], 0
    for c in chunks:
        sl = slice(start, start + c)
        o, cache = _call(m, x[:, sl], pos[:, sl], seg[:, sl], cache)
        outs.append(o)
        start += c
    assert start == x.shape[1] and int(cache["index"]) == start
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_absorbed_equals_expanded_on_a_scrambled_cache():
    """The latent-space MQA (W_uk in the query, W_uv after) equals decompressing every cached
    latent into per-head keys and values, over a cache whose slots are out of order, hold
    two documents and some empty slots."""
    b, tq, s, h, n, p, v, r = 2, 3, 10, 3, 8, 4, 6, 16
    rng = np.random.default_rng(5)
    q_nope, q_rope, c_kv, k_rope, w = (jnp.asarray(rng.normal(size=shape) * std, jnp.float32) for shape, std in [
        ((b, tq, h, n), 1), ((b, tq, h, p), 1), ((b, s, r), 1), ((b, s, p), 1), ((r, h, n + v), 0.3)])
    kv_seg = jnp.asarray([[2, 1, 2, 0, 2, 1, 2, 2, 0, 1]] * 2, jnp.int32)
    kv_pos = jnp.asarray([[3, 0, 0, 0, 2, 1, 4, 1, 0, 2]] * 2, jnp.int32)
    seg = jnp.asarray([[2, 2, 2], [1, 1, 2]], jnp.int32)
    pos = jnp.asarray([[2, 4, 5], [1, 3, 0]], jnp.int32)
    kw = dict(scale=1 / math.sqrt(n + p), segment_ids=seg, positions=pos, kv_segment_ids=kv_seg,
              kv_positions=kv_pos)
    latent = jnp.concatenate([c_kv, k_rope], -1)
    absorbed = jax.jit(lambda *a: absorbed_attention(*a, **kw))(q_nope, q_rope, latent, w)
    expanded, (q, k) = jax.jit(lambda *a: expanded_attention(*a, **kw))(q_nope, q_rope, c_kv, k_rope, w)
    assert absorbed.shape == expanded.shape == (b, tq, h, v) and k.shape == (b, s, h, n + p)
    np.testing.assert_allclose(np.asarray(absorbed), np.asarray(expanded), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(expanded)).max() > 0.1


# ----------------------------------------------------------------------------- config, counts

@pytest.mark.parametrize("change, field", [
    (dict(num_heads=0), "num_heads"),
    (dict(num_heads=3), "num_heads"),  # does not divide d_model 32
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(qk_rope_head_dim=3), "qk_rope_head_dim"),
    (dict(v_head_dim=0), "v_head_dim"),
    (dict(rope_theta=0.0), "rope_theta"),
])
def test_config_errors_name_the_field(change, field):
    cfg = ModelConfig(vocab_size=64, d_model=D, num_layers=1, pattern=("lat",),
                      mixers={"lat": MLAConfig(**change)})
    with pytest.raises(ConfigError, match=rf"model\.mixers\.lat\.{field}"):
        cfg.check()


def test_flops_follow_params_and_visible_keys():
    """Projections: 6 FLOPs per weight (fwd + bwd); scores: 3 x 2 H (n + p + v) per visible key
    (T = 1 sees one key, T = 3 two on average)."""
    for cfg in CASES.values():
        m = _mixer(cfg)
        n, p, v, _ = cfg.dims(D)
        weights = sum(x.size for path, x in nnx.to_flat_state(nnx.state(m, nnx.Param)) if path[-1] == "kernel")
        per_key = 3 * 2 * cfg.num_heads * (n + p + v)
        f1, f3 = MLA.flops_per_token(cfg, D, 1), MLA.flops_per_token(cfg, D, 3)
        assert f1 == 6 * weights + per_key and f3 - f1 == per_key
    assert mixer_class(MLAConfig()) is MLA


def test_default_config_cache_bytes_and_describe():
    """Default config at d_model 256: nope 64, rope 32, v 64, r 256, H 4: the latent cache is
    (256 + 32) * 4 B per token per layer against MHA's 4 * (64 + 32 + 64) * 4 B."""
    ctx = LayerContext(d_model=256, dtype=jnp.float32, runtime=RuntimeConfig(), init_std=0.02, out_std=0.01)
    m = nnx.eval_shape(lambda: MLA(MLAConfig(), ctx, rngs=nnx.Rngs(params=0)))
    assert (m.nope, m.rope, m.v_dim, m.rank) == (64, 32, 64, 256)
    assert m.cache_bytes() == (1152, 2560)
    text = m.describe()
    assert "1152 B/token/layer" in text and "2560 B" in text and "impl=auto" in text, text
    assert "cached calls of < 86 tokens absorbed" in text, text
    assert absorbed_is_cheaper(85, 64, 32, 64, 256) and not absorbed_is_cheaper(86, 64, 32, 64, 256)
    cache = m.init_cache(1, 5)
    assert cache["k"][0, 0].nbytes + cache["v"][0, 0].nbytes == 1152


# ----------------------------------------------------------------------------- in a model

LM_CFG = ModelConfig(vocab_size=64, d_model=D, num_layers=2, pattern=("mla", "attn"),
                     mixers={"mla": MLAConfig(num_heads=2, q_lora_rank=16), "attn": AttentionConfig(num_heads=2)})
LM_RT = RuntimeConfig(compute_dtype="float32", attention_block_q=8, attention_block_k=8)


def _tokens():
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 24)), jnp.int32)
    return tok, jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), tok.shape), jnp.ones(tok.shape, jnp.int32)


@pytest.mark.slow  # ~10 s; the default tier runs MLA in a model in tests/models/test_decode.py
def test_lm_with_mla_and_attention_builds_and_trains():
    LM_CFG.check()
    model = models.build(LM_CFG, LM_RT)
    blocks = model.layers()
    assert [b.name for b in blocks] == ["mla", "attn"]
    mla = blocks[0].mixer
    assert mla.describe().startswith("MLA H=2 nope=16 rope=8 v=16 kv_rank=64 q_rank=16"), mla.describe()
    # initialisation: projections N(0, init_std^2), the output projection N(0, out_std^2), norms 1
    out_std = LM_CFG.init_std / math.sqrt(2 * LM_CFG.num_layers)
    for proj, std in (("q_a_proj", LM_CFG.init_std), ("q_b_proj", LM_CFG.init_std),
                      ("kv_a_proj", LM_CFG.init_std), ("kv_b_proj", LM_CFG.init_std), ("o_proj", out_std)):
        w = np.asarray(getattr(mla, proj).kernel[...])
        assert abs(w.std() / std - 1) < 0.1 and abs(w.mean()) < 0.2 * std, (proj, w.std(), std)
    np.testing.assert_array_equal(np.asarray(mla.kv_a_norm.scale[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(mla.q_a_norm.scale[...]), 1.0)

    tok, pos, seg = _tokens()
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt):
        def loss(params):
            logits, _ = nnx.merge(graphdef, params)(tok[:, :-1], positions=pos[:, :-1], segment_ids=seg[:, :-1])
            return lm_loss(logits, tok[:, 1:], seg[:, 1:])[0]
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    opt, losses = tx.init(params), []
    for _ in range(8):
        params, opt, value = step(params, opt)
        losses.append(float(value))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_lm_with_mla_decodes_like_its_forward():
    """Prefill then single tokens through the scanned stack's latent caches (tests/models/
    test_decode.py checks every mixer the same way once it has an MLA case)."""
    model = models.build(LM_CFG, LM_RT, seed=2)
    tok, pos, seg = _tokens()
    call = nnx.jit(lambda m, t, p, s, c: m(t, positions=p, segment_ids=s, cache=c))
    full, _ = call(model, tok, pos, seg, None)
    cache = model.init_cache(4, 24)
    outs = []
    for sl in [slice(0, 20)] + [slice(t, t + 1) for t in range(20, 24)]:
        logits, cache = call(model, tok[:, sl], pos[:, sl], seg[:, sl], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)

"""The nine linear-attention mixers (layers/linear_attention) and the short causal conv.

Per mixer: config validation names the field; packed documents and padding give each document
exactly the output it gets alone; decoding in chunks and single steps (new documents and padding
arriving mid-decode) equals the full forward; the op runs with the configured implementation;
describe() and FLOPs. Three mixers (ssd, mlstm, gdn) are also checked against a naive token
loop of their paper's equations. Widths are tiny and the op is the "reference" one (cheapest to compile)
unless a test says otherwise; tests/models/test_decode.py covers the default implementation.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import layers.catalog  # noqa: F401  (registers the mixers)
from layers.conv import CausalConv1d, causal_conv1d
from layers.registry import LayerContext, build_mixer, mixer_class, registered_mixers
from pallas_kernels import dispatch
from pallas_kernels.chunked_linear_attention.api import OP
from pallas_kernels.delta_rule.api import OP as DELTA_OP
from train.config import ConfigError, Config, ModelConfig, RuntimeConfig, apply_overrides, from_dict, to_dict
from layers.linear_attention.config import (LINEAR_ATTENTION_CONFIGS, DeltaNetConfig, GDNConfig, GLAConfig,
                                           HGRN2Config, LightningConfig, LinearAttnConfig, MLSTMConfig,
                                           RetentionConfig, SSDConfig)

D = 32
CONFIGS = {  # small, with non-default options and short convolutions spread over the kinds
    "linear": LinearAttnConfig(num_heads=2, conv_size=3),
    "retention": RetentionConfig(num_heads=2),
    "lightning": LightningConfig(num_heads=2, output_gate="swish", conv_size=2),
    "ssd": SSDConfig(head_dim=16, state_dim=8, n_groups=2),
    "gla": GLAConfig(num_heads=2, conv_size=4),
    "hgrn2": HGRN2Config(num_heads=2, lower_bound=0.3, output_gate=True),
    "mlstm": MLSTMConfig(num_heads=2, conv_size=4, input_gate="exp", output_norm="layernorm"),
    "deltanet": DeltaNetConfig(num_heads=2, use_gate=True, allow_neg_eigval=True, conv_size=3),
    "gdn": GDNConfig(num_heads=2),
}
DELTA_KINDS = ("deltanet", "gdn")  # on the delta-rule op
RT = RuntimeConfig(compute_dtype="float32", linear_attention_impl="reference", linear_attention_chunk=8)


def _mixer(cfg, runtime=RT, seed=0):
    ctx = LayerContext(d_model=D, dtype=jnp.float32, runtime=runtime, init_std=0.2, out_std=0.2)
    return build_mixer(cfg, ctx, rngs=nnx.Rngs(params=seed))


@nnx.jit
def _call(m, x, pos, seg, cache):
    return m(x, positions=pos, segment_ids=seg, cache=cache)


def test_every_linear_kind_is_registered_with_a_default_name():
    kinds = {c.kind for c in LINEAR_ATTENTION_CONFIGS}
    assert kinds == set(CONFIGS) and kinds <= {c.kind for c in registered_mixers()}
    cfg = ModelConfig(d_model=64, pattern=("gla", "gla", "gla", "attn"))
    cfg.check()
    assert isinstance(cfg.mixer("gla"), GLAConfig) and isinstance(cfg.mixer("ssd"), SSDConfig)


def test_configs_round_trip_and_override():
    cfg = Config(model=ModelConfig(d_model=64, pattern=("gla", "mlstm", "attn"),
                                   mixers={"mlstm": MLSTMConfig(gate_soft_cap=None, conv_size=4)}))
    d = to_dict(cfg)
    assert d["model"]["mixers"]["mlstm"]["kind"] == "mlstm"
    assert from_dict(Config, d) == cfg
    out = apply_overrides(cfg, ["model.mixers.gla.num_heads=2", "model.mixers.ssd.state_dim=32",
                                "model.mixers.lightning.output_gate=sigmoid"])
    assert out.model.mixers["gla"] == GLAConfig(num_heads=2)
    assert out.model.mixers["ssd"].state_dim == 32 and out.model.mixers["lightning"].output_gate == "sigmoid"
    with pytest.raises(ConfigError, match="output_gate"):
        apply_overrides(cfg, ["model.mixers.lightning.output_gate=relu"])
    with pytest.raises(ConfigError, match="lower_bound"):
        apply_overrides(cfg, ["model.pattern=hgrn2", "model.mixers.hgrn2.lower_bound=1.5"])


BAD = [  # (config, field the error must name)
    (LinearAttnConfig(num_heads=3), "expand_k"),
    (LinearAttnConfig(feature_map="identity"), "normalize"),
    (LinearAttnConfig(feature_map="gelu"), "feature_map"),
    (LinearAttnConfig(conv_size=1), "conv_size"),
    (RetentionConfig(num_heads=8, expand_k=0.25), "expand_k"),
    (RetentionConfig(num_heads=0), "num_heads"),
    (RetentionConfig(rope_theta=0.0), "rope_theta"),
    (LightningConfig(slope_scale=-1.0), "slope_scale"),
    (LightningConfig(output_gate="relu"), "output_gate"),
    (SSDConfig(head_dim=24), "head_dim"),
    (SSDConfig(head_dim=16, n_groups=3), "n_groups"),
    (SSDConfig(dt_min=0.5, dt_max=0.1), "dt_min"),
    (SSDConfig(a_init_min=0.0), "a_init_min"),
    (GLAConfig(expand_k=0.3), "expand_k"),
    (GLAConfig(gate_low_rank_dim=0), "gate_low_rank_dim"),
    (GLAConfig(gate_logit_normalizer=0.0), "gate_logit_normalizer"),
    (HGRN2Config(lower_bound=1.0), "lower_bound"),
    (HGRN2Config(num_heads=3, expand_k=0.75), "num_heads"),
    (MLSTMConfig(gate_soft_cap=0.0), "gate_soft_cap"),
    (MLSTMConfig(expand_qk=0.3), "expand_qk"),
    (MLSTMConfig(fgate_bias_init_min=7.0), "fgate_bias_init_min"),
    (MLSTMConfig(input_gate="softplus"), "input_gate"),
    (MLSTMConfig(input_gate="exp", gate_soft_cap=None), "gate_soft_cap"),
    (DeltaNetConfig(expand_k=0.3), "expand_k"),
    (DeltaNetConfig(num_heads=0), "num_heads"),
    (DeltaNetConfig(conv_size=1), "conv_size"),
    (GDNConfig(expand_v=0.3), "expand_v"),
    (GDNConfig(dt_min=0.5, dt_max=0.1), "dt_min"),
    (GDNConfig(a_init_min=0.0), "a_init_min"),
    (GDNConfig(a_init_min=20.0), "a_init_min"),
]


@pytest.mark.parametrize("cfg,field", BAD, ids=[f"{c.kind}-{f}" for c, f in BAD])
def test_config_errors_name_the_field(cfg, field):
    with pytest.raises(ConfigError, match=rf"model\.mixers\.m\.{field}"):
        cfg.check(D, "model.mixers.m")
    for cfg in CONFIGS.values():
        cfg.check(D, "model.mixers.m")  # the test configs themselves are valid


# ----------------------------------------------------------------------------- packed documents

def _packed_batch(seed=0):
    """5 rows of T = 16 tokens: x [5, T, D], positions, segment ids.

    row 0: doc A (5) | doc B (7) | padding (4)
    row 1: doc B alone, then padding            row 2: padding (3) | doc A alone | padding
    row 3: documents of 8, 1 and 7 tokens (they start where the CHUNKS of the decode test start)
    row 4: 4 tokens of id 1 | padding (4) | doc B and one more token, id 1 again (a new document)
    """
    t = 16
    x = np.array(jax.random.normal(jax.random.PRNGKey(seed), (5, t, D)))
    x[1, :7] = x[0, 5:12]
    x[2, 3:8] = x[0, :5]
    x[4, 8:15] = x[0, 5:12]
    seg = np.zeros((5, t), np.int32)
    seg[0, :5], seg[0, 5:12] = 1, 2
    seg[1, :7] = 3
    seg[2, 3:8] = 1
    seg[3, :8], seg[3, 8:9], seg[3, 9:] = 1, 2, 3
    seg[4, :4], seg[4, 8:] = 1, 1
    pos = np.zeros((5, t), np.int32)
    for r in range(5):
        start = 0
        for i in range(1, t + 1):
            if i == t or seg[r, i] != seg[r, i - 1] or seg[r, i] == 0:
                pos[r, start:i] = np.arange(i - start) if seg[r, start] else 0
                start = i
    return jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg)


# deltanet shares gdn's path through the delta rule (no decay is the only difference): slow tier.
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k == "deltanet" else k for k in CONFIGS])
def test_documents_padding_implementation_and_describe(kind):
    cfg = CONFIGS[kind]
    m = _mixer(cfg)
    x, pos, seg = _packed_batch()
    full, none = _call(m, x, pos, seg, None)
    assert none is None
    op = DELTA_OP if kind in DELTA_KINDS else OP
    assert dispatch.last(op).implementation == "reference"  # the runtime's choice reached the op
    full = np.asarray(full)
    assert full.shape == x.shape and np.isfinite(full).all()
    # a document in a packed row == the same document alone (padding before or after it)
    np.testing.assert_allclose(full[0, 5:12], full[1, :7], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full[0, :5], full[2, 3:8], rtol=1e-5, atol=1e-5)
    # after padding, the same id starts a new document (row 4 holds doc B from t = 8)
    np.testing.assert_allclose(full[4, 8:15], full[1, :7], rtol=1e-5, atol=1e-5)
    text = m.describe()
    assert "impl=reference" in text and "chunk=8" in text and "\n" not in text
    assert ("delta rule impl" in text) == (kind in DELTA_KINDS)
    assert ("conv=" in text) == (cfg.conv_size > 0)
    f = type(m).flops_per_token(cfg, D, 64)
    assert f > 0 and type(m).flops_per_token(cfg, D, 256) >= f  # the chunk grows up to 64


CHUNKS = (8, 1, 7)  # a prefill, one token, a chunk: documents start at each of these (row 3)


@nnx.jit
def _full_and_decoded(m, x, pos, seg):
    """(full forward [B, T, d], the same fed through the cache in CHUNKS [B, T, d], final cache),
    as one compiled program (compiles are what these tests cost)."""
    full, _ = m(x, positions=pos, segment_ids=seg)
    cache = m.init_cache(x.shape[0], x.shape[1], jnp.float32)
    outs, start = [], 0
    for n in CHUNKS:
        sl = slice(start, start + n)
        y, cache = m(x[:, sl], positions=pos[:, sl], segment_ids=seg[:, sl], cache=cache)
        outs.append(y)
        start += n
    return full, jnp.concatenate(outs, axis=1), cache


# The cache logic lives in the shared base class: one mixer per op (mlstm: normaliser column,
# short conv, per-head decay; gdn: the delta rule's beta and decay) in the default run, every
# mixer in the slow one. test_decode.py checks prefill + single steps for all nine in the
# default run.
@pytest.mark.parametrize("kind", [k if k in ("mlstm", "gdn") else pytest.param(k, marks=pytest.mark.slow)
                                  for k in CONFIGS])
def test_chunked_decode_with_documents_equals_full_forward(kind):
    m = _mixer(CONFIGS[kind])
    x, pos, seg = _packed_batch()
    full, decoded, cache = _full_and_decoded(m, x, pos, seg)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert cache["state"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(cache["segment"]), np.asarray(seg[:, -1]))


@pytest.mark.slow
@pytest.mark.skipif("xla" not in dispatch.implementations(OP), reason="xla implementation not registered")
def test_configured_implementation_is_used():
    m = _mixer(CONFIGS["retention"], dataclasses.replace(RT, linear_attention_impl="xla"))
    x, pos, seg = _packed_batch()
    y_xla, _ = _call(m, x, pos, seg, None)
    assert dispatch.last(OP).implementation == "xla"
    assert "impl=xla" in m.describe()
    ref = _mixer(CONFIGS["retention"])
    y_ref, _ = _call(ref, x, pos, seg, None)
    np.testing.assert_allclose(np.asarray(y_xla), np.asarray(y_ref), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- paper equations

def _naive_scan(step, carry, *xs):
    """A Python loop over time (inside jit: unrolled; T is 9)."""
    outs = []
    for t in range(xs[0].shape[1]):
        carry, o = step(carry, *(a[:, t] for a in xs))
        outs.append(o)
    return jnp.stack(outs, axis=1)


@nnx.jit
def _mamba2_naive(m, x, seg):
    """Mamba2 by its equations, token by token, from the module's own parameters."""
    b, t, _ = x.shape
    h, g, n, p = m.heads, m.groups, m.dn, m.dp
    xbc, _ = causal_conv1d(jnp.concatenate([m.x_proj(x), m.bc_proj(x)], -1), m.conv.kernel[...],
                           m.conv.bias[...], seg)
    xbc = jax.nn.silu(xbc)
    xs = xbc[..., :m.d_inner].reshape(b, t, h, p)
    bm = xbc[..., m.d_inner:m.d_inner + g * n].reshape(b, t, g, n)
    cm = xbc[..., m.d_inner + g * n:].reshape(b, t, g, n)
    dt = jax.nn.softplus(m.dt_proj(x) + m.dt_bias[...])
    a = -jnp.exp(m.A_log[...])
    grp = np.arange(h) // (h // g)

    def step(state, x_t, b_t, c_t, dt_t):  # state [B, H, P, N]
        state = jnp.exp(a * dt_t)[..., None, None] * state + \
            jnp.einsum("bhp,bhn->bhpn", dt_t[..., None] * x_t, b_t[:, grp])
        return state, jnp.einsum("bhpn,bhn->bhp", state, c_t[:, grp]) + m.D[...][:, None] * x_t

    ys = _naive_scan(step, jnp.zeros((b, h, p, n)), xs, bm, cm, dt).reshape(b, t, -1)
    ys = (ys * jax.nn.silu(m.z_proj(x))).reshape(b, t, g, -1)  # gate, then RMSNorm per group
    ys = ys / jnp.sqrt(jnp.mean(ys ** 2, -1, keepdims=True) + 1e-6)
    return m.out_proj(ys.reshape(b, t, -1) * m.norm.scale[...])


def test_ssd_matches_mamba2_recurrence():
    m = _mixer(CONFIGS["ssd"])
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 9, D))
    seg = jnp.ones((2, 9), jnp.int32)
    y, _ = _call(m, x, jnp.zeros_like(seg), seg, None)
    np.testing.assert_allclose(np.asarray(y), np.asarray(_mamba2_naive(m, x, seg)), rtol=1e-4, atol=1e-5)


@nnx.jit
def _mlstm_sig_naive(m, x, cap):
    """mLSTMsig by its equations (matrix memory C, normaliser n), token by token."""
    b, t, _ = x.shape
    h, dk, dv = m.heads, m.dk, m.dv
    q = m.q_proj(x).reshape(b, t, h, dk)
    k = m.k_proj(x).reshape(b, t, h, dk) / np.sqrt(dk)
    v = m.v_proj(x).reshape(b, t, h, dv)
    soft = lambda z: cap * jnp.tanh(z / cap)
    i = jax.nn.sigmoid(soft(m.ig_proj(x) + m.ig_bias[...]))
    f = jax.nn.sigmoid(soft(m.fg_proj(x) + m.fg_bias[...]))

    def step(carry, q_t, k_t, v_t, i_t, f_t):
        c, n = carry
        c = f_t[..., None, None] * c + i_t[..., None, None] * jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
        n = f_t[..., None] * n + i_t[..., None] * k_t
        num = jnp.einsum("bhk,bhkv->bhv", q_t, c)
        den = jnp.maximum(jnp.abs(jnp.einsum("bhk,bhk->bh", q_t, n)), 1.0) + 1e-6
        return (c, n), num / den[..., None]

    hid = _naive_scan(step, (jnp.zeros((b, h, dk, dv)), jnp.zeros((b, h, dk))), q, k, v, i, f)
    hid = hid / jnp.sqrt(jnp.mean(hid ** 2, -1, keepdims=True) + 1e-6) * m.o_norm.scale[...]
    return m.o_proj(hid.reshape(b, t, -1) * jax.nn.sigmoid(m.og_proj(x)))


def test_mlstm_matches_sigmoid_gate_recurrence():
    m = _mixer(dataclasses.replace(CONFIGS["mlstm"], conv_size=0, gate_soft_cap=3.0, input_gate="sigmoid",
                                   output_norm="rms"))
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 9, D))
    seg = jnp.ones((2, 9), jnp.int32)
    y, _ = _call(m, x, jnp.zeros_like(seg), seg, None)
    np.testing.assert_allclose(np.asarray(y), np.asarray(_mlstm_sig_naive(m, x, 3.0)), rtol=1e-4, atol=1e-5)


def _mlstm_exp_stabilised_numpy(m, x, cap: float) -> np.ndarray:
    """The original mLSTM cell (Beck et al. 2024, eqs. 19-27, as xLSTM 7B) in float64 numpy, with
    its running-max stabiliser m_t, and the multi-head LayerNorm: an independent statement of
    what input_gate="exp", output_norm="layernorm" must compute (the module runs it without the
    stabiliser)."""
    f64 = lambda a: np.asarray(a, np.float64)
    b, t, _ = x.shape
    h, dk, dv = m.heads, m.dk, m.dv
    q = f64(m.q_proj(x)).reshape(b, t, h, dk) / np.sqrt(dk)
    k = f64(m.k_proj(x)).reshape(b, t, h, dk)
    v = f64(m.v_proj(x)).reshape(b, t, h, dv)
    capped = lambda z: cap * np.tanh(z / cap)
    i_pre = capped(f64(m.ig_proj(x)) + f64(m.ig_bias[...]))
    f_log = -np.logaddexp(0.0, -capped(f64(m.fg_proj(x)) + f64(m.fg_bias[...])))  # log sigmoid
    out = np.zeros((b, t, h, dv))
    for bi in range(b):
        for hi in range(h):
            c, n, mx = np.zeros((dk, dv)), np.zeros(dk), 0.0
            for ti in range(t):
                m_new = max(f_log[bi, ti, hi] + mx, i_pre[bi, ti, hi])
                fa, ia = np.exp(f_log[bi, ti, hi] + mx - m_new), np.exp(i_pre[bi, ti, hi] - m_new)
                c = fa * c + ia * np.outer(k[bi, ti, hi], v[bi, ti, hi])
                n = fa * n + ia * k[bi, ti, hi]
                qt = q[bi, ti, hi]
                # eps scaled by e^{-m_t}: Chimera's eps on the unstabilised cell (transformers adds it
                # unscaled, a difference of 1e-6 e^{m_t} in a denominator >= 1)
                out[bi, ti, hi] = qt @ c / (max(abs(qt @ n), np.exp(-m_new)) + 1e-6 * np.exp(-m_new))
                mx = m_new
    out = out - out.mean(-1, keepdims=True)
    out = out / np.sqrt((out ** 2).mean(-1, keepdims=True) + 1e-6) * f64(m.o_norm.scale[...]).reshape(h, dv)
    gate = 1 / (1 + np.exp(-f64(m.og_proj(x))))
    return f64(m.o_proj(jnp.asarray((out.reshape(b, t, -1) * gate).astype(np.float32))))


def test_mlstm_exp_gate_and_layernorm_match_the_stabilised_cell():
    cfg = dataclasses.replace(CONFIGS["mlstm"], conv_size=0, gate_soft_cap=4.0, input_gate="exp",
                              output_norm="layernorm")
    m = _mixer(cfg)
    m.ig_bias[...] = jnp.asarray([2.0, -1.0])  # exp(i) far from sigmoid(i): the gate choice shows
    m.o_norm.scale[...] = 1 + 0.3 * jax.random.normal(jax.random.PRNGKey(1), m.o_norm.scale[...].shape)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 11, D))
    seg = jnp.ones((2, 11), jnp.int32)
    y, _ = _call(m, x, jnp.zeros_like(seg), seg, None)
    np.testing.assert_allclose(np.asarray(y), _mlstm_exp_stabilised_numpy(m, x, 4.0), rtol=1e-4, atol=1e-5)
    assert m.o_norm.scale[...].shape == (2 * m.dv,)  # a scale per head and channel


@nnx.jit
def _gated_deltanet_naive(m, x, seg):
    """Gated DeltaNet by its equations (state S [K, V] per head), token by token, from the
    module's own parameters."""
    b, t, _ = x.shape
    h, dk, dv = m.heads, m.dk, m.dv
    qkv, _ = causal_conv1d(jnp.concatenate([m.q_proj(x), m.k_proj(x), m.v_proj(x)], -1), m.conv.kernel[...],
                           None, seg)
    qkv = jax.nn.silu(qkv)
    l2 = lambda z: z / jnp.sqrt(jnp.sum(z ** 2, -1, keepdims=True) + 1e-6)
    q = l2(qkv[..., :h * dk].reshape(b, t, h, dk))
    k = l2(qkv[..., h * dk:2 * h * dk].reshape(b, t, h, dk))
    v = qkv[..., 2 * h * dk:].reshape(b, t, h, dv)
    beta = jax.nn.sigmoid(m.b_proj(x)) * (2.0 if m.cfg.allow_neg_eigval else 1.0)
    alpha = jnp.exp(-jnp.exp(m.A_log[...]) * jax.nn.softplus(m.a_proj(x) + m.dt_bias[...]))

    def step(s, q_t, k_t, v_t, b_t, a_t):  # s [B, H, K, V]
        erase = jnp.eye(dk) - b_t[..., None, None] * jnp.einsum("bhi,bhj->bhij", k_t, k_t)
        s = a_t[..., None, None] * jnp.einsum("bhij,bhjv->bhiv", erase, s) + \
            b_t[..., None, None] * jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s) / np.sqrt(dk)

    o = _naive_scan(step, jnp.zeros((b, h, dk, dv)), q, k, v, beta, alpha)
    o = o / jnp.sqrt(jnp.mean(o ** 2, -1, keepdims=True) + 1e-6) * m.o_norm.scale[...]
    return m.o_proj(o.reshape(b, t, -1) * jax.nn.silu(m.g_proj(x)))


@pytest.mark.parametrize("neg", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gdn_matches_gated_delta_rule_recurrence(neg):
    m = _mixer(dataclasses.replace(CONFIGS["gdn"], allow_neg_eigval=neg))
    m.A_log[...] = m.A_log[...] - 3.0  # decays well away from 0 and 1: both terms of the update count
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 9, D))
    seg = jnp.ones((2, 9), jnp.int32)
    y, _ = _call(m, x, jnp.zeros_like(seg), seg, None)
    np.testing.assert_allclose(np.asarray(y), np.asarray(_gated_deltanet_naive(m, x, seg)), rtol=1e-4, atol=1e-5)


def test_delta_flops_exceed_plain_linear_attention():
    """The chunked delta rule costs more than chunked linear attention of the same widths."""
    from layers.linear_attention import common
    assert common.delta_chunk_flops(2, 16, 32, 256) > common.chunk_flops(2, 16, 32, 256)
    lin = LinearAttnConfig(num_heads=2, conv_size=4)
    dn = DeltaNetConfig(num_heads=2)
    cls = mixer_class
    assert cls(dn).flops_per_token(dn, D, 256) > cls(lin).flops_per_token(lin, D, 256)
    gdn = GDNConfig(num_heads=2, expand_k=1.0)
    assert cls(gdn).flops_per_token(gdn, D, 256) > cls(dn).flops_per_token(dn, D, 256)


def test_fixed_decays_follow_the_papers():
    from layers.linear_attention.lightning import alibi_slopes
    from layers.linear_attention.retention import retention_log_decay
    np.testing.assert_allclose(np.exp(retention_log_decay(4)), 1 - 2.0 ** -np.arange(5, 9), rtol=1e-7)
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    np.testing.assert_allclose(alibi_slopes(4), 2.0 ** -np.arange(2, 10, 2))
    assert len(alibi_slopes(6)) == 6 and np.all(np.diff(alibi_slopes(4)) < 0)


# ----------------------------------------------------------------------------- short conv

def _naive_conv(x, w, b, seg):
    """Per-token loop: tap j reads x[t - j] if it is a non-padding token of t's document."""
    x, w, seg = np.asarray(x), np.asarray(w), np.asarray(seg)
    bsz, t, c = x.shape
    y = np.zeros_like(x) + np.asarray(b)
    for r in range(bsz):
        doc, docs = 0, []
        for i in range(t):
            if i > 0 and seg[r, i] != seg[r, i - 1] and seg[r, i] != 0:
                doc += 1
            docs.append(doc)
        for i in range(t):
            for j in range(w.shape[0]):
                s = i - j
                if s >= 0 and seg[r, s] != 0 and docs[s] == docs[i]:
                    y[r, i] += w[j] * x[r, s]
    return y


CONV_CHUNKS = (2, 1, 5, 1, 1, 6)


@nnx.jit
def _conv_full_and_chunked(conv, x, seg):
    y, none = conv(x, seg)
    assert none is None
    cache = conv.init_cache(x.shape[0], jnp.float32)
    outs, start = [], 0
    for n in CONV_CHUNKS:
        y_c, cache = conv(x[:, start:start + n], seg[:, start:start + n], cache)
        outs.append(y_c)
        start += n
    return y, jnp.concatenate(outs, 1), cache


def test_conv_keeps_documents_apart_and_decodes_in_chunks():
    conv = CausalConv1d(6, 4, bias=True, rngs=nnx.Rngs(params=0))
    conv.bias[...] = jnp.arange(6, dtype=jnp.float32) / 10
    x, _, seg = _packed_batch(seed=1)
    x = x[..., :6]
    y, chunked, cache = _conv_full_and_chunked(conv, x, seg)
    np.testing.assert_allclose(np.asarray(y), _naive_conv(x, conv.kernel[...], conv.bias[...], seg),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y[0, 5:12]), np.asarray(y[1, :7]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(y), rtol=1e-6, atol=1e-6)
    assert cache["x"].shape == (5, 3, 6)
    np.testing.assert_array_equal(np.asarray(cache["segment_ids"]), np.asarray(seg[:, -3:]))

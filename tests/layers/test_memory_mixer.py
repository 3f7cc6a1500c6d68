"""The test-time memory mixer (layers/memory, kind "memory").

Its output equals a re-computation from its parameters by the paper's equations with the op's
token-by-token reference; a document packed after another (on a chunk boundary) equals itself
alone, padding outputs zero; gradients are finite and reach every parameter, W0 included;
decoding (a prefill, then single tokens, with documents and padding arriving mid-decode, chunk
4 and T = 19 so the chunks are ragged) equals the parallel form, and at the op level equals it
to 1e-10 in float64; config errors name the field;
a (memory, attn) hybrid trains. The op core itself is tested in
tests/pallas_kernels/test_neural_memory.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.conv import causal_conv1d
from layers.memory import decode
from layers.memory.mixer import NeuralMemory
from layers.registry import LayerContext, build_mixer, registered_mixers
from pallas_kernels import dispatch
from pallas_kernels.neural_memory import common, reference, xla
from pallas_kernels.neural_memory.api import OP
from pallas_kernels.neural_memory.common import MemorySpec
from train.config import Config, ConfigError, ModelConfig, RuntimeConfig, apply_overrides, from_dict, to_dict
from layers.memory.config import MemoryConfig

D, T, PREFILL = 32, 19, 7
RT = RuntimeConfig(compute_dtype="float32")
# Default tier: an MLP memory with every gate (huber delta, decay, momentum), conv and a
# sigmoid gate. Slow tier: the other axes. max_lr well above the default 0.01, so that the
# memory moves a lot in 19 tokens.
CONFIGS = {
    "mlp_huber_momentum": MemoryConfig(num_heads=2, chunk_size=4, max_lr=1.0, bias="huber", conv_size=3,
                                       output_gate="sigmoid"),
    "linear_l2_decayed": MemoryConfig(num_heads=2, arch="linear", chunk_size=4, max_lr=1.0,
                                      gradient_at="decayed", algorithm="gd", output_gate="swish"),
    "ttt_mlp_lagged": MemoryConfig(num_heads=2, head_dim=8, chunk_size=4, max_lr=0.5, w0_std=0.02,
                                   residual=True, layernorm=True,
                                   retention="none", algorithm="gd", read="chunk_lagged", bias="lp",
                                   activation="silu", depth=3, expansion=2, output_gate="none",
                                   output_norm=False, conv_size=0),
    "moneta_chunk_gates": MemoryConfig(num_heads=2, chunk_size=4, max_lr=0.5, residual=True,
                                       layernorm=True, bias="lp", retention="lq_norm",
                                       gate_granularity="chunk", algorithm="gd_momentum"),
    "memora": MemoryConfig(num_heads=2, chunk_size=4, max_lr=1.0, residual=True, layernorm=True,
                           retention="kl_softmax", algorithm="gd", expansion=2),
}
DEFAULT = "mlp_huber_momentum"
KINDS = [k if k == DEFAULT else pytest.param(k, marks=pytest.mark.slow) for k in CONFIGS]


def _mixer(cfg, seed=0):
    ctx = LayerContext(d_model=D, dtype=jnp.float32, runtime=RT, init_std=0.2, out_std=0.2)
    return build_mixer(cfg, ctx, rngs=nnx.Rngs(params=seed))


def _packed(seed=0):
    """2 rows of T tokens: x [2, T, D], positions, segment ids.
    row 0: doc A (8) | doc B (7) | padding (2) | doc C (2)   (B starts on the chunk-4 grid)
    row 1: doc B alone (7) | doc D (3, starts mid-chunk) | padding (9)"""
    x = np.array(jax.random.normal(jax.random.PRNGKey(seed), (2, T, D)))
    x[1, :7] = x[0, 8:15]
    seg = np.zeros((2, T), np.int32)
    seg[0, :8], seg[0, 8:15], seg[0, 17:] = 1, 2, 3
    seg[1, :7], seg[1, 7:10] = 5, 6
    pos = np.zeros((2, T), np.int32)
    for r in range(2):
        for s in set(seg[r]) - {0}:
            idx = np.nonzero(seg[r] == s)[0]
            pos[r, idx] = np.arange(len(idx))
    return jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg)


# ----------------------------------------------------------------------------- config

def test_registered_with_a_default_name_and_round_trips():
    assert MemoryConfig in registered_mixers()
    cfg = Config(model=ModelConfig(d_model=64, pattern=("memory", "memory", "swa")))
    cfg.model.check()
    assert cfg.model.mixer("memory") == MemoryConfig()
    out = apply_overrides(cfg, ["model.mixers.memory.chunk_size=4", "model.mixers.memory.arch=linear"])
    assert out.model.mixers["memory"] == MemoryConfig(chunk_size=4, arch="linear")
    assert from_dict(Config, to_dict(out)) == out
    assert to_dict(out)["model"]["mixers"]["memory"]["kind"] == "memory"
    with pytest.raises(ConfigError, match="model.mixers.memory.bias"):
        apply_overrides(cfg, ["model.mixers.memory.bias=l3"])


BAD = [  # (config, field the error must name)
    (MemoryConfig(num_heads=0), "num_heads"),
    (MemoryConfig(num_heads=3), "num_heads"),
    (MemoryConfig(head_dim=0), "head_dim"),
    (MemoryConfig(arch="conv"), "arch"),
    (MemoryConfig(depth=1), "depth"),
    (MemoryConfig(expansion=0), "expansion"),
    (MemoryConfig(activation="relu"), "activation"),
    (MemoryConfig(bias="l3"), "bias"),
    (MemoryConfig(bias="lp", p=0.5), "p"),
    (MemoryConfig(eps=0.0), "eps"),
    (MemoryConfig(retention="elastic_net"), "retention"),
    (MemoryConfig(retention="lq_norm", q=0.5), "q"),
    (MemoryConfig(retention="forget"), "retention"),
    (MemoryConfig(algorithm="muon"), "algorithm"),
    (MemoryConfig(gradient_at="later"), "gradient_at"),
    (MemoryConfig(chunk_size=0), "chunk_size"),
    (MemoryConfig(read="before_write"), "read"),
    (MemoryConfig(gate_granularity="channel"), "gate_granularity"),
    (MemoryConfig(max_lr=0.0), "max_lr"),
    (MemoryConfig(max_decay=1.0), "max_decay"),
    (MemoryConfig(min_momentum=0.0), "min_momentum"),
    (MemoryConfig(w0_std=0.0), "w0_std"),
    (MemoryConfig(conv_size=1), "conv_size"),
    (MemoryConfig(output_gate="relu"), "output_gate"),
]


@pytest.mark.parametrize("cfg,field", BAD, ids=[f for _, f in BAD])
def test_config_errors_name_the_field(cfg, field):
    with pytest.raises(ConfigError, match=rf"model\.mixers\.m\.{field}\b"):
        cfg.check(D, "model.mixers.m")
    for good in CONFIGS.values():
        good.check(D, "model.mixers.m")


# ----------------------------------------------------------------------------- forward

def _rms(x, scale, eps=1e-6):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def _recompute(m: NeuralMemory, x, seg):
    """The mixer by its equations from its own parameters, through the op's reference."""
    c, spec = m.cfg, m.spec
    b, t, _ = x.shape
    h, hd = m.heads, m.dk
    qkv = x @ jnp.concatenate([m.q_proj.kernel[...], m.k_proj.kernel[...], m.v_proj.kernel[...]], -1)
    if m.conv is not None:
        qkv = jax.nn.silu(causal_conv1d(qkv, m.conv.kernel[...], None, seg)[0])
    q, k, v = (z.reshape(b, t, h, hd) for z in jnp.split(qkv, 3, -1))
    unit = lambda z: z / jnp.sqrt(jnp.sum(z * z, -1, keepdims=True) + 1e-6)
    z = (x @ m.gate_proj.kernel[...] + m.gate_bias[...]).reshape(b, t, -1, h)
    gates, i = {}, 0
    gates["theta"] = c.max_lr * jax.nn.sigmoid(z[:, :, 0])
    if spec.decay:
        i += 1
        gates["alpha"] = c.max_decay * jax.nn.sigmoid(z[:, :, i])
    if spec.momentum:
        i += 1
        gates["eta"] = c.min_momentum + (1 - c.min_momentum) * jax.nn.sigmoid(z[:, :, i])
    if spec.bias == "huber":
        i += 1
        gates["delta"] = jax.nn.softplus(z[:, :, i])
    o, _ = reference.neural_memory(spec, unit(q), unit(k), v, initial_weights=tuple(w[...] for w in m.w0),
                                   segment_ids=seg, **gates)
    if c.output_norm:
        o = _rms(o, m.o_norm.scale[...])
    o = o.reshape(b, t, -1)
    if c.output_gate != "none":
        g = x @ m.g_proj.kernel[...]
        o = o * (jax.nn.sigmoid(g) if c.output_gate == "sigmoid" else jax.nn.silu(g))
    return o @ m.o_proj.kernel[...]


@nnx.jit
def _forward(m, x, pos, seg):
    return m(x, positions=pos, segment_ids=seg)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_equations_and_documents_reset(kind):
    m = _mixer(CONFIGS[kind])
    x, pos, seg = _packed()
    y = np.asarray(_forward(m, x, pos, seg))
    assert dispatch.last(OP).implementation == "xla"  # the best available on CPU
    want = np.asarray(jax.jit(_recompute, static_argnums=0)(m, x, seg))
    # kl_softmax's logits grow large (exp amplifies their float32 rounding); the op-level
    # float64 tests show xla and reference are the same function.
    tol = 1e-3 if CONFIGS[kind].retention == "kl_softmax" else 1e-4
    np.testing.assert_allclose(y, want, rtol=tol, atol=tol / 10)
    # doc B on the chunk grid (t = 8) in row 0 == doc B alone at the start of row 1
    np.testing.assert_allclose(y[0, 8:15], y[1, :7], rtol=1e-5, atol=1e-5)
    assert np.all(y[seg == 0] == 0)  # padding outputs nothing
    assert "neural_memory impl=auto" in m.describe() and "\n" not in m.describe()
    assert NeuralMemory.flops_per_token(CONFIGS[kind], D, 64) > 0


def test_gradients_finite_and_reach_every_param():
    m = _mixer(CONFIGS[DEFAULT])
    x, pos, seg = _packed(seed=1)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    @jax.jit
    def loss(params):
        y, _ = nnx.merge(graphdef, params, rest)(x, positions=pos, segment_ids=seg)
        return jnp.sum(jnp.sin(3.0 * y))

    grads = jax.grad(loss)(params)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert any("w0" in jax.tree_util.keystr(p) for p, _ in flat)
    for path, g in flat:
        g = np.asarray(g)
        assert np.isfinite(g).all(), jax.tree_util.keystr(path)
        assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


# ----------------------------------------------------------------------------- decode

@nnx.jit
def _call(m, x, pos, seg, cache):
    return m(x, positions=pos, segment_ids=seg, cache=cache)


def _full_and_decoded(m, x, pos, seg):
    """(parallel forward, prefill of PREFILL tokens then one token at a time, final cache):
    three compiles (full, prefill, one token), cheaper than one program of all the steps."""
    full, _ = _call(m, x, pos, seg, None)
    cache = m.init_cache(x.shape[0], x.shape[1], jnp.float32)
    outs = []
    for start, n in [(0, PREFILL)] + [(t, 1) for t in range(PREFILL, x.shape[1])]:
        sl = slice(start, start + n)
        y, cache = _call(m, x[:, sl], pos[:, sl], seg[:, sl], cache)
        outs.append(y)
    return full, jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_steps_equal_parallel_form(kind):
    m = _mixer(CONFIGS[kind], seed=2)
    x, pos, seg = _packed(seed=2)
    full, decoded, cache = _full_and_decoded(m, x, pos, seg)
    tol = 1e-3 if CONFIGS[kind].retention == "kl_softmax" else 1e-4  # as in the forward test
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=tol, atol=tol / 5)
    mem = cache["memory"]
    assert isinstance(mem, decode.MemoryCache) and mem.weights[0].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(mem.pos), [T, T])
    np.testing.assert_array_equal(np.asarray(mem.segment), np.asarray(seg[:, -1]))


F64_SPECS = {  # op-level decode vs parallel in float64, slow tier (the default tier decodes in float32 below)
    "titans_chunk_gates": MemorySpec(expansion=2, bias="huber", chunk_size=4, gate_granularity="chunk"),
    "memora_lagged": MemorySpec(expansion=2, residual=True, layernorm=True, retention="kl_softmax",
                                algorithm="gd", chunk_size=3, read="chunk_lagged"),
    "moneta_decayed": MemorySpec(expansion=2, residual=True, layernorm=True, bias="lp",
                                 retention="lq_norm", gradient_at="decayed", chunk_size=5),
}


# Multi-token calls, by chunk size: on the grid (whole chunks in parallel, then a stepped tail),
# off the grid (all stepped), on the grid with fewer tokens than a chunk, and single tokens.
CALLS = {4: [7, 5, 4, 1, 1, 1], 3: [7, 2, 6, 1, 2, 1], 5: [7, 3, 6, 1, 1, 1]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(F64_SPECS))
def test_decode_equals_parallel_in_float64(name, monkeypatch):
    """The decode state (chunk-start anchor, in-chunk decay product, held gates, grid position,
    last segment) reproduces the chunk-parallel op to 1e-10 in float64: calls of CALLS tokens
    through `decode.prefill` (both of its branches), over packed documents and padding, with
    every float32 of the op and the decode switched to float64 (so agreement is exact math,
    not a tolerance that rounding hides)."""
    for module in (common, reference, xla, decode):
        monkeypatch.setattr(module, "F32", jnp.float64)
    spec = F64_SPECS[name]
    h, dk = 2, 4
    _, _, seg = _packed()
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        f = lambda *sh: jnp.asarray(rng.normal(size=sh), jnp.float64)
        unit = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True)
        q, k, v = unit(f(2, T, h, dk)), unit(f(2, T, h, dk)), f(2, T, h, dk)
        gates = (jax.nn.sigmoid(f(2, T, h)), 0.3 * jax.nn.sigmoid(f(2, T, h)) if spec.decay else None,
                 jax.nn.sigmoid(f(2, T, h) + 1.0) if spec.momentum else None,
                 jax.nn.softplus(f(2, T, h)) if spec.bias == "huber" else None)
        w0 = jax.tree.map(lambda w: w.astype(jnp.float64),
                          common.init_weights(spec, jax.random.key(4), h, dk, dk, std=0.5))
        parallel, final = xla.neural_memory(spec, q, k, v, *gates, initial_weights=w0, segment_ids=seg)
        cache = decode.init_cache(spec, 2, h, dk, dk)
        at = lambda x, sl: None if x is None else x[:, sl]
        outs, start = [], 0
        for n in CALLS[spec.chunk_size]:
            sl = slice(start, start + n)
            o, cache = decode.prefill(spec, w0, cache, at(q, sl), at(k, sl), at(v, sl),
                                      *(at(g, sl) for g in gates), seg[:, sl], parallel=xla.neural_memory)
            outs.append(o)
            start += n
        assert start == T
        decoded = jnp.concatenate(outs, axis=1)
        assert decoded.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(decoded), np.asarray(parallel), rtol=1e-10, atol=1e-10)
        for a, b in zip(cache.weights + cache.momentum, final.weights + final.momentum):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- training

@pytest.mark.slow
def test_memory_attention_hybrid_trains(trains_briefly):
    log = trains_briefly([
        "model.pattern=memory,attn", "model.num_layers=2",
        "model.mixers.attn.num_heads=2", "model.mixers.attn.num_kv_heads=1",
        "model.mixers.memory.num_heads=2", "model.mixers.memory.chunk_size=8",
        "model.mixers.memory.expansion=2"], steps=8)
    assert "neural_memory impl=auto" in log

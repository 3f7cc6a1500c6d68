"""Titans MAC / MAG / MAL (models/titans, configs models/titans/config.py).

Each mixer's output equals a plain re-computation of the paper's equations from its parameters:
dense attention with masks written out pair by pair, MAC's segments in a Python loop whose
memory states come from the token-by-token definition of the memory op (pallas_kernels/
neural_memory/reference.py) run over all earlier segments' outputs at once (so the state
carried across segments, the chunk grid and the document resets are checked, not assumed).
Packed documents that start on the grid equal themselves alone; padding outputs zero;
gradients reach every parameter; decoding with documents and padding arriving mid-decode
equals the parallel form; configs round-trip and their errors name the field; each
architecture trains.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models  # noqa: F401  (registers the mixers)
from layers.registry import LayerContext, build_mixer
from pallas_kernels.neural_memory import common, reference
from train.config import (
    Config,
    ConfigError,
    ModelConfig,
    RuntimeConfig,
    apply_overrides,
    from_dict,
    to_dict,
)
from layers.memory.config import MemoryConfig
from models.titans.config import MACConfig, MAGConfig, MALConfig

D, T = 32, 19
C = 8  # MAC segment: segments [0, 8), [8, 16), [16, 19) (the last one padded)
RT = RuntimeConfig(compute_dtype="float32", attention_block_q=8, attention_block_k=8)
# max_lr well above the default so the memory moves a lot in 19 tokens; chunk 4 (2 per segment).
MEM = MemoryConfig(num_heads=2, chunk_size=4, expansion=2, max_lr=1.0, conv_size=3)
CONFIGS = {
    "mac": MACConfig(num_heads=4, num_kv_heads=2, num_persistent=3, segment_size=C, memory=MEM),
    "mag": MAGConfig(num_heads=2, num_persistent=3, window=4, qk_norm=True, memory=MEM),
    "mal": MALConfig(num_heads=2, num_kv_heads=1, num_persistent=2, window=4, memory=MEM),
}


# Decode-only variant: MAC over a memory whose weights are a map of its state (Moneta's l_q
# retention) with per-chunk gates, so retrieval and the decode cache must use both.
DECODE_ONLY = {"mac_lq_chunk_gates": MACConfig(
    num_heads=4, num_kv_heads=2, num_persistent=3, segment_size=C,
    memory=MemoryConfig(num_heads=2, chunk_size=4, expansion=2, max_lr=0.5, conv_size=3, residual=True,
                        layernorm=True, bias="lp", retention="lq_norm", gate_granularity="chunk"))}


def _mixer(kind, seed=0):
    ctx = LayerContext(d_model=D, dtype=jnp.float32, runtime=RT, init_std=0.2, out_std=0.2)
    return build_mixer({**CONFIGS, **DECODE_ONLY}[kind], ctx, rngs=nnx.Rngs(params=seed))


def _jitted(m):
    """A jitted m(x, positions, segment_ids, cache) -> (y, cache)."""
    graphdef, state = nnx.split(m)
    fn = jax.jit(lambda st, x, p, s, c: nnx.merge(graphdef, st)(x, positions=p, segment_ids=s, cache=c))
    return lambda x, p, s, c=None: fn(state, x, p, s, c)


def _packed(seed=0):
    """2 rows of T tokens: x [2, T, D], positions, segment ids.
    row 0: doc A (8) | doc B (5, starts on the segment grid) | doc C (4, starts mid-segment) |
           padding (1) | doc D (1)
    row 1: doc B alone (5) | padding (3) | doc E (11, starts on the grid)"""
    x = np.array(jax.random.normal(jax.random.PRNGKey(seed), (2, T, D)))
    x[1, :5] = x[0, 8:13]
    seg = np.zeros((2, T), np.int32)
    seg[0, :8], seg[0, 8:13], seg[0, 13:17], seg[0, 18] = 1, 2, 3, 4
    seg[1, :5], seg[1, 8:] = 2, 5
    pos = np.zeros((2, T), np.int32)
    for r in range(2):
        for t in range(T):
            pos[r, t] = 0 if t == 0 or seg[r, t] != seg[r, t - 1] else pos[r, t - 1] + 1
    return jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg)


# ----------------------------------------------------------------------------- plain formulations

def _softmax_attention(q, keys, vals, mask):
    """Dense attention written out: q [B, Tq, H, Dh], keys / vals [B, Tk, K, Dh], mask numpy
    bool [B, Tq, Tk]. Rows with nothing visible give 0."""
    h, kh = q.shape[2], keys.shape[2]
    keys, vals = jnp.repeat(keys, h // kh, axis=2), jnp.repeat(vals, h // kh, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, keys) / np.sqrt(q.shape[-1])
    s = jnp.where(mask[:, None], s, -1e30)
    p = jnp.where(mask[:, None], jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vals)


def _memory_reads(mem, y, seg):
    """The "memory" mixer's equations over a whole row by the op's token-by-token definition:
    y [B, T, d] -> (o [B, T, H, V] the after-write reads, final MemoryState)."""
    q, k, v, g, _ = mem.features(y, seg, None)
    return reference.neural_memory(mem.spec, q, k, v, g["theta"], g.get("alpha"), g.get("eta"),
                                   g.get("delta"), initial_weights=mem.initial_weights(), segment_ids=seg)


def _persistent(m, b):
    pk, pv = m.attn.persistent_kv()
    return jnp.broadcast_to(pk[None], (b, *pk.shape)), jnp.broadcast_to(pv[None], (b, *pv.shape))


def _window_attention(m, x, pos, seg, window):
    """W_o SWA*(x): persistent tokens always visible (to non-padding queries), token j visible
    to i iff same document, j <= i and pos_i - pos_j < window."""
    b, t, _ = x.shape
    q, k, v = m.attn.project(x, pos)
    pk, pv = _persistent(m, b)
    s, p = np.asarray(seg), np.asarray(pos)
    n_p = pk.shape[1]
    mask = np.zeros((b, t, n_p + t), bool)
    for r in range(b):
        for i in range(t):
            mask[r, i, :n_p] = s[r, i] != 0
            for j in range(i + 1):
                mask[r, i, n_p + j] = s[r, i] == s[r, j] != 0 and p[r, i] - p[r, j] < window
    o = _softmax_attention(q, jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1), mask)
    return m.attn.o_proj(o.reshape(b, t, -1))


def _gate(m, y, mem_out):
    ny, nm = m.gate.y_norm.scale[...], m.gate.m_norm.scale[...]
    rms = lambda a, w: a / jnp.sqrt(jnp.mean(a * a, -1, keepdims=True) + 1e-6) * w
    return m.gate.o_proj(rms(y, ny) * jax.nn.sigmoid(rms(mem_out, nm)))


def mag_plain(m, x, pos, seg):
    y = _window_attention(m, x, pos, seg, m.cfg.window)
    o, _ = _memory_reads(m.memory, x, seg)
    return _gate(m, y, m.memory.readout(o, x))


def mal_plain(m, x, pos, seg):
    o, _ = _memory_reads(m.memory, x, seg)
    y = m.memory.readout(o, x)
    y = y / jnp.sqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6) * m.mid_norm.scale[...]
    return _window_attention(m, y, pos, seg, m.cfg.window)


def mac_plain(m, x, pos, seg):
    """Segment by segment, in Python: the memory after segments < s is the token-by-token
    definition run over the outputs y of all of them at once (W0 before the first)."""
    b, t, _ = x.shape
    c, mem, spec = m.cfg.segment_size, m.memory, m.memory.spec
    w0 = mem.initial_weights()
    q_r = mem.features(x, seg, None)[0]  # retrieval queries of the whole row
    qa, ka, va = m.attn.project(x, pos)
    pk, pv = _persistent(m, b)
    n_p = pk.shape[1]
    s_np = np.asarray(seg)
    starts = np.zeros((b, t), bool)  # a document starts at the token
    for r in range(b):
        for i in range(t):
            starts[r, i] = s_np[r, i] != 0 and (i == 0 or s_np[r, i] != s_np[r, i - 1])
    ys = []
    for s0 in range(0, t, c):
        sl = slice(s0, min(s0 + c, t))
        n = sl.stop - s0
        state = _memory_reads(mem, jnp.concatenate(ys, 1), seg[:, :s0])[1].weights if s0 else None
        heads = range(q_r.shape[2])
        from_w0 = jnp.stack([common.apply(spec, tuple(w[hh] for w in w0), q_r[:, sl, hh]) for hh in heads], 2)
        reads = from_w0
        if state is not None:
            from_state = jnp.stack([jnp.stack([common.apply(spec, tuple(w[r, hh] for w in state),
                                                            q_r[r, sl, hh]) for hh in heads], 1)
                                    for r in range(b)])
            fresh = np.array([[starts[r, s0:i + 1].any() for i in range(s0, sl.stop)] for r in range(b)])
            reads = jnp.where(fresh[:, :, None, None], from_w0, from_state)  # document began in the segment
        h = mem.readout(reads, x[:, sl])  # [B, n, d]
        kh, vh = m.attn.keys_values(h, pos[:, sl])
        mask = np.zeros((b, n, n_p + 2 * n), bool)
        for r in range(b):
            for i in range(n):
                mask[r, i, :n_p] = s_np[r, s0 + i] != 0
                for j in range(i + 1):
                    same = s_np[r, s0 + i] == s_np[r, s0 + j] != 0
                    mask[r, i, n_p + j] = mask[r, i, n_p + n + j] = same
        o = _softmax_attention(qa[:, sl], jnp.concatenate([pk, kh, ka[:, sl]], 1),
                               jnp.concatenate([pv, vh, va[:, sl]], 1), mask)
        y = m.attn.o_proj(o.reshape(b, n, -1))
        ys.append(y / jnp.sqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6) * m.gate.y_norm.scale[...])
    y = jnp.concatenate(ys, 1)
    o, _ = _memory_reads(mem, y, seg)
    mem_out = mem.readout(o, y)
    return m.gate.o_proj(y * jax.nn.sigmoid(
        mem_out / jnp.sqrt(jnp.mean(mem_out * mem_out, -1, keepdims=True) + 1e-6) * m.gate.m_norm.scale[...]))


PLAIN = {"mac": mac_plain, "mag": mag_plain, "mal": mal_plain}


# ----------------------------------------------------------------------------- tests

# Default tier: the cheap checks and the forward of MAC and MAL (MAG shares MAL's attention and
# MAC's gate); the rest compiles a gradient, a decode or a training step per architecture (tens
# of seconds each on 2 cores) and runs in the slow tier. tests/models/test_decode.py's "titans"
# case checks decode == parallel for all three in the default tier.
slow = pytest.mark.slow
DEFAULT_TIER = ("mac", "mal")


@pytest.mark.parametrize("kind", [k if k in DEFAULT_TIER else pytest.param(k, marks=slow) for k in CONFIGS])
def test_forward_equals_plain_equations_and_packing(kind):
    m = _mixer(kind)
    x, pos, seg = _packed()
    y = np.asarray(_jitted(m)(x, pos, seg)[0])
    plain = jax.jit(lambda x: PLAIN[kind](m, x, pos, seg))(x)  # pos, seg concrete: the masks are numpy
    np.testing.assert_allclose(y, np.asarray(plain), rtol=2e-4, atol=2e-5)
    # doc B starts on the segment grid (and the chunk grid) in row 0 and alone in row 1
    np.testing.assert_allclose(y[1, :5], y[0, 8:13], rtol=1e-4, atol=1e-5)
    assert np.all(y[0, 17] == 0) and np.all(y[1, 5:8] == 0)  # padding
    assert np.abs(y).mean() > 0.1


@slow
def test_mac_retrieval_and_memory_reach_later_segments():
    """The MAC output of segment 2 depends on segment 0's tokens (through the memory only:
    attention never leaves the segment), and not when a document boundary separates them."""
    m = _mixer("mac")
    f = _jitted(m)
    x = _packed()[0]
    one = jnp.ones((1, T), jnp.int32)
    p1 = jnp.arange(T, dtype=jnp.int32)[None]
    x2 = x[:1].at[:, 2].add(1.0)
    y1, y2 = f(x[:1], p1, one)[0], f(x2, p1, one)[0]
    assert float(jnp.abs(y1[:, 16:] - y2[:, 16:]).max()) > 1e-4
    seg = one.at[:, 16:].set(2)  # a new document from segment 2 on: memory reset, nothing leaks
    pos2 = p1.at[:, 16:].set(jnp.arange(3, dtype=jnp.int32))
    np.testing.assert_array_equal(np.asarray(f(x[:1], pos2, seg)[0][:, 16:]),
                                  np.asarray(f(x2, pos2, seg)[0][:, 16:]))


@slow
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_gradients_finite_and_reach_every_param(kind):
    m = _mixer(kind)
    x, pos, seg = _packed()
    graphdef, params = nnx.split(m, nnx.Param)
    r = jax.random.normal(jax.random.PRNGKey(3), (2, T, D))

    @jax.jit
    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x, positions=pos, segment_ids=seg)[0] * r)

    gp, gx = jax.grad(loss, argnums=(0, 1))(params, x)
    leaves = jax.tree_util.tree_leaves_with_path(gp)
    assert leaves
    for path, g in leaves:
        g = np.asarray(g)
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    assert np.isfinite(np.asarray(gx)).all()


@slow
@pytest.mark.parametrize("kind", [*CONFIGS, *DECODE_ONLY])
def test_prefill_then_steps_with_documents_equal_parallel_form(kind):
    """A prefill of 6 tokens (mid-segment, mid-chunk, longer than the window), then chunks of
    1, 4 and 1 tokens, over rows where documents and padding start mid-decode."""
    m = _mixer(kind)
    f = _jitted(m)
    x, pos, seg = _packed(seed=1)
    full = np.asarray(f(x, pos, seg)[0])
    cache = m.init_cache(2, T, jnp.float32)
    outs, start = [], 0
    for n in [6, 1, 4] + [1] * (T - 11):
        o, cache = f(x[:, start:start + n], pos[:, start:start + n], seg[:, start:start + n], cache)
        outs.append(np.asarray(o))
        start += n
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=2e-4, atol=2e-5)


def test_registered_round_trips_and_overrides_reach_the_memory():
    cfg = Config(model=ModelConfig(d_model=64, pattern=("titans_mac", "titans_mag", "titans_mal")))
    for kind, cls in (("titans_mac", MACConfig), ("titans_mag", MAGConfig), ("titans_mal", MALConfig)):
        assert cfg.model.mixer(kind) == cls()
    out = apply_overrides(cfg, ["model.mixers.titans_mac.memory.chunk_size=8",
                                "model.mixers.titans_mac.segment_size=32",
                                "model.mixers.titans_mag.memory.arch=linear",
                                "model.mixers.titans_mal.num_persistent=0"])
    assert out.model.mixers["titans_mac"] == MACConfig(segment_size=32, memory=MemoryConfig(chunk_size=8))
    assert out.model.mixers["titans_mag"].memory.arch == "linear"
    assert out.model.mixers["titans_mal"].num_persistent == 0
    back = from_dict(Config, json.loads(json.dumps(to_dict(out))))
    assert back == out
    with pytest.raises(ConfigError, match=r"titans_mac\.memory\.bias"):
        apply_overrides(cfg, ["model.mixers.titans_mac.memory.bias=l3"])


@pytest.mark.parametrize("cfg, field", [
    (MACConfig(segment_size=24), "segment_size"),  # not a multiple of memory.chunk_size = 16
    (MACConfig(segment_size=0), "segment_size"),
    (MACConfig(num_persistent=-1), "num_persistent"),
    (MACConfig(num_heads=3), "num_heads"),
    (MACConfig(memory=MemoryConfig(chunk_size=0)), "memory.chunk_size"),
    (MAGConfig(window=0), "window"),
    (MAGConfig(num_kv_heads=3), "num_kv_heads"),
    (MAGConfig(memory=MemoryConfig(max_lr=0.0)), "memory.max_lr"),
    (MALConfig(window=0), "window"),
    (MALConfig(memory=MemoryConfig(num_heads=3)), "memory.num_heads"),
])
def test_config_errors_name_the_field(cfg, field):
    with pytest.raises(ConfigError, match=rf"model\.mixers\.x\.{field}"):
        Config(model=ModelConfig(d_model=64, pattern=("x",), mixers={"x": cfg}))


def test_memory_must_be_a_memory_config():
    d = to_dict(MACConfig())
    d["memory"] = {"kind": "attention"}
    with pytest.raises(ConfigError, match=r"x\.memory must be a memory config"):
        bad = from_dict(MACConfig, {k: v for k, v in d.items() if k != "kind"})
        Config(model=ModelConfig(d_model=64, pattern=("x",), mixers={"x": bad}))


def test_flops_and_describe():
    from layers.memory.mixer import NeuralMemory
    for kind, cfg in CONFIGS.items():
        m = _mixer(kind)
        assert type(m).flops_per_token(cfg, D, 64) > NeuralMemory.flops_per_token(cfg.memory, D, 64) > 0
        assert "neural_memory impl=auto" in m.describe() and "persistent" in m.describe()


@slow
@pytest.mark.parametrize("kind", ["titans_mac", "titans_mag", "titans_mal"])
def test_trains(kind, trains_briefly):
    log = trains_briefly([
        f"model.pattern={kind}", "model.num_layers=1",
        *[f"model.mixers.{k}.{f}" for k in ("titans_mac", "titans_mag", "titans_mal")
          for f in ("num_heads=2", "num_persistent=2", "memory.num_heads=2", "memory.chunk_size=8",
                    "memory.expansion=2")],
        "model.mixers.titans_mac.segment_size=16", "model.mixers.titans_mag.window=8",
        "model.mixers.titans_mal.window=8"], steps=8)
    assert "Titans" in log

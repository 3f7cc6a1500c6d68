"""Block routing of the sparse mixers (`route_block_q` = n > 1, layers/sparse_attention/routing.py).

Each group of n consecutive queries shares the choice its first query (the leader) makes. The
layers are checked against numpy loops of the documented equations (the leader's gate /
compressed-branch importance, its document's candidates, the forced blocks; then per-token
causal, same-document attention over the chosen blocks) on a packed batch whose documents start
on a block boundary, mid-block, mid-group and behind padding, with GQA and T not a multiple of
n or of the block; gradients (xla implementation, custom backward) against autodiff of dense
masked attention under the same choice; prefill + decode in chunks that put leaders in earlier
calls equal to the parallel form; config errors; the Pallas GPU kernels (interpret mode) serving
a block-routed layout (slow tier).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import layers.catalog  # noqa: F401  (registers the mixers)
from layers.registry import LayerContext, build_mixer
from layers.sparse_attention import routing
from layers.sparse_attention.common import masked_attention
from pallas_kernels import dispatch
from pallas_kernels.block_sparse_attention.api import OP, block_sparse_attention
from pallas_kernels.block_sparse_attention.layout import from_topk
from train.config import Config, ConfigError, ModelConfig, RuntimeConfig, apply_overrides
from layers.sparse_attention.config import MoBAConfig, NSAConfig

D = 32
N = 16  # route_block_q
T = 150  # 10 groups (the last of 6), blocks of 32: 5 (last ragged), blocks of 16: 10 (ragged)
MOBA = MoBAConfig(num_heads=4, num_kv_heads=2, block_size=32, top_k=2, qk_norm=True, route_block_q=N)
NSA = NSAConfig(num_heads=4, num_kv_heads=2, block_size=16, num_selected=4, window=20, route_block_q=N)
NSA_MLP = NSAConfig(num_heads=4, num_kv_heads=1, block_size=32, num_selected=3, window=9, compression="mlp",
                    route_block_q=N)
RT = RuntimeConfig(compute_dtype="float32", sparse_attention_impl="reference", attention_block_q=16,
                   attention_block_k=16)


def _mixer(cfg, impl="reference", seed=0):
    ctx = LayerContext(d_model=D, dtype=jnp.float32, runtime=dataclasses.replace(RT, sparse_attention_impl=impl),
                       init_std=0.3, out_std=0.3)
    return build_mixer(cfg, ctx, rngs=nnx.Rngs(params=seed))


def _packed_batch(seed=0):
    """3 rows of T = 150 tokens: x [3, T, D], positions, segment ids.

    row 0: doc A [0, 96) | doc B [96, 150)               (B starts on a block and group boundary)
    row 1: doc B alone [0, 54) | padding                 (so B's outputs equal row 0's)
    row 2: padding [0, 5) | doc C [5, 38) | doc D [38, 150)   (C behind a padding leader; D starts
                                                              mid-group, mid-block, in decode)
    """
    x = np.array(jax.random.normal(jax.random.PRNGKey(seed), (3, T, D)))
    x[1, :54] = x[0, 96:]
    seg = np.zeros((3, T), np.int32)
    seg[0, :96], seg[0, 96:], seg[1, :54], seg[2, 5:38], seg[2, 38:] = 1, 2, 7, 3, 4
    pos = np.zeros((3, T), np.int32)
    for r in range(3):
        for i in range(1, T):
            if seg[r, i] and seg[r, i] == seg[r, i - 1]:
                pos[r, i] = pos[r, i - 1] + 1
    return jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg)


@nnx.jit
def _forward_and_features(m, x, pos, seg):
    y, _ = m(x, positions=pos, segment_ids=seg)
    q, k, v, _ = m.project(x, pos, seg)
    return y, q, k, v


# ----------------------------------------------------------------------------- numpy oracle

def _doc_start(seg_row):
    out = np.zeros(len(seg_row), int)
    for i in range(1, len(seg_row)):
        out[i] = out[i - 1] if seg_row[i] == seg_row[i - 1] else i
    return out


def _top(scores, ranks, eligible, k):
    """Eligible blocks ordered by (forced rank, -score, index), the first k."""
    order = sorted((n for n in range(len(scores)) if eligible[n]), key=lambda n: (ranks[n], -scores[n], n))
    return set(order[:k])


def _group_mask(chosen, seg_row, bs, n):
    """chosen[g]: the blocks of group g -> bool [T, T]: j in a chosen block of i's group, j <= i,
    same nonzero segment."""
    t = len(seg_row)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    listed = np.array([[jb in chosen[ii // n] for jb in range(-(-t // bs))] for ii in range(t)])
    return listed[i, j // bs] & (j <= i) & (seg_row[i] == seg_row[j]) & (seg_row[i] != 0)


def _attend(q, k, v, mask):
    s = np.where(mask, q @ k.T / math.sqrt(q.shape[-1]), -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    l = e.sum(-1, keepdims=True)
    p = e / np.where(l > 0, l, 1.0)
    return p @ v, p


def _moba_masks(cfg, q, k, seg):
    """bool [B, H, T, T]: MoBA block routing. Group g's leader l = g n scores the blocks of its
    document up to l // bs by q_l . mean(keys of the block, padding left out), own block forced,
    top_k; its queries see the chosen blocks' keys causally, same document."""
    b, t, h, d = q.shape
    kvh, bs, n = k.shape[2], cfg.block_size, cfg.route_block_q
    nb = -(-t // bs)
    out = np.zeros((b, h, t, t), bool)
    for r in range(b):
        ds = _doc_start(seg[r])
        for hh in range(h):
            g = hh // (h // kvh)
            means = np.zeros((nb, d))
            for blk in range(nb):
                keys = [k[r, j, g] for j in range(blk * bs, min(t, (blk + 1) * bs)) if seg[r, j] != 0]
                means[blk] = np.mean(keys, axis=0) if keys else 0.0
            chosen = []
            for lead in range(0, t, n):
                eligible = [ds[lead] // bs <= blk <= lead // bs for blk in range(nb)]
                ranks = [0 if blk == lead // bs else 1 for blk in range(nb)]
                chosen.append(_top(means @ q[r, lead, hh], ranks, eligible, cfg.top_k))
            out[r, hh] = _group_mask(chosen, seg[r], bs, n)
    return out


def _nsa_oracle(cfg, q, k, v, seg, kc, vc, gates):
    """NSA block routing: per-token compressed branch and window; the selection of group g is the
    leader's (importance = its compressed probabilities summed over the GQA group, own /
    previous / first block of its document forced). Returns (out [B, T, H, D], the selected
    branch's masks [B, K, T, T])."""
    b, t, h, d = q.shape
    kvh, bs, n = k.shape[2], cfg.block_size, cfg.route_block_q
    nb, nc, grp = -(-t // bs), kc.shape[1], h // kvh
    out, masks = np.zeros_like(q), np.zeros((b, kvh, t, t), bool)
    for r in range(b):
        ds = _doc_start(seg[r])
        cvis = np.array([[(c + 1) * bs - 1 <= i and c * bs >= ds[i] and seg[r, i] != 0 for c in range(nc)]
                         for i in range(t)]).reshape(t, nc)
        win = np.array([[i - cfg.window < j <= i and seg[r, j] == seg[r, i] != 0 for j in range(t)]
                        for i in range(t)])
        for g in range(kvh):
            heads = range(g * grp, (g + 1) * grp)
            o_cmp, imp = {}, np.zeros((t, nb))
            for hh in heads:
                o_cmp[hh], p = _attend(q[r, :, hh], kc[r, :, g], vc[r, :, g], cvis)
                imp[:, :nc] += p
            chosen = []
            for lead in range(0, t, n):
                own, first = lead // bs, ds[lead] // bs
                eligible = [first <= blk <= own for blk in range(nb)]
                ranks = [0 if blk == own else 1 if blk == own - 1 else 2 if blk == first else 3
                         for blk in range(nb)]
                chosen.append(_top(imp[lead], ranks, eligible, cfg.num_selected))
            masks[r, g] = mask = _group_mask(chosen, seg[r], bs, n)
            for hh in heads:
                o_slc = _attend(q[r, :, hh], k[r, :, g], v[r, :, g], mask)[0]
                o_win = _attend(q[r, :, hh], k[r, :, g], v[r, :, g], win)[0]
                gt = gates[r, :, hh]
                out[r, :, hh] = gt[:, :1] * o_cmp[hh] + gt[:, 1:2] * o_slc + gt[:, 2:] * o_win
    return out, masks


def _np(*xs):
    return [np.asarray(x, np.float64) for x in xs]


def _moba_oracle(cfg, q, k, v, seg):
    masks = _moba_masks(cfg, q, k, seg)
    b, t, h, _ = q.shape
    g = h // k.shape[2]
    o = np.zeros_like(q)
    for r in range(b):
        for hh in range(h):
            o[r, :, hh] = _attend(q[r, :, hh], k[r, :, hh // g], v[r, :, hh // g], masks[r, hh])[0]
    return o, masks


def _assert_packing(y):
    np.testing.assert_allclose(y[0, 96:], y[1, :54], rtol=1e-5, atol=1e-5)  # doc B alone
    assert not np.any(y[1, 54:]) and not np.any(y[2, :5])  # padding


# ----------------------------------------------------------------------------- layers vs oracles

def test_moba_block_routing_equals_numpy_loop():
    m = _mixer(MOBA)
    x, pos, seg = _packed_batch()
    y, q, k, v = _forward_and_features(m, x, pos, seg)
    q, k, v = _np(q, k, v)
    o, _ = _moba_oracle(MOBA, q, k, v, np.asarray(seg))
    want = np.asarray(m.o_proj(jnp.asarray(o.reshape(3, T, -1), jnp.float32)))
    y = np.asarray(y)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    _assert_packing(y)
    assert dict(dispatch.last(OP).signature)["block_q"] == N  # block matmuls, not per token
    # Real choices: the group of leader 144 in doc D (row 2) has 4 eligible blocks for top_k = 2.
    assert MOBA.top_k < 144 // MOBA.block_size - 38 // MOBA.block_size + 1


@pytest.mark.parametrize("cfg", [NSA, pytest.param(NSA_MLP, marks=pytest.mark.slow)], ids=["gqa_mean", "mqa_mlp"])
def test_nsa_block_routing_equals_numpy_loop(cfg):
    m = _mixer(cfg)
    x, pos, seg = _packed_batch(seed=1)
    y, q, k, v = _forward_and_features(m, x, pos, seg)
    kc, vc = m.compress(k, v)
    gates = jax.nn.sigmoid(m.g_proj(x)).reshape(3, T, cfg.num_heads, 3)
    q, k, v, kc, vc, gates = _np(q, k, v, kc, vc, gates)
    o, _ = _nsa_oracle(cfg, q, k, v, np.asarray(seg), kc, vc, gates)
    want = np.asarray(m.o_proj(jnp.asarray(o.reshape(3, T, -1), jnp.float32)))
    y = np.asarray(y)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    _assert_packing(y)
    # NSA's routing is document-local: changing doc C (row 2) leaves doc D untouched.
    x2 = x.at[2, 5:38].multiply(-2.0)
    y2 = np.asarray(_forward_and_features(m, x2, pos, seg)[0])
    np.testing.assert_array_equal(y2[2, 38:], y[2, 38:])
    assert not np.allclose(y2[2, 5:38], y[2, 5:38])


# ----------------------------------------------------------------------------- gradients

def _dense_forward(m, cfg, x, pos, seg, masks):
    """The mixer with the selected branch as dense masked attention under fixed masks."""
    q, k, v, _ = m.project(x, pos, seg)
    if isinstance(cfg, MoBAConfig):
        return m.output(masked_attention(q, k, v, masks & routing.same_document(seg, seg)[:, None]))
    b, t = x.shape[:2]
    q_idx = jnp.arange(t, dtype=jnp.int32)
    gates = jax.nn.sigmoid(m.g_proj(x)).reshape(b, t, cfg.num_heads, 3)
    kc, vc = m.compress(k, v)
    o_cmp, _ = m.compressed(q, kc, vc, q_idx, seg, routing.query_doc_starts(seg, q_idx))
    same = routing.same_document(seg, seg)[:, None]
    o_slc = masked_attention(q, k, v, jnp.repeat(masks, cfg.num_heads // cfg.kv_heads, axis=1) & same)
    o_win = masked_attention(q, k, v, routing.window_mask(q_idx, t, cfg.window) & same)
    return m.output(sum(gates[..., i, None] * o for i, o in enumerate((o_cmp, o_slc, o_win))))


@pytest.mark.parametrize("cfg", [MOBA, pytest.param(NSA, marks=pytest.mark.slow)], ids=["moba", "nsa"])
def test_gradients_match_dense_masked_reference(cfg):
    """xla implementation (its custom backward) vs autodiff of dense masked attention under the
    oracle's choice; finite, and reaching every parameter."""
    m = _mixer(cfg, impl="xla")
    x, pos, seg = _packed_batch(seed=2)
    _, q, k, v = _forward_and_features(m, x, pos, seg)
    if isinstance(cfg, MoBAConfig):
        masks = _moba_masks(cfg, *_np(q, k), np.asarray(seg))
    else:
        kc, vc = m.compress(k, v)
        gates = jax.nn.sigmoid(m.g_proj(x)).reshape(3, T, cfg.num_heads, 3)
        masks = _nsa_oracle(cfg, *_np(q, k, v), np.asarray(seg), *_np(kc, vc, gates))[1]
    masks = jnp.asarray(masks)
    w = jax.random.normal(jax.random.PRNGKey(9), (3, T, D))

    @nnx.jit
    def grads(m, x):
        layer = lambda m, x: jnp.sum(m(x, positions=pos, segment_ids=seg)[0] * w)
        dense = lambda m, x: jnp.sum(_dense_forward(m, cfg, x, pos, seg, masks) * w)
        return [nnx.grad(f, argnums=(0, 1))(m, x) for f in (layer, dense)]

    (gm, gx), (dm, dx) = grads(m, x)
    assert dispatch.last(OP).implementation == "xla"
    np.testing.assert_allclose(np.asarray(gx), np.asarray(dx), rtol=1e-4, atol=1e-5)
    dense = dict(nnx.to_flat_state(dm))
    for path, leaf in nnx.to_flat_state(gm):
        a = np.asarray(leaf[...])
        assert np.isfinite(a).all() and np.abs(a).max() > 0, path
        want = np.asarray(dense[path][...])  # sums of many terms: tolerance relative to the largest
        np.testing.assert_allclose(a, want, rtol=1e-4, atol=2e-5 * np.abs(want).max(), err_msg=str(path))


# ----------------------------------------------------------------------------- decode

# prefill 7 (leader 0 in the call), token 7 (leader 0 cached), 8..37 (leader 0 cached, then
# leaders 16 and 32 new), 38 (doc D of row 2 starts mid-group; leader 32 cached), the rest.
CHUNKS = (7, 1, 30, 1, 111)


@nnx.jit
def _full_and_decoded(m, x, pos, seg):
    full, _ = m(x, positions=pos, segment_ids=seg)
    cache = m.init_cache(x.shape[0], x.shape[1] + 3, jnp.float32)
    outs, start = [], 0
    for n in CHUNKS:
        sl = slice(start, start + n)
        y, cache = m(x[:, sl], positions=pos[:, sl], segment_ids=seg[:, sl], cache=cache)
        outs.append(y)
        start += n
    return full, jnp.concatenate(outs, axis=1), cache, m.project(x, pos, seg)[0]


# nsa in the slow tier (the default tier's time budget): moba covers the shared decode routing.
@pytest.mark.parametrize("cfg", [MOBA, pytest.param(NSA, marks=pytest.mark.slow),
                                 pytest.param(NSA_MLP, marks=pytest.mark.slow),
                                 pytest.param(dataclasses.replace(MOBA, key_conv_size=3, num_kv_heads=1),
                                              marks=pytest.mark.slow)],
                         ids=["moba", "nsa", "nsa_mlp", "moba_keyconv"])
def test_decode_equals_parallel(cfg):
    assert sum(CHUNKS) == T
    m = _mixer(cfg)
    x, pos, seg = _packed_batch(seed=3)
    full, decoded, cache, q = _full_and_decoded(m, x, pos, seg)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert int(cache["index"]) == T and cache["route_q"].shape == (3, cfg.num_heads, D // cfg.num_heads)
    # the cache holds the last leader's query
    np.testing.assert_allclose(np.asarray(cache["route_q"]), np.asarray(q[:, (T - 1) // N * N]),
                               rtol=1e-5, atol=1e-6)


def test_leaders_and_route_queries():
    q_idx = jnp.arange(14, 20, dtype=jnp.int32)
    leaders = routing.group_leaders(q_idx, 16)
    np.testing.assert_array_equal(leaders, [0, 0, 16, 16, 16, 16])
    q = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1, 1)
    out, last = routing.route_queries(q, q_idx, leaders, jnp.full((1, 1, 1), -1.0))
    np.testing.assert_array_equal(out[0, :, 0, 0], [-1, -1, 2, 2, 2, 2])
    np.testing.assert_array_equal(last, [[[2.0]]])


# ----------------------------------------------------------------------------- configs

BAD = [MoBAConfig(route_block_q=0), MoBAConfig(route_block_q=8), MoBAConfig(route_block_q=24),
       MoBAConfig(block_size=32, route_block_q=64), NSAConfig(block_size=48, route_block_q=32),
       NSAConfig(route_block_q=2)]


@pytest.mark.parametrize("cfg", BAD, ids=[f"{c.kind}-{c.block_size}-{c.route_block_q}" for c in BAD])
def test_route_block_q_errors_name_the_field(cfg):
    with pytest.raises(ConfigError, match=r"^model\.mixers\.m\.route_block_q must be 1 \(token routing\) or a "
                                          r"power of two >= 16 dividing model\.mixers\.m\.block_size=\d+, got"):
        cfg.check(D, "model.mixers.m")


def test_route_block_q_accepted_values_and_pallas_runtime():
    for cfg in (MoBAConfig(), MoBAConfig(route_block_q=16), MoBAConfig(route_block_q=64),
                NSAConfig(block_size=48, route_block_q=16), MOBA, NSA, NSA_MLP):
        cfg.check(D, "model.mixers.m")
    assert MoBAConfig().route_block_q == 1 and NSAConfig().route_block_q == 1  # token routing by default
    base = Config(model=ModelConfig(d_model=64, pattern=("moba", "nsa")))
    ok = apply_overrides(base, ["model.mixers.moba.route_block_q=32", "model.mixers.nsa.route_block_q=16",
                                "runtime.sparse_attention_impl=gpu"])
    assert ok.model.mixers["moba"].route_block_q == 32
    with pytest.raises(ConfigError, match=r"sparse_attention_impl='gpu'.*model\.mixers\.nsa.*route_block_q"):
        apply_overrides(base, ["model.mixers.moba.route_block_q=32", "runtime.sparse_attention_impl=gpu"])
    with pytest.raises(ConfigError, match=r"'tpu'.*model\.mixers\.moba\.route_block_q.*multiples of 128"):
        apply_overrides(base, ["model.mixers.moba.route_block_q=64", "model.mixers.nsa.route_block_q=64",
                               "runtime.sparse_attention_impl=tpu"])
    apply_overrides(base, [f"model.mixers.{n}.{f}=128" for n in ("moba", "nsa")
                           for f in ("block_size", "route_block_q")] + ["runtime.sparse_attention_impl=tpu"])
    with pytest.raises(ConfigError, match=r"model\.mixers\.moba\.route_block_q"):
        apply_overrides(base, ["model.mixers.moba.route_block_q=20"])


def test_describe_and_flops():
    m = _mixer(MOBA, impl="xla")
    assert "route_block_q=16" in m.describe() and "route_block_q" in _mixer(NSA).describe()
    assert "route_block_q" not in _mixer(dataclasses.replace(MOBA, route_block_q=1)).describe()
    tok = type(m).flops_per_token(dataclasses.replace(MOBA, route_block_q=1), D, 2048)
    assert type(m).flops_per_token(MOBA, D, 2048) < tok  # the gate runs on the leaders only


# ----------------------------------------------------------------------------- Pallas (interpret)

@pytest.mark.slow
def test_gpu_kernels_serve_a_block_routed_layout():
    """MoBA's block-routed layout (per-head lists, block_q = 16 < block_k = 32, causal own block)
    on the Triton kernels in interpret mode equals the dense reference, forward and gradients."""
    cfg = dataclasses.replace(MOBA, num_heads=2, num_kv_heads=1)
    m = _mixer(cfg)
    x, pos, seg = _packed_batch(seed=5)
    x, pos, seg = x[:, :96], pos[:, :96], seg[:, :96]
    q, k, v, _ = m.project(x, pos, seg)  # head dim 16
    lay = from_topk(m.route(q[:, ::N], k, seg, jnp.arange(0, 96, N, dtype=jnp.int32)), block_q=N,
                    block_k=cfg.block_size, q_len=96, kv_len=96)

    def loss(impl, **kw):
        def f(q, k, v):
            o = block_sparse_attention(q, k, v, lay, segment_ids=seg, implementation=impl, **kw)[0]
            return jnp.sum(o * jnp.cos(o)), o
        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, o_gpu), g_gpu = loss("gpu", interpret=True)
    (_, o_ref), g_ref = loss("reference")
    np.testing.assert_allclose(np.asarray(o_gpu), np.asarray(o_ref), rtol=2e-4, atol=2e-5)
    for a, b in zip(g_gpu, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_nsa_per_query_head_lists_for_pallas(monkeypatch):
    """Where the Pallas kernels may serve the op, NSA repeats its per-KV-group selection to one
    list per query head (Hl = H, the only per-head form they take): same outputs."""
    m = _mixer(NSA)
    x, pos, seg = _packed_batch(seed=6)
    y = _forward_and_features(m, x, pos, seg)[0]
    asked = []
    monkeypatch.setattr(type(m), "_pallas_may_serve", lambda self: asked.append(1) or True)
    y_h = nnx.jit(lambda m, x: m(x, positions=pos, segment_ids=seg)[0])(m, x)
    assert asked
    np.testing.assert_allclose(np.asarray(y_h), np.asarray(y), rtol=1e-5, atol=1e-6)

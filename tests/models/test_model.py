import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import lm_loss
from train.config import AttentionConfig, ModelConfig, RuntimeConfig

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=5, pattern=("swa", "attn"),
                  mixers={"swa": AttentionConfig(num_heads=2, window=4), "attn": AttentionConfig(num_heads=2, num_kv_heads=1)})
RT = RuntimeConfig(attention_block_q=8, attention_block_k=8)


def _batch(b=2, lens=(9, 14), seed=0):
    t = sum(lens)
    tok = jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 64)
    seg = np.tile(np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)]), (b, 1))
    pos = np.tile(np.concatenate([np.arange(n) for n in lens]), (b, 1))
    return tok, jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32)


def _copy_loop_into_scan(loop_model, scan_model):
    """Give the scanned model the loop model's weights (stack the periods' params)."""
    n = scan_model.stack.num_scanned
    periods = [nnx.state(p) for p in loop_model.stack.loop[:n]]
    nnx.update(scan_model.stack.scanned, jax.tree.map(lambda *xs: jnp.stack(xs), *periods))
    for a, b in zip(loop_model.stack.loop[n:], scan_model.stack.loop):
        nnx.update(b, nnx.state(a))
    nnx.update(scan_model.embed, nnx.state(loop_model.embed))
    nnx.update(scan_model.final_norm, nnx.state(loop_model.final_norm))


def test_pattern_layout_scan_plus_remainder():
    m = models.build(CFG, RT)
    assert m.stack.num_scanned == 2 and len(m.stack.loop) == 1  # 5 = 2 periods of 2 + 1
    assert [b.name for b in m.layers()] == ["swa", "attn", "swa", "attn", "swa"]
    assert jax.tree.leaves(nnx.state(m.stack.scanned))[0].shape[0] == 2
    loop = models.build(dataclasses.replace(CFG, scan=False), RT)
    assert loop.stack.scanned is None and len(loop.stack.loop) == 3


def test_scan_equals_plain_loop():
    loop = models.build(dataclasses.replace(CFG, scan=False), RT, seed=1)
    scan = models.build(CFG, RT, seed=2)
    _copy_loop_into_scan(loop, scan)
    tok, pos, seg = _batch()
    a, _ = loop(tok, positions=pos, segment_ids=seg)
    b, _ = scan(tok, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", pytest.param("dots", marks=pytest.mark.slow),
                                   pytest.param("dots_no_batch", marks=pytest.mark.slow)])
def test_remat_policies_do_not_change_gradients(remat):
    tok, pos, seg = _batch()
    mask = jnp.ones(tok.shape, jnp.float32)

    def loss(m):
        logits, _ = m(tok, positions=pos, segment_ids=seg)
        return lm_loss(logits, tok, mask)[0]

    grads = []
    for r in ("none", remat):
        m = models.build(CFG, dataclasses.replace(RT, remat=r), seed=0)
        grads.append(nnx.jit(nnx.grad(loss))(m))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan", [True, False])
def test_model_decode_equals_forward(scan):
    m = models.build(dataclasses.replace(CFG, scan=scan), RT)
    tok, pos, seg = _batch(lens=(23,))
    full, _ = m(tok, positions=pos, segment_ids=seg)
    step = nnx.jit(lambda m, t, p, s, c: m(t, positions=p, segment_ids=s, cache=c))
    cache = m.init_cache(2, 32)
    logits, cache = step(m, tok[:, :10], pos[:, :10], seg[:, :10], cache)  # prefill
    outs = [logits]
    for t in range(10, 23):
        logits, cache = step(m, tok[:, t:t + 1], pos[:, t:t + 1], seg[:, t:t + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-4, atol=1e-4)


def test_packed_documents_do_not_interact():
    m = models.build(CFG, RT)
    tok, pos, seg = _batch(lens=(9, 14))
    packed, _ = m(tok, positions=pos, segment_ids=seg)
    alone, _ = m(tok[:, 9:], positions=pos[:, 9:], segment_ids=seg[:, 9:])
    np.testing.assert_allclose(np.asarray(packed[:, 9:]), np.asarray(alone), rtol=1e-4, atol=1e-5)


def test_untied_head_and_z_loss():
    m = models.build(dataclasses.replace(CFG, tie_embeddings=False), RT)
    assert m.head is not None
    tok, pos, seg = _batch()
    logits, _ = m(tok, positions=pos, segment_ids=seg)
    mask = jnp.ones(tok.shape)
    base, aux = lm_loss(logits, tok, mask)
    with_z, _ = lm_loss(logits, tok, mask, z_loss=1e-2)
    lse = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(float(with_z - base), 1e-2 * float((lse ** 2).mean()), rtol=1e-5)
    np.testing.assert_allclose(float(base), float(aux["ce_sum"] / aux["tokens"]), rtol=1e-6)


def test_bf16_compute_dtype():
    m = models.build(CFG, dataclasses.replace(RT, compute_dtype="bfloat16"))
    assert m.dtype == jnp.bfloat16
    tok, pos, seg = _batch()
    logits, _ = m(tok, positions=pos, segment_ids=seg)
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_flops_per_token_split_by_mixer():
    f = models.flops_per_token(CFG, 64)
    assert set(f) == {"swa", "attn", "mlp", "head"}
    assert f["head"] == 6 * 32 * 64 and f["mlp"] == 5 * 6 * 3 * 32 * CFG.hidden

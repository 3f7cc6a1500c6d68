"""The diagnostics suite: attention sink rate and entropy from the lse (checked against the dense
definition and hand-built attentions), the layer-by-layer walk, the suite's record, and its
logging during training (train.diagnostics_every)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from pallas_kernels.attention.api import attention_with_lse
from train.artifacts import LoadedRun, load_run
from train.cli import load_config
from train.config import AttentionConfig, ModelConfig, apply_overrides
from train.data import get_tokenizer
from train.evals import diagnostics
from train.evals.attention_stats import attention_stats, dense_attention_stats, document_first, query_mask
from train.loop import resolve, run

# Rows of packed documents (lengths) with a padding tail; 37 is not a multiple of any block.
DOCS = [[10, 15, 8], [37]]
T = 37


def packed(docs=DOCS, t=T):
    """(segment_ids, positions) int32 [len(docs), t]: documents 1, 2, ... then padding (0)."""
    seg, pos = np.zeros((len(docs), t), np.int32), np.zeros((len(docs), t), np.int32)
    for r, lengths in enumerate(docs):
        start = 0
        for i, n in enumerate(lengths):
            seg[r, start:start + n], pos[r, start:start + n] = i + 1, np.arange(n)
            start += n
    return jnp.asarray(seg), jnp.asarray(pos)


def visible_counts(seg, pos, window):
    """Keys each query sees, [B, T] (numpy): its document's tokens up to itself, within the window."""
    seg, pos = np.asarray(seg), np.asarray(pos)
    n = pos + 1
    return np.where(seg > 0, n if window is None else np.minimum(n, window), 0)


def test_document_first_and_query_mask():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3]], jnp.int32)
    np.testing.assert_array_equal(document_first(seg), [[0, 0, 2, 2, 2, 5], [0] * 6])
    np.testing.assert_array_equal(query_mask(seg), [[0, 1, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize("window", [None, 6])
def test_all_mass_on_the_first_token_gives_sink_rate_one(window):
    seg, pos = packed()
    b, h, kvh, d = 2, 4, 2, 8
    q = jnp.zeros((b, T, h, d)).at[..., 0].set(10.0)
    # Keys: e_0 * 10 at each document's first token, 0 elsewhere, so q . k_first = 100 >> 0.
    first = np.asarray(document_first(seg))
    is_first = (first == np.arange(T)) & (np.asarray(seg) > 0)
    k = jnp.zeros((b, T, kvh, d)).at[..., 0].set(10.0 * jnp.asarray(is_first)[:, :, None])
    for stats in (attention_stats(q, k, seg, pos, window=window, block=8),
                  dense_attention_stats(q, k, seg, pos, window=window)):
        m = np.asarray(stats["mask"])
        sink, ent = np.asarray(stats["sink"])[m], np.asarray(stats["entropy"])[m]
        covered = np.asarray(pos)[m] < (window or T)  # queries whose window still holds the first token
        np.testing.assert_allclose(sink[covered], 1.0, atol=1e-5)
        np.testing.assert_allclose(ent[covered], 0.0, atol=1e-4)
        np.testing.assert_array_equal(sink[~covered], 0.0)  # the window moved past it: mass 0
        assert covered.all() == (window is None)


@pytest.mark.parametrize("window", [None, 5])
def test_uniform_attention_has_entropy_log_of_visible_keys(window):
    seg, pos = packed()
    q = jnp.zeros((2, T, 2, 8))  # every logit 0: uniform over the visible keys
    k = jax.random.normal(jax.random.PRNGKey(0), (2, T, 1, 8))
    n = visible_counts(seg, pos, window)
    for stats in (attention_stats(q, k, seg, pos, window=window, block=8),
                  dense_attention_stats(q, k, seg, pos, window=window)):
        m = np.asarray(stats["mask"])
        np.testing.assert_allclose(np.asarray(stats["entropy"])[m], np.log(np.maximum(n, 1))[m][:, None].repeat(2, 1),
                                   rtol=1e-5, atol=1e-5)
        expect_sink = np.where(np.asarray(pos) < (window or T), 1.0 / np.maximum(n, 1), 0.0)
        np.testing.assert_allclose(np.asarray(stats["sink"])[m], expect_sink[m][:, None].repeat(2, 1),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 2.0), (9, 3.0)])
@pytest.mark.parametrize("block", [8, 128])
def test_lse_path_matches_the_dense_definition(window, softcap, block):
    """Random q/k, packed documents with padding, GQA (4 heads on 2 kv heads), windows, soft-cap,
    and blocks that do not divide T."""
    seg, pos = packed()
    kq, kk = jax.random.split(jax.random.PRNGKey(1))
    q = 2.0 * jax.random.normal(kq, (2, T, 4, 16))
    k = jax.random.normal(kk, (2, T, 2, 16))
    got = attention_stats(q, k, seg, pos, window=window, logit_softcap=softcap, block=block)
    want = dense_attention_stats(q, k, seg, pos, window=window, logit_softcap=softcap)
    m = np.asarray(want["mask"])
    np.testing.assert_array_equal(np.asarray(got["mask"]), m)
    for key in ("sink", "entropy"):
        np.testing.assert_allclose(np.asarray(got[key])[m], np.asarray(want[key])[m], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", [dict(sinks=True), dict(sinks=True, window=7, logit_softcap=2.0),
                                  dict(score="sigmoid", sigmoid_bias=-2.0),
                                  dict(score="sigmoid", sigmoid_bias=-3.5, window=9, logit_softcap=3.0)],
                         ids=["sinks", "sinks_window_softcap", "sigmoid", "sigmoid_window_softcap"])
def test_score_options_match_the_dense_definition(opts):
    """Learned sinks (their share reported apart) and sigmoid scores (shares of the query's total
    weight), blocked against dense, GQA over packed documents with padding."""
    seg, pos = packed()
    kq, kk, ks = jax.random.split(jax.random.PRNGKey(5), 3)
    q = 2.0 * jax.random.normal(kq, (2, T, 4, 16))
    k = jax.random.normal(kk, (2, T, 2, 16))
    opts = dict(opts)
    if opts.pop("sinks", False):
        opts["sinks"] = jax.random.normal(ks, (4,))
    got = attention_stats(q, k, seg, pos, block=8, **opts)
    want = dense_attention_stats(q, k, seg, pos, **opts)
    m = np.asarray(want["mask"])
    keys = ("sink", "entropy") + (("learned_sink",) if "sinks" in opts else ())
    assert set(keys) | {"mask"} == set(got) == set(want)
    for key in keys:
        np.testing.assert_allclose(np.asarray(got[key])[m], np.asarray(want[key])[m], atol=2e-5, rtol=1e-5)


def test_uniform_weights_with_a_sink_and_with_sigmoid_scores():
    """q = 0: every visible key weighs the same. A sink of logit log(n0) then takes n0 / (n + n0)
    and each key 1 / (n + n0); sigmoid weights sigmoid(b) are shares 1 / n whatever b."""
    seg, pos = packed()
    q = jnp.zeros((2, T, 2, 8))
    k = jax.random.normal(jax.random.PRNGKey(0), (2, T, 1, 8))
    n, n0 = visible_counts(seg, pos, None)[..., None].astype(float), 3.0
    m = np.asarray(query_mask(seg))
    sink = attention_stats(q, k, seg, pos, sinks=jnp.full((2,), math.log(n0)), block=8)
    np.testing.assert_allclose(np.asarray(sink["sink"])[m], (1 / (n + n0))[m].repeat(2, 1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sink["learned_sink"])[m], (n0 / (n + n0))[m].repeat(2, 1), rtol=1e-5)
    ent = -(n * (1 / (n + n0)) * np.log(1 / (n + n0)) + n0 / (n + n0) * np.log(n0 / (n + n0)))
    np.testing.assert_allclose(np.asarray(sink["entropy"])[m], ent[m].repeat(2, 1), rtol=1e-5)
    sig = attention_stats(q, k, seg, pos, score="sigmoid", sigmoid_bias=-4.0, block=8)
    np.testing.assert_allclose(np.asarray(sig["sink"])[m], (1 / n)[m].repeat(2, 1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sig["entropy"])[m], np.log(n)[m].repeat(2, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_lse_of_the_blocked_op_matches_the_reference(softcap):
    seg, pos = packed()
    q = jax.random.normal(jax.random.PRNGKey(2), (2, T, 4, 8))
    k, v = jax.random.normal(jax.random.PRNGKey(3), (2, 2, T, 2, 8))
    kw = dict(segment_ids=seg, positions=pos, window=11, logit_softcap=softcap, block_q=8, block_k=16)
    out_x, lse_x = attention_with_lse(q, k, v, implementation="xla", **kw)
    out_r, lse_r = attention_with_lse(q, k, v, implementation="reference", **kw)
    np.testing.assert_allclose(np.asarray(lse_x), np.asarray(lse_r), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_x), np.asarray(out_r), atol=1e-5)
    assert lse_x.shape == (2, T, 4) and lse_x.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(lse_x)[np.asarray(seg) == 0], 0.0)  # padding


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_no_t_by_t_array(softcap, largest_intermediate):
    b, t, h, d = 1, 1024, 2, 16
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    k = jax.ShapeDtypeStruct((b, t, 1, d), jnp.float32)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda q, k, s, p: attention_stats(q, k, s, p, logit_softcap=softcap))(q, k, ids, ids)
    assert largest_intermediate(jaxpr.jaxpr) < t * t


# ----------------------------------------------------------------------------- the suite

HYBRID = ["model.d_model=32", "model.num_layers=5", "model.mixers.gla.num_heads=2", "model.mixers.attn.num_heads=2",
          "model.mixers.capped.kind=attention", "model.mixers.capped.num_heads=2",
          "model.mixers.capped.logit_softcap=5.0", "model.mixers.capped.window=8",
          "model.pattern=gla,attn,capped", "data.seq_len=32", "data.batch_size=2", "train.eval_batches=1"]


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    """An untrained 5-layer GLA / attention / soft-capped SWA hybrid (one scanned period of three
    layers and a remainder of two), as train.artifacts.load_run would return it."""
    cfg = resolve(apply_overrides(load_config("gla_hybrid"), HYBRID))
    return LoadedRun(run_dir=tmp_path_factory.mktemp("diag_run"), cfg=cfg, model=models.build(cfg.model, cfg.runtime),
                     step=3, tokenizer=get_tokenizer(cfg.data))


@pytest.mark.slow  # ~10 s: builds and runs a 5-layer hybrid both ways
def test_layer_walk_equals_the_model(hybrid_run):
    cfg = hybrid_run.cfg
    graphdef, params = nnx.split(hybrid_run.model, nnx.Param)
    seg, pos = packed([[20, 12], [30]], 32)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, cfg.model.vocab_size)
    assert [b.name for b in diagnostics.layer_blocks(hybrid_run.model)] == list(cfg.model.layer_names())

    @jax.jit
    def both(params):
        model = nnx.merge(graphdef, params)
        x = model.embed(tokens)
        for block in diagnostics.layer_blocks(model):
            x, _ = block(x, positions=pos, segment_ids=seg)
        return model.embed.attend(model.final_norm(x)), model(tokens, positions=pos, segment_ids=seg)[0]

    walked, scanned = both(params)
    np.testing.assert_allclose(np.asarray(walked), np.asarray(scanned), atol=1e-5)


def test_captured_qk_give_the_same_stats_as_the_layer_itself(hybrid_run):
    """q, k read through nnx.capture are those the layer attends with: attention on them with
    the layer's own values reproduces the mixer's output."""
    model, cfg = hybrid_run.model, hybrid_run.cfg
    seg, pos = packed([[20, 12], [30]], 32)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 32, 32))
    block = diagnostics.layer_blocks(model)[2]  # "capped": window 8, soft-cap 5
    mixer = block.mixer
    (y, _), inter = nnx.capture(mixer, nnx.Intermediate)(x, positions=pos, segment_ids=seg)
    q, k = inter["qk"][0]
    v = mixer.v_proj(x).reshape(2, 32, mixer.kv_heads, mixer.head_dim)
    o, _ = attention_with_lse(q, k, v, segment_ids=seg, positions=pos, window=8, logit_softcap=5.0)
    np.testing.assert_allclose(np.asarray(mixer.o_proj(o.reshape(2, 32, -1))), np.asarray(y), atol=1e-5)
    assert not hasattr(mixer, "qk")  # outside nnx.capture the sow leaves nothing behind
    mixer(x, positions=pos, segment_ids=seg)
    assert not hasattr(mixer, "qk")


def test_suite_record_has_the_documented_keys(hybrid_run):
    record = diagnostics.run(hybrid_run, seed=5)
    json.dumps(record)  # JSON-able
    assert {"suite", "step", "seed", "elapsed_s", "results", "summary"} <= set(record)
    assert (record["suite"], record["step"], record["seed"]) == ("diagnostics", 3, 5)
    assert record["results"]["batches"] == 1
    res = record["results"]["layers"]
    assert [r["layer"] for r in res] == list(range(5))
    assert [r["mixer"] for r in res] == ["gla", "attn", "capped", "gla", "attn"]
    assert [r["kind"] for r in res] == ["gla", "attention", "attention", "gla", "attention"]
    for r in res:
        assert r["max_activation"] > 0 and r["max_update"] > 0
        if r["kind"] == "attention":
            assert len(r["sink_rate"]) == len(r["entropy"]) == 2  # per head
            assert all(0 < s < 1 for s in r["sink_rate"]) and all(e > 0 for e in r["entropy"])
        else:
            assert r["sink_rate"] is None and r["entropy"] is None
    assert res[2]["entropy_method"] == "blocked_softcap" and res[1]["entropy_method"] == "lse"
    # Untrained: attention is near uniform, so the entropy is near the mean log of the visible
    # keys (a window of 8 caps it at log 8).
    assert res[2]["entropy"][0] < math.log(8) + 1e-3
    s = record["summary"]
    assert all(isinstance(v, float) for v in s.values())
    for key in ("sink_rate_mean", "sink_rate_max", "entropy_mean", "max_activation", "sink_rate@L1",
                "entropy@L4", "max_activation@L0", "max_activation@L4"):
        assert f"diagnostics/{key}" in s, key
    assert "diagnostics/sink_rate@L0" not in s  # GLA has no softmax attention
    assert s["diagnostics/max_activation"] == max(r["max_activation"] for r in res)


def test_suite_measures_each_window_group_with_its_options():
    """A layer with learned sinks and per-head windows (kv heads 0 and 3: window 5, 1 and 2:
    full, so the group order 0, 3, 1, 2 must be undone): the record has the learned sink's
    share, and each head's numbers are those of its own window."""
    # scan=False: layer_blocks returns the model's own block, whose sinks are set below.
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=1, pattern=("opt",), scan=False,
                      mixers={"opt": AttentionConfig(num_heads=4, num_kv_heads=4, sinks=True,
                                                     head_windows=(5, 0, 0, 5))})
    model = models.build(cfg, seed=0)
    mixer = diagnostics.layer_blocks(model)[0].mixer
    mixer.sinks[...] = jnp.asarray([0.5, -1.0, 2.0, 0.0])
    seg, pos = packed([[20, 12], [30]], 32)
    batch = {"inputs": jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, 50), "segment_ids": seg,
             "positions": pos}
    graphdef, params = nnx.split(model, nnx.Param)
    res, summary = diagnostics.make_diagnostics(graphdef, cfg)(params, [batch])
    rec = res[0]
    assert len(rec["sink_rate"]) == len(rec["learned_sink_rate"]) == 4
    assert "diagnostics/learned_sink_rate@L0" in summary
    x = model.embed(batch["inputs"])
    _, inter = nnx.capture(diagnostics.layer_blocks(model)[0], nnx.Intermediate)(x, positions=pos, segment_ids=seg)
    q, k = inter["mixer"]["qk"][0]
    sinks = mixer.sinks[...]
    for heads, kv, window in (([0, 3], [0, 3], 5), ([1, 2], [1, 2], None)):
        want = attention_stats(q[:, :, heads], k[:, :, kv], seg, pos, window=window, sinks=sinks[np.array(heads)])
        msk = np.asarray(want["mask"])[..., None]
        n = msk.sum()
        for key, got in (("sink", rec["sink_rate"]), ("learned_sink", rec["learned_sink_rate"])):
            expect = (np.asarray(want[key]) * msk).sum((0, 1)) / n
            np.testing.assert_allclose([got[h] for h in heads], expect, rtol=1e-5)


@pytest.mark.slow  # the session's mqar run (~7 s) and one more compilation
def test_suite_on_a_run_directory(mqar_run_dir):
    record = diagnostics.run(load_run(mqar_run_dir))
    assert record["step"] == 0 and len(record["results"]["layers"]) == 2
    assert {"diagnostics/sink_rate@L0", "diagnostics/sink_rate@L1"} <= set(record["summary"])


@pytest.mark.slow  # ~7 s: a short training run
def test_training_logs_diagnostics_every_n_steps(tmp_path):
    cfg = apply_overrides(load_config("tiny"), [
        "model.d_model=32", "model.num_layers=2", "model.pattern=swa,attn", "model.mixers.attn.num_heads=2",
        "model.mixers.swa.num_heads=2", "model.mixers.swa.window=8", "data.seq_len=32", "data.batch_size=2",
        "optimizer.warmup_steps=1", "train.steps=4", "train.eval_every=0", "train.eval_batches=1",
        "train.log_every=2", "train.checkpoint_every=4", "train.diagnostics_every=2", "runtime.mesh_data=1"])
    run(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    diag = [r for r in records if r["kind"] == "diagnostics"]
    assert [r["step"] for r in diag] == [2, 4]
    for key in ("sink_rate_mean", "entropy_mean", "max_activation", "sink_rate@L0", "entropy@L1",
                "max_activation@L1"):
        assert all(isinstance(r[key], float) for r in diag), key

"""The block options of ModelConfig (post_norm, layer_scale) and the identity mixer ("none").

A block is x + s * norm'(mixer(norm(x))), then the same for the MLP, with norm' (post_norm) and
s (layer_scale) each the identity when off: checked against the same block written out in jnp,
with every norm scale and LayerScale vector made random first (so a swapped order or a wrong
param shows). The mixer of those blocks is linear attention, a black box here (its own tests
check it).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models
from layers.config import ConfigError, RuntimeConfig
from layers.linear_attention.config import LinearAttnConfig
from layers.none.config import NoneConfig
from layers.registry import LayerContext, build_mixer, mixer_class
from models.block import Block
from models.stats import param_counts
from train.config import AttentionConfig, ModelConfig

VOCAB, D, T = 64, 32, 11
# the reference (token-by-token scan) linear attention: the cheapest mixer to run eagerly
RT = RuntimeConfig(compute_dtype="float32", attention_block_q=8, attention_block_k=8,
                   linear_attention_impl="reference")
LIN = {"lin": LinearAttnConfig(num_heads=2, conv_size=3)}
OPTIONS = {"post_norm": dict(post_norm=True), "layer_scale": dict(layer_scale=0.5),
           "both": dict(post_norm=True, layer_scale=1e-2)}


def _ctx(cfg):
    return LayerContext(d_model=cfg.d_model, dtype=jnp.float32, runtime=RT, init_std=0.02, out_std=0.02,
                        norm_eps=cfg.norm_eps)


def _inputs(b=2, t=T, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (b, t, D))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return x, pos, jnp.ones((b, t), jnp.int32)


def _randomize_vectors(module, seed):
    """Every 1-D param (norm scales, LayerScale vectors; stacked: 2-D [periods, d]) random in
    [0.5, 1.5], so that each one, and the order they are applied in, changes the output."""
    rng = np.random.default_rng(seed)  # numpy: no jax kernel to compile per shape
    leaves, tree = jax.tree.flatten(nnx.state(module, nnx.Param))
    new = [jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32) if a.shape[-1] == D and a.ndim <= 2 else a
           for a in leaves]
    nnx.update(module, jax.tree.unflatten(tree, new))


def _rms(x, w, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _hand_block(blk, x, pos, seg, post_norm, layer_scale):
    """The block of models/block.py written out: pre-norm, mixer (as a black box), post-norm,
    LayerScale, residual; then the same with the SwiGLU MLP from its kernels."""
    eps = blk.mixer_norm.eps
    y, _ = blk.mixer(_rms(x, blk.mixer_norm.scale[...], eps), positions=pos, segment_ids=seg)
    if post_norm:
        y = _rms(y, blk.mixer_post_norm.scale[...], eps)
    if layer_scale:
        y = y * blk.mixer_scale[...]
    x = x + y
    h = _rms(x, blk.mlp_norm.scale[...], eps)
    m = (jax.nn.silu(h @ blk.mlp.gate.kernel[...]) * (h @ blk.mlp.up.kernel[...])) @ blk.mlp.down.kernel[...]
    if post_norm:
        m = _rms(m, blk.mlp_post_norm.scale[...], eps)
    if layer_scale:
        m = m * blk.mlp_scale[...]
    return x + m


# Both options together in the default tier; each alone in the slow tier.
@pytest.mark.parametrize("option", [o if o == "both" else pytest.param(o, marks=pytest.mark.slow)
                                    for o in OPTIONS])
def test_block_equals_hand_written(option):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=D, num_layers=1, pattern=("lin",), mixers=LIN, **OPTIONS[option])
    blk = Block("lin", cfg, _ctx(cfg), rngs=nnx.Rngs(params=0))
    _randomize_vectors(blk, seed=1)
    x, pos, seg = _inputs()
    got, _ = blk(x, positions=pos, segment_ids=seg)
    want = _hand_block(blk, x, pos, seg, cfg.post_norm, cfg.layer_scale)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # and the options matter: the same params without them give something else
    plain = _hand_block(blk, x, pos, seg, False, None)
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-3


def test_layer_scale_starts_at_its_value():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=D, num_layers=1, pattern=("lin",), mixers=LIN, layer_scale=1e-4)
    blk = Block("lin", cfg, _ctx(cfg), rngs=nnx.Rngs(params=0))
    np.testing.assert_array_equal(np.asarray(blk.mixer_scale[...]), np.full(D, 1e-4, np.float32))
    np.testing.assert_array_equal(np.asarray(blk.mlp_scale[...]), np.full(D, 1e-4, np.float32))
    # a small LayerScale keeps the block near the identity at initialisation
    x, pos, seg = _inputs()
    y, _ = blk(x, positions=pos, segment_ids=seg)
    assert 0 < np.abs(np.asarray(y - x)).max() < 1e-3


def _param_names(cfg) -> set[str]:
    model = nnx.eval_shape(lambda: models.build(cfg, RT))
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("option", ["off", *OPTIONS])
def test_option_params_exist_only_when_on(option):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=D, num_layers=3, pattern=("none", "lin"), mixers=LIN,
                      **OPTIONS.get(option, {}))
    names = _param_names(cfg)
    extra = {"mixer_post_norm.scale", "mlp_post_norm.scale", "mixer_scale", "mlp_scale"}
    want = (({"mixer_post_norm.scale", "mlp_post_norm.scale"} if cfg.post_norm else set())
            | ({"mixer_scale", "mlp_scale"} if cfg.layer_scale else set()))
    for prefix in ("stack.scanned.blocks.0.", "stack.scanned.blocks.1.", "stack.loop.0.blocks.0."):
        assert {n[len(prefix):] for n in names if n.startswith(prefix)} & extra == want, prefix
    # the none mixer has no params; parameter accounting still adds up to the model's total
    assert not any(".mixer." in n for n in names if n.startswith(("stack.scanned.blocks.0.", "stack.loop")))
    assert any(n.startswith("stack.scanned.blocks.1.mixer.") for n in names)
    model = nnx.eval_shape(lambda: models.build(cfg, RT))
    parts = param_counts(model)
    total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert sum(parts.values()) == total and parts["mixer:none"] == 0
    assert parts["norms"] == (1 + 3 * (2 + 2 * cfg.post_norm + 2 * (cfg.layer_scale is not None))) * D


@pytest.mark.parametrize("field,value,match", [
    ("layer_scale", 0.0, r"model\.layer_scale must be a finite number > 0"),
    ("layer_scale", -0.1, r"model\.layer_scale must be a finite number > 0"),
    ("layer_scale", float("nan"), r"model\.layer_scale must be a finite number > 0"),
    ("layer_scale", float("inf"), r"model\.layer_scale must be a finite number > 0"),
    ("layer_scale", True, r"model\.layer_scale must be a finite number > 0"),
    ("post_norm", "yes", r"model\.post_norm must be true or false"),
    ("post_norm", 1, r"model\.post_norm must be true or false"),
])
def test_config_errors_name_the_field(field, value, match):
    cfg = ModelConfig(vocab_size=VOCAB, **{field: value})
    with pytest.raises(ConfigError, match=match) as e:
        cfg.check()
    assert "\n" not in str(e.value)


def test_options_parse_from_the_command_line():
    from train.cli import load_config
    from train.config import apply_overrides
    cfg = apply_overrides(load_config("tiny"), ["model.post_norm=true", "model.layer_scale=0.1"])
    assert cfg.model.post_norm is True and cfg.model.layer_scale == 0.1
    with pytest.raises(ConfigError, match="layer_scale"):
        apply_overrides(load_config("tiny"), ["model.layer_scale=-1"])


@pytest.mark.slow  # the default tier decodes both options (and none layers) in tests/models/test_decode.py
def test_decode_with_options_equals_parallel():
    """A scanned period (none, lin) plus a remainder none layer, both options on with random
    vectors: single tokens through the caches give the full forward's logits (prefills of
    several tokens are tests/models/test_decode.py's)."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=D, num_layers=3, pattern=("none", "lin"), mixers=LIN,
                      post_norm=True, layer_scale=0.5)
    model = models.build(cfg, RT, seed=1)
    _randomize_vectors(model, seed=2)
    graphdef, state = nnx.split(model)

    @jax.jit
    def call(state, t, p, s, cache):
        return nnx.merge(graphdef, state)(t, positions=p, segment_ids=s, cache=cache)

    tok = jax.random.randint(jax.random.PRNGKey(3), (2, T), 0, VOCAB)
    _, pos, seg = _inputs()
    full, _ = call(state, tok, pos, seg, None)
    cache = model.init_cache(2, T)
    assert cache["scanned"][0] == {} and cache["loop"][0][0] == {}  # the none layers' caches
    outs, start = [], 0
    for n in [1] * T:
        logits, cache = call(state, tok[:, start:start + n], pos[:, start:start + n], seg[:, start:start + n], cache)
        outs.append(logits)
        start += n
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-5, atol=2e-5)


@pytest.mark.slow  # 12 s of CPU: tests/models/test_model.py checks remat in the default tier
def test_remat_keeps_gradients_with_options():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=D, num_layers=2, pattern=("lin",), mixers=LIN,
                      post_norm=True, layer_scale=0.5)
    tok = jax.random.randint(jax.random.PRNGKey(0), (2, T), 0, VOCAB)
    _, pos, seg = _inputs()

    def loss(m):
        logits, _ = m(tok, positions=pos, segment_ids=seg)
        return models.lm_loss(logits, tok, jnp.ones(tok.shape))[0]

    grads = [nnx.jit(nnx.grad(loss))(models.build(cfg, dataclasses.replace(RT, remat=r), seed=0))
             for r in ("none", "full")]
    flat = [dict(nnx.to_flat_state(g)) for g in grads]
    assert any(p[-1] == "mixer_scale" for p in flat[0]) and any(p[-2] == "mlp_post_norm" for p in flat[0])
    for p, a in flat[0].items():
        np.testing.assert_allclose(np.asarray(flat[1][p][...]), np.asarray(a[...]), rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(flat[0][("stack", "scanned", "blocks", 0, "mixer_scale")][...])).max() > 0


# ----------------------------------------------------------------------------- the none mixer

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_none_mixer_returns_zeros_and_keeps_its_cache(dtype):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=D, pattern=("none",))
    mixer = build_mixer(NoneConfig(), _ctx(cfg), rngs=nnx.Rngs(params=0))
    x, pos, seg = _inputs()
    x = x.astype(dtype)
    y, cache = mixer(x, positions=pos, segment_ids=seg)
    assert y.shape == x.shape and y.dtype == dtype and cache is None
    np.testing.assert_array_equal(np.asarray(y, np.float32), 0.0)
    c0 = mixer.init_cache(2, T, dtype)
    assert jax.tree.leaves(c0) == []
    _, c1 = mixer(x, positions=pos, segment_ids=seg, cache=c0)
    assert jax.tree.structure(c1) == jax.tree.structure(c0)
    assert jax.tree.leaves(nnx.state(mixer)) == []
    assert mixer_class(NoneConfig()).flops_per_token(NoneConfig(), D, 128) == 0
    assert mixer.describe() == "identity (no mixer): control"
    assert models.flops_per_token(cfg, 128)["none"] == 0


@pytest.mark.slow  # the default tier runs none layers in a model in tests/models/test_decode.py
def test_lm_with_a_none_layer_trains():
    """("none", "attn") over 3 layers (a scanned period, then a none layer): the loss falls, and
    the none layers' mixer contributes exactly nothing: their mixer pre-norm scales get zero
    gradients all along, so Adam leaves them exactly at 1, while the attention layer's move."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=D, num_layers=3, pattern=("none", "attn"),
                      mixers={"attn": AttentionConfig(num_heads=2)})
    model = models.build(cfg, RT, seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-2)
    opt = tx.init(params)
    tok = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, VOCAB)
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), tok.shape)
    seg = jnp.ones(tok.shape, jnp.int32)

    @jax.jit
    def step(params, opt):
        def loss(params):
            logits, _ = nnx.merge(graphdef, params, rest)(tok[:, :-1], positions=pos[:, :-1], segment_ids=seg[:, :-1])
            return models.lm_loss(logits, tok[:, 1:], jnp.ones(tok[:, 1:].shape))[0]
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    losses = []
    for _ in range(6):
        params, opt, value = step(params, opt)
        losses.append(float(value))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.3, losses
    blocks = params["stack"]
    np.testing.assert_array_equal(np.asarray(blocks["scanned"]["blocks"][0]["mixer_norm"]["scale"][...]), 1.0)
    np.testing.assert_array_equal(np.asarray(blocks["loop"][0]["blocks"][0]["mixer_norm"]["scale"][...]), 1.0)
    assert np.abs(np.asarray(blocks["scanned"]["blocks"][1]["mixer_norm"]["scale"][...]) - 1.0).max() > 1e-3
    assert not any("mixer" in p for p, _ in nnx.to_flat_state(blocks["loop"][0]["blocks"][0]))


def test_a_block_without_an_mlp_is_its_mixer_branch_alone():
    """model.mlp_hidden=0 (Mamba2's blocks): x + norm'(mixer(norm(x))), no MLP params at all."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=D, num_layers=2, pattern=("lin",), mixers=LIN, mlp_hidden=0,
                      post_norm=True)
    blk = Block("lin", cfg, _ctx(cfg), rngs=nnx.Rngs(params=0))
    _randomize_vectors(blk, seed=2)
    assert blk.mlp is None and blk.mlp_norm is None and not hasattr(blk, "mlp_post_norm")
    x, pos, seg = _inputs()
    got, _ = blk(x, positions=pos, segment_ids=seg)
    y, _ = blk.mixer(_rms(x, blk.mixer_norm.scale[...], 1e-6), positions=pos, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x + _rms(y, blk.mixer_post_norm.scale[...], 1e-6)),
                               rtol=1e-5, atol=1e-5)
    assert not any(".mlp" in n for n in _param_names(cfg))
    parts = param_counts(nnx.eval_shape(lambda: models.build(cfg, RT)))
    assert parts["mlp"] == 0 and parts["norms"] == (1 + 2 * 2) * D
    with pytest.raises(ConfigError, match=r"model\.mlp_hidden must be an int >= 0"):
        dataclasses.replace(cfg, mlp_hidden=-1).check()

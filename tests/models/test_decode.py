"""Cached decode equals the full forward pass, for every registered token mixer.

For each model config in CASES: run the whole sequence through the model at once, then again as
a prefill (longer than any sliding window) followed by one-token steps through the decode
caches, and compare the logits at every position (fp32, tight tolerance). A new mixer is covered
by adding a config that uses it to CASES; `test_every_registered_mixer_has_a_case` fails until
one does.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import layers.catalog  # noqa: F401  (registers the mixers)
import models
from layers import registry
from layers.attention.config import DiffAttentionConfig, MLAConfig
from train.config import AttentionConfig, ModelConfig, RuntimeConfig
from layers.linear_attention.config import (DeltaNetConfig, GDNConfig, GLAConfig, HGRN2Config, LightningConfig,
                                           LinearAttnConfig, MLSTMConfig, RetentionConfig, SSDConfig)
from layers.memory.config import MemoryConfig
from layers.sparse_attention.config import MoBAConfig, NSAConfig

VOCAB, T, PREFILL = 64, 19, 7
WINDOW = 4  # < PREFILL < T: the ring buffers wrap during prefill and again while decoding

# A pattern of several mixer configs tests them all in one model (one compile per input shape
# is what costs time here). 3 layers of a 2-name pattern: 1 scanned period + a remainder layer.
_VARIANTS = ModelConfig(
    vocab_size=VOCAB, d_model=32, num_layers=3, pattern=("swa_gqa_qknorm", "mqa_softcap"),
    mixers={"swa_gqa_qknorm": AttentionConfig(num_heads=4, num_kv_heads=2, window=WINDOW, qk_norm=True),
            "mqa_softcap": AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=8, logit_softcap=5.0)})
# Every linear-attention mixer in one model (one compile for all nine, the two delta-rule ones
# included), small widths, several with a short convolution (its cache) and non-default options;
# the attention layer checks that they mix with a KV-cached layer.
_LINEAR = ModelConfig(
    vocab_size=VOCAB, d_model=32, num_layers=10,
    pattern=("lin", "ret", "tnl", "ssd", "gla", "hgrn", "mlstm", "deltanet", "gdn", "attn"),
    mixers={"lin": LinearAttnConfig(num_heads=2, conv_size=3),
            "ret": RetentionConfig(num_heads=2),
            "tnl": LightningConfig(num_heads=2, output_gate="sigmoid"),
            "ssd": SSDConfig(head_dim=16, state_dim=8, n_groups=2),
            "gla": GLAConfig(num_heads=2, conv_size=4),
            "hgrn": HGRN2Config(num_heads=2, lower_bound=0.5, output_gate=True, conv_size=2),
            "mlstm": MLSTMConfig(num_heads=2, conv_size=4),
            "deltanet": DeltaNetConfig(num_heads=2, allow_neg_eigval=True),
            "gdn": GDNConfig(num_heads=2, use_gate=False, conv_size=2),
            "attn": AttentionConfig(num_heads=2)})
# The routed sparse mixers: selection at decode time must reproduce the parallel routing.
_SPARSE = ModelConfig(
    vocab_size=VOCAB, d_model=32, num_layers=3, pattern=("moba", "nsa"),
    mixers={"moba": MoBAConfig(num_heads=4, num_kv_heads=2, block_size=4, top_k=2, key_conv_size=3),
            "nsa": NSAConfig(num_heads=4, num_kv_heads=2, block_size=4, num_selected=3,
                             window=WINDOW, compression="mlp")})
# The attention options, the other kinds of the softmax family and the identity mixer, with the
# Block options on: gate + sinks + per-head windows (a wrapping ring and a full cache), sigmoid
# scores + knocking heads, differential attention (windowed), MLA (its prefill decompresses the
# latents, its single steps attend absorbed), "none" in the scanned period and as the remainder.
_SOFTMAX_KINDS = ModelConfig(
    vocab_size=VOCAB, d_model=32, num_layers=6, pattern=("none", "gated_sinks_mswa", "sigmoid_knock", "diff", "mla"),
    post_norm=True, layer_scale=0.5,
    mixers={"gated_sinks_mswa": AttentionConfig(num_heads=4, num_kv_heads=2, gate="elementwise", sinks=True,
                                                head_windows=(WINDOW, 0)),
            "sigmoid_knock": AttentionConfig(num_heads=2, score="sigmoid", sigmoid_length=8, knock_heads="qkv"),
            "diff": DiffAttentionConfig(num_heads=2, num_kv_heads=1, window=WINDOW),
            "mla": MLAConfig(num_heads=2, kv_lora_rank=32, qk_nope_head_dim=4, qk_rope_head_dim=4,
                             v_head_dim=4)})
# Add a case (or a name in _VARIANTS.pattern) for every new mixer config.
CASES = {
    "attention_family": _VARIANTS,
    "linear_attention_family": _LINEAR,
    "sparse_attention_family": _SPARSE,
    "softmax_kinds_and_block_options": _SOFTMAX_KINDS,
    # The Titans memory (chunk 4: ragged chunks) and MAC (segment 8: the prefill ends
    # mid-segment), MAG, MAL (their default configs, shrunk) in one model: one scanned period of
    # the four, then a memory layer as the remainder.
    "memory_family": ModelConfig(
        vocab_size=VOCAB, d_model=32, num_layers=5,
        pattern=("memory", "titans_mac", "titans_mag", "titans_mal"),
        mixers={"memory": MemoryConfig(num_heads=2, chunk_size=4, expansion=2, max_lr=1.0),
                "titans_mac": dataclasses.replace(
                    ModelConfig().mixer("titans_mac"), num_heads=2, num_kv_heads=1, num_persistent=2,
                    segment_size=8, memory=MemoryConfig(num_heads=2, chunk_size=4, expansion=2, max_lr=1.0)),
                "titans_mag": dataclasses.replace(
                    ModelConfig().mixer("titans_mag"), num_heads=2, num_persistent=2, window=WINDOW,
                    memory=MemoryConfig(num_heads=2, chunk_size=4, arch="linear")),
                "titans_mal": dataclasses.replace(
                    ModelConfig().mixer("titans_mal"), num_heads=2, num_persistent=1, window=WINDOW,
                    memory=MemoryConfig(num_heads=2, chunk_size=4, expansion=2))}),
}
SLOW_CASES = {
    "attention_family_unscanned_untied_mha": dataclasses.replace(
        _VARIANTS, num_layers=5, pattern=("mha", *_VARIANTS.pattern), scan=False, tie_embeddings=False,
        mixers={**_VARIANTS.mixers, "mha": AttentionConfig(num_heads=2)}),
}
STEPS = [PREFILL] + [1] * (T - PREFILL)  # a prefill longer than the window, then single tokens
CHUNKS = [PREFILL, 3, 1, 5] + [1] * (T - PREFILL - 9)  # tokens added in chunks to a filled cache
RT = RuntimeConfig(compute_dtype="float32", attention_block_q=8, attention_block_k=8)


def _inputs(batch=2, seed=0):
    tok = jax.random.randint(jax.random.PRNGKey(seed), (batch, T), 0, VOCAB)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (batch, T))
    return tok, pos, jnp.ones((batch, T), jnp.int32)


def _full_and_decoded(model, tok, pos, seg, chunks):
    """(full-forward logits, logits from feeding `tok` through the caches in consecutive
    chunks of the given sizes), both [B, T, V]."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def call(state, t, p, s, cache):
        return nnx.merge(graphdef, state)(t, positions=p, segment_ids=s, cache=cache)

    full, _ = call(state, tok, pos, seg, None)
    cache = model.init_cache(tok.shape[0], T)
    outs, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        logits, cache = call(state, tok[:, sl], pos[:, sl], seg[:, sl], cache)
        outs.append(logits)
        start += n
    assert start == T
    return np.asarray(full), np.asarray(jnp.concatenate(outs, axis=1))


def _mixer_config_types(cfg: ModelConfig) -> set[type]:
    return {type(cfg.mixer(name)) for name in cfg.pattern}


def test_every_registered_mixer_has_a_case():
    covered = set().union(*(_mixer_config_types(c) for c in CASES.values()))
    missing = set(registry.registered_mixers()) - covered
    assert not missing, f"add a decode case to CASES for: {sorted(c.kind for c in missing)}"


# memory_family (30 s) and sparse_attention_family (8 s) run in the slow tier: the default tier
# keeps the Titans decode checks of tests/models/test_titans.py and tests/layers/
# test_memory_mixer.py, and MoBA's of tests/layers/test_sparse_attention_mixers.py (its budget).
_SLOW_NAMES = set(SLOW_CASES) | {"memory_family", "sparse_attention_family"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_NAMES else n
                                  for n in {**CASES, **SLOW_CASES}])
def test_prefill_then_steps_equal_full_forward(name):
    model = models.build({**CASES, **SLOW_CASES}[name], RT, seed=1)
    full, got = _full_and_decoded(model, *_inputs(), STEPS)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=2e-5)


@pytest.mark.slow
def test_chunks_after_prefill_equal_full_forward():
    model = models.build(CASES["attention_family"], RT, seed=4)
    full, got = _full_and_decoded(model, *_inputs(seed=5), CHUNKS)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=2e-5)


@pytest.mark.slow
def test_decode_with_the_reference_attention():
    """The same through the dense reference implementation (the default on CPU is the blocked
    xla one), which must also take keys from a cache in ring order."""
    model = models.build(CASES["attention_family"], dataclasses.replace(RT, attention_impl="reference"), seed=2)
    full, got = _full_and_decoded(model, *_inputs(batch=1, seed=3), STEPS)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=2e-5)

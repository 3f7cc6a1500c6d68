"""Hugging Face export and import (train/hf/, train/import_hf.py): the attention-only architectures.

Three architectures, each exported from a run directory: the default job's (sliding-window +
full attention, GQA, tied: MinistralForCausalLM), a QK-norm GQA model with an explicit head_dim,
untied, with windows, RoPE theta 5e4 and a remainder layer (Qwen3ForCausalLM), and a plain
unscanned untied one with norm eps 1e-5 (LlamaForCausalLM). Each must import back bit for bit and,
under transformers (PyTorch, .venv-torch, via scripts/hf_torch_check.py), give our logits on
sequences longer than the windows. Without .venv-torch that test is skipped, except under CI=true,
where scripts/setup_torch.sh has made it and a skip would hide a failure.
"""
import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import models
from test_export import TINY_MODEL, assert_same_params, make_run, run_config  # tests/train/ is on sys.path
from train.artifacts import load_run
from train.cli import load_config
from train.config import AttentionConfig, ConfigError, MixerConfig, ModelConfig, to_dict
from train.data.tokenizer import build_tokenizer
from train.export import chimera_tensors, export_run, main as export_main
from train.hf import ARCHS, choose_arch as hf_arch, import_params, model_config_from_hf
from train.import_hf import main as import_main
from train.safetensors_io import SafetensorsReader, TensorOut, write_safetensors

ROOT = Path(__file__).resolve().parents[2]
TORCH_PY = ROOT / ".venv-torch" / "bin" / "python"

QWEN3_MODEL = ModelConfig(
    vocab_size=256, d_model=64, num_layers=3, pattern=("swa", "attn"), tie_embeddings=False, norm_eps=1e-5,
    mixers={"attn": AttentionConfig(num_heads=4, num_kv_heads=1, head_dim=32, qk_norm=True, rope_theta=5e4),
            "swa": AttentionConfig(num_heads=4, num_kv_heads=1, head_dim=32, qk_norm=True, rope_theta=5e4,
                                   window=8)})
LLAMA_MODEL = ModelConfig(
    vocab_size=256, d_model=64, num_layers=2, pattern=("attn",), tie_embeddings=False, scan=False,
    norm_eps=1e-5, mlp_hidden=96, mixers={"attn": AttentionConfig(num_heads=4, num_kv_heads=2)})
CASES = {"ministral": TINY_MODEL, "qwen3": QWEN3_MODEL, "llama": LLAMA_MODEL}
SEQ = 40  # longer than the windows (16 and 8)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (run_dir, hf export dir) for each of CASES."""
    out = {}
    for name, mc in CASES.items():
        run_dir = make_run(tmp_path_factory.mktemp(name), run_config(mc, name), steps=(3,))
        out[name] = (run_dir, export_run(run_dir, "hf"))
    return out


def same_function(a: ModelConfig, b: ModelConfig) -> None:
    assert [a.mixer(n) for n in a.layer_names()] == [b.mixer(n) for n in b.layer_names()]
    for f in ("vocab_size", "d_model", "num_layers", "hidden", "norm_eps", "tie_embeddings"):
        assert getattr(a, f) == getattr(b, f), f


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("name,arch", [("ministral", "MinistralForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
                                       ("llama", "LlamaForCausalLM")])
def test_architecture_and_config(exports, name, arch):
    hf = json.loads((exports[name][1] / "config.json").read_text())
    assert hf["architectures"] == [arch]
    mc = CASES[name]
    assert hf["tie_word_embeddings"] == mc.tie_embeddings and hf["rms_norm_eps"] == mc.norm_eps
    if name == "ministral":
        assert hf["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"] and hf["sliding_window"] == 16
    if name == "qwen3":
        assert hf["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
        assert hf["use_sliding_window"] and hf["head_dim"] == 32 and hf["rope_parameters"]["rope_theta"] == 5e4
    names = SafetensorsReader(exports[name][1]).names()
    assert ("lm_head.weight" in names) == (not mc.tie_embeddings)


@pytest.mark.parametrize("name", list(CASES))
def test_hf_export_imports_back_bit_for_bit(exports, name):
    run_dir, hf_dir = exports[name]
    mc = model_config_from_hf(hf_dir)
    same_function(mc, CASES[name])
    model = import_params(hf_dir, nnx.eval_shape(lambda: models.build(mc)))
    assert_same_params(model, load_run(run_dir).model)


@dataclasses.dataclass(frozen=True)
class FakeLinearAttention(MixerConfig):
    kind: ClassVar[str] = "linear_test"


def test_unmappable_layers_are_named():
    mc = ModelConfig(vocab_size=256, d_model=64, num_layers=4, pattern=("attn", "capped", "lin", "far"),
                     mixers={"attn": AttentionConfig(), "capped": AttentionConfig(logit_softcap=30.0),
                             "lin": FakeLinearAttention(), "far": AttentionConfig(rope_theta=1e6)})
    with pytest.raises(ConfigError) as e:
        hf_arch(mc)
    msg = str(e.value)
    assert "layer 1 (capped): logit_softcap=30.0" in msg
    assert "layer 2 (lin): mixer kind 'linear_test' is not softmax attention" in msg
    assert ("rope_theta differs across layers (10000.0 in layers 0 (attn), 1 (capped); "
            "1000000.0 in layers 3 (far))") in msg
    two_windows = dataclasses.replace(TINY_MODEL, mixers={**TINY_MODEL.mixers, "attn": AttentionConfig(
        num_heads=4, num_kv_heads=2, window=32)})
    with pytest.raises(ConfigError, match=r"window differs across layers \(16 in layers 0 \(swa\)"):
        hf_arch(two_windows)


def _with_attn(**options) -> ModelConfig:
    """TINY_MODEL (exportable as it is) with `options` on its full-attention layer (layer 3)."""
    return dataclasses.replace(TINY_MODEL, mixers={**TINY_MODEL.mixers, "attn": dataclasses.replace(
        TINY_MODEL.mixers["attn"], **options)})


@pytest.mark.parametrize("mc,expected", [
    (_with_attn(gate="headwise"),
     "layer 3 (attn): gate='headwise'; Llama, Qwen3 and Ministral: no output gate"),
    (_with_attn(gate="elementwise"), "layer 3 (attn): gate='elementwise'"),
    (_with_attn(sinks=True), "layer 3 (attn): sinks=True; Llama, Qwen3 and Ministral: no attention sinks"),
    (_with_attn(score="sigmoid"), "layer 3 (attn): score='sigmoid'"),
    (_with_attn(knock_heads="v"), "layer 3 (attn): knock_heads='v'"),
    (_with_attn(window=None, head_windows=(0, 8)), "layer 3 (attn): head_windows=(0, 8)"),
    (dataclasses.replace(TINY_MODEL, post_norm=True),
     "model.post_norm=True; Llama, Qwen3 and Ministral: no norm on the residual branches' outputs"),
    (dataclasses.replace(TINY_MODEL, layer_scale=0.1), "model.layer_scale=0.1; Llama, Qwen3 and Ministral: no LayerScale"),
], ids=["gate", "gate_elementwise", "sinks", "sigmoid", "knock_heads", "head_windows",
        "post_norm", "layer_scale"])
def test_every_unmapped_option_is_refused_by_name(mc, expected):
    mc.check()
    with pytest.raises(ConfigError) as e:
        hf_arch(mc)
    msg = str(e.value)
    assert msg.startswith("cannot export to Hugging Face format") and expected in msg, msg
    assert msg.endswith("(--format safetensors exports any model)")
    problems = [line for line in msg.splitlines() if line.startswith("  ") and not line.startswith("  (")]
    assert len(problems) == 1, msg  # that one problem only


@dataclasses.dataclass(frozen=True)
class FutureAttention(AttentionConfig):
    """Stands for an AttentionConfig field added after the export was written."""
    new_option: int = 0


def resolved(mc: ModelConfig):
    """What the Llama-family export writes for `mc` (architecture, heads, windows, ...)."""
    assert hf_arch(mc) is ARCHS[0]
    return ARCHS[0].resolve(mc)[0]


def test_options_added_later_are_refused_too():
    mc = dataclasses.replace(TINY_MODEL, mixers={**TINY_MODEL.mixers, "attn": FutureAttention(
        num_heads=4, num_kv_heads=2)})
    assert resolved(mc) == resolved(TINY_MODEL)  # at its default, the new field exports
    mc = dataclasses.replace(mc, mixers={**mc.mixers, "attn": FutureAttention(
        num_heads=4, num_kv_heads=2, new_option=3)})
    with pytest.raises(ConfigError, match=r"layer 3 \(attn\): new_option=3; Llama, Qwen3 and Ministral: no "
                                          r"such option \(the export does not map it\)"):
        hf_arch(mc)


def test_model_options_outside_the_function_do_not_block_export():
    mc = dataclasses.replace(TINY_MODEL, z_loss=1e-4, init_std=0.01, scan=False)
    assert resolved(mc) == resolved(TINY_MODEL)


def test_non_attention_only_model_names_the_way_out():
    mc = ModelConfig(vocab_size=256, d_model=64, num_layers=2, pattern=("none",), post_norm=True)
    with pytest.raises(ConfigError) as e:
        hf_arch(mc)
    msg = str(e.value)
    assert "model.post_norm=True" in msg and "layer 0 (none): mixer kind 'none' is not softmax attention" in msg
    assert msg.endswith("(--format safetensors exports any model)")


def test_cli_refuses_before_reading_checkpoints(tmp_path, capsys):
    mc = dataclasses.replace(TINY_MODEL, mixers={**TINY_MODEL.mixers, "attn": AttentionConfig(
        num_heads=4, num_kv_heads=2, logit_softcap=50.0)})
    (tmp_path / "config.json").write_text(json.dumps(to_dict(run_config(mc))))  # no checkpoints at all
    assert export_main([str(tmp_path), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "cannot export to Hugging Face format" in err and "layer 3 (attn): logit_softcap=50.0" in err
    assert "--format safetensors exports any model" in err


def test_byte_tokenizer_file_gives_byte_ids(exports):
    hf_dir = exports["ministral"][1]
    tok = build_tokenizer(str(hf_dir / "tokenizer.json"))
    text = "héllo\n\tdef f(x):  return x  # ✓ \x00"
    assert tok.kind == "hf" and tok.vocab_size == 256
    np.testing.assert_array_equal(tok.encode(text), np.frombuffer(text.encode(), np.uint8))
    assert tok.decode(tok.encode(text)) == text
    assert (tok.token_bytes == 1).all()


# ----------------------------------------------------------------------------- import

def rewrite(hf_dir: Path, dst: Path, extra: dict[str, np.ndarray] = (), drop=(), max_shard_bytes=2**40,
            dtype=np.float32) -> Path:
    """A copy of hf_dir with tensors added, dropped, cast or sharded differently."""
    shutil.copytree(hf_dir, dst)
    reader = SafetensorsReader(hf_dir)
    arrays = {n: reader.get(n).astype(dtype) for n in reader.names() if n not in drop}
    arrays.update(dict(extra))
    tensors = [TensorOut(n, a.shape, a.dtype, lambda a=a: a) for n, a in arrays.items()]
    write_safetensors(dst, tensors, metadata={"format": "pt"}, max_shard_bytes=max_shard_bytes)
    return dst


def abstract(mc: ModelConfig):
    return nnx.eval_shape(lambda: models.build(mc))


def test_import_accepts_known_extras_and_shards(exports, tmp_path):
    run_dir, hf_dir = exports["llama"]
    extras = {"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32),
              "model.layers.1.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
    src = rewrite(hf_dir, tmp_path / "x", extra=extras, max_shard_bytes=50_000)
    assert (src / "model.safetensors.index.json").is_file()
    ref = load_run(run_dir).model
    assert_same_params(import_params(src, abstract(LLAMA_MODEL)), ref)
    # bfloat16 checkpoints (the usual published dtype) load as their float32 values
    bf16 = import_params(rewrite(hf_dir, tmp_path / "bf16", dtype=ml_dtypes.bfloat16), abstract(LLAMA_MODEL))
    for got, want in zip(chimera_tensors(bf16), chimera_tensors(ref)):
        np.testing.assert_array_equal(got.fetch(), want.fetch().astype(ml_dtypes.bfloat16).astype(np.float32))


def test_import_refuses_mismatches(exports, tmp_path):
    _, hf_dir = exports["llama"]
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(96, 64\), "
                                          r"but Chimera's layers.0.mlp.gate.kernel needs \(128, 64\)"):
        import_params(hf_dir, abstract(dataclasses.replace(LLAMA_MODEL, mlp_hidden=128)))
    bias = {"model.layers.1.self_attn.k_proj.bias": np.full(32, 0.5, np.float32)}
    biased = rewrite(hf_dir, tmp_path / "bias", extra=bias)
    with pytest.raises(ConfigError, match="model.layers.1.self_attn.k_proj.bias is a nonzero bias"):
        import_params(biased, abstract(LLAMA_MODEL))
    with pytest.raises(ConfigError, match="lm_head.weight differs from model.embed_tokens.weight, but the "):
        import_params(hf_dir, abstract(dataclasses.replace(LLAMA_MODEL, tie_embeddings=True)))
    with pytest.raises(ConfigError, match=r"the checkpoint lacks: model.layers.0.self_attn.k_norm.weight, "
                                          r"model.layers.0.self_attn.q_norm.weight"):
        import_params(hf_dir, abstract(dataclasses.replace(LLAMA_MODEL, mixers={
            "attn": AttentionConfig(num_heads=4, num_kv_heads=2, qk_norm=True)})))
    with pytest.raises(ConfigError, match="lacks: model.layers.1.mlp.down_proj.weight"):
        import_params(rewrite(hf_dir, tmp_path / "drop", drop={"model.layers.1.mlp.down_proj.weight"}),
                      abstract(LLAMA_MODEL))


def test_import_cli_writes_a_warm_start_config(exports, tmp_path, capsys):
    _, hf_dir = exports["qwen3"]
    out = tmp_path / "cfg.json"
    assert import_main([str(hf_dir), "--out", str(out), "train.steps=7", "optimizer.warmup_steps=1"]) == 0
    assert "train it: python -m train --config" in capsys.readouterr().out
    cfg = load_config(str(out))
    assert cfg.train.init_from == str(hf_dir.absolute()) and cfg.train.steps == 7
    assert cfg.data.tokenizer == "byte"  # the export carries tokenizer_byte.json
    same_function(cfg.model, QWEN3_MODEL)
    assert import_main([str(tmp_path), "--out", str(out)]) == 2
    assert "has no config.json" in capsys.readouterr().err


def hf_dir_with(tmp_path: Path, **config) -> Path:
    base = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2}
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**base, **config}))
    return d


def test_config_import_follows_transformers_layer_rules(tmp_path):
    # Qwen2: sliding layers are those from max_window_layers on, only with use_sliding_window
    mc = model_config_from_hf(hf_dir_with(tmp_path, use_sliding_window=True, sliding_window=32,
                                          max_window_layers=4))
    assert mc.layer_names() == ("attn",) * 4 + ("swa",) * 2 and mc.mixer("swa").window == 32
    assert mc.pattern == ("attn",) * 4 + ("swa",) * 2 and not mc.tie_embeddings
    mc = model_config_from_hf(hf_dir_with(tmp_path, sliding_window=32, max_window_layers=4))
    assert mc.layer_names() == ("attn",) * 6
    mc = model_config_from_hf(hf_dir_with(tmp_path, model_type="mistral", sliding_window=16, rope_theta=1e6))
    assert mc.pattern == ("swa",) and mc.mixer("swa").window == 16 and mc.mixer("swa").rope_theta == 1e6
    mc = model_config_from_hf(hf_dir_with(tmp_path, model_type="ministral", sliding_window=16, head_dim=8,
                                          layer_types=["sliding_attention", "full_attention"] * 3))
    assert mc.pattern == ("swa", "attn") and mc.mixer("attn").head_dim == 8
    mc = model_config_from_hf(hf_dir_with(tmp_path, model_type="qwen3", rms_norm_eps=1e-5))
    assert mc.norm_eps == 1e-5 and mc.mixer("attn").qk_norm  # Qwen3's QK-norm uses rms_norm_eps too
    for bad, match in [({"model_type": "gemma2"}, "model_type 'gemma2' cannot be imported"),
                       ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
                       ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3'")]:
        with pytest.raises(ConfigError, match=match):
            model_config_from_hf(hf_dir_with(tmp_path, **bad))


# ----------------------------------------------------------------------------- transformers

def torch_env() -> Path:
    if TORCH_PY.exists():
        return TORCH_PY
    if os.environ.get("CI") == "true":
        pytest.fail(f"{TORCH_PY} is missing; CI must run `bash scripts/setup_torch.sh` first")
    pytest.skip(f"{TORCH_PY} is missing (bash scripts/setup_torch.sh)")


@nnx.jit  # one compile per model beats op-by-op dispatch here
def _forward(model, tokens):
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return model(tokens, positions=pos, segment_ids=jnp.ones_like(pos))[0]


def our_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] of one unpadded document per row, positions 0..T-1."""
    return np.asarray(_forward(model, jnp.asarray(tokens)))


def test_transformers_computes_our_logits(exports, tmp_path):
    py = torch_env()
    from test_hf_hybrids import greedy
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, SEQ)).astype(np.int32)
    tokens2 = rng.integers(0, 256, (1, 37)).astype(np.int32)
    prompt = rng.integers(0, 256, 8).astype(np.int32)
    text = "héllo wörld\n\tdef f(x):  return x  # ✓"
    args = []
    for name, (_, hf_dir) in exports.items():
        np.savez(tmp_path / f"{name}-in.npz", tokens=tokens, tokens2=tokens2, prompt=prompt, new_tokens=32,
                 text=np.array(text))
        args += [str(hf_dir), str(tmp_path / f"{name}-in.npz"), str(tmp_path / f"{name}-out.npz")]
    proc = subprocess.run([str(py), str(ROOT / "scripts" / "hf_torch_check.py"), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, (run_dir, hf_dir) in exports.items():
        theirs = np.load(tmp_path / f"{name}-out.npz")
        assert str(theirs["architecture"]) == json.loads((hf_dir / "config.json").read_text())["architectures"][0]
        model = load_run(run_dir).model
        for key, toks in (("logits2", tokens2), ("logits", tokens)):
            ours = our_logits(model, toks)
            np.testing.assert_allclose(theirs[key], ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max(), err_msg=name)
        np.testing.assert_array_equal(theirs["generated"], greedy(model, prompt, 32), err_msg=name)
        np.testing.assert_array_equal(theirs["text_ids"], np.frombuffer(text.encode(), np.uint8))
    # The windows matter at this length: the same weights without them give other logits.
    full = dataclasses.replace(TINY_MODEL, mixers={**TINY_MODEL.mixers, "swa": TINY_MODEL.mixers["attn"]})
    unwindowed = import_params(exports["ministral"][1], abstract(full))
    gap = np.abs(our_logits(unwindowed, tokens) - np.load(tmp_path / "ministral-out.npz")["logits"]).max()
    assert gap > 1e-2 * np.abs(ours).max()


@pytest.mark.slow  # 19 s; the default tier checks the import round trip and sharded training apart
def test_warm_start_trains_from_the_imported_weights_under_a_mesh(exports, tmp_path):
    """train.init_from through the loop, sharded (fsdp x tensor): the first step's loss is the
    loss of the imported model on the first batch, so the weights were loaded, not re-initialised."""
    import jax.numpy as jnp

    import models
    from models import lm_loss
    from train.data import make_train_iterator
    from train.loop import run

    _, hf_dir = exports["llama"]
    out = tmp_path / "cfg.json"
    assert import_main([str(hf_dir), "--out", str(out), "train.steps=1", "optimizer.warmup_steps=0",
                        "data.seq_len=32", "data.batch_size=4", "train.eval_batches=1",
                        "runtime.mesh_data=1", "runtime.mesh_fsdp=2", "runtime.mesh_tensor=2"]) == 0
    cfg = load_config(str(out))
    run(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    model = import_params(hf_dir, models.build(cfg.model, cfg.runtime, seed=123))
    batch = next(make_train_iterator(cfg.data, seed=cfg.train.seed))
    logits, _ = model(jnp.asarray(batch["inputs"]), positions=jnp.asarray(batch["positions"]),
                      segment_ids=jnp.asarray(batch["segment_ids"]))
    expected, _ = lm_loss(logits, jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"]))
    assert rec["step"] == 1 and abs(rec["loss"] - float(expected)) < 1e-4 * float(expected)

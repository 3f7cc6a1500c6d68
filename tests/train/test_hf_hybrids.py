"""Hybrid and non-Llama models exported to the transformers architectures that hold them
(train/hf/: Qwen3-Next, Bamba, Mamba2, GptOss, DeepseekV3, xLSTM), verified against transformers itself.

Each case is a tiny model with random weights (tests/train/test_export.random_params: no two
tensors alike, norm scales away from 1) saved as a run directory and exported with
`train.export --format hf`. Then:
  - the export imports back bit for bit, and its config.json imports to the same function;
  - transformers (PyTorch, CPU, .venv-torch, scripts/hf_torch_check.py) loads it with
    AutoModelForCausalLM and no custom code and computes our logits within 1e-4 (relative to the
    largest logit) on a batch of two 80-token rows (longer than every chunk of the linear ops,
    64 by default, and than HF's chunk sizes) and on a 37-token row (a length no chunk divides);
  - its greedy generation of 32 tokens through its own decode cache equals ours (train.generate
    Decoder at temperature 0, through our decode caches).
Without .venv-torch the transformers test is skipped, except under CI=true.
"""
import dataclasses
import json
import subprocess

import numpy as np
import pytest
from flax import nnx

import models
from layers.attention.config import AttentionConfig, MLAConfig
from layers.linear_attention.config import GDNConfig, MLSTMConfig, SSDConfig
from test_export import assert_same_params, make_run, run_config  # tests/train/ is on sys.path
from test_hf import ROOT, our_logits, same_function, torch_env
from train.artifacts import load_run
from train.config import ConfigError, ModelConfig
from train.export import export_run
from train.generate import Decoder
from train.hf import choose_arch, import_params, model_config_from_hf
from train.sampling import SamplingSettings

D = 64
CASES = {
    # Gated DeltaNet 3 : 1 gated full attention (QK-norm, G1 elementwise gate)
    "qwen3_next": ("Qwen3NextForCausalLM", ModelConfig(
        vocab_size=256, d_model=D, num_layers=4, pattern=("gdn", "gdn", "gdn", "attn"), tie_embeddings=False,
        mixers={"gdn": GDNConfig(num_heads=2, expand_k=0.5, expand_v=1.0),
                "attn": AttentionConfig(num_heads=4, num_kv_heads=2, qk_norm=True, gate="elementwise")})),
    # Mamba2 SSD 1 : 1 attention, two B/C groups
    "bamba": ("BambaForCausalLM", ModelConfig(
        vocab_size=256, d_model=D, num_layers=4, pattern=("ssd", "attn"),
        mixers={"ssd": SSDConfig(head_dim=16, state_dim=16, n_groups=2),
                "attn": AttentionConfig(num_heads=4, num_kv_heads=2)})),
    # Mamba2 blocks: SSD only, no MLP, tied embeddings
    "mamba2": ("Mamba2ForCausalLM", ModelConfig(
        vocab_size=256, d_model=D, num_layers=3, pattern=("ssd",), mlp_hidden=0,
        mixers={"ssd": SSDConfig(head_dim=16, state_dim=16, n_groups=2, conv_size=3)})),
    # learned sinks in every layer, sliding-window 1 : 1 full, GQA (the MLP as a one-expert mixture)
    "gpt_oss": ("GptOssForCausalLM", ModelConfig(
        vocab_size=256, d_model=D, num_layers=4, pattern=("swa", "attn"), tie_embeddings=False,
        mixers={"swa": AttentionConfig(num_heads=4, num_kv_heads=2, sinks=True, window=16),
                "attn": AttentionConfig(num_heads=4, num_kv_heads=2, sinks=True)})),
    # MLA in every layer, with query compression
    "deepseek_v3": ("DeepseekV3ForCausalLM", ModelConfig(
        vocab_size=256, d_model=D, num_layers=2, pattern=("mla",), tie_embeddings=False,
        mixers={"mla": MLAConfig(num_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                                 qk_rope_head_dim=8, v_head_dim=16)})),
    # mLSTM with xLSTM 7B's exponential input gate
    "xlstm": ("xLSTMForCausalLM", ModelConfig(
        vocab_size=256, d_model=2 * D, num_layers=2, pattern=("mlstm",), tie_embeddings=False,
        mixers={"mlstm": MLSTMConfig(num_heads=2, input_gate="exp", output_norm="layernorm")})),
}
SEQ, SEQ2, PROMPT, NEW = 80, 37, 8, 32


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (run_dir, hf export dir)."""
    out = {}
    for name, (_, mc) in CASES.items():
        run_dir = make_run(tmp_path_factory.mktemp(name), run_config(mc, name), steps=(3,))
        out[name] = (run_dir, export_run(run_dir, "hf"))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_chosen_architecture_and_exact_round_trip(exports, name):
    arch, mc = CASES[name]
    run_dir, hf_dir = exports[name]
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == [arch]
    back = model_config_from_hf(hf_dir)
    same_function(back, mc)
    assert_same_params(import_params(hf_dir, nnx.eval_shape(lambda: models.build(back))), load_run(run_dir).model)


def greedy(model, prompt: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate(list(Decoder(model, SamplingSettings(temperature=0.0)).generate(prompt, n)))


def test_transformers_computes_our_logits_and_generation(exports, tmp_path):
    py = torch_env()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, SEQ)).astype(np.int32)
    tokens2 = rng.integers(0, 256, (1, SEQ2)).astype(np.int32)
    prompt = rng.integers(0, 256, PROMPT).astype(np.int32)
    args = []
    for name, (_, hf_dir) in exports.items():
        np.savez(tmp_path / f"{name}-in.npz", tokens=tokens, tokens2=tokens2, prompt=prompt, new_tokens=NEW)
        args += [str(hf_dir), str(tmp_path / f"{name}-in.npz"), str(tmp_path / f"{name}-out.npz")]
    proc = subprocess.run([str(py), str(ROOT / "scripts" / "hf_torch_check.py"), *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, (run_dir, hf_dir) in exports.items():
        theirs = np.load(tmp_path / f"{name}-out.npz")
        assert str(theirs["architecture"]) == CASES[name][0]
        model = load_run(run_dir).model
        for key, toks in (("logits", tokens), ("logits2", tokens2)):
            ours = our_logits(model, toks)
            np.testing.assert_allclose(theirs[key], ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max(),
                                       err_msg=f"{name} {key}")
        np.testing.assert_array_equal(theirs["generated"], greedy(model, prompt, NEW), err_msg=name)


# ----------------------------------------------------------------------------- refusals

def _with(name: str, mixer: str, **options) -> ModelConfig:
    mc = CASES[name][1]
    return dataclasses.replace(mc, mixers={**mc.mixers, mixer: dataclasses.replace(mc.mixers[mixer], **options)})


@pytest.mark.parametrize("mc,closest,line", [
    (_with("qwen3_next", "attn", qk_norm=False), "Qwen3-Next", "layer 3 (attn): qk_norm=False"),
    (_with("qwen3_next", "gdn", use_gate=False), "Qwen3-Next", "layer 0 (gdn): use_gate=False"),
    (_with("bamba", "attn", window=16), "Bamba", "layer 1 (attn): window=16"),
    (_with("xlstm", "mlstm", input_gate="sigmoid"), "xLSTM", "layer 0 (mlstm): input_gate='sigmoid'"),
    (dataclasses.replace(CASES["deepseek_v3"][1], norm_eps=1e-5), "DeepseekV3", "model.norm_eps=1e-05"),
], ids=["attn_without_qk_norm", "gdn_without_gate", "ssd_with_windowed_attn", "sigmoid_mlstm", "mla_eps"])
def test_a_near_miss_names_the_closest_architecture_and_what_it_lacks(mc, closest, line):
    mc.check()
    with pytest.raises(ConfigError) as e:
        choose_arch(mc)
    msg = str(e.value)
    assert msg.startswith(f"cannot export to Hugging Face format; the closest architecture, {closest}, lacks:"), msg
    assert f"\n  {line}" in msg and msg.endswith("(--format safetensors exports any model)"), msg


def test_import_refuses_what_the_checkpoint_computes_otherwise(exports, tmp_path):
    from test_hf import rewrite
    _, hf_dir = exports["gpt_oss"]
    name = "model.layers.1.mlp.experts.gate_up_proj_bias"
    biased = rewrite(hf_dir, tmp_path / "bias", extra={name: np.zeros((1, 2 * CASES["gpt_oss"][1].hidden), np.float32)})
    with pytest.raises(ConfigError, match=f"{name} must be 0 on the gate columns and -1 on the up columns"):
        import_params(biased, nnx.eval_shape(lambda: models.build(CASES["gpt_oss"][1])))
    _, hf_dir = exports["qwen3_next"]
    cfg = json.loads((hf_dir / "config.json").read_text())
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({**cfg, "num_experts": 4, "mlp_only_layers": []}))
    with pytest.raises(ConfigError, match="MoE"):
        model_config_from_hf(moe)
    # a Qwen3-Next checkpoint into a model config it cannot be (no gate on the attention layer)
    with pytest.raises(ConfigError, match=r"does not match the checkpoint's architecture, Qwen3-Next:\n  "
                                          r"layer 3 \(attn\): gate='none'"):
        import_params(hf_dir, nnx.eval_shape(lambda: models.build(_with("qwen3_next", "attn", gate="none"))))

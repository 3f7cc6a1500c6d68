"""DeepseekV3: a model whose every layer is MLA (layers/attention/mla.py), dense SwiGLU MLPs.

transformers' DeepseekV3 builds a dense MLP for layers below `first_k_dense_replace`; set to the
number of layers, no MoE module exists (the MoE keys are written as 1s and never read). Our MLA
names follow DeepseekV3Attention and its output orders (per head [nope; rope] in q, [c_kv; k_R]
in kv_a, per head [k_nope; v] in kv_b), so every tensor is a transpose:

    layers.i.mixer.q_proj            model.layers.i.self_attn.q_proj           (q_lora_rank None)
    layers.i.mixer.q_a_proj / q_b_proj, q_a_norm   self_attn.q_a_proj / q_b_proj, q_a_layernorm
    layers.i.mixer.kv_a_proj         self_attn.kv_a_proj_with_mqa
    layers.i.mixer.kv_a_norm         self_attn.kv_a_layernorm
    layers.i.mixer.kv_b_proj, o_proj self_attn.kv_b_proj, o_proj
    (norms, MLP, embeddings, head as Llama)

What must hold: every layer MLA with one set of dims and one rope_theta; `rope_interleave`
false (our rotate-half RoPE); plain RoPE (no YaRN: the softmax scale is exactly (n + p)^-1/2);
model.norm_eps = 1e-6, because transformers builds the two latent RMSNorms with eps 1e-6
whatever rms_norm_eps says; num_key_value_heads = num_attention_heads (MLA decompresses a key
and value per head).
"""
from __future__ import annotations

from layers.attention.config import MLAConfig
from models.config import ModelConfig
from train.hf.arch import (Arch, common_config, embedding_maps, layers_of, layers_of_kind, model_problems,
                           one_value, require, rope_theta, swiglu_maps)
from train.hf.tensors import TensorMap, linear, same

NAME = "DeepseekV3"
MAPPED_MLA_FIELDS = frozenset({"num_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                               "v_head_dim", "rope_theta"})
LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default, used for q_a/kv_a_layernorm


class DeepseekV3(Arch):
    name = NAME
    model_types = ("deepseek_v3",)
    kinds = frozenset({"mla"})

    def problems(self, mc: ModelConfig) -> list[str]:
        mla, problems = layers_of_kind(mc, MLAConfig, NAME, "mla", MAPPED_MLA_FIELDS, {})
        problems = model_problems(mc, NAME) + problems
        if mla:
            one_value(mla, "MLA dims (num_heads, q_lora_rank, kv_lora_rank, nope, rope, v)",
                      lambda c: (c.num_heads, c.q_lora_rank, *c.dims(mc.d_model)), problems)
            one_value(mla, "rope_theta", lambda c: c.rope_theta, problems)
            if mc.norm_eps != LATENT_NORM_EPS:
                problems.append(f"model.norm_eps={mc.norm_eps}; {NAME}: its latent norms (q_a_layernorm, "
                                f"kv_a_layernorm) use eps {LATENT_NORM_EPS}, set model.norm_eps={LATENT_NORM_EPS}")
        return problems

    def config(self, cfg) -> dict:
        m = cfg.model
        c = m.mixer(m.layer_names()[0])
        nope, rope, v, rank = c.dims(m.d_model)
        return {
            **common_config(cfg, "DeepseekV3ForCausalLM", "deepseek_v3"), "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_heads, "q_lora_rank": c.q_lora_rank, "kv_lora_rank": rank,
            "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "v_head_dim": v,
            # every layer dense: no MoE module is built, so these are never read
            "first_k_dense_replace": m.num_layers, "n_routed_experts": 1, "n_shared_experts": 1,
            "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1, "moe_intermediate_size": 1,
            "routed_scaling_factor": 1.0, "norm_topk_prob": True, "num_nextn_predict_layers": 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_theta)},
            "rope_interleave": False, "attention_bias": False, "attention_dropout": 0.0,
        }

    def tensors(self, mc: ModelConfig) -> list[TensorMap]:
        out = []
        for i, _, c in layers_of(mc):
            hf, ours = f"model.layers.{i}.self_attn", f"layers.{i}.mixer"
            q = ([linear(f"{hf}.q_proj.weight", f"{ours}.q_proj.kernel")] if c.q_lora_rank is None else
                 [linear(f"{hf}.q_a_proj.weight", f"{ours}.q_a_proj.kernel"),
                  same(f"{hf}.q_a_layernorm.weight", f"{ours}.q_a_norm.scale"),
                  linear(f"{hf}.q_b_proj.weight", f"{ours}.q_b_proj.kernel")])
            out += [same(f"model.layers.{i}.input_layernorm.weight", f"layers.{i}.mixer_norm.scale"), *q,
                    linear(f"{hf}.kv_a_proj_with_mqa.weight", f"{ours}.kv_a_proj.kernel"),
                    same(f"{hf}.kv_a_layernorm.weight", f"{ours}.kv_a_norm.scale"),
                    linear(f"{hf}.kv_b_proj.weight", f"{ours}.kv_b_proj.kernel"),
                    linear(f"{hf}.o_proj.weight", f"{ours}.o_proj.kernel"),
                    same(f"model.layers.{i}.post_attention_layernorm.weight", f"layers.{i}.mlp_norm.scale"),
                    *swiglu_maps(i, f"model.layers.{i}.mlp")]
        return out + embedding_maps(mc, "model.embed_tokens.weight", "model.norm.weight")

    def model_config(self, c: dict) -> ModelConfig:
        n = int(c["num_hidden_layers"])
        require(c, "first_k_dense_replace", lambda v: v is not None and v >= n,
                f"first_k_dense_replace >= num_hidden_layers ({n}): a dense MLP in every layer (MoE layers "
                "cannot be imported)")
        require(c, "hidden_act", lambda v: v in (None, "silu"), "silu (SwiGLU MLP)")
        require(c, "rope_interleave", lambda v: v is False,
                "rope_interleave=false (rotate-half RoPE); interleaved checkpoints need their rope columns permuted")
        require(c, "attention_bias", lambda v: not v, "attention_bias=false")
        require(c, "rms_norm_eps", lambda v: v is None or float(v) == LATENT_NORM_EPS,
                f"rms_norm_eps={LATENT_NORM_EPS} (the latent norms' eps, which Chimera shares with every norm)")
        heads = int(c["num_attention_heads"])
        require(c, "num_key_value_heads", lambda v: v in (None, heads), f"num_key_value_heads = num_attention_heads")
        mla = MLAConfig(num_heads=heads, q_lora_rank=c.get("q_lora_rank"), kv_lora_rank=int(c["kv_lora_rank"]),
                        qk_nope_head_dim=int(c["qk_nope_head_dim"]), qk_rope_head_dim=int(c["qk_rope_head_dim"]),
                        v_head_dim=int(c["v_head_dim"]), rope_theta=rope_theta(c))
        return ModelConfig(vocab_size=int(c["vocab_size"]), d_model=int(c["hidden_size"]), num_layers=n,
                           pattern=("mla",), mixers={"mla": mla}, mlp_hidden=int(c["intermediate_size"]),
                           norm_eps=LATENT_NORM_EPS, tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                           init_std=float(c.get("initializer_range", 0.02)))

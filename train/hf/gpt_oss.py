"""GptOss: softmax attention with learned sinks in every layer, full or sliding-window, and our
dense SwiGLU held as a one-expert mixture.

GptOss's attention appends a learned logit per head to each query's scores and drops it after
the softmax: exactly our `sinks`. Its windows mean the W most recent positions, the query
included, as ours. Its MLP is always a mixture of experts computing, per expert,
(clamp(up) + 1) * g sigmoid(alpha g), g = clamp(gate); with one expert chosen top-1 the router's
softmax weight is exactly 1, alpha = 1 makes g sigmoid(g) = silu(g), a limit of 1e9 makes the
clamps identities, and an up bias of -1 cancels the +1. So:

    layers.i.mixer.{q,k,v,o}_proj      model.layers.i.self_attn.{q,k,v,o}_proj.weight   (T)
    layers.i.mixer.sinks               model.layers.i.self_attn.sinks
    layers.i.mlp.gate / up             model.layers.i.mlp.experts.gate_up_proj [1, d, 2F]:
                                       columns 0::2 gate, 1::2 up (kernels as they are, [in, out])
    layers.i.mlp.down                  model.layers.i.mlp.experts.down_proj [1, F, d]
    (constants)                        mlp.router.weight / bias 0, experts.gate_up_proj_bias
                                       0 (gate) / -1 (up), experts.down_proj_bias 0
    (norms, embeddings, head as Llama)

The one inexact step: (up - 1) + 1 rounds, by at most half an ulp of 1 (6e-8) in float32, which
the export writes. What must hold: every layer attention with sinks, one head layout, one RoPE
theta and one sliding window shared by the windowed layers, and no other attention option.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from layers.attention.config import AttentionConfig
from models.config import ModelConfig
from train.hf.arch import (Arch, common_config, embedding_maps, layers_of, layers_of_kind, model_problems,
                           one_value, period, require, rope_theta)
from train.hf.llama import FULL, SLIDING, WHY_NOT, attention_maps
from train.hf.tensors import TensorMap, constant, same

NAME = "GptOss"
MAPPED_ATTENTION_FIELDS = frozenset({"num_heads", "num_kv_heads", "head_dim", "rope_theta", "window", "sinks"})
NO_LIMIT = 1e9  # swiglu_limit that never clamps


def _gate_up(hf: str, gate: str, up: str) -> TensorMap:
    """gate, up kernels [d, F] <-> [1, d, 2F] with gate in the even and up in the odd columns."""
    def to_hf(g, u):
        out = np.empty((1, g.shape[0], 2 * g.shape[1]), np.float32)
        out[0, :, 0::2], out[0, :, 1::2] = g, u
        return out
    return TensorMap(hf, (gate, up), to_hf, lambda a: (np.ascontiguousarray(a[0, :, 0::2]),
                                                       np.ascontiguousarray(a[0, :, 1::2])))


def _expert_axis(hf: str, ours: str) -> TensorMap:
    """A kernel [in, out] <-> [1, in, out] (one expert, not transposed)."""
    return TensorMap(hf, (ours,), lambda a: a[None], lambda a: (np.ascontiguousarray(a[0]),))


class GptOss(Arch):
    name = NAME
    model_types = ("gpt_oss",)
    kinds = frozenset({"attention"})

    def problems(self, mc: ModelConfig) -> list[str]:
        attn, problems = layers_of_kind(mc, AttentionConfig, NAME, "softmax attention", MAPPED_ATTENTION_FIELDS,
                                        WHY_NOT)
        problems = model_problems(mc, NAME) + problems
        problems += [f"layer {i} ({name}): sinks=False; {NAME}: learned sinks in every layer "
                     f"(model.mixers.{name}.sinks=true)" for i, name, c in attn if not c.sinks]
        d = mc.d_model
        one_value(attn, "head layout (num_heads, num_kv_heads, head dim)",
                  lambda c: (c.num_heads, c.kv_heads, c.dim_per_head(d)), problems)
        one_value(attn, "rope_theta", lambda c: c.rope_theta, problems)
        one_value([a for a in attn if a[2].window is not None], "window", lambda c: c.window, problems)
        return problems

    def config(self, cfg) -> dict:
        m = cfg.model
        cs = [m.mixer(n) for n in m.layer_names()]
        window = next((c.window for c in cs if c.window is not None), None)
        return {
            **common_config(cfg, "GptOssForCausalLM", "gpt_oss"), "num_attention_heads": cs[0].num_heads,
            "num_key_value_heads": cs[0].kv_heads, "head_dim": cs[0].dim_per_head(m.d_model),
            "num_local_experts": 1, "num_experts_per_tok": 1, "swiglu_alpha": 1.0, "swiglu_limit": NO_LIMIT,
            "router_aux_loss_coef": 0.0, "output_router_logits": False,
            "sliding_window": window, "layer_types": [FULL if c.window is None else SLIDING for c in cs],
            "attention_bias": False, "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(cs[0].rope_theta)},
        }

    def tensors(self, mc: ModelConfig) -> list[TensorMap]:
        d, f = mc.d_model, mc.hidden
        up_bias = np.zeros((1, 2 * f), np.float32)
        up_bias[0, 1::2] = -1.0
        out = []
        for i, _, c in layers_of(mc):
            hf, ours = f"model.layers.{i}", f"layers.{i}"
            out += [same(f"{hf}.input_layernorm.weight", f"{ours}.mixer_norm.scale"),
                    *attention_maps(i, c),
                    same(f"{hf}.self_attn.sinks", f"{ours}.mixer.sinks"),
                    same(f"{hf}.post_attention_layernorm.weight", f"{ours}.mlp_norm.scale"),
                    constant(f"{hf}.mlp.router.weight", np.zeros((1, d)), "zeros (one expert)"),
                    constant(f"{hf}.mlp.router.bias", np.zeros(1), "zero (one expert)"),
                    _gate_up(f"{hf}.mlp.experts.gate_up_proj", f"{ours}.mlp.gate.kernel", f"{ours}.mlp.up.kernel"),
                    constant(f"{hf}.mlp.experts.gate_up_proj_bias", up_bias,
                             "0 on the gate columns and -1 on the up columns (cancelling GptOss's up + 1)"),
                    _expert_axis(f"{hf}.mlp.experts.down_proj", f"{ours}.mlp.down.kernel"),
                    constant(f"{hf}.mlp.experts.down_proj_bias", np.zeros((1, d)), "zeros (no MLP bias)")]
        return out + embedding_maps(mc, "model.embed_tokens.weight", "model.norm.weight")

    def model_config(self, c: dict) -> ModelConfig:
        require(c, "num_local_experts", lambda v: v == 1, "num_local_experts=1 (a dense MLP; MoE cannot be imported)")
        require(c, "num_experts_per_tok", lambda v: v in (None, 1), "num_experts_per_tok=1")
        require(c, "swiglu_alpha", lambda v: v is not None and float(v) == 1.0, "swiglu_alpha=1.0 (silu)")
        require(c, "swiglu_limit", lambda v: v is not None and float(v) >= NO_LIMIT, f"swiglu_limit >= {NO_LIMIT:g} (no clamp)")
        require(c, "attention_bias", lambda v: v is False, "attention_bias=false")
        n, d, heads = int(c["num_hidden_layers"]), int(c["hidden_size"]), int(c["num_attention_heads"])
        types = c.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(n)]
        require(c, "layer_types", lambda v: v is None or (len(v) == n and set(v) <= {FULL, SLIDING}),
                f"{n} of {FULL!r} / {SLIDING!r}")
        # absent keys take GptOssConfig's defaults (64, 8); null ones its fallbacks (d / H, H)
        head_dim = int(c.get("head_dim", 64) or d // heads)
        base = AttentionConfig(num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads", 8) or heads),
                               head_dim=None if head_dim * heads == d else head_dim, sinks=True,
                               rope_theta=rope_theta(c))
        mixers = {"attn": base}
        if SLIDING in types:
            mixers["swa"] = dataclasses.replace(base, window=int(c["sliding_window"]))
        names = ["swa" if t == SLIDING else "attn" for t in types]
        mixers = {k: v for k, v in mixers.items() if k in names}
        return ModelConfig(vocab_size=int(c["vocab_size"]), d_model=d, num_layers=n, pattern=period(names),
                           mixers=mixers, mlp_hidden=int(c["intermediate_size"]),
                           norm_eps=float(c.get("rms_norm_eps", 1e-5)),
                           tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                           init_std=float(c.get("initializer_range", 0.02)))

"""Llama, Qwen3 and Ministral: models whose every layer is softmax attention.

The export picks, of these three, the architecture that computes exactly what the model computes:

    LlamaForCausalLM      (llama)      every layer full causal attention, no QK-norm
    Qwen3ForCausalLM      (qwen3)      QK-norm in every layer; sliding-window layers through
                                       `layer_types` + `sliding_window` (use_sliding_window=true)
    MinistralForCausalLM  (ministral)  some layers windowed, no QK-norm: Llama with per-layer
                                       `layer_types`, no biases, free head_dim (Qwen2 would need
                                       q/k/v biases and head_dim = d / H)

Those configs hold one value per model for heads, kv heads, head dim, RoPE theta, window and
QK-norm, so a model whose layers differ in any of them is refused with the offending layers
named (`--format safetensors` exports anything). So is any option the export does not map, found
generically so that a new option can never be dropped silently: a non-attention mixer, an
AttentionConfig field other than the mapped ones (MAPPED_ATTENTION_FIELDS) that is not at its
default (logit_softcap, conv_size, gate, sinks, score, head_windows, ...), and a ModelConfig
field other than MAPPED_MODEL_FIELDS that is not at its default (post_norm, layer_scale, ...).
Both sides: pre-norm blocks, RMSNorm x * rsqrt(mean(x^2) + eps) * w (the QK-norm's eps is
model.norm_eps too, as Qwen3's rms_norm_eps), SwiGLU down(silu(gate x) * up x), RoPE rotate-half
with inv_freq theta^(-2i/D), softmax scale D^-0.5, query head h reading kv head h // (H / K),
and a window W meaning the W most recent positions, the query included
(HF: kv_idx > q_idx - sliding_window).

Tensors: a Dense kernel is [d_in, d_out] and a torch Linear weight [d_out, d_in] (transposed);
embeddings [V, d] and norm scales [d] are the same:

    embed.embedding                 model.embed_tokens.weight
    layers.i.mixer_norm.scale       model.layers.i.input_layernorm.weight
    layers.i.mixer.{q,k,v,o}_proj   model.layers.i.self_attn.{q,k,v,o}_proj.weight   (T)
    layers.i.mixer.{q,k}_norm       model.layers.i.self_attn.{q,k}_norm.weight       (Qwen3)
    layers.i.mlp_norm.scale         model.layers.i.post_attention_layernorm.weight
    layers.i.mlp.{gate,up,down}     model.layers.i.mlp.{gate,up,down}_proj.weight    (T)
    final_norm.scale                model.norm.weight
    head.kernel                     lm_head.weight   (untied only; tied models write none)   (T)

Import reads llama, mistral, ministral, qwen2 and qwen3
config.json files and their safetensors (one file or sharded, any float dtype, cast to float32).
Every HF tensor must be used, except known ones: rotary `inv_freq` buffers, biases that are all
zero (Qwen2 always has q/k/v biases; nonzero ones are refused, the model has none) and a tied
`lm_head.weight` equal to the embedding.

"""
from __future__ import annotations

import dataclasses

import numpy as np

from layers.attention.config import AttentionConfig
from layers.config import ConfigError
from models.config import ModelConfig
from train.hf.arch import (Arch, common_config, embedding_maps, layers_of, layers_of_kind, model_problems,
                           one_value, period, rope_theta, swiglu_maps)
from train.hf.tensors import TensorMap, linear, same

FULL, SLIDING = "full_attention", "sliding_attention"

# The AttentionConfig fields these configs hold; every other must be at its default.
MAPPED_ATTENTION_FIELDS = frozenset({"num_heads", "num_kv_heads", "head_dim", "qk_norm", "rope_theta", "window"})
NAME = "Llama, Qwen3 and Ministral"
# Why an unmapped option cannot be exported, where there is more to say than that it is not mapped.
WHY_NOT = {
    "logit_softcap": "no soft-capping of attention logits",
    "conv_size": "no convolution on q/k/v",
    "gate": "no output gate on attention",
    "sinks": "no attention sinks",
    "score": "softmax attention only",
    "head_windows": "one window for every head of a layer",
}


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What the HF config needs: the architecture and the values it holds once per model."""
    architecture: str
    model_type: str
    num_heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    qk_norm: bool
    window: int | None           # the one sliding window, None when no layer has one
    layer_types: tuple[str, ...]  # FULL or SLIDING per layer


def attention_maps(i: int, c: AttentionConfig, prefix: str = "self_attn") -> list[TensorMap]:
    """q/k/v/o (and QK-norm) of a plain attention layer as Llama-style `self_attn` tensors."""
    base = f"model.layers.{i}.{prefix}"
    out = [linear(f"{base}.{n}_proj.weight", f"layers.{i}.mixer.{n}_proj.kernel") for n in "qkvo"]
    if c.qk_norm:
        out += [same(f"{base}.{n}_norm.weight", f"layers.{i}.mixer.{n}_norm.scale") for n in "qk"]
    return out


class LlamaFamily(Arch):
    name = NAME
    model_types = ("llama", "mistral", "ministral", "qwen2", "qwen3")
    kinds = frozenset({"attention"})

    def resolve(self, mc: ModelConfig) -> tuple[Resolved | None, list[str]]:
        attn, problems = layers_of_kind(mc, AttentionConfig, NAME, "softmax attention", MAPPED_ATTENTION_FIELDS,
                                        WHY_NOT)
        problems = model_problems(mc, NAME) + problems
        if not attn:
            return None, problems
        d = mc.d_model
        heads = one_value(attn, "num_heads", lambda c: c.num_heads, problems)
        kv_heads = one_value(attn, "num_kv_heads", lambda c: c.kv_heads, problems)
        head_dim = one_value(attn, "head dim", lambda c: c.dim_per_head(d), problems)
        theta = one_value(attn, "rope_theta", lambda c: c.rope_theta, problems)
        qk_norm = one_value(attn, "qk_norm", lambda c: c.qk_norm, problems)
        windowed = [a for a in attn if a[2].window is not None]
        window = one_value(windowed, "window", lambda c: c.window, problems) if windowed else None
        if problems:
            return None, problems
        if qk_norm:
            arch, model_type = "Qwen3ForCausalLM", "qwen3"
        elif window is not None:
            arch, model_type = "MinistralForCausalLM", "ministral"
        else:
            arch, model_type = "LlamaForCausalLM", "llama"
        types = tuple(FULL if c.window is None else SLIDING for _, _, c in attn)
        return Resolved(arch, model_type, heads, kv_heads, head_dim, float(theta), qk_norm, window, types), []

    def problems(self, mc: ModelConfig) -> list[str]:
        return self.resolve(mc)[1]

    def config(self, cfg) -> dict:
        """config.json (keys of transformers 5; `rope_theta` is also written at the top level,
        where transformers 4 reads it)."""
        m, a = cfg.model, self.resolve(cfg.model)[0]
        out = {
            **common_config(cfg, a.architecture, a.model_type),
            "num_attention_heads": a.num_heads, "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim,
            "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta}, "rope_theta": a.rope_theta,
            "attention_dropout": 0.0,
        }
        if a.model_type == "llama":
            out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        elif a.model_type == "qwen3":
            out.update(attention_bias=False, use_sliding_window=a.window is not None, sliding_window=a.window,
                       max_window_layers=m.num_layers, layer_types=list(a.layer_types))
        else:
            out.update(sliding_window=a.window, layer_types=list(a.layer_types))
        return out

    def tensors(self, mc: ModelConfig) -> list[TensorMap]:
        out = []
        for i, _, c in layers_of(mc):
            out += [same(f"model.layers.{i}.input_layernorm.weight", f"layers.{i}.mixer_norm.scale"),
                    *attention_maps(i, c),
                    same(f"model.layers.{i}.post_attention_layernorm.weight", f"layers.{i}.mlp_norm.scale"),
                    *swiglu_maps(i, f"model.layers.{i}.mlp")]
        return out + embedding_maps(mc, "model.embed_tokens.weight", "model.norm.weight")

    def known_unused(self, name: str, reader, mc: ModelConfig) -> str | None:
        """Rotary buffers and all-zero biases (Qwen2 always has q/k/v biases; nonzero ones are
        refused: the model has none)."""
        if name.endswith(".bias"):
            a = reader.get(name)
            if np.any(a != 0):
                biggest = float(np.abs(a.astype(np.float32)).max())
                raise ConfigError(f"{name} is a nonzero bias (max |b| = {biggest:.3g}); Chimera's projections "
                                  "have no bias, so this checkpoint cannot be imported exactly")
            return "zero bias"
        return super().known_unused(name, reader, mc)

    def model_config(self, c: dict) -> ModelConfig:
        """Full-attention layers become mixer "attn" and windowed ones "swa"; the pattern is the
        shortest period of the layer list."""
        act = c.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act={act!r} is not supported; Chimera's MLP is SwiGLU (silu)")
        d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        head_dim = c.get("head_dim") or d // heads
        base = AttentionConfig(num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
                               head_dim=None if head_dim * heads == d else int(head_dim),
                               qk_norm=c["model_type"] == "qwen3", rope_theta=rope_theta(c))
        windows = _layer_windows(c)
        names = ["attn" if w is None else "swa" for w in windows]
        mixers = {"attn": base} if "attn" in names else {}
        if "swa" in names:
            mixers["swa"] = dataclasses.replace(base, window=int(next(w for w in windows if w is not None)))
        return ModelConfig(
            vocab_size=int(c["vocab_size"]), d_model=d, num_layers=int(c["num_hidden_layers"]),
            pattern=period(names), mixers=mixers, mlp_hidden=int(c["intermediate_size"]),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            init_std=float(c.get("initializer_range", 0.02)))


def _layer_windows(c: dict) -> list[int | None]:
    """The window of each layer (None: full causal), as transformers decides it per model type."""
    n, mt = c["num_hidden_layers"], c["model_type"]
    window = c.get("sliding_window")
    if mt == "llama":
        return [None] * n
    if mt in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
        window = None
    types = c.get("layer_types") if mt != "mistral" else None
    if types is None:
        if mt in ("qwen2", "qwen3"):
            start = c.get("max_window_layers", 28)
            types = [SLIDING if window is not None and i >= start else FULL for i in range(n)]
        else:
            types = [SLIDING if window is not None else FULL] * n
    if len(types) != n or set(types) - {FULL, SLIDING}:
        raise ConfigError(f"layer_types must list {n} of {FULL!r} / {SLIDING!r}, got {types}")
    return [window if t == SLIDING else None for t in types]

"""Bamba: a sequential hybrid whose every layer is Mamba2 (SSD, layers/linear_attention/ssd.py)
or plain softmax attention, each followed by a SwiGLU MLP; `attn_layer_indices` says which layers
attend, so any pattern and order of the two is held. Both sides compute the same function:

  - in_proj splits as [z (gate), x, B (G groups of N), C (G x N), dt (H)]: our z, x, bc, dt kernels
    side by side; the depthwise conv with bias runs on [x, B, C], then SiLU (`hidden_act`);
  - dt = softplus(dt + dt_bias), clamped to `time_step_limit`, (0, inf) when left out (a no-op, as
    ours); A = -exp(A_log); head h reads B/C group h // (H / G); y += D x before the gate;
  - the gated norm is RMSNorm(y * silu(z)) over G groups of d_inner / G channels (ours
    MergedHeadsNorm), with eps `rms_norm_eps`, as every other norm;
  - attention: Llama's (GQA, rotate-half RoPE over the whole head, scale D^-0.5, causal).

    embed.embedding                   model.embed_tokens.weight
    layers.i.mixer_norm.scale         model.layers.i.input_layernorm.weight
    layers.i.mixer.{z,x,bc,dt}_proj   model.layers.i.mamba.in_proj.weight     (concatenated, T)
    layers.i.mixer.conv.kernel        model.layers.i.mamba.conv1d.weight      (taps reversed)
    layers.i.mixer.conv.bias          model.layers.i.mamba.conv1d.bias
    layers.i.mixer.{A_log,D,dt_bias}  model.layers.i.mamba.{A_log,D,dt_bias}
    layers.i.mixer.norm.scale         model.layers.i.mamba.norm.weight
    layers.i.mixer.out_proj           model.layers.i.mamba.out_proj.weight    (T)
    layers.i.mixer.{q,k,v,o}_proj     model.layers.i.self_attn.{q,k,v,o}_proj.weight  (T)
    layers.i.mlp_norm.scale           model.layers.i.pre_ff_layernorm.weight
    layers.i.mlp.{gate,up,down}       model.layers.i.feed_forward.{gate,up,down}_proj.weight  (T)
    final_norm.scale                  model.final_layernorm.weight
    head.kernel                       lm_head.weight   (untied only)   (T)

What must hold: every layer `ssd` or `attention`; one value across the SSD layers for expand,
head_dim, state_dim, n_groups and conv_size (>= 2: Bamba has no conv-less flag), and across the
attention layers for heads, kv heads, head dim and rope_theta; attention without QK-norm, window,
soft-cap, gate, sinks, sigmoid score, conv, head windows or knocking heads (any AttentionConfig /
SSDConfig field outside the MAPPED sets must be at its default, so a new option is refused).
BambaConfig forces partial_rotary_factor 0.5 unless `rope_parameters` says otherwise, so 1.0 is
written there. A pure-SSD model (no attention layer) exports too, with use_cache=false: transformers
5.25's Bamba cache needs an attention layer (its forward and generate fail with a cache), so it
runs and generates without one (recomputing the prefix each step).
"""
from __future__ import annotations

import math

from layers.attention.config import AttentionConfig
from layers.linear_attention.config import SSDConfig
from models.config import ModelConfig
from train.hf.arch import (Arch, is_kind, common_config, embedding_maps, layers_of, model_problems, one_value, period, require,
                           rope_theta, swiglu_maps, unmapped_options)
from train.hf.llama import WHY_NOT as ATTENTION_WHY_NOT, attention_maps
from train.hf.tensors import TensorMap, conv, fused, linear, same

NAME = "Bamba"
MAPPED_ATTENTION_FIELDS = frozenset({"num_heads", "num_kv_heads", "head_dim", "rope_theta"})
MAPPED_SSD_FIELDS = frozenset({"expand", "head_dim", "state_dim", "n_groups", "conv_size"})
SSD_SHARED = ("expand", "head_dim", "state_dim", "n_groups", "conv_size")
WHY_NOT = ATTENTION_WHY_NOT | {"qk_norm": "no QK-norm", "window": "full causal attention only",
                               "knock_heads": "no knocking-heads mixing"}


def _kinds(mc: ModelConfig, problems: list[str]):
    """The (index, name, cfg) of the SSD layers and of the attention layers; a problem for any other."""
    ssd, attn = [], []
    for i, name, c in layers_of(mc):
        if is_kind(c, SSDConfig):
            problems += unmapped_options(f"layer {i} ({name}): ", c, MAPPED_SSD_FIELDS, NAME, {})
            if c.conv_size == 0:
                problems.append(f"layer {i} ({name}): conv_size=0; {NAME}: the SSD conv is always on (conv_size >= 2)")
            ssd.append((i, name, c))
        elif is_kind(c, AttentionConfig):
            problems += unmapped_options(f"layer {i} ({name}): ", c, MAPPED_ATTENTION_FIELDS, NAME, WHY_NOT)
            attn.append((i, name, c))
        else:
            problems.append(f"layer {i} ({name}): mixer kind {c.kind!r}; {NAME}: only ssd (Mamba2) and attention")
    return ssd, attn


def ssd_maps(hf: str, ours: str, c: SSDConfig, d_model: int) -> list[TensorMap]:
    """Our SSD mixer (params under `ours`) as transformers' Mamba2 mixer (under `hf`: Bamba's
    `mamba`, Mamba2's `mixer`)."""
    d_in, gn = c.expand * d_model, c.n_groups * c.state_dim
    return [fused(f"{hf}.in_proj.weight", [f"{ours}.{n}_proj.kernel" for n in ("z", "x", "bc", "dt")],
                  [d_in, d_in, 2 * gn, c.num_heads(d_model)]),
            conv(f"{hf}.conv1d.weight", f"{ours}.conv.kernel"),
            same(f"{hf}.conv1d.bias", f"{ours}.conv.bias"),
            *(same(f"{hf}.{n}", f"{ours}.{n}") for n in ("A_log", "D", "dt_bias")),
            same(f"{hf}.norm.weight", f"{ours}.norm.scale"),
            linear(f"{hf}.out_proj.weight", f"{ours}.out_proj.kernel")]


class Bamba(Arch):
    name = NAME
    model_types = ("bamba",)
    kinds = frozenset({"ssd", "attention"})

    def problems(self, mc: ModelConfig) -> list[str]:
        problems = model_problems(mc, NAME)
        ssd, attn = _kinds(mc, problems)
        if not ssd:
            problems.append(f"no ssd layer; an all-attention model is a Llama ({NAME} would be the same function)")
        for f in SSD_SHARED:
            one_value(ssd, f"ssd {f}", lambda c, f=f: getattr(c, f), problems)
        one_value(attn, "num_heads", lambda c: c.num_heads, problems)
        one_value(attn, "num_kv_heads", lambda c: c.kv_heads, problems)
        one_value(attn, "head dim", lambda c: c.dim_per_head(mc.d_model), problems)
        one_value(attn, "rope_theta", lambda c: c.rope_theta, problems)
        return problems

    def config(self, cfg) -> dict:
        m = cfg.model
        ssd, attn = _kinds(m, [])
        s = ssd[0][2]
        a = attn[0][2] if attn else None
        heads, kv, head_dim, theta = ((a.num_heads, a.kv_heads, a.dim_per_head(m.d_model), float(a.rope_theta))
                                      if a else (1, 1, m.d_model, 10_000.0))  # unused without attention
        return {
            **common_config(cfg, "BambaForCausalLM", "bamba"), "attn_layer_indices": [i for i, _, _ in attn],
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 1.0},
            "rope_theta": theta, "partial_rotary_factor": 1.0,
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "mamba_n_heads": s.num_heads(m.d_model), "mamba_d_head": s.head_dim, "mamba_n_groups": s.n_groups,
            "mamba_d_state": s.state_dim, "mamba_expand": s.expand, "mamba_d_conv": s.conv_size,
            # any chunk size computes the same function; time_step_limit is left at its (0, inf)
            "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_proj_bias": False,
            "z_loss_coefficient": m.z_loss, "num_logits_to_keep": 1,
            "use_cache": bool(attn),  # transformers 5.25's Bamba cache needs an attention layer
        }

    def tensors(self, mc: ModelConfig) -> list[TensorMap]:
        out = []
        for i, _, c in layers_of(mc):
            h, ours = f"model.layers.{i}", f"layers.{i}.mixer"
            if isinstance(c, SSDConfig):
                mixer = ssd_maps(f"{h}.mamba", ours, c, mc.d_model)
            else:
                mixer = attention_maps(i, c)
            out += [same(f"{h}.input_layernorm.weight", f"layers.{i}.mixer_norm.scale"), *mixer,
                    same(f"{h}.pre_ff_layernorm.weight", f"layers.{i}.mlp_norm.scale"),
                    *swiglu_maps(i, f"{h}.feed_forward")]
        return out + embedding_maps(mc, "model.embed_tokens.weight", "model.final_layernorm.weight")

    def model_config(self, c: dict) -> ModelConfig:
        """SSD layers become mixer "ssd", attention layers "attn"; the pattern is the shortest period.
        Missing keys take BambaConfig's defaults."""
        n, d = int(c["num_hidden_layers"]), int(c["hidden_size"])
        require(c, "hidden_act", lambda v: v in (None, "silu"), "silu (SwiGLU MLP and the SiLU after the conv)")
        require(c, "mamba_conv_bias", lambda v: v in (None, True), "mamba_conv_bias=true (the SSD conv has a bias)")
        require(c, "mamba_proj_bias", lambda v: not v, "mamba_proj_bias=false (no projection biases)")
        require(c, "mlp_bias", lambda v: not v, "mlp_bias=false")
        if "time_step_limit" in c:
            require(c, "time_step_limit", no_time_step_limit, "time_step_limit (0, inf) or left out (dt is not clamped)")
        indices = set(c.get("attn_layer_indices") or ())
        require(c, "attn_layer_indices", lambda v: indices <= set(range(n)), f"layer indices in [0, {n})")
        names = ["attn" if i in indices else "ssd" for i in range(n)]
        mixers = {}
        if "ssd" in names:
            expand = require(c, "mamba_expand", lambda v: v is None or int(v) == v, "an integer mamba_expand") or 2
            n_heads = int(c.get("mamba_n_heads") or 128)
            head = c.get("mamba_d_head", "auto")
            require(c, "mamba_d_conv", lambda v: v is None or v >= 2, "mamba_d_conv >= 2")
            mixers["ssd"] = SSDConfig(
                expand=int(expand), head_dim=int(expand) * d // n_heads if head in (None, "auto") else int(head),
                state_dim=int(c.get("mamba_d_state") or 256), n_groups=int(c.get("mamba_n_groups") or 1),
                conv_size=int(c.get("mamba_d_conv") or 4))
        if "attn" in names:
            require(c, "attention_bias", lambda v: not v, "attention_bias=false")
            rope = c.get("rope_parameters") or {}
            if rope.get("partial_rotary_factor", 0.5) != 1.0:
                require(c, "rope_parameters", lambda v: False,
                        "rope_parameters.partial_rotary_factor=1.0 (Bamba's default 0.5 rotates half of each head)")
            heads = int(c.get("num_attention_heads") or 32)
            head_dim = int(c.get("head_dim") or d // heads)
            mixers["attn"] = AttentionConfig(
                # absent: BambaConfig's default 8; null: num_attention_heads
                num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads", 8) or heads),
                head_dim=None if head_dim * heads == d else head_dim, rope_theta=rope_theta(c))
        return ModelConfig(
            vocab_size=int(c["vocab_size"]), d_model=d, num_layers=n, pattern=period(names), mixers=mixers,
            mlp_hidden=int(c["intermediate_size"]), norm_eps=float(c.get("rms_norm_eps") or 1e-5),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)), z_loss=float(c.get("z_loss_coefficient") or 0.0),
            init_std=float(c.get("initializer_range", 0.02)))


def no_time_step_limit(v) -> bool:
    """Whether a time_step_limit is (0, inf); save_pretrained writes inf as {"__float__": "Infinity"}."""
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        return False
    hi = v[1].get("__float__") if isinstance(v[1], dict) else v[1]
    try:
        return float(v[0]) == 0.0 and math.isinf(float(hi)) and float(hi) > 0
    except (TypeError, ValueError):
        return False

"""Qwen3-Next: Gated DeltaNet (layers/linear_attention/gdn.py) and gated full attention
(layers/attention, qk_norm, gate="elementwise") in any order, dense SwiGLU MLPs.

transformers' Qwen3NextForCausalLM builds a dense MLP in every layer listed in `mlp_only_layers`
(all of them here; `num_experts=0` as well), so no MoE module exists. `layer_types` says per layer
"linear_attention" (our gdn) or "full_attention" (our attention). Its RMSNorms are zero-centred,
x * rsqrt(mean x^2 + eps) * (1 + w), so our scales s are stored as s - 1 (`offset`), except the
GDN gated norm, which multiplies by w itself. Tensors (T: transposed Dense kernel):

    layers.i.mixer_norm / mlp_norm      model.layers.i.input_layernorm / post_attention_layernorm  (s - 1)
    layers.i.mlp.{gate,up,down}         model.layers.i.mlp.{gate,up,down}_proj.weight               (T)
    gdn:  mixer.{q,k,v,g}_proj          linear_attn.in_proj_qkvz.weight  per head [q_h, k_h, v_h, z_h] (T)
          mixer.{b,a}_proj              linear_attn.in_proj_ba.weight    per head [b_h, a_h]           (T)
          mixer.conv [W, C]             linear_attn.conv1d.weight [C, 1, W]   (taps reversed, C = q|k|v)
          mixer.A_log, dt_bias          linear_attn.A_log, dt_bias
          mixer.o_norm                  linear_attn.norm.weight                                     (as is)
          mixer.o_proj                  linear_attn.out_proj.weight                                 (T)
    attn: mixer.{q,gate}_proj           self_attn.q_proj.weight          per head [q_h, gate_h]      (T)
          mixer.{k,v,o}_proj            self_attn.{k,v,o}_proj.weight                               (T)
          mixer.{q,k}_norm              self_attn.{q,k}_norm.weight                                 (s - 1)
    embed / final_norm / head           model.embed_tokens / model.norm (s - 1) / lm_head (untied only, T)

What must hold: every GDN layer with use_gate (HF always has z), allow_neg_eigval off (beta =
sigmoid), a conv (HF always convolves q|k|v then SiLU) and one H, K, V, conv width; at least
one attention layer (transformers 5 builds its causal mask, cached or not, from one); every
attention layer with qk_norm (HF always normalises q and k), the elementwise output gate
o * sigmoid(x W_g), full causal softmax attention with nothing else, and one H, KV, D, theta;
q, k and v heads all equal (linear_num_value_heads = linear_num_key_heads); all of RoPE rotated
(partial_rotary_factor must be written: transformers' default is 0.25). Both sides: L2-normalised
q/k (eps 1e-6) scaled by K^-1/2, decay -exp(A_log) softplus(a + dt_bias), rotate-half RoPE, every
norm's eps rms_norm_eps.
"""
from __future__ import annotations

from layers.attention.config import AttentionConfig
from layers.config import ConfigError
from layers.linear_attention.config import GDNConfig, qkv_widths
from models.config import ModelConfig
from train.hf.arch import (Arch, is_kind, common_config, embedding_maps, layers_of, model_problems, one_value, period, require,
                           rope_theta, swiglu_maps, unmapped_options)
from train.hf.tensors import TensorMap, conv, fused, linear, offset, same

NAME = "Qwen3-Next"
LINEAR, FULL = "linear_attention", "full_attention"
MAPPED_ATTENTION_FIELDS = frozenset({"num_heads", "num_kv_heads", "head_dim", "qk_norm", "rope_theta", "gate"})
MAPPED_GDN_FIELDS = frozenset({"num_heads", "expand_k", "expand_v", "conv_size"})
WHY_NOT = {
    "window": "full causal attention only (no sliding-window layer type)",
    "logit_softcap": "no soft-capping of attention logits",
    "conv_size": "no convolution on attention q/k/v",
    "sinks": "no attention sinks",
    "score": "softmax attention only",
    "head_windows": "one (full) window for every head",
    "knock_heads": "no knocking-heads mixing",
    "use_gate": "its gated DeltaNet always has the output gate z (set use_gate=true)",
    "allow_neg_eigval": "beta = sigmoid(b) in (0, 1) only",
}
# transformers' Qwen3NextConfig defaults, for keys a config.json may leave out
HF_DEFAULTS = {"head_dim": 256, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
               "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
               "num_experts": 512, "decoder_sparse_step": 1, "num_key_value_heads": 2, "rms_norm_eps": 1e-6}


def _split(mc: ModelConfig):
    """(gdn layers, attention layers, problems) of `mc`, one problem per layer or option."""
    problems = model_problems(mc, NAME)
    gdn, attn = [], []
    for i, name, c in layers_of(mc):
        where = f"layer {i} ({name}): "
        if is_kind(c, GDNConfig):
            problems += unmapped_options(where, c, MAPPED_GDN_FIELDS, NAME, WHY_NOT)
            if c.conv_size == 0:
                problems.append(f"{where}conv_size=0; {NAME}: its gated DeltaNet always has the short conv + SiLU "
                                "on q/k/v (set conv_size >= 2)")
            gdn.append((i, name, c))
        elif is_kind(c, AttentionConfig):
            problems += unmapped_options(where, c, MAPPED_ATTENTION_FIELDS, NAME, WHY_NOT)
            if not c.qk_norm:
                problems.append(f"{where}qk_norm=False; {NAME}: its attention always has q/k RMSNorm "
                                f"(set model.mixers.{name}.qk_norm=true)")
            if c.gate != "elementwise":
                problems.append(f"{where}gate={c.gate!r}; {NAME}: its attention output gate is elementwise "
                                f"(set model.mixers.{name}.gate=elementwise)")
            attn.append((i, name, c))
        else:
            problems.append(f"{where}mixer kind {c.kind!r}; {NAME}: gdn (linear_attention) or "
                            "attention (full_attention) layers only")
    return gdn, attn, problems


class Qwen3Next(Arch):
    name = NAME
    model_types = ("qwen3_next",)
    kinds = frozenset({"gdn", "attention"})

    def problems(self, mc: ModelConfig) -> list[str]:
        gdn, attn, problems = _split(mc)
        d = mc.d_model
        if gdn:
            one_value(gdn, "gdn (num_heads, key dim, value dim, conv_size)",
                      lambda c: (c.num_heads, *qkv_widths(c, d), c.conv_size), problems)
        if not attn:
            problems.append(f"no attention layer; {NAME}: transformers runs its decode cache only with at least "
                            "one full_attention layer (it builds the causal mask from one)")
        else:
            one_value(attn, "attention (num_heads, num_kv_heads, head dim)",
                      lambda c: (c.num_heads, c.kv_heads, c.dim_per_head(d)), problems)
            one_value(attn, "rope_theta", lambda c: c.rope_theta, problems)
        return problems

    def config(self, cfg) -> dict:
        """config.json (keys of transformers 5; rope_theta and partial_rotary_factor also at the
        top level, where transformers 4 reads them)."""
        m = cfg.model
        layers = layers_of(m)
        g = next((c for _, _, c in layers if is_kind(c, GDNConfig)),
                 GDNConfig(num_heads=1, expand_k=1.0, expand_v=1.0))  # no gdn layer: written, never read
        a = next(c for _, _, c in layers if is_kind(c, AttentionConfig))
        dk, dv = qkv_widths(g, m.d_model)
        theta = float(a.rope_theta)
        return {
            **common_config(cfg, "Qwen3NextForCausalLM", "qwen3_next"),
            "layer_types": [LINEAR if is_kind(c, GDNConfig) else FULL for _, _, c in layers],
            "num_attention_heads": a.num_heads, "num_key_value_heads": a.kv_heads,
            "head_dim": a.dim_per_head(m.d_model), "attention_bias": False, "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 1.0},
            "rope_theta": theta, "partial_rotary_factor": 1.0,
            "linear_num_key_heads": g.num_heads, "linear_num_value_heads": g.num_heads,
            "linear_key_head_dim": dk, "linear_value_head_dim": dv, "linear_conv_kernel_dim": g.conv_size,
            # dense MLP everywhere: no MoE block is built, the MoE keys are never read
            "num_experts": 0, "mlp_only_layers": list(range(m.num_layers)), "decoder_sparse_step": 1,
            "num_experts_per_tok": 1, "moe_intermediate_size": m.hidden,
            "shared_expert_intermediate_size": m.hidden, "norm_topk_prob": True,
            "output_router_logits": False, "router_aux_loss_coef": 0.0,
        }

    def tensors(self, mc: ModelConfig) -> list[TensorMap]:
        out, d = [], mc.d_model
        for i, _, c in layers_of(mc):
            hf, ours = f"model.layers.{i}", f"layers.{i}.mixer"
            out.append(offset(f"{hf}.input_layernorm.weight", f"layers.{i}.mixer_norm.scale", -1.0))
            if is_kind(c, GDNConfig):
                dk, dv = qkv_widths(c, d)
                la = f"{hf}.linear_attn"
                out += [fused(f"{la}.in_proj_qkvz.weight", [f"{ours}.{n}_proj.kernel" for n in "qkvg"],
                              [dk, dk, dv, dv], groups=c.num_heads),
                        fused(f"{la}.in_proj_ba.weight", [f"{ours}.b_proj.kernel", f"{ours}.a_proj.kernel"],
                              [1, 1], groups=c.num_heads),
                        conv(f"{la}.conv1d.weight", f"{ours}.conv.kernel"),
                        same(f"{la}.A_log", f"{ours}.A_log"), same(f"{la}.dt_bias", f"{ours}.dt_bias"),
                        same(f"{la}.norm.weight", f"{ours}.o_norm.scale"),
                        linear(f"{la}.out_proj.weight", f"{ours}.o_proj.kernel")]
            else:
                hd, sa = c.dim_per_head(d), f"{hf}.self_attn"
                out += [fused(f"{sa}.q_proj.weight", [f"{ours}.q_proj.kernel", f"{ours}.gate_proj.kernel"],
                              [hd, hd], groups=c.num_heads),
                        *(linear(f"{sa}.{n}_proj.weight", f"{ours}.{n}_proj.kernel") for n in "kvo"),
                        *(offset(f"{sa}.{n}_norm.weight", f"{ours}.{n}_norm.scale", -1.0) for n in "qk")]
            out += [offset(f"{hf}.post_attention_layernorm.weight", f"layers.{i}.mlp_norm.scale", -1.0),
                    *swiglu_maps(i, f"{hf}.mlp")]
        return out + embedding_maps(mc, "model.embed_tokens.weight", "model.norm.weight",
                                    norm_map=lambda hf, ours: offset(hf, ours, -1.0))

    def model_config(self, c: dict) -> ModelConfig:
        """Linear-attention layers become mixer "gdn" and full-attention ones "attn"; the pattern
        is the shortest period of the layer list."""
        def get(k):  # the value transformers uses: written, else its default
            return c[k] if c.get(k) is not None else HF_DEFAULTS.get(k)
        n, d = int(c["num_hidden_layers"]), int(c["hidden_size"])
        types = c.get("layer_types") or [LINEAR if (i + 1) % c.get("full_attention_interval", 4) else FULL
                                         for i in range(n)]
        if len(types) != n or set(types) - {LINEAR, FULL}:
            raise ConfigError(f"config.json: layer_types must list {n} of {LINEAR!r} / {FULL!r}, got {types}")
        only, step = set(c.get("mlp_only_layers") or []), int(get("decoder_sparse_step"))
        moe = [i for i in range(n) if i not in only and (i + 1) % step == 0]
        require(c, "num_experts", lambda v: not moe or int(get("num_experts")) == 0,
                f"num_experts=0 or every MoE layer ({moe}) in mlp_only_layers: a dense MLP in every layer "
                "(MoE layers cannot be imported)")
        require(c, "hidden_act", lambda v: v in (None, "silu"), "silu (SwiGLU MLP and SiLU after the GDN conv)")
        require(c, "attention_bias", lambda v: not v, "attention_bias=false")
        params = c.get("rope_parameters") or {}
        prf = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.25))
        require({"partial_rotary_factor": prf}, "partial_rotary_factor", lambda v: float(v) == 1.0,
                "partial_rotary_factor=1.0 in rope_parameters (RoPE on all head dims; transformers' "
                "default is 0.25)")
        heads = int(get("linear_num_key_heads"))
        require(c, "linear_num_value_heads", lambda v: int(get("linear_num_value_heads")) == heads,
                "linear_num_value_heads = linear_num_key_heads (one head count for GDN q, k and v)")
        mixers = {}
        if LINEAR in types:
            mixers["gdn"] = GDNConfig(num_heads=heads, expand_k=heads * int(get("linear_key_head_dim")) / d,
                                      expand_v=heads * int(get("linear_value_head_dim")) / d,
                                      conv_size=int(get("linear_conv_kernel_dim")))
        if FULL in types:
            ah, hd = int(c["num_attention_heads"]), int(get("head_dim"))
            mixers["attn"] = AttentionConfig(num_heads=ah, num_kv_heads=int(get("num_key_value_heads")),
                                             head_dim=None if hd * ah == d else hd, qk_norm=True,
                                             rope_theta=rope_theta(c), gate="elementwise")
        return ModelConfig(
            vocab_size=int(c["vocab_size"]), d_model=d, num_layers=n,
            pattern=period(["gdn" if t == LINEAR else "attn" for t in types]), mixers=mixers,
            mlp_hidden=int(c["intermediate_size"]), norm_eps=float(get("rms_norm_eps")),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)), init_std=float(c.get("initializer_range", 0.02)))

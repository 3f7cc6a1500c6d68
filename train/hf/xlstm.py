"""xLSTM (transformers' xLSTMForCausalLM, the xLSTM 7B layout): a model whose every layer is mLSTM
(layers/linear_attention/mlstm.py) with the exponential input gate and the multi-head LayerNorm.

    layers.i.mixer_norm.scale        backbone.blocks.i.norm_mlstm.weight
    layers.i.mixer.{q,k,v}_proj      backbone.blocks.i.mlstm_layer.{q,k,v}.weight          (T)
    layers.i.mixer.og_proj           backbone.blocks.i.mlstm_layer.ogate_preact.weight     (T)
    layers.i.mixer.ig_proj / ig_bias backbone.blocks.i.mlstm_layer.igate_preact.weight (T) / .bias
    layers.i.mixer.fg_proj / fg_bias backbone.blocks.i.mlstm_layer.fgate_preact.weight (T) / .bias
    layers.i.mixer.o_norm.scale      backbone.blocks.i.mlstm_layer.multihead_norm.weight   [H * V]
    layers.i.mixer.o_proj            backbone.blocks.i.mlstm_layer.out_proj.weight         (T)
    layers.i.mlp_norm.scale          backbone.blocks.i.norm_ffn.weight
    layers.i.mlp.{gate,up,down}      backbone.blocks.i.ffn.proj_{up_gate,up,down}.weight   (T)
    embed.embedding                  backbone.embeddings.weight
    final_norm.scale                 backbone.out_norm.weight
    head.kernel                      lm_head.weight                                        (T)

What must hold: mlstm in every layer with one set of options; input_gate="exp" (transformers
stabilises the exponential gate with a running max, which computes our unstabilised cell exactly
but for its eps, scaled by e^{m_t}: see mlstm.py); output_norm="layernorm"; no convolution;
untied embeddings (transformers' xLSTM never ties its head); d_model * expand_qk and
d_model * expand_v multiples of 64 (its decode cache rounds the head widths up to that).
transformers caps the output logits at `output_logit_soft_cap` (30 in xLSTM 7B); Chimera has no
cap, so the export writes 1e9, where cap * tanh(x / cap) = x to float32 rounding. The FFN width
is written as ffn_proj_factor = F / d rounded up to a multiple of F, which gives F exactly.
transformers runs this on CPU with its native torch kernels (`mode="inference"`).
"""
from __future__ import annotations

from layers.linear_attention.config import MLSTMConfig
from models.config import ModelConfig
from train.hf.arch import Arch, common_config, layers_of, layers_of_kind, model_problems, one_value, require
from train.hf.tensors import TensorMap, linear, same

NAME = "xLSTM"
MAPPED_MLSTM_FIELDS = frozenset({"num_heads", "expand_qk", "expand_v", "gate_soft_cap", "input_gate", "output_norm"})
WHY_NOT = {"conv_size": "no convolution in the mLSTM layer"}
NO_CAP = 1e9  # output_logit_soft_cap that leaves logits as they are (transformers requires a float)
CACHE_MULTIPLE = 64


class XLSTM(Arch):
    name = NAME
    model_types = ("xlstm",)
    kinds = frozenset({"mlstm"})

    def problems(self, mc: ModelConfig) -> list[str]:
        problems = model_problems(mc, NAME)
        if mc.tie_embeddings:
            problems.append(f"model.tie_embeddings=True; {NAME}: its lm_head is never tied, set "
                            "model.tie_embeddings=false")
        cells, other = layers_of_kind(mc, MLSTMConfig, NAME, "mlstm", MAPPED_MLSTM_FIELDS, WHY_NOT)
        problems += other
        for i, name, c in cells:
            where = f"layer {i} ({name}): "
            if c.input_gate != "exp":
                problems.append(f"{where}input_gate={c.input_gate!r}; {NAME}: the exponential input gate "
                                f"(model.mixers.{name}.input_gate=exp)")
            if c.output_norm != "layernorm":
                problems.append(f"{where}output_norm={c.output_norm!r}; {NAME}: a multi-head LayerNorm "
                                f"(model.mixers.{name}.output_norm=layernorm)")
            if c.gate_soft_cap is None:
                problems.append(f"{where}gate_soft_cap=None; {NAME}: gates are always soft-capped")
            for field in ("expand_qk", "expand_v"):
                width = mc.d_model * getattr(c, field)
                if int(width) != round(width) or round(width) % CACHE_MULTIPLE:
                    # transformers truncates d * factor to an int; its cache rounds it up to 64
                    problems.append(f"{where}d_model * {field} = {width!r}; {NAME}: a whole multiple of "
                                    f"{CACHE_MULTIPLE} (its layer truncates the width, its decode cache rounds "
                                    "it up to that)")
        one_value(cells, "mlstm options", lambda c: (c.num_heads, c.expand_qk, c.expand_v, c.gate_soft_cap), problems)
        return problems

    def config(self, cfg) -> dict:
        m = cfg.model
        c = m.mixer(m.layer_names()[0])
        out = common_config(cfg, "xLSTMForCausalLM", "xlstm")
        for key in ("intermediate_size", "hidden_act", "rms_norm_eps"):  # xLSTM's own keys say these
            del out[key]
        return {
            **out, "embedding_dim": m.d_model,
            "num_blocks": m.num_layers, "num_heads": c.num_heads,
            "qk_dim_factor": c.expand_qk, "v_dim_factor": c.expand_v,
            "ffn_proj_factor": m.hidden / m.d_model, "ffn_round_up_to_multiple_of": m.hidden,
            "use_bias": False, "add_out_norm": True, "norm_eps": m.norm_eps, "eps": 1e-6,
            "gate_soft_cap": float(c.gate_soft_cap), "output_logit_soft_cap": NO_CAP,
            "tie_word_embeddings": False, "weight_mode": "single", "mode": "inference",
            "chunkwise_kernel": "chunkwise--native_autograd", "sequence_kernel": "native_sequence__native",
            "step_kernel": "native", "chunk_size": 64, "autocast_kernel_dtype": "float32",
            "inference_state_dtype": "float32",
        }

    def tensors(self, mc: ModelConfig) -> list[TensorMap]:
        out = []
        for i, _, _ in layers_of(mc):
            hf, ours = f"backbone.blocks.{i}", f"layers.{i}"
            cell = f"{hf}.mlstm_layer"
            out += [same(f"{hf}.norm_mlstm.weight", f"{ours}.mixer_norm.scale"),
                    *(linear(f"{cell}.{n}.weight", f"{ours}.mixer.{n}_proj.kernel") for n in "qkv"),
                    linear(f"{cell}.ogate_preact.weight", f"{ours}.mixer.og_proj.kernel"),
                    linear(f"{cell}.igate_preact.weight", f"{ours}.mixer.ig_proj.kernel"),
                    same(f"{cell}.igate_preact.bias", f"{ours}.mixer.ig_bias"),
                    linear(f"{cell}.fgate_preact.weight", f"{ours}.mixer.fg_proj.kernel"),
                    same(f"{cell}.fgate_preact.bias", f"{ours}.mixer.fg_bias"),
                    same(f"{cell}.multihead_norm.weight", f"{ours}.mixer.o_norm.scale"),
                    linear(f"{cell}.out_proj.weight", f"{ours}.mixer.o_proj.kernel"),
                    same(f"{hf}.norm_ffn.weight", f"{ours}.mlp_norm.scale"),
                    linear(f"{hf}.ffn.proj_up_gate.weight", f"{ours}.mlp.gate.kernel"),
                    linear(f"{hf}.ffn.proj_up.weight", f"{ours}.mlp.up.kernel"),
                    linear(f"{hf}.ffn.proj_down.weight", f"{ours}.mlp.down.kernel")]
        return out + [same("backbone.embeddings.weight", "embed.embedding"),
                      same("backbone.out_norm.weight", "final_norm.scale"),
                      linear("lm_head.weight", "head.kernel")]

    def model_config(self, c: dict) -> ModelConfig:
        require(c, "use_bias", lambda v: not v, "use_bias=false (no biases on projections and norms)")
        require(c, "weight_mode", lambda v: v in (None, "single"), "weight_mode='single'")
        require(c, "output_logit_soft_cap", lambda v: v is not None and float(v) >= NO_CAP,
                f"no logit cap (output_logit_soft_cap >= {NO_CAP:g}); Chimera does not cap logits")
        require(c, "eps", lambda v: v is None or float(v) == 1e-6, "eps=1e-6 (the mLSTM normaliser's)")
        require(c, "add_out_norm", lambda v: v in (None, True), "add_out_norm=true")
        d = int(c["hidden_size"])
        require(c, "embedding_dim", lambda v: v in (None, d), "embedding_dim = hidden_size")
        n = int(c.get("num_blocks") or c["num_hidden_layers"])
        mult = int(c.get("ffn_round_up_to_multiple_of", 64))
        raw = d * float(c.get("ffn_proj_factor", 2.667))
        hidden = int(((raw + mult - 1) // mult) * mult)  # transformers' round_up_to_next_multiple_of
        cell = MLSTMConfig(num_heads=int(c["num_heads"]), expand_qk=float(c.get("qk_dim_factor", 0.5)),
                           expand_v=float(c.get("v_dim_factor", 1.0)), input_gate="exp", output_norm="layernorm",
                           gate_soft_cap=float(c.get("gate_soft_cap", 15.0)))
        return ModelConfig(vocab_size=int(c["vocab_size"]), d_model=d, num_layers=n, pattern=("mlstm",),
                           mixers={"mlstm": cell}, mlp_hidden=hidden, norm_eps=float(c.get("norm_eps", 1e-6)),
                           tie_embeddings=False)

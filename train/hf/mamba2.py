"""Mamba2: every layer SSD (layers/linear_attention/ssd.py) and no MLP (`model.mlp_hidden=0`):
x + mixer(RMSNorm(x)) per block, as mamba_ssm's Mamba2 language model.

    layers.i.mixer_norm.scale        backbone.layers.i.norm.weight
    layers.i.mixer.*                 backbone.layers.i.mixer.*   (as Bamba's `mamba`: bamba.ssd_maps)
    embed.embedding                  backbone.embeddings.weight
    final_norm.scale                 backbone.norm_f.weight
    head.kernel                      lm_head.weight   (untied only)   (T)

What must hold: one SSD config for every layer (a conv, with its bias, as ours always has);
model.mlp_hidden=0. transformers' Mamba2 uses `layer_norm_epsilon` for the block norms and the
gated norm alike, as our norm_eps; dt is not clamped (time_step_limit (0, inf)).
"""
from __future__ import annotations

from layers.linear_attention.config import SSDConfig
from models.config import ModelConfig
from train.hf.arch import Arch, common_config, layers_of, layers_of_kind, model_problems, one_value, require
from train.hf.bamba import MAPPED_SSD_FIELDS, SSD_SHARED, no_time_step_limit, ssd_maps
from train.hf.tensors import TensorMap, linear, same

NAME = "Mamba2"


class Mamba2(Arch):
    name = NAME
    model_types = ("mamba2",)
    kinds = frozenset({"ssd"})

    def problems(self, mc: ModelConfig) -> list[str]:
        ssd, problems = layers_of_kind(mc, SSDConfig, NAME, "ssd", MAPPED_SSD_FIELDS, {})
        problems = model_problems(mc, NAME, mlp=False) + problems
        problems += [f"layer {i} ({name}): conv_size=0; {NAME}: the SSD conv is always on (conv_size >= 2)"
                     for i, name, c in ssd if c.conv_size == 0]
        one_value(ssd, "ssd (" + ", ".join(SSD_SHARED) + ")", lambda c: tuple(getattr(c, f) for f in SSD_SHARED),
                  problems)
        return problems

    def config(self, cfg) -> dict:
        m = cfg.model
        s = m.mixer(m.layer_names()[0])
        out = common_config(cfg, "Mamba2ForCausalLM", "mamba2")
        for key in ("intermediate_size", "rms_norm_eps"):  # no MLP; its norms' eps is layer_norm_epsilon
            del out[key]
        return {
            **out, "layer_norm_epsilon": m.norm_eps, "num_heads": s.num_heads(m.d_model), "head_dim": s.head_dim,
            "expand": s.expand, "state_size": s.state_dim, "n_groups": s.n_groups, "conv_kernel": s.conv_size,
            "use_bias": False, "use_conv_bias": True, "residual_in_fp32": True, "rescale_prenorm_residual": False,
            "chunk_size": 256,  # any chunk size computes the same function; time_step_limit stays (0, inf)
        }

    def tensors(self, mc: ModelConfig) -> list[TensorMap]:
        out = []
        for i, _, c in layers_of(mc):
            hf = f"backbone.layers.{i}"
            out += [same(f"{hf}.norm.weight", f"layers.{i}.mixer_norm.scale"),
                    *ssd_maps(f"{hf}.mixer", f"layers.{i}.mixer", c, mc.d_model)]
        out += [same("backbone.embeddings.weight", "embed.embedding"), same("backbone.norm_f.weight", "final_norm.scale")]
        return out + ([] if mc.tie_embeddings else [linear("lm_head.weight", "head.kernel")])

    def model_config(self, c: dict) -> ModelConfig:
        """Missing keys take Mamba2Config's defaults."""
        require(c, "hidden_act", lambda v: v in (None, "silu"), "silu (the SiLU after the conv)")
        require(c, "use_bias", lambda v: not v, "use_bias=false (no projection biases)")
        require(c, "use_conv_bias", lambda v: v in (None, True), "use_conv_bias=true (the SSD conv has a bias)")
        require(c, "conv_kernel", lambda v: v is None or v >= 2, "conv_kernel >= 2")
        if "time_step_limit" in c:
            require(c, "time_step_limit", no_time_step_limit, "time_step_limit (0, inf) or left out (dt is not clamped)")
        d, expand = int(c["hidden_size"]), c.get("expand") or 2
        require(c, "expand", lambda v: v is None or int(v) == v, "an integer expand")
        heads, head_dim = int(c.get("num_heads") or 128), int(c.get("head_dim") or 64)
        require(c, "num_heads", lambda v: heads * head_dim == int(expand) * d,
                f"num_heads * head_dim = expand * hidden_size ({int(expand) * d})")
        ssd = SSDConfig(expand=int(expand), head_dim=head_dim, state_dim=int(c.get("state_size") or 128),
                        n_groups=int(c.get("n_groups") or 8), conv_size=int(c.get("conv_kernel") or 4))
        return ModelConfig(vocab_size=int(c["vocab_size"]), d_model=d, num_layers=int(c["num_hidden_layers"]),
                           pattern=("ssd",), mixers={"ssd": ssd}, mlp_hidden=0,
                           norm_eps=float(c.get("layer_norm_epsilon") or 1e-5),
                           tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                           init_std=float(c.get("initializer_range", 0.1)))


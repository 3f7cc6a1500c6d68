"""What an exportable Hugging Face architecture provides, and the checks they share.

Each module of this package (llama.py, gpt_oss.py, deepseek_v3.py, xlstm.py, qwen3_next.py, bamba.py)
defines one `Arch`: which Chimera models it holds exactly (`problems` is empty), the config.json
that makes transformers compute our function, the tensor mapping (train/hf/tensors.py) and the
reverse: a ModelConfig from a config.json it can represent. train/hf/__init__.py picks the arch
and does the export and import around them.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

from layers.config import ConfigError
from models.config import ModelConfig
from train.hf.tensors import TensorMap, linear, same

# ModelConfig fields the architectures below hold or that do not change the function computed;
# any other field must be at its default, whatever fields are added later.
MAPPED_MODEL_FIELDS = frozenset({
    "vocab_size", "d_model", "num_layers", "pattern", "mixers", "mlp_hidden", "norm_eps", "tie_embeddings",
    "init_std",  # initializer_range: initialisation only
    "z_loss",    # a training loss term, not part of the forward pass
    "scan",      # param layout only: export writes one tensor per layer either way
})
# Why a Block option cannot be exported, for the message.
MODEL_WHY_NOT = {
    "post_norm": "no norm on the residual branches' outputs",
    "layer_scale": "no LayerScale on the residual branches",
}


# Mixer fields that set initial values only: they never change the function of a checkpoint.
INIT_ONLY_FIELDS = frozenset({"dt_min", "dt_max", "dt_init_floor", "a_init_min", "a_init_max",
                              "igate_bias_init", "fgate_bias_init_min", "fgate_bias_init_max"})


def is_kind(c, cls) -> bool:
    """Whether mixer config `c` is of `cls`'s kind; by kind as well as class, since a future
    mixer may extend a config class and compute something else."""
    return c.kind == cls.kind and isinstance(c, cls)


class Arch:
    """One HF architecture (or family of close ones). Subclasses set the class attributes and
    implement the four methods."""
    name: str = ""                        # for messages: "Qwen3-Next"
    model_types: tuple[str, ...] = ()     # config.json model_type values `model_config` reads
    kinds: frozenset[str] = frozenset()   # the mixer kinds it can hold (to rank near misses)

    def problems(self, mc: ModelConfig) -> list[str]:
        """Why `mc` cannot be exported exactly to this architecture: one line per layer or
        option, [] when it can."""
        raise NotImplementedError

    def config(self, cfg) -> dict:
        """config.json for the model of `cfg` (a Config), called only when problems() is []."""
        raise NotImplementedError

    def tensors(self, mc: ModelConfig) -> list[TensorMap]:
        """Every HF tensor of the model, each from its Chimera params; together they must use
        every Chimera param exactly once (train/hf/__init__.py checks)."""
        raise NotImplementedError

    def model_config(self, c: dict) -> ModelConfig:
        """The ModelConfig of a config.json of one of `model_types`; ConfigError for what
        Chimera does not compute."""
        raise NotImplementedError

    def known_unused(self, name: str, reader, mc: ModelConfig) -> str | None:
        """Why an HF tensor that maps to no param may be dropped, or None if it may not."""
        return "rotary buffer" if name.endswith("rotary_emb.inv_freq") else None


# ----------------------------------------------------------------------------- shared checks

def non_default_fields(cfg, mapped: Iterable[str]) -> list[tuple[str, object]]:
    """(name, value) of each dataclass field of `cfg` not in `mapped` whose value is not its
    default (a field without a default always counts: nothing says what it would map to)."""
    out = []
    for f in dataclasses.fields(cfg):
        if f.name in mapped:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        value = getattr(cfg, f.name)
        if default is dataclasses.MISSING or value != default:
            out.append((f.name, value))
    return out


def unmapped_options(where: str, cfg, mapped: Iterable[str], arch: str, why: dict[str, str]) -> list[str]:
    """One problem per option of `cfg` outside `mapped` (and INIT_ONLY_FIELDS) that is not at its
    default."""
    return [f"{where}{f}={v!r}; {arch}: {why.get(f, 'no such option (the export does not map it)')}"
            for f, v in non_default_fields(cfg, set(mapped) | INIT_ONLY_FIELDS)]


def model_problems(mc: ModelConfig, arch: str, mapped=MAPPED_MODEL_FIELDS, mlp: bool = True) -> list[str]:
    """Block / model options outside what `arch` holds; `mlp`: whether its blocks have an MLP
    (mlp_hidden > 0) or none (mlp_hidden = 0)."""
    problems = unmapped_options("model.", mc, mapped, arch, MODEL_WHY_NOT)
    if mlp and mc.hidden == 0:
        problems.append(f"model.mlp_hidden=0; {arch}: an MLP in every block")
    elif not mlp and mc.hidden:
        problems.append(f"model.mlp_hidden={mc.hidden}; {arch}: no MLP in its blocks (model.mlp_hidden=0)")
    return problems


def layers_of_kind(mc: ModelConfig, cls, arch: str, what: str, mapped: Iterable[str],
                   why: dict[str, str]) -> tuple[list[tuple[int, str, object]], list[str]]:
    """For an architecture with one mixer kind in every layer: the (index, name, cfg) of the
    layers of `cls`'s kind, and one problem per layer of another kind ("is not {what}") and per
    option of those layers outside `mapped`."""
    layers, problems = [], []
    for i, name, c in layers_of(mc):
        if not is_kind(c, cls):
            problems.append(f"layer {i} ({name}): mixer kind {c.kind!r} is not {what}; {arch}: {what} in every layer")
            continue
        problems += unmapped_options(f"layer {i} ({name}): ", c, mapped, arch, why)
        layers.append((i, name, c))
    return layers, problems


def one_value(layers: list[tuple[int, str, object]], what: str, get, problems: list[str]):
    """The value `get(cfg)` shared by all (index, name, cfg) layers, or a problem naming them."""
    groups: dict = {}
    for i, name, c in layers:
        groups.setdefault(get(c), []).append(f"{i} ({name})")
    if len(groups) > 1:
        listing = "; ".join(f"{v!r} in layers {', '.join(ls)}" for v, ls in groups.items())
        problems.append(f"{what} differs across layers ({listing}); the HF config holds one value")
    return next(iter(groups)) if groups else None


def layers_of(mc: ModelConfig) -> list[tuple[int, str, object]]:
    """(layer index, mixer name, mixer config) for every layer."""
    return [(i, name, mc.mixer(name)) for i, name in enumerate(mc.layer_names())]


def period(names: list[str]) -> tuple[str, ...]:
    """The shortest pattern whose repetition (plus a prefix as the remainder) gives `names`."""
    for p in range(1, len(names) + 1):
        if all(names[i] == names[i % p] for i in range(len(names))):
            return tuple(names[:p])
    raise AssertionError("unreachable")


def require(c: dict, key: str, ok, accepted: str, path: str = "config.json"):
    """c[key] if ok(value), else ConfigError naming the key and what is accepted."""
    v = c.get(key)
    if not ok(v):
        raise ConfigError(f"{path}: {key}={v!r} cannot be imported; Chimera needs {accepted}")
    return v


def rope_theta(c: dict) -> float:
    """RoPE theta of plain (unscaled) RoPE over every head dim; scaled variants (llama3, yarn, ...) are refused."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError("rope_parameters per layer type are not supported; one RoPE for all layers")
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"rope type {kind!r} (rope scaling) is not supported; Chimera's RoPE is plain")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor={c['partial_rotary_factor']} is not supported "
                          "(Chimera rotates all head dims)")
    return float(params.get("rope_theta", c.get("rope_theta", 10_000.0)))


def common_config(cfg, architecture: str, model_type: str) -> dict:
    """The config.json keys every export writes the same way (an arch adds its own after them)."""
    m = cfg.model
    return {
        "architectures": [architecture], "model_type": model_type,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.hidden,
        "num_hidden_layers": m.num_layers, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
        "max_position_embeddings": cfg.data.seq_len,  # the context trained at; RoPE itself has no limit
        "use_cache": True,
        # no special tokens: documents were separated by segment ids (and some defaults, e.g.
        # DeepseekV3's eos 1, would stop generation at an ordinary token)
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "dtype": "float32", "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------- shared tensors

def swiglu_maps(i: int, prefix: str) -> list[TensorMap]:
    """Our SwiGLU (gate, up, down) as `{prefix}.{gate,up,down}_proj.weight`."""
    return [linear(f"{prefix}.{n}_proj.weight", f"layers.{i}.mlp.{n}.kernel") for n in ("gate", "up", "down")]


def embedding_maps(mc: ModelConfig, embed: str, final_norm: str, head: str = "lm_head.weight",
                   norm_map=same) -> list[TensorMap]:
    """Embedding, final norm (through `norm_map`) and, for untied models, the head."""
    out = [same(embed, "embed.embedding"), norm_map(final_norm, "final_norm.scale")]
    if not mc.tie_embeddings:
        out.append(linear(head, "head.kernel"))
    return out

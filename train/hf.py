"""Hugging Face (transformers) interchange: config.json and tensor names, out and in.

Export (`python -m train.export RUN --format hf`) picks the architecture that computes exactly
what the model computes:

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

Import (`model_config_from_hf`, `import_params`) reads llama, mistral, ministral, qwen2 and qwen3
config.json files and their safetensors (one file or sharded, any float dtype, cast to float32).
Every HF tensor must be used, except known ones: rotary `inv_freq` buffers, biases that are all
zero (Qwen2 always has q/k/v biases; nonzero ones are refused, the model has none) and a tied
`lm_head.weight` equal to the embedding.

Tokenizer files: a run with an HF tokenizer gets its tokenizer.json plus a tokenizer_config.json
(PreTrainedTokenizerFast). The byte tokenizer has no file format of its own in HF, so it is
written as an equivalent `tokenizers` byte-level BPE with no merges whose ids are the byte values
(encode(text) = its UTF-8 bytes). SentencePiece runs get their tokenizer.model copied (load it
with sentencepiece) and synthetic-task id tokenizers nothing HF can read. No BOS/EOS ids are
declared: the models were trained on documents separated by segment ids, not special tokens.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from train.config import AttentionConfig, Config, ConfigError, ModelConfig
from train.export import ParamRef, assign_params, param_refs, read_param, short_list, param_variables
from train.safetensors_io import SafetensorsReader, TensorOut

log = logging.getLogger("chimera.hf")

FULL, SLIDING = "full_attention", "sliding_attention"

# The fields the HF config holds (or that do not change the function a checkpoint computes);
# every other field must be at its default (hf_arch), whatever fields are added later.
MAPPED_ATTENTION_FIELDS = frozenset({"num_heads", "num_kv_heads", "head_dim", "qk_norm", "rope_theta", "window"})
MAPPED_MODEL_FIELDS = frozenset({
    "vocab_size", "d_model", "num_layers", "pattern", "mixers", "mlp_hidden", "norm_eps", "tie_embeddings",
    "init_std",  # initializer_range: initialisation only
    "z_loss",    # a training loss term, not part of the forward pass
    "scan",      # param layout only: export writes one tensor per layer either way
})
_ARCHS = "Llama, Qwen3 and Ministral"
# Why an unmapped option cannot be exported, where there is more to say than that it is not mapped.
_WHY_NOT = {
    "logit_softcap": "do not soft-cap attention logits",
    "conv_size": "have no convolution on q/k/v",
    "gate": "have no output gate on attention",
    "sinks": "have no attention sinks",
    "score": "have softmax attention only",
    "head_windows": "hold one window for every head of a layer",
    "post_norm": "have no norm on the residual branches' outputs",
    "layer_scale": "have no LayerScale on the residual branches",
}
IMPORTABLE = ("llama", "mistral", "ministral", "qwen2", "qwen3")

# Chimera name inside layer i -> (HF name inside model.layers.i, transposed)
_LAYER_NAMES = {
    "mixer_norm.scale": ("input_layernorm.weight", False),
    "mixer.q_proj.kernel": ("self_attn.q_proj.weight", True),
    "mixer.k_proj.kernel": ("self_attn.k_proj.weight", True),
    "mixer.v_proj.kernel": ("self_attn.v_proj.weight", True),
    "mixer.o_proj.kernel": ("self_attn.o_proj.weight", True),
    "mixer.q_norm.scale": ("self_attn.q_norm.weight", False),
    "mixer.k_norm.scale": ("self_attn.k_norm.weight", False),
    "mlp_norm.scale": ("post_attention_layernorm.weight", False),
    "mlp.gate.kernel": ("mlp.gate_proj.weight", True),
    "mlp.up.kernel": ("mlp.up_proj.weight", True),
    "mlp.down.kernel": ("mlp.down_proj.weight", True),
}
_TOP_NAMES = {
    "embed.embedding": ("model.embed_tokens.weight", False),
    "final_norm.scale": ("model.norm.weight", False),
    "head.kernel": ("lm_head.weight", True),
}


def hf_name(name: str) -> tuple[str, bool]:
    """(HF tensor name, whether the tensor is transposed) for a Chimera param name."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        inner, transposed = _LAYER_NAMES[parts[2]]
        return f"model.layers.{parts[1]}.{inner}", transposed
    raise ConfigError(f"param {name} has no Hugging Face counterpart")


# ----------------------------------------------------------------------------- export

@dataclasses.dataclass(frozen=True)
class HFArch:
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


def _one_value(attn, what: str, get, problems: list[str]):
    """The value `get(cfg)` shared by all attention layers, or a problem naming the layers."""
    groups: dict = {}
    for i, name, c in attn:
        groups.setdefault(get(c), []).append(f"{i} ({name})")
    if len(groups) > 1:
        listing = "; ".join(f"{v!r} in layers {', '.join(ls)}" for v, ls in groups.items())
        problems.append(f"{what} differs across layers ({listing}); the HF config holds one value")
    return next(iter(groups))


def _non_default_fields(cfg, mapped) -> list[tuple[str, object]]:
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


def _unmapped(where: str, field: str, value) -> str:
    why = _WHY_NOT.get(field, "have no such option (the export does not map it)")
    return f"{where}{field}={value!r}; {_ARCHS} {why}"


def hf_arch(mc: ModelConfig) -> HFArch:
    """The HF architecture of `mc`, or ConfigError naming each layer (or model option) that
    cannot map and why."""
    problems = [_unmapped("model.", f, v) for f, v in _non_default_fields(mc, MAPPED_MODEL_FIELDS)]
    attn = []
    for i, name in enumerate(mc.layer_names()):
        c = mc.mixer(name)
        # by kind, not class: a future mixer may extend AttentionConfig and compute something else
        if c.kind != AttentionConfig.kind or not isinstance(c, AttentionConfig):
            problems.append(f"layer {i} ({name}): mixer kind {c.kind!r} is not softmax attention; "
                            "Llama, Qwen3 and Ministral have nothing else")
            continue
        problems += [_unmapped(f"layer {i} ({name}): ", f, v)
                     for f, v in _non_default_fields(c, MAPPED_ATTENTION_FIELDS)]
        attn.append((i, name, c))
    if not attn:
        raise ConfigError("cannot export to Hugging Face format:\n  " + "\n  ".join(problems)
                          + "\n(--format safetensors exports any model)")
    d = mc.d_model
    heads = _one_value(attn, "num_heads", lambda c: c.num_heads, problems)
    kv_heads = _one_value(attn, "num_kv_heads", lambda c: c.kv_heads, problems)
    head_dim = _one_value(attn, "head dim", lambda c: c.dim_per_head(d), problems)
    theta = _one_value(attn, "rope_theta", lambda c: c.rope_theta, problems)
    qk_norm = _one_value(attn, "qk_norm", lambda c: c.qk_norm, problems)
    windowed = [a for a in attn if a[2].window is not None]
    window = _one_value(windowed, "window", lambda c: c.window, problems) if windowed else None
    if problems:
        raise ConfigError("cannot export to Hugging Face format:\n  " + "\n  ".join(problems)
                          + "\n(--format safetensors exports any model)")
    if qk_norm:
        arch, model_type = "Qwen3ForCausalLM", "qwen3"
    elif window is not None:
        arch, model_type = "MinistralForCausalLM", "ministral"
    else:
        arch, model_type = "LlamaForCausalLM", "llama"
    types = tuple(FULL if c.window is None else SLIDING for _, _, c in attn)
    return HFArch(arch, model_type, heads, kv_heads, head_dim, float(theta), qk_norm, window, types)


def hf_config(cfg: Config) -> dict:
    """config.json for the model of `cfg` (keys of transformers 5; `rope_theta` is also written at
    the top level, where transformers 4 reads it)."""
    m, a = cfg.model, hf_arch(cfg.model)
    out = {
        "architectures": [a.architecture], "model_type": a.model_type,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.hidden,
        "num_hidden_layers": m.num_layers, "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim, "hidden_act": "silu",
        # the context the model was trained at; RoPE itself has no limit
        "max_position_embeddings": cfg.data.seq_len,
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta}, "rope_theta": a.rope_theta,
        "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "dtype": "float32", "torch_dtype": "float32",
    }
    if a.model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif a.model_type == "qwen3":
        out.update(attention_bias=False, use_sliding_window=a.window is not None, sliding_window=a.window,
                   max_window_layers=m.num_layers, layer_types=list(a.layer_types))
    else:
        out.update(sliding_window=a.window, layer_types=list(a.layer_types))
    return out


def write_hf_config(cfg: Config, out: Path) -> None:
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")


def hf_tensors(model) -> list[TensorOut]:
    """The model's params under HF names (Linear weights transposed), fetched lazily."""
    variables = param_variables(model)
    out = []
    for r in param_refs(model):
        name, transposed = hf_name(r.name)
        shape = r.shape[::-1] if transposed else r.shape

        def fetch(r=r, transposed=transposed):
            a = read_param(variables, r)
            return np.ascontiguousarray(a.T) if transposed else a
        out.append(TensorOut(name, shape, np.dtype(np.float32), fetch))
    return out


def byte_tokenizer_json() -> str:
    """A `tokenizers` file equivalent to the byte tokenizer: byte-level BPE without merges whose
    vocabulary maps the printable stand-in of byte b (GPT-2's byte alphabet) to id b."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from train.data.tokenizer import _byte_level_alphabet
    tok = Tokenizer(models.BPE(vocab=_byte_level_alphabet(), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def write_hf_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json where HF can read the run's tokenizer (see the
    module docstring); nothing for SentencePiece and id tokenizers beyond Tokenizer.save."""
    if tokenizer.kind == "byte":
        (out / "tokenizer.json").write_text(byte_tokenizer_json())
    elif tokenizer.kind != "hf":
        return
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
          "add_bos_token": False, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")


# ----------------------------------------------------------------------------- import: config

def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory: it has no config.json")
    c = json.loads(path.read_text())
    mt = c.get("model_type")
    if mt not in IMPORTABLE:
        raise ConfigError(f"{path}: model_type {mt!r} cannot be imported; supported: {list(IMPORTABLE)}")
    return c


def _rope_theta(c: dict) -> float:
    """RoPE theta of plain (unscaled) RoPE; scaled variants (llama3, yarn, ...) are refused."""
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


def _period(names: list[str]) -> tuple[str, ...]:
    """The shortest pattern whose repetition (plus a prefix as the remainder) gives `names`."""
    for p in range(1, len(names) + 1):
        if all(names[i] == names[i % p] for i in range(len(names))):
            return tuple(names[:p])
    raise AssertionError("unreachable")


def model_config_from_hf(hf_dir: str | Path) -> ModelConfig:
    """Our ModelConfig for a Llama / Mistral / Ministral / Qwen2 / Qwen3 config.json.

    Full-attention layers become mixer "attn" and windowed ones "swa"; the pattern is the
    shortest period of the layer list. Raises ConfigError for what Chimera does not compute."""
    c = read_hf_config(hf_dir)
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"hidden_act={act!r} is not supported; Chimera's MLP is SwiGLU (silu)")
    d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    head_dim = c.get("head_dim") or d // heads
    qk_norm = c["model_type"] == "qwen3"
    eps = float(c.get("rms_norm_eps", 1e-6))
    base = AttentionConfig(num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
                           head_dim=None if head_dim * heads == d else int(head_dim),
                           qk_norm=qk_norm, rope_theta=_rope_theta(c))
    windows = _layer_windows(c)
    names = ["attn" if w is None else "swa" for w in windows]
    mixers = {"attn": base} if "attn" in names else {}
    if "swa" in names:
        mixers["swa"] = dataclasses.replace(base, window=int(next(w for w in windows if w is not None)))
    mc = ModelConfig(
        vocab_size=int(c["vocab_size"]), d_model=d, num_layers=int(c["num_hidden_layers"]),
        pattern=_period(names), mixers=mixers, mlp_hidden=int(c["intermediate_size"]), norm_eps=eps,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        init_std=float(c.get("initializer_range", 0.02)))
    mc.check()
    return mc


_HEAD_LAYOUT = ("num_heads", "num_kv_heads", "head_dim")


def _function_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """What differs between two configs in the function computed, beyond param shapes."""
    out = []
    for i, (na, nb) in enumerate(zip(a.layer_names(), b.layer_names())):
        ca, cb = a.mixer(na), b.mixer(nb)
        if not (isinstance(ca, AttentionConfig) and isinstance(cb, AttentionConfig)):
            if type(ca) is not type(cb):
                out.append(f"layer {i}: mixer kind {ca.kind} vs {cb.kind}")
            continue
        for f in dataclasses.fields(ca):  # every option, the head layout aside (shapes check it)
            if f.name not in _HEAD_LAYOUT and getattr(ca, f.name) != getattr(cb, f.name, None):
                out.append(f"layer {i} {f.name}: {getattr(ca, f.name)} vs {getattr(cb, f.name, None)}")
    for f in dataclasses.fields(a):
        if (f.name == "norm_eps" or f.name not in MAPPED_MODEL_FIELDS) and getattr(a, f.name) != getattr(b, f.name):
            out.append(f"{f.name}: {getattr(a, f.name)} vs {getattr(b, f.name)}")
    return out


# ----------------------------------------------------------------------------- import: params

def _known_unused(name: str, reader: SafetensorsReader, tied: bool) -> str | None:
    """Why an HF tensor that maps to no param may be dropped, or None if it may not."""
    if name.endswith("rotary_emb.inv_freq"):
        return "rotary buffer"
    if name.endswith(".bias"):
        a = reader.get(name)
        if np.any(a != 0):
            biggest = float(np.abs(a.astype(np.float32)).max())
            raise ConfigError(f"{name} is a nonzero bias (max |b| = {biggest:.3g}); Chimera's projections "
                              "have no bias, so this checkpoint cannot be imported exactly")
        return "zero bias"
    if name == "lm_head.weight" and tied:
        if not np.array_equal(reader.get(name), reader.get("model.embed_tokens.weight")):
            raise ConfigError("lm_head.weight differs from model.embed_tokens.weight, but the model ties "
                              "its embeddings; set model.tie_embeddings=false")
        return "tied head"
    return None


def import_params(hf_dir: str | Path, model):
    """Load an HF checkpoint (safetensors, one file or sharded) into a built Chimera LM.

    Checks every shape and that every HF tensor is used or known-unused (module docstring), then
    sets the params in place (float32, keeping their sharding) and returns the model. A model
    config that differs from the checkpoint's config.json in what it computes (windows, RoPE
    theta, ...) is loaded anyway, with a warning: that may be an intended change."""
    hf_dir = Path(hf_dir)
    reader = SafetensorsReader(hf_dir)
    tied = model.head is None
    plan: dict[str, tuple[ParamRef, bool]] = {}  # HF name -> (our param, transposed)
    for r in param_refs(model):
        name, transposed = hf_name(r.name)
        plan[name] = (r, transposed)
    have = set(reader.names())
    missing = sorted(set(plan) - have)
    if missing:
        raise ConfigError(f"{hf_dir}: the model needs tensors the checkpoint lacks: {short_list(missing)}"
                          + ("; the checkpoint may tie its embeddings (model.tie_embeddings=true)"
                             if missing == ["lm_head.weight"] else ""))
    unused = [n for n in sorted(have - set(plan)) if _known_unused(n, reader, tied) is None]
    if unused:
        raise ConfigError(f"{hf_dir}: checkpoint tensors that no Chimera param takes: {short_list(unused)} "
                          "(does the model config match the checkpoint? e.g. qk_norm, tie_embeddings)")
    wrong = []
    for name, (r, transposed) in plan.items():
        want = r.shape[::-1] if transposed else r.shape
        if reader.shape(name) != want:
            wrong.append(f"{name} has shape {reader.shape(name)}, but Chimera's {r.name} needs {want}")
    if wrong:
        raise ConfigError(f"{hf_dir}: shapes differ from the model's: {short_list(wrong, sep='; ')}")
    if (hf_dir / "config.json").is_file():
        try:
            diffs = _function_differences(model.cfg, model_config_from_hf(hf_dir))
        except ConfigError as e:
            diffs = [f"(config.json not comparable: {e})"]
        if diffs:
            log.warning("model config differs from %s/config.json beyond shapes: %s", hf_dir, "; ".join(diffs))
    by_ref = {r.name: (name, transposed) for name, (r, transposed) in plan.items()}

    def fetch(r: ParamRef) -> np.ndarray:
        name, transposed = by_ref[r.name]
        a = reader.get(name).astype(np.float32)
        return a.T if transposed else a
    return assign_params(model, fetch)

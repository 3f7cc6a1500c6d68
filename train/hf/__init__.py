"""Hugging Face (transformers) interchange: config.json and tensors, out and in, for every
architecture that holds a Chimera model exactly.

Export (`python -m train.export RUN --format hf`) asks each architecture in `ARCHS` whether it
holds the model (`Arch.problems`) and takes the first that does; otherwise it refuses, naming
each layer or option the closest architecture lacks (the one with fewest problems). The
architectures, their modules and what they hold are in README.md ("Export and import").

The tensor mapping of an architecture (`Arch.tensors`) must use every Chimera param exactly
once (checked at every export and import, so a new parameter can never be dropped silently),
and its transforms are exact permutations (train/hf/tensors.py): import(export(params)) is
bit-identical.

Import (`import_params`, `model_config_from_hf`, and `python -m train.import_hf`) reads the
architecture named by config.json's model_type: safetensors in one file or sharded, any float
dtype, cast to float32. Every HF tensor must be used or known-unused (`Arch.known_unused`:
rotary buffers, all-zero biases, a tied `lm_head.weight` equal to the embedding).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from layers.config import ConfigError
from models.config import ModelConfig
from train.hf.arch import INIT_ONLY_FIELDS, MAPPED_MODEL_FIELDS, Arch
from train.hf.bamba import Bamba
from train.hf.deepseek_v3 import DeepseekV3
from train.hf.gpt_oss import GptOss
from train.hf.llama import LlamaFamily
from train.hf.mamba2 import Mamba2
from train.hf.qwen3_next import Qwen3Next
from train.hf.xlstm import XLSTM
from train.hf.tensors import TensorMap, round_trips
from train.hf.tokenizer import byte_tokenizer_json, write_hf_tokenizer

log = logging.getLogger("chimera.hf")

ARCHS: tuple[Arch, ...] = (LlamaFamily(), GptOss(), DeepseekV3(), XLSTM(), Qwen3Next(), Bamba(), Mamba2())
SAFETENSORS_HINT = "(--format safetensors exports any model)"

__all__ = ["ARCHS", "choose_arch", "hf_config", "write_hf_config", "hf_tensors", "model_config_from_hf",
           "import_params", "read_hf_config", "byte_tokenizer_json", "write_hf_tokenizer"]


# ----------------------------------------------------------------------------- export

def choose_arch(mc: ModelConfig) -> Arch:
    """The first architecture that holds `mc` exactly, or ConfigError naming what the closest
    one lacks (one line per layer or option) and how far the others are."""
    found = [(a, a.problems(mc)) for a in ARCHS]
    for arch, problems in found:
        if not problems:
            return arch
    kinds = [mc.mixer(n).kind for n in mc.layer_names()]
    misses = {a.name: sum(k not in a.kinds for k in kinds) for a in ARCHS}
    # closest: holds the most layers' kinds, then has the fewest problems (then ARCHS order)
    found.sort(key=lambda ap: (misses[ap[0].name], len(ap[1])))
    (best, problems), others = found[0], [ap for ap in found[1:] if not misses[ap[0].name]]
    lines = [f"cannot export to Hugging Face format; the closest architecture, {best.name}, lacks:",
             *(f"  {p}" for p in problems)]
    if others:
        lines.append("  (also close: " + "; ".join(f"{a.name}, {len(p)} problem{'s' * (len(p) > 1)}: {p[0]}"
                                                for a, p in others) + ")")
    raise ConfigError("\n".join(lines + [SAFETENSORS_HINT]))


def hf_config(cfg) -> dict:
    """config.json for the model of `cfg` (a Config)."""
    return choose_arch(cfg.model).config(cfg)


def write_hf_config(cfg, out: Path) -> None:
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")


def _plan(arch: Arch, model) -> tuple[list[TensorMap], dict]:
    """The architecture's tensor maps for `model`, checked to use each param exactly once;
    and our param refs by name. ConfigError when the architecture cannot hold the model (an
    import into a model config that does not match the checkpoint)."""
    from train.export import param_refs
    problems = arch.problems(model.cfg)
    if problems:
        raise ConfigError(f"the model config does not match the checkpoint's architecture, {arch.name}:\n  "
                          + "\n  ".join(problems))
    refs = {r.name: r for r in param_refs(model)}
    maps = arch.tensors(model.cfg)
    used: dict[str, str] = {}
    for m in maps:
        for name in m.ours:
            if name in used:
                raise AssertionError(f"{arch.name} export maps {name} twice ({used[name]}, {m.hf})")
            if name not in refs:
                raise AssertionError(f"{arch.name} export maps {name} ({m.hf}), which the model lacks")
            used[name] = m.hf
    left = sorted(set(refs) - set(used))
    if left:
        raise ConfigError(f"{arch.name} export has no place for the params {', '.join(left[:6])}"
                          + (f" and {len(left) - 6} more" if len(left) > 6 else ""))
    return maps, refs


def hf_tensors(model) -> list:
    """The model's params as the chosen architecture's tensors, computed lazily (one at a time)."""
    from train.export import param_variables, read_param
    from train.safetensors_io import TensorOut
    arch = choose_arch(model.cfg)
    maps, refs = _plan(arch, model)
    variables = param_variables(model)
    out = []

    def fetch(m: TensorMap) -> np.ndarray:
        arrays = [read_param(variables, refs[n]) for n in m.ours]
        hf = m.to_hf(*arrays).astype(np.float32)
        if not round_trips(m, arrays, hf):
            log.warning("%s: its values do not survive export and import bit for bit (a norm scale "
                        "outside [1/2, 2^24) stored as scale - 1); the function is the same to rounding", m.hf)
        return hf
    for m in maps:
        out.append(TensorOut(m.hf, m.hf_shape([refs[n].shape for n in m.ours]), np.dtype(np.float32),
                             lambda m=m: fetch(m)))
    return out


# ----------------------------------------------------------------------------- import: config

def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory: it has no config.json")
    return json.loads(path.read_text())


def arch_for(c: dict, path: str = "config.json") -> Arch:
    mt = c.get("model_type")
    for a in ARCHS:
        if mt in a.model_types:
            return a
    known = [t for a in ARCHS for t in a.model_types]
    raise ConfigError(f"{path}: model_type {mt!r} cannot be imported; supported: {known}")


def model_config_from_hf(hf_dir: str | Path) -> ModelConfig:
    """Our ModelConfig for a config.json of any importable architecture (ConfigError for what
    Chimera does not compute)."""
    c = read_hf_config(hf_dir)
    mc = arch_for(c, f"{hf_dir}/config.json").model_config(c)
    mc.check()
    return mc


# Fields that set only param shapes (or a default resolved from them), which import checks tensor
# by tensor; comparing them as written would flag None (a default) against its resolved value.
_SHAPE_FIELDS = ("num_heads", "num_kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                 "qk_rope_head_dim", "v_head_dim")


def _function_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """What differs between two configs in the function computed, beyond param shapes."""
    out = []
    for i, (na, nb) in enumerate(zip(a.layer_names(), b.layer_names())):
        ca, cb = a.mixer(na), b.mixer(nb)
        if type(ca) is not type(cb):
            out.append(f"layer {i}: mixer kind {ca.kind} vs {cb.kind}")
            continue
        skip = _SHAPE_FIELDS + tuple(INIT_ONLY_FIELDS)
        for f in dataclasses.fields(ca):  # every option, the shapes aside (checked tensor by tensor)
            if f.name not in skip and getattr(ca, f.name) != getattr(cb, f.name, None):
                out.append(f"layer {i} {f.name}: {getattr(ca, f.name)} vs {getattr(cb, f.name, None)}")
    for f in dataclasses.fields(a):
        if (f.name == "norm_eps" or f.name not in MAPPED_MODEL_FIELDS) and getattr(a, f.name) != getattr(b, f.name):
            out.append(f"{f.name}: {getattr(a, f.name)} vs {getattr(b, f.name)}")
    return out


# ----------------------------------------------------------------------------- import: params

def _short(items: list[str], n: int = 6, sep: str = ", ") -> str:
    from train.export import short_list
    return short_list(items, n, sep)


def import_params(hf_dir: str | Path, model):
    """Load an HF checkpoint (safetensors, one file or sharded) into a built Chimera LM.

    The architecture is config.json's (else the one export would choose for the model). Checks
    every shape and that every HF tensor is used or known-unused, then sets the params in place
    (float32, keeping their sharding) and returns the model. A model config that differs from
    config.json in what it computes (windows, RoPE theta, ...) is loaded anyway, with a warning:
    that may be an intended change."""
    from train.export import assign_params
    from train.safetensors_io import SafetensorsReader
    hf_dir = Path(hf_dir)
    reader = SafetensorsReader(hf_dir)
    has_config = (hf_dir / "config.json").is_file()
    arch = arch_for(read_hf_config(hf_dir), f"{hf_dir}/config.json") if has_config else choose_arch(model.cfg)
    maps, refs = _plan(arch, model)
    tied = model.head is None
    have = set(reader.names())
    missing = sorted({m.hf for m in maps} - have)
    if missing:
        raise ConfigError(f"{hf_dir}: the model needs tensors the checkpoint lacks: {_short(missing)}"
                          + ("; the checkpoint may tie its embeddings (model.tie_embeddings=true)"
                             if missing == ["lm_head.weight"] else ""))
    mapped = {m.hf for m in maps}
    embed = next(m.hf for m in maps if m.ours == ("embed.embedding",))
    unused = [n for n in sorted(have - mapped) if not _tied_head(n, embed, reader, tied)
              and arch.known_unused(n, reader, model.cfg) is None]
    if unused:
        raise ConfigError(f"{hf_dir}: checkpoint tensors that no Chimera param takes: {_short(unused)} "
                          "(does the model config match the checkpoint? e.g. qk_norm, tie_embeddings)")
    wrong = []
    for m in maps:
        want = m.hf_shape([refs[n].shape for n in m.ours])
        if reader.shape(m.hf) != want:
            wrong.append(f"{m.hf} has shape {reader.shape(m.hf)}, but Chimera's "
                         f"{' + '.join(m.ours)} needs {want}")
    if wrong:
        raise ConfigError(f"{hf_dir}: shapes differ from the model's: {_short(wrong, sep='; ')}")
    if has_config:
        try:
            diffs = _function_differences(model.cfg, model_config_from_hf(hf_dir))
        except ConfigError as e:
            diffs = [f"(config.json not comparable: {e})"]
        if diffs:
            log.warning("model config differs from %s/config.json beyond shapes: %s", hf_dir, "; ".join(diffs))
    for m in maps:
        if not m.ours:  # a constant of the architecture: check its value now
            m.from_hf(reader.get(m.hf))
    source = {n: (m, k) for m in maps for k, n in enumerate(m.ours)}

    def fetch(r) -> np.ndarray:
        # a fused HF tensor is read once per part it holds (at most 4): memory stays at one
        # tensor, whatever order assign_params asks for the parts in
        m, k = source[r.name]
        return m.from_hf(reader.get(m.hf).astype(np.float32))[k]
    return assign_params(model, fetch)


def _tied_head(name: str, embed: str, reader, tied: bool) -> bool:
    """A tied model may ignore `lm_head.weight` when it equals the embedding (HF name `embed`)."""
    if name != "lm_head.weight" or not tied:
        return False
    if not np.array_equal(reader.get(name), reader.get(embed)):
        raise ConfigError(f"lm_head.weight differs from {embed}, but the model ties "
                          "its embeddings; set model.tie_embeddings=false")
    return True

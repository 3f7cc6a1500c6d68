"""Shared base types of every config: the error, the mixer-config base and its registries, the
head layout of the softmax-attention mixers, and the runtime section.

The lowest config floor: layers/ (each family's config beside its code), models/ (ModelConfig)
and train/ (the run sections, `Config`, JSON and command-line conversion) all build on it, and it
imports nothing of theirs (nor jax: a bad command line is refused before jax starts).

Registries, filled as the family config modules are imported (models/config.py imports them all):
  MIXER_CONFIG_KINDS  kind -> MixerConfig subclass (JSON `kind` tags, `model.mixers.X.kind=`)
  DEFAULT_MIXERS      mixer names usable in ModelConfig.pattern without declaring them
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import ClassVar, Literal

__all__ = ["ConfigError", "MixerConfig", "HeadsConfig", "RuntimeConfig", "MIXER_CONFIG_KINDS",
           "DEFAULT_MIXERS", "register_mixer_config", "check_literals", "suggest"]


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or impossible."""



# ----------------------------------------------------------------------------- mixer configs

MIXER_CONFIG_KINDS: dict[str, type["MixerConfig"]] = {}


def register_mixer_config(cls):
    """Class decorator: make a MixerConfig subclass loadable from JSON by its `kind`."""
    MIXER_CONFIG_KINDS[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class MixerConfig:
    """Base of every token-mixer config. Subclasses set `kind` and validate in `check`."""
    kind: ClassVar[str] = ""

    def check(self, d_model: int, where: str) -> None:
        """Raise ConfigError (naming `where`) when this mixer cannot run at width d_model."""

    def check_runtime(self, runtime: "RuntimeConfig", where: str) -> None:
        """Raise ConfigError (naming the runtime field) when this mixer cannot be computed the
        way `runtime` asks (e.g. an implementation that refuses every call it would make)."""


def check_literals(cfg, where: str) -> None:
    """ConfigError naming `where.field` unless every Literal-typed field of the dataclass `cfg`
    holds one of its values (from_dict checks this too; direct construction in a preset does
    not)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp = hints[f.name]
        if typing.get_origin(tp) is Literal and getattr(cfg, f.name) not in typing.get_args(tp):
            raise ConfigError(f"{where}.{f.name}={getattr(cfg, f.name)!r} is not accepted; "
                              f"choose one of {list(typing.get_args(tp))}")


@dataclass(frozen=True)
class HeadsConfig(MixerConfig):
    """Head layout of the softmax-attention mixers (attention, moba, nsa): num_heads query
    heads, num_kv_heads key/value heads (MHA when equal or None, GQA, MQA when 1; they must
    divide num_heads), head_dim (None: d_model // num_heads; even, for RoPE), optional RMSNorm
    on q and k per head (Qwen3 / OLMo2 style) before RoPE with base rope_theta."""
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: same as num_heads
    head_dim: int | None = None  # None: d_model // num_heads
    qk_norm: bool = False
    rope_theta: float = 10_000.0

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def dim_per_head(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.num_heads

    def check(self, d_model: int, where: str) -> None:
        check_literals(self, where)
        if self.num_heads < 1:
            raise ConfigError(f"{where}.num_heads must be >= 1, got {self.num_heads}")
        if self.head_dim is None and d_model % self.num_heads:
            raise ConfigError(
                f"{where}.num_heads={self.num_heads} does not divide model.d_model={d_model}; "
                f"choose a divisor of {d_model} or set {where}.head_dim")
        if self.head_dim is not None and self.head_dim < 2:
            raise ConfigError(f"{where}.head_dim must be >= 2 or None, got {self.head_dim}")
        if self.kv_heads < 1 or self.num_heads % self.kv_heads:
            raise ConfigError(
                f"{where}.num_kv_heads={self.num_kv_heads} must divide "
                f"{where}.num_heads={self.num_heads} (1 = MQA, num_heads = MHA)")
        hd = self.dim_per_head(d_model)
        if hd % 2:
            raise ConfigError(f"{where}: head dim {hd} must be even for RoPE "
                              f"(set {where}.head_dim or change {where}.num_heads)")
        if not self.rope_theta > 0:
            raise ConfigError(f"{where}.rope_theta must be > 0, got {self.rope_theta}")


# Mixer names usable in ModelConfig.pattern without declaring them in ModelConfig.mixers; each
# family's config module adds its own ("attn" and "swa" in layers/attention/config.py).
DEFAULT_MIXERS: dict[str, MixerConfig] = {}


def suggest(name: str, options) -> str:
    """' (did you mean X?)' for the closest of `options` to `name`, or ''."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------- runtime

@dataclass(frozen=True)
class RuntimeConfig:
    """How the model is computed; never what it computes.

    compute_dtype: "auto" is bfloat16 on GPU/TPU and float32 on CPU. Params stay float32.
    remat: what the backward pass recomputes per layer: "none" (save everything), "full"
      (save only layer inputs), "dots" (save matmul outputs), "dots_no_batch" (save matmuls
      without batch dims, i.e. weight matmuls, recompute attention).
    attention_impl: the implementation of `pallas_kernels.attention` for the softmax-attention
      mixers (attn / swa, diff_attention, mla). None tries the best one for the platform: the
      Pallas kernels ("gpu": Triton, "tpu": Mosaic) first, then "xla"; "xla", "reference",
      "gpu" or "tpu" forces one (and fails loudly if it cannot serve a call). "block_sparse":
      the softmax attention mixers (attn / swa) compute through the block-sparse op
      (`pallas_kernels.block_sparse_attention`) with a causal / sliding-window layout, in the
      implementation `sparse_attention_impl` names.
    linear_attention_impl: the same for the ops of the linear-attention mixers,
      `pallas_kernels.chunked_linear_attention` and `pallas_kernels.delta_rule` (deltanet, gdn):
      None, "xla", "reference", "gpu" (Pallas Triton) or "tpu" (Pallas Mosaic).
    linear_attention_chunk: chunk length of the chunked implementations of both ops.
    sparse_attention_impl: the implementation of `pallas_kernels.block_sparse_attention`, used
      by the routed sparse mixers (moba, nsa) and by attention with attention_impl="block_sparse":
      None (best available for the platform, with fallback), "xla", "reference", "gpu" (Pallas
      Triton) or "tpu" (Pallas Mosaic); a named one never falls back.
    mesh_data, mesh_fsdp, mesh_tensor: the device mesh (train/mesh.py, layers/sharding.py):
      data parallel, fully-sharded data parallel (params split too) and tensor parallel sizes.
      At most one may be -1, meaning "all the devices the others leave"; their product must
      equal the number of devices (all hosts together), or be smaller when none is -1 (the
      first devices are used). The default puts every device on the data axis.
    distributed: call jax.distributed.initialize() before touching devices (multi-host runs:
      SLURM, TPU pods, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set).
    """
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    attention_impl: Literal["xla", "reference", "gpu", "tpu", "block_sparse"] | None = None
    attention_block_q: int = 128
    attention_block_k: int = 128
    linear_attention_impl: Literal["xla", "reference", "gpu", "tpu"] | None = None
    linear_attention_chunk: int = 64
    sparse_attention_impl: Literal["xla", "reference", "gpu", "tpu"] | None = None
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    distributed: bool = False

    MESH_FIELDS: ClassVar[tuple[str, ...]] = ("mesh_data", "mesh_fsdp", "mesh_tensor")

    def check(self) -> None:
        for name in ("attention_block_q", "attention_block_k", "linear_attention_chunk"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ConfigError(f"runtime.{name} must be a power of two, got {v}")
        sizes = {f: getattr(self, f) for f in self.MESH_FIELDS}
        for f, v in sizes.items():
            if v < 1 and v != -1:
                raise ConfigError(f"runtime.{f} must be >= 1 or -1 (all remaining devices), got {v}")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError(f"only one of runtime.{{{', '.join(self.MESH_FIELDS)}}} may be -1, got "
                              + ", ".join(f"{f}={v}" for f, v in sizes.items()))


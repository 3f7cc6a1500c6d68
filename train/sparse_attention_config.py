"""Configs of the routed block-sparse attention mixers (layers/sparse_attention).

Two kinds, each registered for JSON (`kind`) and given a default mixer name in `DEFAULT_MIXERS`
(the same as its kind), so `model.pattern=("moba", "moba", "moba", "attn")` works without
declaring mixers, and `--set model.mixers.moba.top_k=4` edits the default:

    moba   Mixture of Block Attention (Lu et al. 2025), with FlashMoBA's options (Xiao et al. 2025)
    nsa    Native Sparse Attention (Yuan et al. 2025)

Both run on `pallas_kernels.block_sparse_attention` (its implementation is
`runtime.sparse_attention_impl`). The equations, the defaults and where they depart from the
papers live in the mixers' module docstrings. Defaults are CPU-scale (block 64 / window 64);
the papers use blocks of 512-4096 (MoBA), 128 (FlashMoBA) and 64 with a 512 window (NSA).

Imported at the bottom of train/config.py, so these kinds exist wherever `Config` does.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

from train.config import DEFAULT_MIXERS, ConfigError, MixerConfig, register_mixer_config

__all__ = ["MoBAConfig", "NSAConfig", "SPARSE_ATTENTION_CONFIGS"]


def _check_literals(cfg, where: str) -> None:
    """Literal-typed fields hold one of their values (from_dict checks this too; direct
    construction in a preset does not)."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        tp = hints[f.name]
        if typing.get_origin(tp) is Literal and getattr(cfg, f.name) not in typing.get_args(tp):
            raise ConfigError(f"{where}.{f.name}={getattr(cfg, f.name)!r} is not accepted; "
                              f"choose one of {list(typing.get_args(tp))}")


def _at_least(cfg, where: str, minimum: int, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < minimum:
            raise ConfigError(f"{where}.{n} must be >= {minimum}, got {getattr(cfg, n)}")


@dataclass(frozen=True)
class _SparseHeads(MixerConfig):
    """Head layout shared by both kinds (as AttentionConfig): H query heads, K kv heads (GQA,
    H % K == 0), head dim D (None: d_model // H, even for RoPE), optional RMSNorm on q/k."""
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
        _check_literals(self, where)
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


@register_mixer_config
@dataclass(frozen=True)
class MoBAConfig(_SparseHeads):
    """Mixture of Block Attention: keys in blocks of `block_size`; each query token and head
    attends to the `top_k` blocks (its own block, always chosen and causal inside, counts
    toward them) whose mean key scores highest against it: s[t, n] = q_t . mean(K_n).

    block_size: MoBA block (paper 512-4096; FlashMoBA recommends 128; 64 suits CPU runs).
    top_k: blocks per query token, the own block included (paper 3; FlashMoBA 8).
    key_conv_size: width of FlashMoBA's short depthwise causal convolution on the keys; 0 (the
      default, as the MoBA paper) turns it off, else >= 2.
    """
    kind: ClassVar[str] = "moba"
    block_size: int = 64
    top_k: int = 3
    key_conv_size: int = 0

    def check(self, d_model: int, where: str) -> None:
        super().check(d_model, where)
        _at_least(self, where, 1, "block_size", "top_k")
        if self.key_conv_size != 0 and self.key_conv_size < 2:
            raise ConfigError(f"{where}.key_conv_size must be 0 (no convolution) or >= 2, "
                              f"got {self.key_conv_size}")


@register_mixer_config
@dataclass(frozen=True)
class NSAConfig(_SparseHeads):
    """Native Sparse Attention: three branches over the same q/k/v, mixed by per-head sigmoid
    gates of x: compressed tokens (one per block of `block_size` keys), the `num_selected` blocks
    of highest compressed-attention importance (summed over each GQA group), and a sliding
    window of `window` tokens.

    block_size: compression and selection block (paper: compression 32 with stride 16,
      selection 64; here one size, stride = block size: see the module docstring).
    num_selected: selected blocks per token and KV group, counting the forced ones (the own
      block, the one before it and the document's first block, in that priority); paper 16.
    window: sliding-window branch, keys i - window < j <= i (paper 512; 64 suits CPU runs).
    compression: "mean" (mean pooling, as fla) or "mlp" (the paper's learned MLP over the
      block's keys plus a learned intra-block position embedding).
    """
    kind: ClassVar[str] = "nsa"
    block_size: int = 64
    num_selected: int = 4
    window: int = 64
    compression: Literal["mean", "mlp"] = "mean"

    def check(self, d_model: int, where: str) -> None:
        super().check(d_model, where)
        _at_least(self, where, 1, "block_size", "num_selected", "window")


SPARSE_ATTENTION_CONFIGS = (MoBAConfig, NSAConfig)

for _cls in SPARSE_ATTENTION_CONFIGS:
    DEFAULT_MIXERS.setdefault(_cls.kind, _cls())

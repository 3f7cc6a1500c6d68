"""Configs of the routed block-sparse attention mixers (layers/sparse_attention).

Two kinds, each registered for JSON (`kind`) and given a default mixer name in `DEFAULT_MIXERS`
(the same as its kind), so `model.pattern=("moba", "moba", "moba", "attn")` works without
declaring mixers, and `--set model.mixers.moba.top_k=4` edits the default:

    moba   Mixture of Block Attention (Lu et al. 2025), with FlashMoBA's options (Xiao et al. 2025)
    nsa    Native Sparse Attention (Yuan et al. 2025)

Both run on `pallas_kernels.block_sparse_attention` (its implementation is
`runtime.sparse_attention_impl`). Both route per query token by default (`route_block_q = 1`,
the faithful form); `route_block_q = n` (a power of two >= 16 dividing block_size) routes per
group of n consecutive queries instead, the choice of the group's first query shared by the
group, so the op runs block matmuls and the Pallas GPU / TPU kernels can serve it (the math:
layers/sparse_attention/routing.py, "Block routing"). The equations, the defaults and where
they depart from the papers live in the mixers' module docstrings. Defaults are CPU-scale (block 64 / window 64);
the papers use blocks of 512-4096 (MoBA), 128 (FlashMoBA) and 64 with a 512 window (NSA).

Imported by models/config.py, so these kinds exist wherever `ModelConfig` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from layers.config import DEFAULT_MIXERS, ConfigError, HeadsConfig, register_mixer_config

__all__ = ["MoBAConfig", "NSAConfig", "SPARSE_ATTENTION_CONFIGS"]


def _at_least(cfg, where: str, minimum: int, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < minimum:
            raise ConfigError(f"{where}.{n} must be >= {minimum}, got {getattr(cfg, n)}")


class _SparseHeads(HeadsConfig):
    """Both kinds: the attention head fields (layers/config.py HeadsConfig), the check of
    `route_block_q`, and a refusal of the Pallas implementations for layouts they do not
    serve: token routing (block_q = 1) on either; on TPU also query or key blocks that are not
    multiples of 128 (Mosaic's lane tiling)."""

    def check_route_block_q(self, where: str) -> None:
        n, bs = self.route_block_q, self.block_size
        if n != 1 and not (n >= 16 and n & (n - 1) == 0 and bs % n == 0):
            raise ConfigError(f"{where}.route_block_q must be 1 (token routing) or a power of two >= 16 "
                              f"dividing {where}.block_size={bs}, got {n}")

    def check_runtime(self, runtime, where: str) -> None:
        impl = runtime.sparse_attention_impl
        if impl in ("gpu", "tpu") and self.route_block_q == 1:
            raise ConfigError(
                f"runtime.sparse_attention_impl={impl!r} cannot compute {where} ({self.kind}): "
                f"its routing is per query token (block layouts with block_q = 1), which the "
                f"Pallas {impl} kernels do not serve (they need blocks of >= 16 / 128 queries); "
                f"use 'xla', 'reference' or None, or set {where}.route_block_q (block routing)")
        if impl == "tpu" and (self.route_block_q % 128 or self.block_size % 128):
            raise ConfigError(
                f"runtime.sparse_attention_impl='tpu' cannot compute {where} ({self.kind}): the "
                f"Mosaic kernels need {where}.route_block_q and {where}.block_size to be multiples "
                f"of 128, got {self.route_block_q} and {self.block_size}; use 'xla', 'reference' or None")


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
    route_block_q: 1 (the default, as the paper): every query token routes itself; n: each
      group of n consecutive queries (n a power of two >= 16 dividing block_size) shares the
      choice its first query makes (layers/sparse_attention/moba.py).
    """
    kind: ClassVar[str] = "moba"
    block_size: int = 64
    top_k: int = 3
    key_conv_size: int = 0
    route_block_q: int = 1

    def check(self, d_model: int, where: str) -> None:
        super().check(d_model, where)
        _at_least(self, where, 1, "block_size", "top_k")
        self.check_route_block_q(where)
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
    route_block_q: 1 (the default, as the paper): every query token selects its blocks; n: each
      group of n consecutive queries (n a power of two >= 16 dividing block_size) shares the
      selection of its first query (layers/sparse_attention/nsa.py).
    """
    kind: ClassVar[str] = "nsa"
    block_size: int = 64
    num_selected: int = 4
    window: int = 64
    compression: Literal["mean", "mlp"] = "mean"
    route_block_q: int = 1

    def check(self, d_model: int, where: str) -> None:
        super().check(d_model, where)
        _at_least(self, where, 1, "block_size", "num_selected", "window")
        self.check_route_block_q(where)


SPARSE_ATTENTION_CONFIGS = (MoBAConfig, NSAConfig)

for _cls in SPARSE_ATTENTION_CONFIGS:
    DEFAULT_MIXERS.setdefault(_cls.kind, _cls())

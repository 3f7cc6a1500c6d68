"""Config of the test-time memory mixer (Titans / Miras, layers/memory), kind "memory".

Registered for JSON (`kind`) and given the default mixer name "memory" in `DEFAULT_MIXERS`, so
`model.pattern=("memory", "memory", "memory", "swa")` works without declaring mixers and
`--set model.mixers.memory.chunk_size=4` edits the default.

The memory's design axes (arch ... read) are the fields of
`pallas_kernels.neural_memory.common.MemorySpec` under the same names, with the same defaults
(Titans' LMM: MLP depth 2 expansion 4 GELU, l2 bias, per-token decay, GD with momentum,
gradient anchor b = 16, read after write); `spec()` builds it and `check` turns its ValueErrors
into ConfigErrors naming the field. The equations and the gate parametrisation live in
layers/memory/mixer.py.

The three knobs that change the function besides the memory itself are explicit fields:
`chunk_size` (the gradient anchor b), `gate_granularity` ("token": theta / alpha / eta per token
and head, Titans' experiments; "chunk": each chunk uses its first token's gates) and `read`
("after_write" or "chunk_lagged"). Miras' channel-wise gates are future work.

Imported by models/config.py, so the kind exists wherever `ModelConfig` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from layers.config import DEFAULT_MIXERS, ConfigError, MixerConfig, check_literals, register_mixer_config

__all__ = ["MemoryConfig", "SPEC_FIELDS"]

# MemoryConfig fields that are MemorySpec fields (same names and meaning).
SPEC_FIELDS = ("arch", "depth", "expansion", "activation", "residual", "layernorm", "bias", "p", "eps",
               "retention", "q", "gate_granularity", "algorithm", "gradient_at", "chunk_size", "read")


@register_mixer_config
@dataclass(frozen=True)
class MemoryConfig(MixerConfig):
    """Titans / Miras neural memory mixer.

    num_heads, head_dim: H memories of key = value width head_dim (None: d_model // num_heads).
    arch ... read: the memory (MemorySpec; see pallas_kernels/neural_memory/common.py).
    gate_granularity: "token" (one theta, alpha, eta per token and head) or "chunk" (the chunk's
      first token's, for the whole chunk).
    max_lr: theta_t = max_lr * sigmoid(.) (the inner learning rate's bound; 0.01 as
      titans-pytorch's default_step_transform_max_lr). It must be small: inside a chunk every
      gradient is taken at the same anchor, so a chunk of b repeated keys moves the memory by
      ~b theta (~b^2 theta / 2 with momentum near 1) gradient steps without feedback; max_lr 1
      made the MLP memory diverge on text at b = 16 (raise it for b = 1, e.g. the GDN limit).
    max_decay: alpha_t = max_decay * sigmoid(.) < 1, so log(1 - alpha) stays finite.
    min_momentum: eta_t = min_momentum + (1 - min_momentum) sigmoid(.) > 0, so log(eta) is finite.
    lr_bias_init, decay_bias_init, momentum_bias_init: initial per-head biases of the three gate
      logits (theta = max_lr / 2, alpha = sigmoid(-4) = 0.018, eta = sigmoid(2) = 0.88 at start).
      With `layernorm` and decay, start the decay lower (e.g. -7): a decay that shrinks M faster
      than the writes restore it drives f(k)'s variance under the LayerNorm's eps, where its
      second derivative explodes (the yaad preset's first gradient norm: 1.7e7 at -4, 6.5 at -7).
    w0_std: std of the initial memory weights W0; None: 1 for kl_softmax (W0 holds logits, see
      NeuralMemory.default_w0_std), else 1 / sqrt(d_in) per layer (LeCun normal,
      so an MLP memory starts with non-vanishing gradients; TTT's 0.02 relies on its residual).
    conv_size: short depthwise causal conv (+ SiLU) on q, k, v; 0 disables both.
    output_norm: per-head RMSNorm of the read-out. output_gate: "none", "sigmoid" or "swish" gate
      from the input, applied after the norm, before the output projection.
    """
    kind: ClassVar[str] = "memory"
    num_heads: int = 4
    head_dim: int | None = None
    arch: Literal["linear", "mlp"] = "mlp"
    depth: int = 2
    expansion: int = 4
    activation: Literal["gelu", "silu"] = "gelu"
    residual: bool = False
    layernorm: bool = False
    bias: Literal["dot", "l2", "lp", "huber"] = "l2"
    p: float = 3.0
    eps: float = 1e-6
    retention: str = "decay"  # "none" | "decay" | "lq_norm" | "kl_softmax" (MemorySpec checks it)
    q: float = 4.0
    algorithm: Literal["gd", "gd_momentum"] = "gd_momentum"
    gradient_at: Literal["undecayed", "decayed"] = "undecayed"
    chunk_size: int = 16
    read: Literal["after_write", "chunk_lagged"] = "after_write"
    gate_granularity: Literal["token", "chunk"] = "token"
    max_lr: float = 0.01
    max_decay: float = 0.999
    min_momentum: float = 1e-3
    lr_bias_init: float = 0.0
    decay_bias_init: float = -4.0
    momentum_bias_init: float = 2.0
    w0_std: float | None = None
    conv_size: int = 4
    output_norm: bool = True
    output_gate: Literal["none", "sigmoid", "swish"] = "swish"

    def dim_per_head(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.num_heads

    def spec(self):
        """The op's MemorySpec (ValueError naming the MemorySpec field when impossible)."""
        from pallas_kernels.neural_memory.common import MemorySpec
        return MemorySpec(**{f: getattr(self, f) for f in SPEC_FIELDS})

    def check(self, d_model: int, where: str) -> None:
        check_literals(self, where)
        if self.num_heads < 1:
            raise ConfigError(f"{where}.num_heads must be >= 1, got {self.num_heads}")
        if self.head_dim is None and d_model % self.num_heads:
            raise ConfigError(f"{where}.num_heads={self.num_heads} does not divide model.d_model={d_model}; "
                              f"choose a divisor or set {where}.head_dim")
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError(f"{where}.head_dim must be >= 1 or None, got {self.head_dim}")
        try:
            self.spec()
        except ValueError as e:
            msg = str(e)
            first = msg.split()[0] if msg else ""  # MemorySpec's messages start with the field
            name = f"{where}.{first}" if first in SPEC_FIELDS else where
            raise ConfigError(f"{name}: {msg}") from None
        if not 0 < self.max_lr:
            raise ConfigError(f"{where}.max_lr must be > 0, got {self.max_lr}")
        if not 0 < self.max_decay < 1:
            raise ConfigError(f"{where}.max_decay must be in (0, 1) (alpha < 1 keeps log(1 - alpha) "
                              f"finite), got {self.max_decay}")
        if not 0 < self.min_momentum < 1:
            raise ConfigError(f"{where}.min_momentum must be in (0, 1) (eta > 0 keeps log(eta) "
                              f"finite), got {self.min_momentum}")
        if self.w0_std is not None and not self.w0_std > 0:
            raise ConfigError(f"{where}.w0_std must be > 0 or None (1 / sqrt(d_in)), got {self.w0_std}")
        if self.conv_size != 0 and self.conv_size < 2:
            raise ConfigError(f"{where}.conv_size must be 0 (no convolution) or >= 2, got {self.conv_size}")


DEFAULT_MIXERS.setdefault(MemoryConfig.kind, MemoryConfig())

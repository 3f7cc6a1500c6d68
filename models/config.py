"""ModelConfig: what the network computes, as one period of mixer names and the configs they
name.

Importing this module imports every mixer family's config module, so that every mixer kind is
registered (layers.config.MIXER_CONFIG_KINDS) and every default mixer name is defined
(DEFAULT_MIXERS) wherever a ModelConfig can be built. It imports no jax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from layers.config import DEFAULT_MIXERS, ConfigError, MixerConfig, suggest
# Each registers its kinds and default mixer names.
from layers.attention import config as _attention  # noqa: F401
from layers.linear_attention import config as _linear_attention  # noqa: F401
from layers.sparse_attention import config as _sparse_attention  # noqa: F401
from layers.memory import config as _memory  # noqa: F401
from layers.none import config as _none  # noqa: F401
from models.titans import config as _titans  # noqa: F401

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only LM. `pattern` is one period of mixer names; layers cycle through it.

    With num_layers = n * len(pattern) + r, the n full periods are scanned over (when `scan`)
    and the first r names of the pattern follow as a remainder.
    """
    vocab_size: int | None = None  # None: take it from the tokenizer / task
    d_model: int = 256
    num_layers: int = 4
    pattern: tuple[str, ...] = ("attn",)
    mixers: Mapping[str, MixerConfig] = field(default_factory=dict)  # added to DEFAULT_MIXERS
    mlp_hidden: int | None = None  # None: 8/3 * d_model rounded up to a multiple of 64; 0: no MLP (Mamba2's blocks)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2), PaLM style; 0 disables
    init_std: float = 0.02
    scan: bool = True  # scan over periods (stacked params); False: a plain loop of layers
    # Block options (models/block.py), for any mixer. post_norm: "hybrid-norm" / sandwich norm,
    # an RMSNorm on each residual branch's output before it is added. layer_scale: LayerScale
    # (Touvron et al. 2021, CaiT), a learnable per-channel vector initialised to this value
    # multiplying each branch's output; None: off. The sigmoid-attention paper pairs its
    # score (AttentionConfig.score) with one of them.
    post_norm: bool = False
    layer_scale: float | None = None

    def mixer(self, name: str) -> MixerConfig:
        if name in self.mixers:
            return self.mixers[name]
        if name in DEFAULT_MIXERS:
            return DEFAULT_MIXERS[name]
        known = sorted(set(self.mixers) | set(DEFAULT_MIXERS))
        raise ConfigError(f"model.pattern names mixer {name!r}, which is not defined; "
                          f"known mixers: {known}{suggest(name, known)}")

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-(8 * self.d_model // 3) // 64) * 64

    def layer_names(self) -> tuple[str, ...]:
        p = self.pattern
        return tuple(p[i % len(p)] for i in range(self.num_layers))

    def check(self) -> None:
        if self.d_model < 1 or self.num_layers < 1:
            raise ConfigError("model.d_model and model.num_layers must be >= 1")
        if not self.pattern:
            raise ConfigError("model.pattern must name at least one mixer")
        if len(self.pattern) > self.num_layers:
            # Layers cycle through the pattern, so the tail of a longer one would never be built
            # (a 6-name pattern on 4 layers would silently drop its attention layers).
            raise ConfigError(
                f"model.pattern has {len(self.pattern)} mixers ({','.join(self.pattern)}) but "
                f"model.num_layers={self.num_layers}; set model.num_layers to a multiple of "
                f"{len(self.pattern)} (or a shorter pattern)")
        if not isinstance(self.post_norm, bool):
            raise ConfigError(f"model.post_norm must be true or false, got {self.post_norm!r}")
        if self.layer_scale is not None and not (isinstance(self.layer_scale, (int, float))
                                                 and not isinstance(self.layer_scale, bool)
                                                 and math.isfinite(self.layer_scale) and self.layer_scale > 0):
            raise ConfigError(f"model.layer_scale must be a finite number > 0 (the initial LayerScale, "
                              f"e.g. 0.1 or 1e-5) or None (off), got {self.layer_scale!r}")
        if self.mlp_hidden is not None and (isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int)
                                            or self.mlp_hidden < 0):
            raise ConfigError(f"model.mlp_hidden must be an int >= 0 (0: blocks without an MLP) or None "
                              f"(8/3 d_model), got {self.mlp_hidden!r}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ConfigError(f"model.vocab_size must be >= 2 or None, got {self.vocab_size}")
        for name, mc in self.mixers.items():
            if not isinstance(mc, MixerConfig):
                raise ConfigError(f"model.mixers[{name!r}] must be a MixerConfig, got {type(mc).__name__}")
        for name in dict.fromkeys(self.pattern):
            self.mixer(name).check(self.d_model, f"model.mixers.{name}")

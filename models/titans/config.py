"""Configs of the Titans architectures (Behrouz, Zhong, Mirrokni 2024, sec. 4), kinds
"titans_mac" (memory as context), "titans_mag" (memory as gate) and "titans_mal" (memory as
layer); the modules are in models/titans/.

Each is a softmax-attention head layout (HeadsConfig: num_heads, num_kv_heads, head_dim,
qk_norm, rope_theta), N_p persistent tokens (`num_persistent`), the neural memory's own config
nested whole (`memory`, a MemoryConfig: every field of the "memory" mixer, its defaults
Titans' LMM), and the one size that places the attention: MAC's `segment_size` C, MAG's and
MAL's sliding `window`.

The nested config round-trips like any mixer config: to_dict writes it with its kind
("memory"), from_dict reads it back, and `--set` reaches into it,
e.g. `model.mixers.titans_mac.memory.chunk_size=8`. Default mixer names equal to the kinds
("titans_mac", "titans_mag", "titans_mal") are added to DEFAULT_MIXERS, so a pattern may name
them without declaring them.

Imported by models/config.py, so the kinds exist wherever `ModelConfig` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from layers.config import DEFAULT_MIXERS, ConfigError, HeadsConfig, register_mixer_config
from layers.memory.config import MemoryConfig

__all__ = ["MACConfig", "MAGConfig", "MALConfig", "TitansConfig"]


@dataclass(frozen=True)
class TitansConfig(HeadsConfig):
    """What MAC, MAG and MAL share: the attention's heads (HeadsConfig's fields), N_p =
    num_persistent learned input-independent tokens that every query of the attention sees (0:
    none), and the neural memory (`memory`, the "memory" mixer's config)."""
    num_persistent: int = 4
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def check(self, d_model: int, where: str) -> None:
        super().check(d_model, where)
        if not isinstance(self.num_persistent, int) or self.num_persistent < 0:
            raise ConfigError(f"{where}.num_persistent must be an int >= 0, got {self.num_persistent!r}")
        if not isinstance(self.memory, MemoryConfig):
            raise ConfigError(f"{where}.memory must be a memory config (kind 'memory'), got kind "
                              f"{getattr(self.memory, 'kind', type(self.memory).__name__)!r}")
        self.memory.check(d_model, f"{where}.memory")


@register_mixer_config
@dataclass(frozen=True)
class MACConfig(TitansConfig):
    """Memory as context: segments of segment_size (C) tokens on the row's grid; each segment
    attends (causally) over [persistent | memory retrieved for its tokens | its tokens] and
    writes its attention output into the memory. C must be a multiple of memory.chunk_size, so
    that the memory's gradient-anchor grid runs on unbroken across segments."""
    kind: ClassVar[str] = "titans_mac"
    segment_size: int = 64

    def check(self, d_model: int, where: str) -> None:
        super().check(d_model, where)
        if not isinstance(self.segment_size, int) or self.segment_size < 1:
            raise ConfigError(f"{where}.segment_size must be an int >= 1, got {self.segment_size!r}")
        b = self.memory.chunk_size
        if self.segment_size % b:
            raise ConfigError(f"{where}.segment_size={self.segment_size} must be a multiple of "
                              f"{where}.memory.chunk_size={b} (each segment's memory write starts a "
                              f"new gradient anchor, so the chunk grid must line up with the segments)")


@dataclass(frozen=True)
class _WindowedConfig(TitansConfig):
    """MAG / MAL: sliding-window attention of `window` keys (the query's own included) plus
    the persistent prefix."""
    window: int = 128

    def check(self, d_model: int, where: str) -> None:
        super().check(d_model, where)
        if not isinstance(self.window, int) or self.window < 1:
            raise ConfigError(f"{where}.window must be an int >= 1, got {self.window!r}")


@register_mixer_config
@dataclass(frozen=True)
class MAGConfig(_WindowedConfig):
    """Memory as gate: o = W_o(RMSNorm(SWA*(x)) * sigmoid(RMSNorm(M(x)))), the two branches
    on the same input."""
    kind: ClassVar[str] = "titans_mag"


@register_mixer_config
@dataclass(frozen=True)
class MALConfig(_WindowedConfig):
    """Memory as layer: o = SWA*(RMSNorm(M(x))), the memory's output the attention's input."""
    kind: ClassVar[str] = "titans_mal"


for _cfg in (MACConfig(), MAGConfig(), MALConfig()):
    DEFAULT_MIXERS.setdefault(_cfg.kind, _cfg)

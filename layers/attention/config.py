"""Config of the softmax-attention mixer (layers/attention/mixer.py), kind "attention", and its
default mixer names "attn" (full causal) and "swa" (sliding window of 128)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from layers.config import DEFAULT_MIXERS, ConfigError, HeadsConfig, register_mixer_config

__all__ = ["AttentionConfig"]


@register_mixer_config
@dataclass(frozen=True)
class AttentionConfig(HeadsConfig):
    """Softmax attention: MHA (num_kv_heads == num_heads), GQA, or MQA (num_kv_heads == 1);
    the head fields are HeadsConfig's.

    window: None for full causal attention, or W for sliding-window attention where a query
        sees itself and the W - 1 tokens before it.
    logit_softcap: c * tanh(s / c) on the attention logits (Gemma 2 style), or None.
    conv_size: 0 (off), or W >= 2 for a depthwise causal convolution of width W over time on
        each of the q, k and v projections, before QK-norm and RoPE (Primer's "depthwise conv
        after Q/K/V"; Zoology's attention baselines put a short convolution before attention
        for the same reason: it hands each token its predecessors, which associative recall
        otherwise has to learn as a previous-token head). Documents stay apart; decode keeps
        the last W - 1 projections.
    """
    kind: ClassVar[str] = "attention"
    window: int | None = None
    logit_softcap: float | None = None
    conv_size: int = 0

    def check(self, d_model: int, where: str) -> None:
        super().check(d_model, where)
        if self.window is not None and self.window < 1:
            raise ConfigError(f"{where}.window must be >= 1 or None (full attention), got {self.window}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ConfigError(f"{where}.logit_softcap must be > 0 or None, got {self.logit_softcap}")
        if self.conv_size < 0 or self.conv_size == 1:
            raise ConfigError(f"{where}.conv_size must be 0 (off) or >= 2, got {self.conv_size}")



DEFAULT_MIXERS.setdefault("attn", AttentionConfig())
DEFAULT_MIXERS.setdefault("swa", AttentionConfig(window=128))

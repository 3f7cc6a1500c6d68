"""Configs of the softmax-attention family (layers/attention/), one kind per module:

    attention       mixer.py  MHA / GQA / MQA, windows, and the score and head options below
    diff_attention  diff.py   Differential attention (Ye et al. 2024)
    mla             mla.py    Multi-head latent attention (DeepSeek-V2/V3)

and their default mixer names "attn" (full causal), "swa" (window 128), "diff" and "mla".
The equations, initialisation and departures from each paper are in the module docstrings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from layers.config import (DEFAULT_MIXERS, ConfigError, HeadsConfig, MixerConfig,
                           register_mixer_config)

__all__ = ["AttentionConfig", "DiffAttentionConfig", "MLAConfig"]


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
    gate: "none", or the output gate of Gated Attention (Qiu et al. 2025, position G1):
        o_h <- o_h * sigmoid(x W_g) after attention, before the output projection, from the
        mixer's input x; "headwise" (one gate per head, W_g [d, H]) or "elementwise" (W_g
        [d, H * D]); no bias, as in the paper.
    sinks: a learned logit per query head that joins the softmax denominator with no value
        (gpt-oss's attention sinks; softmax only), initialised to 0.
    score: "softmax", or "sigmoid": weights sigmoid(s + b) per visible key, no normalisation
        (Ramapuram et al. 2024, FlashSigmoid). b = sigmoid_bias, or -ln(sigmoid_length) when
        None (the paper's b = -ln n for sequence length n: set sigmoid_length to the training
        length). The paper pairs it with LayerScale or hybrid-norm: ModelConfig.layer_scale
        and ModelConfig.post_norm.
    head_windows: () (every head as `window` says), or one window per kv head, 0 = full causal
        (multi-scale window attention, MSWA: some heads local, some global in one layer); the
        query heads of a kv head share its window. Excludes `window`. Decode keeps a cache per
        distinct window (a ring buffer of W slots for windowed heads).
    knock_heads: "none", "v" or "qkv": Knocking-Heads Attention (Zhou et al. 2025, KHA-linear):
        a D x D matrix shared by all heads, initialised to the identity, multiplies each head's
        value ("v", the paper's most important one) or query, key and value ("qkv") after the
        projections, before QK-norm and RoPE.
    """
    kind: ClassVar[str] = "attention"
    window: int | None = None
    logit_softcap: float | None = None
    conv_size: int = 0
    gate: Literal["none", "headwise", "elementwise"] = "none"
    sinks: bool = False
    score: Literal["softmax", "sigmoid"] = "softmax"
    sigmoid_bias: float | None = None
    sigmoid_length: int = 1024
    head_windows: tuple[int, ...] = ()
    knock_heads: Literal["none", "v", "qkv"] = "none"

    @property
    def bias(self) -> float:
        """The sigmoid score's bias b (score="sigmoid")."""
        return -math.log(self.sigmoid_length) if self.sigmoid_bias is None else self.sigmoid_bias

    def kv_head_windows(self) -> tuple[int | None, ...]:
        """The window of each kv head (None: full causal)."""
        if self.head_windows:
            return tuple(None if w == 0 else w for w in self.head_windows)
        return (self.window,) * self.kv_heads

    def check(self, d_model: int, where: str) -> None:
        super().check(d_model, where)
        if self.window is not None and self.window < 1:
            raise ConfigError(f"{where}.window must be >= 1 or None (full attention), got {self.window}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ConfigError(f"{where}.logit_softcap must be > 0 or None, got {self.logit_softcap}")
        if self.conv_size < 0 or self.conv_size == 1:
            raise ConfigError(f"{where}.conv_size must be 0 (off) or >= 2, got {self.conv_size}")
        if self.sinks and self.score != "softmax":
            raise ConfigError(f"{where}.sinks=true needs {where}.score='softmax' (a sink joins the "
                              f"softmax denominator; sigmoid weights have none)")
        if self.score == "softmax" and (self.sigmoid_bias is not None or self.sigmoid_length != 1024):
            field = "sigmoid_bias" if self.sigmoid_bias is not None else "sigmoid_length"
            raise ConfigError(f"{where}.{field} is only used with {where}.score='sigmoid'")
        if self.sigmoid_bias is not None and not math.isfinite(self.sigmoid_bias):
            raise ConfigError(f"{where}.sigmoid_bias must be finite or None, got {self.sigmoid_bias}")
        if self.sigmoid_length < 1:
            raise ConfigError(f"{where}.sigmoid_length must be >= 1, got {self.sigmoid_length}")
        if self.head_windows:
            if self.window is not None:
                raise ConfigError(f"{where}: set either {where}.window (every head) or "
                                  f"{where}.head_windows (one per kv head), not both")
            if len(self.head_windows) != self.kv_heads or min(self.head_windows) < 0:
                raise ConfigError(f"{where}.head_windows must hold one window >= 0 per kv head "
                                  f"({self.kv_heads}; 0 = full causal), got {list(self.head_windows)}")


@register_mixer_config
@dataclass(frozen=True)
class DiffAttentionConfig(HeadsConfig):
    """Differential attention (Ye et al. 2024, DIFF Transformer): per head,
    (softmax(Q1 K1^T / sqrt(D)) - lambda softmax(Q2 K2^T / sqrt(D))) V, then a per-head RMSNorm
    and the (1 - lambda_init) scale. The head fields are HeadsConfig's, with these meanings:
    num_heads differential heads, each with two queries and two keys of head_dim D and one value
    of 2 D (head_dim None: d_model // (2 * num_heads), the paper's halved head count at equal
    width); num_kv_heads key pairs / values shared GQA-style.

    lambda_init: the constant in lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init. The
        paper's default schedule 0.8 - 0.6 exp(-0.3 (l - 1)) depends on the layer index l,
        which a mixer config does not know: give layers their own mixer names to vary it.
    window: None (full causal) or a sliding window W, as AttentionConfig's.
    """
    kind: ClassVar[str] = "diff_attention"
    lambda_init: float = 0.8
    window: int | None = None

    def dim_per_head(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // (2 * self.num_heads)

    def check(self, d_model: int, where: str) -> None:
        if self.num_heads >= 1 and self.head_dim is None and d_model % (2 * self.num_heads):
            raise ConfigError(f"{where}.num_heads={self.num_heads}: 2 * num_heads = {2 * self.num_heads} "
                              f"does not divide model.d_model={d_model} (each differential head has "
                              f"two queries); "
                              f"change {where}.num_heads or set {where}.head_dim")
        super().check(d_model, where)
        if self.window is not None and self.window < 1:
            raise ConfigError(f"{where}.window must be >= 1 or None (full attention), got {self.window}")
        if not 0.0 <= self.lambda_init < 1.0:
            raise ConfigError(f"{where}.lambda_init must be in [0, 1), got {self.lambda_init}")


@register_mixer_config
@dataclass(frozen=True)
class MLAConfig(MixerConfig):
    """Multi-head latent attention (DeepSeek-V2, sec. 2.1; DeepSeek-V3): keys and values come
    from a compressed latent c_kv (kv_lora_rank wide, RMSNorm'd) that decode caches together
    with one RoPE key shared by the heads (qk_rope_head_dim wide).

    num_heads: query heads H (every head has its own key and value, decompressed from c_kv).
    q_lora_rank: None (queries projected from x directly, as DeepSeek-V2-Lite) or the width of
        the compressed query c_q (RMSNorm'd).
    kv_lora_rank: width of c_kv; None: 4 * qk_nope_head_dim (DeepSeek's 512 = 4 * 128).
    qk_nope_head_dim: per-head query / key width without RoPE; None: d_model // num_heads.
    qk_rope_head_dim: width of the decoupled RoPE query (per head) and key (shared); None:
        qk_nope_head_dim // 2 rounded down to even, at least 2 (DeepSeek's 64 = 128 / 2). Even.
    v_head_dim: per-head value width; None: qk_nope_head_dim.
    rope_theta: RoPE base of the decoupled part.

    Decode caches (kv_lora_rank + qk_rope_head_dim) numbers per token and layer, against
    num_heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) for MHA with these heads.
    """
    kind: ClassVar[str] = "mla"
    num_heads: int = 4
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_theta: float = 10_000.0

    def dims(self, d_model: int) -> tuple[int, int, int, int]:
        """(nope, rope, v, kv_lora_rank) widths with the defaults resolved."""
        nope = self.qk_nope_head_dim if self.qk_nope_head_dim is not None else d_model // self.num_heads
        rope = self.qk_rope_head_dim if self.qk_rope_head_dim is not None else max(2, nope // 2 // 2 * 2)
        v = self.v_head_dim if self.v_head_dim is not None else nope
        rank = self.kv_lora_rank if self.kv_lora_rank is not None else 4 * nope
        return nope, rope, v, rank

    def check(self, d_model: int, where: str) -> None:
        if self.num_heads < 1:
            raise ConfigError(f"{where}.num_heads must be >= 1, got {self.num_heads}")
        if self.qk_nope_head_dim is None and d_model % self.num_heads:
            raise ConfigError(f"{where}.num_heads={self.num_heads} does not divide model.d_model="
                              f"{d_model}; choose a divisor or set {where}.qk_nope_head_dim")
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{where}.{name} must be >= 1 or None, got {v}")
        if self.dims(d_model)[1] % 2:
            raise ConfigError(f"{where}.qk_rope_head_dim must be even (RoPE rotates pairs), got "
                              f"{self.qk_rope_head_dim}")
        if not self.rope_theta > 0:
            raise ConfigError(f"{where}.rope_theta must be > 0, got {self.rope_theta}")


DEFAULT_MIXERS.setdefault("attn", AttentionConfig())
DEFAULT_MIXERS.setdefault("swa", AttentionConfig(window=128))
DEFAULT_MIXERS.setdefault("diff", DiffAttentionConfig())
DEFAULT_MIXERS.setdefault("mla", MLAConfig())

"""Configs of the token mixers built on the chunked linear-attention op (layers/linear_attention).

Nine kinds, each registered for JSON (`kind`) and given a default mixer name in
`DEFAULT_MIXERS` (the same as its kind), so `model.pattern=("gla", "gla", "gla", "attn")` works
without declaring mixers, and `--set model.mixers.gla.num_heads=2` edits the default:

    linear     vanilla linear attention (Katharopoulos et al. 2020)
    retention  RetNet multi-scale retention (Sun et al. 2023)
    lightning  TransNormerLLM / Lightning Attention (Qin et al. 2023, 2024)
    ssd        Mamba2 state-space duality layer (Dao & Gu 2024)
    gla        Gated Linear Attention (Yang et al. 2024)
    hgrn2      HGRN2 (Qin et al. 2024)
    mlstm      xLSTM mLSTM with a sigmoid input gate ("mLSTMsig", Beck et al. 2025, TFLA)
    deltanet   DeltaNet (Yang et al. 2024), on the delta-rule op
    gdn        Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025), on the delta-rule op

Widths are given as expansion ratios of d_model (as fla does), so one config serves any width;
`check` names the field and the accepted values when a width does not divide. The equations and
what each field means live in the mixer's module docstring.

`conv_size`: width of an optional short depthwise causal convolution (layers/conv.py) on the
projections before the recurrence; 0 disables it. On by default only where the paper has it
(ssd, deltanet, gdn).

Imported by models/config.py, so these kinds exist wherever `ModelConfig` does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from layers.config import (DEFAULT_MIXERS, ConfigError, MixerConfig, check_literals,
                           register_mixer_config)

__all__ = ["qkv_widths", "head_width", "LinearAttnConfig", "RetentionConfig", "LightningConfig", "SSDConfig", "GLAConfig",
           "HGRN2Config", "MLSTMConfig", "DeltaNetConfig", "GDNConfig", "LINEAR_ATTENTION_CONFIGS"]


# ----------------------------------------------------------------------------- shared checks

def _positive(cfg, where: str, *names: str) -> None:
    for n in names:
        if not getattr(cfg, n) > 0:
            raise ConfigError(f"{where}.{n} must be > 0, got {getattr(cfg, n)}")


def _check_conv(conv_size: int, where: str) -> None:
    if conv_size != 0 and conv_size < 2:
        raise ConfigError(f"{where}.conv_size must be 0 (no convolution) or >= 2, got {conv_size}")


def head_width(d_model: int, expand: float, num_heads: int, where: str, field: str) -> int:
    """Per-head width of a projection of total width d_model * expand split over num_heads;
    ConfigError naming `where.field` when that is not a whole number per head."""
    total = d_model * expand
    if total < 1 or not math.isclose(total, round(total)) or round(total) % num_heads:
        raise ConfigError(
            f"{where}.{field}={expand} gives width d_model * {field} = {total:g}, which must be a "
            f"whole multiple of {where}.num_heads={num_heads}")
    return round(total) // num_heads


def qkv_widths(cfg, d_model: int, where: str | None = None) -> tuple[int, int]:
    """Per-head key and value widths (K, V) of a config with num_heads, expand_k, expand_v;
    ConfigError naming `where` (default: the kind) when they are impossible."""
    where = where or cfg.kind
    _heads(cfg, where)
    return (head_width(d_model, cfg.expand_k, cfg.num_heads, where, "expand_k"),
            head_width(d_model, cfg.expand_v, cfg.num_heads, where, "expand_v"))


def _check_mamba2_init(cfg, where: str) -> None:
    """The Mamba2 decay initialisation fields (dt_min, dt_max, dt_init_floor, a_init_min,
    a_init_max) of ssd and gdn."""
    _positive(cfg, where, "dt_min", "dt_max", "dt_init_floor", "a_init_min", "a_init_max")
    if cfg.dt_min > cfg.dt_max:
        raise ConfigError(f"{where}.dt_min={cfg.dt_min} must be <= {where}.dt_max={cfg.dt_max}")
    if cfg.a_init_min > cfg.a_init_max:
        raise ConfigError(f"{where}.a_init_min={cfg.a_init_min} must be <= "
                          f"{where}.a_init_max={cfg.a_init_max}")


def _heads(cfg, where: str) -> None:
    if cfg.num_heads < 1:
        raise ConfigError(f"{where}.num_heads must be >= 1, got {cfg.num_heads}")


# ----------------------------------------------------------------------------- the seven kinds

@register_mixer_config
@dataclass(frozen=True)
class LinearAttnConfig(MixerConfig):
    """Vanilla linear attention. feature_map: "elu" (elu(x) + 1), "relu" or "identity".
    normalize: divide by q . sum_s k_s (needs a non-negative feature map). output_norm: RMSNorm
    per head before the output projection."""
    kind: ClassVar[str] = "linear"
    num_heads: int = 4
    expand_k: float = 1.0
    expand_v: float = 1.0
    feature_map: Literal["elu", "relu", "identity"] = "elu"
    normalize: bool = True
    output_norm: bool = True
    conv_size: int = 0

    def check(self, d_model: int, where: str) -> None:
        check_literals(self, where)
        qkv_widths(self, d_model, where)
        if self.normalize and self.feature_map == "identity":
            raise ConfigError(f"{where}.normalize=True needs a non-negative feature map "
                              f"({where}.feature_map 'elu' or 'relu'), got 'identity'")
        _check_conv(self.conv_size, where)


@register_mixer_config
@dataclass(frozen=True)
class RetentionConfig(MixerConfig):
    """RetNet multi-scale retention: fixed decay gamma_h = 1 - 2^(-5 - h) per head, rotary q/k,
    value width expand_v * d_model (2x in the paper), per-head RMSNorm, swish output gate."""
    kind: ClassVar[str] = "retention"
    num_heads: int = 4
    expand_k: float = 1.0
    expand_v: float = 2.0
    rope_theta: float = 10_000.0
    conv_size: int = 0

    def check(self, d_model: int, where: str) -> None:
        dk, _ = qkv_widths(self, d_model, where)
        if dk % 2:
            raise ConfigError(f"{where}: key head dim {dk} must be even for the rotary embedding "
                              f"(change {where}.expand_k or {where}.num_heads)")
        _positive(self, where, "rope_theta")
        _check_conv(self.conv_size, where)


@register_mixer_config
@dataclass(frozen=True)
class LightningConfig(MixerConfig):
    """TransNormerLLM lightning attention: fixed decay exp(-slope_scale * s_h) per head with
    ALiBi slopes s_h, swish q/k, SimpleRMSNorm, output gate U (activation `output_gate`)."""
    kind: ClassVar[str] = "lightning"
    num_heads: int = 4
    expand_k: float = 1.0
    expand_v: float = 1.0
    slope_scale: float = 1.0  # TNL: 1 - l / (L - 1) + 1e-5 for layer l of L (see the module)
    output_gate: Literal["none", "sigmoid", "swish"] = "none"
    conv_size: int = 0

    def check(self, d_model: int, where: str) -> None:
        check_literals(self, where)
        qkv_widths(self, d_model, where)
        if self.slope_scale < 0:
            raise ConfigError(f"{where}.slope_scale must be >= 0 (0: no decay), got {self.slope_scale}")
        _check_conv(self.conv_size, where)


@register_mixer_config
@dataclass(frozen=True)
class SSDConfig(MixerConfig):
    """Mamba2 (SSD): inner width expand * d_model in heads of head_dim, B/C of state_dim shared by
    n_groups head groups, conv on x/B/C, dt initialised log-uniformly in [dt_min, dt_max],
    A = exp(A_log) initialised uniformly in [a_init_min, a_init_max]."""
    kind: ClassVar[str] = "ssd"
    expand: int = 2
    head_dim: int = 64
    state_dim: int = 128
    n_groups: int = 1
    conv_size: int = 4
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    a_init_min: float = 1.0
    a_init_max: float = 16.0

    def num_heads(self, d_model: int) -> int:
        return self.expand * d_model // self.head_dim

    def check(self, d_model: int, where: str) -> None:
        for n in ("expand", "head_dim", "state_dim", "n_groups"):
            if getattr(self, n) < 1:
                raise ConfigError(f"{where}.{n} must be >= 1, got {getattr(self, n)}")
        inner = self.expand * d_model
        if inner % self.head_dim:
            raise ConfigError(f"{where}.head_dim={self.head_dim} must divide the inner width "
                              f"{where}.expand * d_model = {inner}")
        if self.num_heads(d_model) % self.n_groups:
            raise ConfigError(f"{where}.n_groups={self.n_groups} must divide the number of heads "
                              f"{self.num_heads(d_model)} (= expand * d_model / head_dim)")
        _check_mamba2_init(self, where)
        _check_conv(self.conv_size, where)


@register_mixer_config
@dataclass(frozen=True)
class GLAConfig(MixerConfig):
    """Gated Linear Attention: key width expand_k * d_model (1/2 in the paper), per-key-channel
    forget gate logsigmoid(low-rank proj) / gate_logit_normalizer, per-head RMSNorm, swish
    output gate."""
    kind: ClassVar[str] = "gla"
    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    conv_size: int = 0

    def check(self, d_model: int, where: str) -> None:
        qkv_widths(self, d_model, where)
        if self.gate_low_rank_dim < 1:
            raise ConfigError(f"{where}.gate_low_rank_dim must be >= 1, got {self.gate_low_rank_dim}")
        _positive(self, where, "gate_logit_normalizer")
        _check_conv(self.conv_size, where)


@register_mixer_config
@dataclass(frozen=True)
class HGRN2Config(MixerConfig):
    """HGRN2: forget gate f = lower_bound + (1 - lower_bound) * sigmoid(.) per key channel, key
    tied as 1 - f, swish query, RMSNorm on the output; output_gate adds HGRN1's swish gate."""
    kind: ClassVar[str] = "hgrn2"
    num_heads: int = 4
    expand_k: float = 1.0
    lower_bound: float = 0.0
    output_gate: bool = False
    conv_size: int = 0

    def check(self, d_model: int, where: str) -> None:
        _heads(self, where)
        head_width(d_model, self.expand_k, self.num_heads, where, "expand_k")
        if d_model % self.num_heads:
            raise ConfigError(f"{where}.num_heads={self.num_heads} must divide model.d_model={d_model} "
                              f"(the value width of HGRN2 is d_model)")
        if not 0.0 <= self.lower_bound < 1.0:
            raise ConfigError(f"{where}.lower_bound must be in [0, 1), got {self.lower_bound}")
        _check_conv(self.conv_size, where)


@register_mixer_config
@dataclass(frozen=True)
class MLSTMConfig(MixerConfig):
    """mLSTM, xLSTM-7B layer layout: q/k width expand_qk * d_model, v width expand_v * d_model,
    per-head scalar gates soft-capped at gate_soft_cap, normaliser max(|q n|, 1), per-head
    norm, sigmoid output gate. input_gate: "sigmoid" (mLSTMsig, TFLA) or "exp" (the original
    exponential gate, as xLSTM 7B; bias -10 there). output_norm: "rms" (RMSNorm, one [V] scale
    shared by the heads) or "layernorm" (per-head LayerNorm with a scale per head and channel,
    [H * V], as xLSTM 7B's multi-head norm)."""
    kind: ClassVar[str] = "mlstm"
    num_heads: int = 4
    expand_qk: float = 0.5
    expand_v: float = 1.0
    input_gate: Literal["sigmoid", "exp"] = "sigmoid"
    output_norm: Literal["rms", "layernorm"] = "rms"
    gate_soft_cap: float | None = 15.0
    igate_bias_init: float = 0.0
    fgate_bias_init_min: float = 3.0
    fgate_bias_init_max: float = 6.0
    conv_size: int = 0

    def check(self, d_model: int, where: str) -> None:
        check_literals(self, where)
        _heads(self, where)
        head_width(d_model, self.expand_qk, self.num_heads, where, "expand_qk")
        head_width(d_model, self.expand_v, self.num_heads, where, "expand_v")
        if self.gate_soft_cap is not None and self.gate_soft_cap <= 0:
            raise ConfigError(f"{where}.gate_soft_cap must be > 0 or None, got {self.gate_soft_cap}")
        if self.input_gate == "exp" and (self.gate_soft_cap is None or self.gate_soft_cap > 30):
            raise ConfigError(f"{where}.input_gate='exp' needs {where}.gate_soft_cap <= 30 (got "
                              f"{self.gate_soft_cap}): the unstabilised exponential gate relies on the cap "
                              "to keep exp(i) within float32")
        if self.fgate_bias_init_min > self.fgate_bias_init_max:
            raise ConfigError(f"{where}.fgate_bias_init_min={self.fgate_bias_init_min} must be <= "
                              f"{where}.fgate_bias_init_max={self.fgate_bias_init_max}")
        _check_conv(self.conv_size, where)


@register_mixer_config
@dataclass(frozen=True)
class DeltaNetConfig(MixerConfig):
    """DeltaNet: q/k/v of widths expand_k / expand_v * d_model through a short conv + SiLU,
    L2-normalised q/k, write strength beta = sigmoid(x W_beta) per head (2 sigmoid(.) with
    allow_neg_eigval), per-head RMSNorm (gated by swish(x W_g) with use_gate), no decay."""
    kind: ClassVar[str] = "deltanet"
    num_heads: int = 4
    expand_k: float = 1.0
    expand_v: float = 1.0
    use_gate: bool = False
    allow_neg_eigval: bool = False
    conv_size: int = 4

    def check(self, d_model: int, where: str) -> None:
        qkv_widths(self, d_model, where)
        _check_conv(self.conv_size, where)


@register_mixer_config
@dataclass(frozen=True)
class GDNConfig(MixerConfig):
    """Gated DeltaNet: DeltaNet plus a per-head decay g = -exp(A_log) softplus(x W_a + dt_bias)
    (Mamba2's, initialised from dt_min / dt_max / dt_init_floor and a_init_min / a_init_max as
    ssd), value width twice the key width by default, gated RMSNorm (use_gate)."""
    kind: ClassVar[str] = "gdn"
    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    use_gate: bool = True
    allow_neg_eigval: bool = False
    conv_size: int = 4
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    a_init_min: float = 1.0
    a_init_max: float = 16.0

    def check(self, d_model: int, where: str) -> None:
        qkv_widths(self, d_model, where)
        _check_mamba2_init(self, where)
        _check_conv(self.conv_size, where)


LINEAR_ATTENTION_CONFIGS = (LinearAttnConfig, RetentionConfig, LightningConfig, SSDConfig, GLAConfig,
                            HGRN2Config, MLSTMConfig, DeltaNetConfig, GDNConfig)

for _cls in LINEAR_ATTENTION_CONFIGS:
    DEFAULT_MIXERS.setdefault(_cls.kind, _cls())

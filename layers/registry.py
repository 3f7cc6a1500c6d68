"""Token-mixer registry: config class -> nnx.Module class.

Every mixer has the same shape, so the model only ever deals in names:

    mixer = cls(cfg, ctx, rngs=rngs)
    y, cache = mixer(x, positions=..., segment_ids=..., cache=None)   # x, y: [B, T, d_model]
    cache = mixer.init_cache(batch, max_len, dtype)
    cls.flops_per_token(cfg, d_model, seq_len)    # training FLOPs (fwd + bwd) per token
    mixer.describe()                               # one line for the start-up log
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layers.config import ConfigError, MixerConfig, RuntimeConfig


@dataclass(frozen=True)
class LayerContext:
    """What every layer needs besides its own config."""
    d_model: int
    dtype: Any  # compute dtype (params are always float32)
    runtime: RuntimeConfig
    init_std: float  # std of input projections
    out_std: float  # std of projections that write into the residual stream
    norm_eps: float = 1e-6  # eps of every RMSNorm inside a mixer (model.norm_eps)


_MIXERS: dict[type[MixerConfig], type] = {}


def register_mixer(config_cls: type[MixerConfig]):
    """Class decorator binding a mixer module to its config class."""
    def deco(module_cls):
        _MIXERS[config_cls] = module_cls
        return module_cls
    return deco


def registered_mixers() -> dict[type[MixerConfig], type]:
    """Every registered config class -> its mixer module class (for conformance tests)."""
    return dict(_MIXERS)


def mixer_class(cfg: MixerConfig) -> type:
    try:
        return _MIXERS[type(cfg)]
    except KeyError:
        raise ConfigError(f"no mixer module is registered for config kind {cfg.kind!r}; "
                          f"registered: {sorted(c.kind for c in _MIXERS)}") from None


def build_mixer(cfg: MixerConfig, ctx: LayerContext, *, rngs):
    return mixer_class(cfg)(cfg, ctx, rngs=rngs)

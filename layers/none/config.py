"""Config of the identity mixer (layers/none/mixer.py), kind "none", default mixer name "none":
a layer whose mixer adds nothing (the block is its MLP alone), the control of mixer ablations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from layers.config import DEFAULT_MIXERS, MixerConfig, register_mixer_config

__all__ = ["NoneConfig"]


@register_mixer_config
@dataclass(frozen=True)
class NoneConfig(MixerConfig):
    """No fields: the mixer returns zeros, so x + mixer(norm(x)) = x."""
    kind: ClassVar[str] = "none"


DEFAULT_MIXERS.setdefault("none", NoneConfig())

"""Model assembly: `build(model_cfg, runtime_cfg, seed)` returns an NNX LM."""
from __future__ import annotations

from flax import nnx

import layers  # noqa: F401  (registers the mixers)
import models.titans  # noqa: F401  (registers the Titans MAC / MAG / MAL mixers)
from models.lm import LM, flops_per_token, lm_loss, resolve_dtype
from train.config import ModelConfig, RuntimeConfig

__all__ = ["LM", "build", "flops_per_token", "lm_loss", "resolve_dtype"]


def build(cfg: ModelConfig, runtime: RuntimeConfig | None = None, *, seed: int = 0) -> LM:
    return LM(cfg, runtime or RuntimeConfig(), rngs=nnx.Rngs(params=seed))

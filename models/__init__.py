"""Model assembly: `build(model_cfg, runtime_cfg, seed)` returns an NNX LM.

The package itself imports nothing heavy (`models.config` must load without jax); `LM`,
`build`, `flops_per_token`, `lm_loss` and `resolve_dtype` come from models/lm.py on first use.
"""
from __future__ import annotations

import importlib

__all__ = ["LM", "build", "flops_per_token", "lm_loss", "resolve_dtype"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("models.lm"), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")

"""What a model costs, for matching ablations on parameters, compute or decode state.

    model_stats(model_cfg, runtime, seq_len, state_lengths=(1024, 4096, 16384, 65536))

returns a JSON-able dict:

    params            total trainable parameters
    params_by_part    {"embedding", "head", "mlp", "norms", "mixer:<name>" per mixer name}
                      (summed over the layers that use the name); the parts add up to params.
                      "norms" holds every block param outside the mixer and the MLP (pre-norms,
                      and the post-norms and LayerScale vectors of model.post_norm / layer_scale)
                      plus the final norm
    mixer_kinds       {name: kind} of the mixers the layers use, in layer order
    flops_per_token   training FLOPs per token at seq_len (forward + backward, models.flops_per_token)
    flops_by_part     the same split ("mixer:<name>", "mlp", "head")
    state_bytes       {str(L): bytes of the decode state of ONE sequence after L tokens}: every
                      layer's cache from `init_cache(1, L)` (a KV cache grows with L, a sliding
                      window's ring buffer stops at the window, a recurrent state is constant)
    state_bytes_by_mixer  {str(L): {name: bytes}}
    state_dtype       the dtype the KV caches were sized in (the compute dtype)

Nothing is allocated: the model and the caches are built abstractly (`nnx.eval_shape`,
`jax.eval_shape`), so this is cheap for any size.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from layers.config import RuntimeConfig
from models.config import ModelConfig
from models.lm import LM, flops_per_token, resolve_dtype

__all__ = ["model_stats", "param_counts", "state_bytes"]

DEFAULT_STATE_LENGTHS = (1024, 4096, 16384, 65536)


def _count(module) -> int:
    if module is None:  # a block without an MLP
        return 0
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def _abstract_model(cfg: ModelConfig, runtime: RuntimeConfig) -> LM:
    return nnx.eval_shape(lambda: LM(cfg, runtime, rngs=nnx.Rngs(params=0)))


def param_counts(model: LM) -> dict[str, int]:
    """Trainable parameters of an (abstract) LM split by part; see the module docstring."""
    parts = {"embedding": _count(model.embed), "head": 0 if model.head is None else _count(model.head),
             "mlp": 0, "norms": _count(model.final_norm)}
    for block in model.stack.periods():  # one Block per layer (a scanned period stands for each of its copies)
        key = f"mixer:{block.name}"
        parts[key] = parts.get(key, 0) + _count(block.mixer)
        parts["mlp"] += _count(block.mlp)
        # the rest of the block: its pre-norms, and post-norms and LayerScale vectors when on
        parts["norms"] += _count(block) - _count(block.mixer) - _count(block.mlp)
    return parts


def state_bytes(model: LM, lengths, dtype) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(total, by mixer name) decode-cache bytes of one sequence at each length in `lengths`."""
    total, by_mixer = {}, {}
    for length in lengths:
        per = {}
        for block in model.stack.periods():
            shapes = jax.eval_shape(lambda b=block: b.mixer.init_cache(1, int(length), dtype))
            nbytes = int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes)))
            per[block.name] = per.get(block.name, 0) + nbytes
        by_mixer[str(length)] = per
        total[str(length)] = sum(per.values())
    return total, by_mixer


def model_stats(cfg: ModelConfig, runtime: RuntimeConfig | None = None, *, seq_len: int,
                state_lengths=DEFAULT_STATE_LENGTHS) -> dict:
    """Parameters, training FLOPs/token and decode-state bytes of `cfg` (vocab_size resolved)."""
    runtime = runtime or RuntimeConfig()
    model = _abstract_model(cfg, runtime)
    parts = param_counts(model)
    flops = flops_per_token(cfg, seq_len)
    flops_by_part = {(k if k in ("mlp", "head") else f"mixer:{k}"): float(v) for k, v in flops.items()}
    dtype = resolve_dtype(runtime)
    total, by_mixer = state_bytes(model, state_lengths, dtype)
    kinds = {name: cfg.mixer(name).kind for name in cfg.layer_names()}
    return {"params": sum(parts.values()), "params_by_part": parts, "mixer_kinds": kinds,
            "flops_per_token": float(sum(flops.values())), "flops_by_part": flops_by_part,
            "flops_seq_len": int(seq_len),
            "state_bytes": total, "state_bytes_by_mixer": by_mixer, "state_dtype": np.dtype(dtype).name}

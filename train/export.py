"""Export a run's params as safetensors: Chimera's own names, or a Hugging Face model directory.

    python -m train.export RUN_DIR --format safetensors|hf [--step N] [--out DIR]

The default out is RUN_DIR/export/<format>-step<N>. Either format writes into it:

    chimera_config.json    the run's resolved Config (`load_exported(dir)` rebuilds the model)
    tokenizer files        Tokenizer.save (for `hf`, also HF-loadable files: train/hf/tokenizer.py)
    model.safetensors      or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                           (Hugging Face's sharded layout) when the params exceed --shard-gib

`hf` adds config.json and uses transformers' tensor names (train/hf/). `safetensors` uses
Chimera's names, one tensor per layer: a scanned stack's params [n_periods, ...] are cut into
their layers, so the file does not depend on model.scan or on how layers split into periods
(it loads into the same architecture built with scan on or off). With d the model width, V the
vocabulary, H / K query / kv heads of D dims and F the MLP hidden width:

    embed.embedding                    [V, d]
    layers.<i>.mixer_norm.scale        [d]        i = 0 .. num_layers - 1, in depth order
    layers.<i>.mixer.q_proj.kernel     [d, H*D]   Dense kernels are [d_in, d_out], as in the model
    layers.<i>.mixer.k_proj.kernel     [d, K*D]   (and v_proj; o_proj [H*D, d]; q_norm / k_norm
                                                   .scale [D] with QK-norm)
    layers.<i>.mlp_norm.scale          [d]
    layers.<i>.mlp.gate.kernel         [d, F]     (and up [d, F], down [F, d])
    final_norm.scale                   [d]
    head.kernel                        [d, V]     untied embeddings only

A new mixer's params appear under layers.<i>.mixer.<its nnx path> with no change here. The
file metadata says {"format": "chimera", "chimera_step": N} ("pt" for `hf`, as transformers
expects), which is how `load_exported` tells the two formats apart.

Files are written and read by train/safetensors_io.py, one tensor at a time.
Export runs as one process: every tensor is gathered whole onto the host that writes it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.errors import USER_ERRORS
from train.config import Config, ConfigError, RuntimeConfig, from_dict, to_dict
from train.safetensors_io import DEFAULT_SHARD_BYTES, SafetensorsReader, TensorOut, write_safetensors

FORMATS = ("safetensors", "hf")
CONFIG_FILE = "chimera_config.json"
CHIMERA_FORMAT = "chimera"  # safetensors metadata "format" of the `safetensors` export


# ----------------------------------------------------------------------------- Chimera param names

@dataclasses.dataclass(frozen=True)
class ParamRef:
    """One per-layer tensor of the model: its Chimera name and where it lives.

    path: the nnx path of the Variable; index: position along the stacked (period) axis of a
    scanned param, or None; shape: the shape of this one tensor (without the stacked axis).
    """
    name: str
    path: tuple
    index: int | None
    shape: tuple[int, ...]
    layer: int | None


def param_variables(model) -> dict[tuple, nnx.Variable]:
    """nnx path -> the model's own Param variables (setting one changes the model)."""
    return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def param_refs(model) -> list[ParamRef]:
    """Every param tensor of an LM in order: embed, layers 0..L-1, final_norm, head.

    The stack keeps layer i either in `stack.scanned` (stacked over n periods: block j of
    period p is layer p * P + j for a pattern of length P) or in `stack.loop` (period i of the
    loop, after the scanned ones, block j is layer (n + i) * P + j; the remainder comes last).
    """
    period = len(model.cfg.pattern)
    n_scanned = model.stack.num_scanned
    refs: list[ParamRef] = []
    for path, var in param_variables(model).items():
        shape = tuple(var.get_value().shape)
        if path[:3] == ("stack", "scanned", "blocks"):
            j, rest = path[3], path[4:]
            for p in range(shape[0]):
                layer = p * period + j
                refs.append(ParamRef(_layer_name(layer, rest), path, p, shape[1:], layer))
        elif path[:2] == ("stack", "loop") and path[3] == "blocks":
            layer = (n_scanned + path[2]) * period + path[4]
            refs.append(ParamRef(_layer_name(layer, path[5:]), path, None, shape, layer))
        elif path[0] == "stack":
            raise ValueError(f"param {path} is not in a block of the stack; "
                             "train/export.py must learn its layout")
        else:
            refs.append(ParamRef(".".join(map(str, path)), path, None, shape, None))
    order = {"embed": 0, "final_norm": 2, "head": 3}
    return sorted(refs, key=lambda r: (order.get(r.name.split(".")[0], 1), r.layer or 0, r.name))


def _layer_name(layer: int, rest: tuple) -> str:
    return ".".join(["layers", str(layer), *map(str, rest)])


def read_param(variables: dict, ref: ParamRef) -> np.ndarray:
    """The host copy of one tensor (one layer's slice of a stacked param)."""
    a = variables[ref.path].get_value()
    if ref.index is not None:
        a = a[ref.index]
    return np.asarray(jax.device_get(a))


def chimera_tensors(model) -> list[TensorOut]:
    """The model's params under their Chimera names, fetched lazily (for write_safetensors)."""
    variables = param_variables(model)
    return [TensorOut(r.name, r.shape, np.dtype(variables[r.path].get_value().dtype),
                      lambda r=r: read_param(variables, r)) for r in param_refs(model)]


def assign_params(model, fetch: Callable[[ParamRef], np.ndarray]):
    """Set every param of `model` from `fetch(ref)` (one array per ParamRef, its `shape`),
    stacking the layers of scanned params. Values are cast to the param's dtype and keep its
    sharding. Works on abstract models (nnx.eval_shape) too. Returns the model."""
    variables = param_variables(model)
    by_path: dict[tuple, list[ParamRef]] = {}
    for r in param_refs(model):
        by_path.setdefault(r.path, []).append(r)
    for path, refs in by_path.items():
        var = variables[path]
        old = var.get_value()
        parts = []
        for r in sorted(refs, key=lambda r: r.index or 0):
            a = np.asarray(fetch(r))
            if a.shape != r.shape:
                raise ConfigError(f"param {r.name}: got shape {a.shape}, the model needs {r.shape}")
            parts.append(a.astype(old.dtype, copy=False))
        new = np.stack(parts) if refs[0].index is not None else parts[0]
        if isinstance(old, jax.Array):
            new = jax.device_put(new, old.sharding)
        elif isinstance(old, jax.ShapeDtypeStruct):
            new = jnp.asarray(new)
        var.set_value(new)
    return model


def load_chimera_safetensors(path: str | Path, model):
    """Load a `safetensors`-format export into `model` (same architecture, any scan setting).
    Every model tensor must be in the file with its shape, and every file tensor must be used."""
    reader = SafetensorsReader(path)
    refs = param_refs(model)
    want = {r.name for r in refs}
    missing, extra = sorted(want - set(reader.names())), sorted(set(reader.names()) - want)
    if missing or extra:
        raise ConfigError(f"{path} does not match the model: missing {short_list(missing)}, "
                          f"unexpected {short_list(extra)}")
    return assign_params(model, lambda r: reader.get(r.name))


def short_list(items: list[str], n: int = 6, sep: str = ", ") -> str:
    """The first n items joined, and how many more there are."""
    if not items:
        return "none"
    return sep.join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# ----------------------------------------------------------------------------- export / load

def load_exported(export_dir: str | Path, runtime: RuntimeConfig | None = None):
    """(Config, LM) from an export directory of either format (chimera_config.json + weights).
    The model is built abstractly and filled from the file, never randomly initialised."""
    import models
    export_dir = Path(export_dir)
    cfg_path = export_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise ConfigError(f"{export_dir} has no {CONFIG_FILE}; it was not written by train.export")
    cfg = from_dict(Config, json.loads(cfg_path.read_text()))
    if runtime is not None:
        cfg = dataclasses.replace(cfg, runtime=runtime)
    model = nnx.eval_shape(lambda: models.build(cfg.model, cfg.runtime, seed=cfg.train.seed))
    if SafetensorsReader(export_dir).metadata.get("format") == CHIMERA_FORMAT:
        return cfg, load_chimera_safetensors(export_dir, model)
    from train.hf import import_params
    return cfg, import_params(export_dir, model)


def export_run(run_dir: str | Path, fmt: str = "safetensors", step: int | None = None,
               out: str | Path | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Export checkpoint `step` (default: the newest) of `run_dir`; returns the out directory."""
    from train import hf  # hf builds on this module's files and names
    from train.artifacts import load_config, load_run
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; choose one of {list(FORMATS)}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if fmt == "hf":  # refuse before the (possibly long) checkpoint read
        hf.choose_arch(load_config(run_dir).model)
    run = load_run(run_dir, step)
    out = Path(out) if out is not None else run_dir / "export" / f"{fmt}-step{run.step}"
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(to_dict(run.cfg), indent=2) + "\n")
    run.tokenizer.save(out)
    # "pt" is what transformers expects of a checkpoint's metadata; ours tells load_exported apart
    meta = {"format": "pt" if fmt == "hf" else CHIMERA_FORMAT, "chimera_step": str(run.step)}
    if fmt == "hf":
        hf.write_hf_config(run.cfg, out)
        hf.write_hf_tokenizer(run.tokenizer, out)
        tensors = hf.hf_tensors(run.model)
    else:
        tensors = chimera_tensors(run.model)
    write_safetensors(out, tensors, metadata=meta, max_shard_bytes=max_shard_bytes)
    return out


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (config.json + checkpoints/)")
    p.add_argument("--format", default="safetensors", choices=FORMATS,
                   help="safetensors: Chimera names, any model; hf: a transformers model directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest readable)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export/<format>-step<N>)")
    p.add_argument("--shard-gib", type=float, default=DEFAULT_SHARD_BYTES / 1024**3,
                   help="largest safetensors file before splitting into shards, GiB (default 2)")
    args = p.parse_args(None if argv is None else list(argv))
    try:
        out = export_run(args.run_dir, args.format, args.step, args.out, int(args.shard_gib * 1024**3))
    except USER_ERRORS as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    files = sorted(f.name for f in out.iterdir())
    print(f"exported {args.run_dir} ({args.format}) to {out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

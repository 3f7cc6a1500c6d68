"""Glue shared by the ops whose implementations are Pallas kernels (chunked_linear_attention,
delta_rule): registering the implementations with `dispatch`, the api's option handling, and
the small pure pieces of the Triton (gpu.py) and Mosaic (tpu.py) wrappers that must stay the
same for every op (refusal messages, platform detection, matmul precision, GQA reductions).

Kernel bodies, block specs and launch parameters stay in each op's modules: they look alike
but are tuned per op.
"""
from __future__ import annotations

import functools
import importlib
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import dispatch

F32 = jnp.float32
PALLAS = ("gpu", "tpu")  # implementation names that are Pallas kernels (accept interpret=True)


# ----------------------------------------------------------------------------- api.py

def register_implementations(op: str, package: str, reference_fn) -> None:
    """Register `reference_fn` and the function named `op` of the modules `package`.xla /
    .gpu / .tpu under those names, and the order tried with implementation=None: the
    platform's Pallas kernels, then xla, then reference. A backend module this installation
    cannot import is left out and logged, so that the op still works through the others."""
    dispatch.register(op, "reference", reference_fn)
    for name in ("xla", *PALLAS):
        try:
            module = importlib.import_module(f"{package}.{name}")
        except ImportError as e:
            logging.getLogger("chimera.kernels").info("%s: %r unavailable: %s", op, name, e)
        else:
            dispatch.register(op, name, getattr(module, op))
    dispatch.set_order(op, ("xla", "reference"))
    dispatch.set_order(op, ("gpu", "xla", "reference"), platform="gpu")
    dispatch.set_order(op, ("tpu", "xla", "reference"), platform="tpu")


def dispatch_kwargs(q, k, v, log_decay, initial_state, segment_ids, *, scale: float | None,
                    chunk_size: int, implementation: str | None,
                    interpret: bool) -> dict:
    """Keyword arguments of `dispatch.call` for a chunked op: implementation, the signature
    (the shapes and options an implementation's choice depends on, logged and recorded per
    call) and the implementation's options (scale, default 1/sqrt(K); chunk_size; interpret
    only when set, since only the Pallas implementations accept it). Raises ValueError for
    interpret=True without a Pallas implementation named: interpret mode with fallback would
    silently run something else."""
    check_interpret(interpret, implementation)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    options = dict(scale=scale, chunk_size=int(chunk_size))
    if interpret:
        options["interpret"] = True
    signature = dispatch.signature(q=q, k=k, v=v, log_decay=log_decay,
                                   initial_state=initial_state is not None,
                                   segments=segment_ids is not None, chunk_size=int(chunk_size))
    return dict(implementation=implementation, signature=signature, **options)


# ----------------------------------------------------------------------------- argument checks

def check_interpret(interpret: bool, implementation: str | None) -> None:
    """ValueError for interpret=True without a Pallas implementation named: interpret mode with
    fallback would silently run something else."""
    if interpret and implementation not in PALLAS:
        raise ValueError(f"interpret=True needs implementation in {list(PALLAS)}, got "
                         f"{implementation!r}")


def check_segment_ids(segment_ids, b: int, t: int) -> None:
    """Raise ValueError unless segment_ids is None or int [B, T] = [b, t] (0 = padding)."""
    if segment_ids is not None and (segment_ids.shape != (b, t)
                                    or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be int [B, T] = [{b}, {t}]; got "
                         f"{segment_ids.dtype}{list(segment_ids.shape)}")


# ----------------------------------------------------------------------------- both wrappers

def sum_kv_groups(x, kv_heads: int, axis: int):
    """Gradients computed per query head -> per kv head: x's `axis` (H query heads, head h
    reading kv head h // (H // G)) becomes G = kv_heads by summing each group. x itself when
    H == G."""
    h = x.shape[axis]
    if h == kv_heads:
        return x
    grouped = x.reshape(*x.shape[:axis], kv_heads, h // kv_heads, *x.shape[axis + 1:])
    return jnp.sum(grouped, axis=axis + 1)


# ----------------------------------------------------------------------------- gpu.py (Triton)

def triton_head_dims_refusal(dk: int, dv: int, head_dims: tuple[int, ...]) -> str | None:
    """Why Triton kernels tiled for `head_dims` refuse head dims K = dk, V = dv, or None."""
    if dk not in head_dims or dv not in head_dims:
        return (f"head dims K={dk}, V={dv} not supported: both must be one of {head_dims} "
                "(powers of two, Triton tiles)")
    return None


def check_triton_supported(q, v, interpret: bool, head_dims: tuple[int, ...]) -> None:
    """NotImplementedError (with the reason) for calls Pallas Triton kernels do not serve: a
    non-GPU platform unless interpret=True, or head dims K (q) / V (v) not in `head_dims`."""
    if not interpret:
        platform = dispatch.target_platform()
        if platform not in ("gpu", "cuda"):
            raise NotImplementedError(
                f"Pallas Triton kernels need a GPU backend (platform is {platform!r}); "
                "pass interpret=True to run them in interpret mode")
    reason = triton_head_dims_refusal(q.shape[-1], v.shape[-1], head_dims)
    if reason:
        raise NotImplementedError(reason)


def triton_precision(cdt, interpret: bool):
    """Matmul precision of Triton kernels for operands of dtype `cdt`. fp32: 3-pass tf32 on GPU
    (fp32-level accuracy on tensor cores; Triton's ieee fp32 dot is an FMA loop that spills
    thousands of bytes per thread at these tile sizes), exact fp32 in interpret mode. Other
    dtypes: DEFAULT (bf16 operands for bf16; tf32 for fp16 inputs cast to fp32 operands)."""
    if cdt != F32:
        return lax.Precision.DEFAULT
    return lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def named_pallas_call(kernel, cfg, interpret: bool, grid, inputs, outputs, name: str, params):
    """pallas_call with named refs: inputs / outputs are lists of (name, array-or-shape, spec);
    inputs whose array is None (an absent optional input) are dropped. The kernel is called
    with cfg= and names= (the names of its refs, inputs then outputs)."""
    # Imported here, not at the top: api.py imports this module, and an installation whose
    # Pallas cannot be imported must still get the xla / reference implementations.
    from jax.experimental import pallas as pl

    inputs = [x for x in inputs if x[1] is not None]
    names = tuple(n for n, _, _ in inputs) + tuple(n for n, _, _ in outputs)
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg, names=names),
        grid=grid,
        in_specs=[s for _, _, s in inputs],
        out_specs=[s for _, _, s in outputs],
        out_shape=[a for _, a, _ in outputs],
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(*[a for _, a, _ in inputs])


# ----------------------------------------------------------------------------- tpu.py (Mosaic)

def mosaic_platform_refusal(interpret: bool) -> str | None:
    """Why Pallas Mosaic kernels cannot run here (not a TPU backend and interpret=False), or
    None."""
    if not interpret and jax.default_backend() != "tpu":
        return (f"Pallas Mosaic kernels need a TPU backend (default backend is "
                f"{jax.default_backend()!r}); pass interpret=True to emulate them")
    return None


def mosaic_shape_refusal(q, v, chunk_size: int, chunk_sizes: tuple[int, ...],
                         max_head_dim: int) -> str | None:
    """Why Pallas Mosaic kernels cannot serve these shapes, or None: chunk_size not in
    `chunk_sizes`, or head dim K (q) / V (v) not a multiple of 8 (the TPU sublane tile) or
    above `max_head_dim`."""
    if chunk_size not in chunk_sizes:
        return f"chunk_size {chunk_size} not supported; accepted: {list(chunk_sizes)}"
    for name, d in (("K", q.shape[-1]), ("V", v.shape[-1])):
        if d % 8 or d > max_head_dim:
            return (f"head dim {name}={d} not supported; accepted: multiples of 8 up to "
                    f"{max_head_dim}")
    return None


def relative_docs(doc, chunk: int):
    """doc int32 [B, Tp] -> float32 [B, n, 1, C]: each token's document number minus that of
    the previous chunk's last token (0 before the first chunk: the initial state's document).
    Zero means the carried state reaches the token; equal values mean same document. Laid out
    [.., 1, C] so that a kernel block is a [1, C] row (a trailing dim of 1 would be padded to
    128 lanes in HBM)."""
    b, tp = doc.shape
    d = doc.reshape(b, tp // chunk, chunk)
    prev_end = jnp.concatenate([jnp.zeros((b, 1), doc.dtype), d[:, :-1, -1]], axis=1)
    return (d - prev_end[:, :, None]).astype(F32)[:, :, None, :]

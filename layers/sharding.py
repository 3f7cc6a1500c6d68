"""Logical axis names for params and activations, and the rules that map them onto the mesh.

Layers never name mesh axes. A param is created with logical names for its dims
(`param(value, ("embed", "mlp"))`) and an activation is pinned with
`constrain(x, ("batch", "seq", "act_embed"))`; `RULES` turns each logical name into mesh axes
("data", "fsdp", "tensor"), the same for every model, so a new mixer is shardable as soon as it
names its dims. The layout this table gives:

    data    pure data parallelism: the batch is split, params are replicated
    fsdp    the batch is split AND every param is split along its model-width ("embed") dim
            (ZeRO-3: XLA all-gathers a layer's params where they are used)
    tensor  Megatron-style tensor parallelism: heads, MLP hidden units and the vocabulary are
            split; the residual stream between blocks is replicated across it

Params stacked by the scanned layer stack carry one more leading dim than their names; it is
the "layers" dim and is never split.

A dim whose size the mesh axes do not divide is left whole (replicated) rather than padded:
e.g. 2 KV heads under tensor=4. `spec_for` reports that choice to its caller, which logs it.

`constrain` is a no-op unless a mesh was activated with `use_mesh`, so single-device code
(tests, export, generation) runs the layers unchanged.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

RULES: dict[str, tuple[str, ...]] = {
    # params
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),      # q/k/v output and o input dims: heads x head_dim, split by heads
    "mlp": ("tensor",),
    "norm": (),
    "layers": (),
    # activations
    "batch": ("data", "fsdp"),
    "seq": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}

RESIDUAL = ("batch", "seq", "act_embed")  # the residual stream [B, T, d]

_ACTIVE: list[Mesh] = []


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    """An nnx.Param whose dims carry logical names (metadata "axes", read by `spec_for`)."""
    axes = tuple(axes)
    if len(axes) != value.ndim:
        raise ValueError(f"param of shape {value.shape} given {len(axes)} axis names {axes}")
    return nnx.Param(value, axes=axes)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> tuple[P, list[str]]:
    """PartitionSpec for an array with logical `axes` and `shape` on `mesh`.

    Extra leading dims (stacked layers) are not split. Returns (spec, notes) where notes say
    which dims were left whole because the mesh does not divide them.
    """
    axes = (None,) * (len(shape) - len(axes)) + tuple(axes)
    used: set[str] = set()
    spec, notes = [], []
    for name, size in zip(axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in RULES:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(RULES)}")
        mesh_axes = tuple(a for a in RULES[name] if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and size % n:
            notes.append(f"{name} (size {size}) is not divisible by {'x'.join(mesh_axes)}={n}: replicated")
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec), notes


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Activate `mesh` for `constrain` while tracing (jit traces on first call: call the
    step functions inside this context)."""
    _ACTIVE.append(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE.pop()


def active_mesh() -> Mesh | None:
    return _ACTIVE[-1] if _ACTIVE else None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pin activation `x` to the layout its logical `axes` give on the active mesh (no-op
    without one). Telling XLA where activations live keeps GSPMD from guessing a layout that
    needs extra collectives (e.g. gathering the batch)."""
    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return x
    spec, _ = spec_for(axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

"""The device mesh of a run, sharded train-state creation and batch placement.

    init_distributed(cfg.runtime)          # multi-host: before anything touches devices
    mesh = make_mesh(cfg.runtime)          # ("data", "fsdp", "tensor")
    graphdef, state, notes = create_state(build_model, tx, seed, mesh)
    lo, hi = host_rows(mesh, batch_size)   # the rows of each global batch this process holds
    batch = place_batch(host_batch, mesh, batch_size)

Where each param lives comes from the logical axis names it was created with and the rules in
layers/sharding.py; the optimizer moments follow their params. The state is created directly
in its sharded layout (a jitted init with out_shardings), so no host ever holds a full copy.

Multi-host: every process runs the same program on the same config. Each one reads only the
rows of every global batch that its own devices hold (`host_rows`, one contiguous block per
process) and hands them to jax (`jax.make_array_from_process_local_data`). Orbax writes and
reads checkpoints collectively.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from layers.sharding import MESH_AXES, RULES, spec_for
from train.config import ConfigError, RuntimeConfig

log = logging.getLogger("chimera.mesh")


def init_distributed(runtime: RuntimeConfig) -> None:
    """jax.distributed.initialize() when runtime.distributed is set (once per process).

    jax finds the coordinator, process count and index by itself under SLURM and on Cloud TPU
    pods; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if not runtime.distributed or jax.distributed.is_initialized():
        return
    kw = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kw = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kw)
    log.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def mesh_shape(runtime: RuntimeConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `num_devices`, resolving a -1; errors name the fields."""
    sizes = [getattr(runtime, f) for f in runtime.MESH_FIELDS]
    fields = ", ".join(f"runtime.{f}={v}" for f, v in zip(runtime.MESH_FIELDS, sizes))
    known = math.prod(v for v in sizes if v != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"{fields}: {num_devices} devices cannot be split by {known}; "
                              f"choose sizes whose product divides {num_devices}")
        sizes[sizes.index(-1)] = num_devices // known
    elif known > num_devices:
        raise ConfigError(f"{fields} needs {known} devices but only {num_devices} are available")
    return tuple(sizes)


def make_mesh(runtime: RuntimeConfig, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(runtime, len(devices))
    n = math.prod(shape)
    if n < len(devices):
        log.warning("mesh %s uses %d of the %d devices", dict(zip(MESH_AXES, shape)), n, len(devices))
    # Auto axes: the classic GSPMD flow, where XLA propagates layouts from the params and the
    # constraints we place (explicit axes would need an out_sharding on every gather).
    return jax.make_mesh(shape, MESH_AXES, devices=devices[:n], axis_types=(AxisType.Auto,) * 3)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(abstract_params: nnx.State, mesh: Mesh) -> tuple[Any, list[str]]:
    """NamedSharding for each param (from its "axes" metadata) and notes on dims left whole."""
    notes: list[str] = []

    def one(path, var):
        axes = var.get_metadata().get("axes")
        if axes is None:
            name = ".".join(str(getattr(k, "key", k)) for k in path)
            raise ValueError(f"param {name} {var.shape} was created without logical axis names; "
                             "create it with layers.sharding.param(value, axes)")
        spec, why = spec_for(axes, var.shape, mesh)
        notes.extend(f"{'.'.join(str(getattr(k, 'key', k)) for k in path)}: {w}" for w in why)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, abstract_params, is_leaf=_is_var), notes


def state_shardings(abstract_state: dict, tx: optax.GradientTransformation, mesh: Mesh) -> tuple[dict, list[str]]:
    """Shardings for the TrainState (train/step.py): params by their names, optimizer moments
    like their params, scalars (step, counts, rng) replicated."""
    replicated = NamedSharding(mesh, P())
    params, notes = param_shardings(abstract_state["params"], mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state["opt_state"], params,
                                transform_non_params=lambda _: replicated, is_leaf=_is_var)
    return {"params": params, "opt_state": opt, "step": replicated, "rng": replicated}, notes


def create_state(init: Callable[[], tuple[Any, dict]], tx: optax.GradientTransformation,
                 mesh: Mesh) -> tuple[Any, dict, list[str]]:
    """Run `init() -> (graphdef, TrainState)` once abstractly to learn the shapes, then for real
    under jit with the state's shardings as outputs. Returns (graphdef, state, notes).

    On a one-device mesh the state is made eagerly instead: compiling the init of every param
    costs seconds (18 s against 4 s for a small model on a CPU) and buys nothing there.
    """
    graphdef, abstract = nnx.eval_shape(init)
    shardings, notes = state_shardings(abstract, tx, mesh)
    if mesh.size == 1:
        return graphdef, jax.device_put(init()[1], shardings), notes
    state = jax.jit(lambda: init()[1], out_shardings=shardings)()
    return graphdef, state, notes


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in RULES["batch"])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the data-parallel axes (RULES["batch"]); the other dims whole."""
    axes = tuple(a for a in RULES["batch"] if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(axes or None))


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
    """Every micro-batch must split evenly over the data-parallel devices."""
    dp = data_parallel_size(mesh)
    micro = batch_size // grad_accum
    if micro % dp:
        raise ConfigError(f"data.batch_size={batch_size} / train.grad_accum={grad_accum} = {micro} rows per "
                          f"micro-batch must be divisible by the data-parallel devices "
                          f"(runtime.mesh_data x runtime.mesh_fsdp = {dp})")


def host_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
    """[lo, hi): the rows of a global batch of `batch_size` that this process's devices hold."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    rows = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(batch_size))})
    lo, hi = rows[0], rows[-1] + 1
    if len(rows) != hi - lo:
        raise ConfigError(f"this process's devices hold rows {rows} of the batch, not one block; "
                          "order the mesh so that each process holds consecutive rows")
    return lo, hi


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh, batch_size: int | None = None) -> dict[str, jax.Array]:
    """This process's rows of a global batch (`host_rows`) -> global jax arrays split by rows.
    batch_size: the global batch's rows (default: the batch is the whole global one)."""
    sharding = batch_sharding(mesh)
    rows = batch_size or next(iter(batch.values())).shape[0]
    if all(a.shape[0] == rows for a in batch.values()):  # the whole batch (one process): the cheaper call
        return {k: jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx]) for k, a in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, a, (rows, *a.shape[1:])) for k, a in batch.items()}

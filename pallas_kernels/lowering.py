"""Lower a JAX function for a real GPU from a CPU-only host, to check Pallas Triton kernels in CI.

    from pallas_kernels import lowering
    text = lowering.lower_for_gpu(jax.grad(loss), q_spec, k_spec, ...)   # StableHLO text
    assert lowering.TRITON_CALL in text

An abstract H100 (`jax._src.mesh.AbstractDevice`) set through `jax.sharding.use_abstract_mesh`
makes `jax.jit(f).trace(*specs).lower(lowering_platforms=("cuda",))` run the real Pallas ->
Triton IR lowering (power-of-two shapes, supported primitives, block specs) without a GPU or
the CUDA plugin. Inside `abstract_gpu()` an abstract mesh names the GPU, which is what the
kernels' platform checks read (chunked_linear_attention/gpu.py `_target_platform`). Not for
Mosaic GPU kernels, whose lowering needs the CUDA plugin.

The lowering stops at the Triton IR embedded in each custom call; XLA compiles it to PTX on
the GPU host. To go one step further on CPU (does Triton compile it for sm_90a, how many
registers, how many bytes of spill, how much shared memory), dump the kernels with
`write_triton_kernels(f, *specs, directory=...)` and, in any Python with the `triton` wheel
(it needs no GPU, and bundles ptxas), run this file:

    python pallas_kernels/lowering.py DIRECTORY [sm]     # sm defaults to 90 (H100)

which compiles every DIRECTORY/*.ttir with that kernel's num_warps / num_stages and prints
shared memory, registers and spills per kernel (shared memory above 227 KB fails at launch
on H100). jax is imported lazily so that this entry point runs without jax.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
from typing import Any, Callable

H100 = "NVIDIA H100 80GB HBM3"
TRITON_CALL = "__gpu$xla.gpu.triton"  # custom-call target of Pallas Triton kernels


def available() -> str | None:
    """None if this jax can cross-lower for an abstract GPU, else the reason it cannot."""
    import jax
    try:
        from jax._src import mesh as mesh_lib
        mesh_lib.AbstractDevice  # noqa: B018 - attribute check
        jax.sharding.use_abstract_mesh  # noqa: B018
        jax.sharding.AbstractMesh  # noqa: B018
    except (ImportError, AttributeError) as e:
        return f"this jax ({jax.__version__}) lacks abstract devices / abstract meshes: {e}"
    return None


@contextlib.contextmanager
def abstract_gpu(device_kind: str = H100, num_cores: int = 132):
    """Context in which tracing targets an abstract GPU of `device_kind`."""
    import jax
    from jax._src import mesh as mesh_lib
    device = mesh_lib.AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def lower(f: Callable[..., Any], *specs: Any, device_kind: str = H100, num_cores: int = 132):
    """`jax.stages.Lowered` of `jax.jit(f)` for CUDA on an abstract `device_kind` GPU.

    specs: `jax.ShapeDtypeStruct`s (or arrays) of f's positional arguments.
    """
    import jax
    reason = available()
    if reason:
        raise NotImplementedError(reason)
    with abstract_gpu(device_kind, num_cores):
        return jax.jit(f).trace(*specs).lower(lowering_platforms=("cuda",))


def lower_for_gpu(f: Callable[..., Any], *specs: Any, device_kind: str = H100,
                  num_cores: int = 132) -> str:
    """StableHLO text of `jax.jit(f)` lowered for CUDA on an abstract `device_kind` GPU."""
    return lower(f, *specs, device_kind=device_kind, num_cores=num_cores).as_text()


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One Pallas Triton kernel of a lowered function: its Triton IR and launch parameters."""
    name: str
    ttir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


def triton_kernels(f: Callable[..., Any], *specs: Any, **kw: Any) -> list[TritonKernel]:
    """The Triton kernels of `jax.jit(f)` lowered for an abstract GPU, in program order."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib import triton as triton_lib
    from jax._src.lib.mlir import ir

    module = lower(f, *specs, **kw).compiler_ir("stablehlo")
    context = jax_mlir.JaxIrContext()
    context.append_dialect_registry(jax_mlir.upstream_dialects)
    triton_lib.dialect.register_dialect(context)
    context.load_all_available_dialects()
    kernels: list[TritonKernel] = []

    def visit(op) -> None:
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if (inner.operation.name == "stablehlo.custom_call"
                            and ir.StringAttr(inner.attributes["call_target_name"]).value
                            == TRITON_CALL):
                        config = ir.DictAttr(inner.attributes["mhlo.backend_config"])
                        value = lambda key: ir.IntegerAttr(config[key]).value
                        with context:
                            ttir = str(ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes))
                        kernels.append(TritonKernel(
                            name=ir.StringAttr(config["name"]).value, ttir=ttir,
                            num_warps=value("num_warps"), num_stages=value("num_stages"),
                            grid=(value("grid_x"), value("grid_y"), value("grid_z"))))
                    visit(inner.operation)

    visit(module.operation)
    return kernels


def write_triton_kernels(f: Callable[..., Any], *specs: Any, directory: str,
                         **kw: Any) -> list[str]:
    """Write `triton_kernels(f, *specs)` as DIRECTORY/NN_name.ttir plus kernels.json (launch
    parameters by file); returns the file names."""
    os.makedirs(directory, exist_ok=True)
    meta, names = {}, []
    for i, kernel in enumerate(triton_kernels(f, *specs, **kw)):
        name = f"{i:02d}_{kernel.name}.ttir"
        with open(os.path.join(directory, name), "w") as fh:
            fh.write(kernel.ttir)
        meta[name] = dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages,
                          grid=list(kernel.grid))
        names.append(name)
    with open(os.path.join(directory, "kernels.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    return names


def compile_triton_kernels(directory: str, sm: int = 90) -> list[dict[str, Any]]:
    """Compile DIRECTORY/*.ttir (from `write_triton_kernels`) with the `triton` package for
    sm_{sm}; per kernel: shared memory bytes, registers and spill bytes (from ptxas -v)."""
    import triton
    from triton.backends.compiler import GPUTarget

    with open(os.path.join(directory, "kernels.json")) as fh:
        meta = json.load(fh)
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")
                  if os.path.exists(os.path.join(bin_dir, n))), "ptxas")
    arch = f"sm_{sm}a" if sm >= 90 else f"sm_{sm}"
    results = []
    for name, params in sorted(meta.items()):
        row: dict[str, Any] = dict(kernel=name, **params)
        try:
            compiled = triton.compile(os.path.join(directory, name),
                                      target=GPUTarget("cuda", sm, 32),
                                      options=dict(num_warps=params["num_warps"],
                                                   num_stages=params["num_stages"]))
        except Exception as e:  # noqa: BLE001 - report, keep going
            row["error"] = f"{type(e).__name__}: {e}"
            results.append(row)
            continue
        row["shared_bytes"] = compiled.metadata.shared
        ptx = os.path.join(directory, name.replace(".ttir", ".ptx"))
        with open(ptx, "w") as fh:
            fh.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        regs = re.findall(r"Used (\d+) registers", out)
        spills = re.findall(r"(\d+) bytes spill stores", out)
        row["registers"] = int(regs[0]) if regs else None
        row["spill_bytes"] = int(spills[0]) if spills else None
        results.append(row)
    return results


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python pallas_kernels/lowering.py DIRECTORY [sm]")
    sm = int(sys.argv[2]) if len(sys.argv) == 3 else 90
    for result in compile_triton_kernels(sys.argv[1], sm):
        print(json.dumps(result))

"""The attention op as the softmax-attention mixers call it: per device under a multi-device
mesh when the op will run a Pallas kernel.

    o = attend(q, k, v, segment_ids=seg, positions=pos, implementation=rt.attention_impl, ...)

Same arguments and result as `pallas_kernels.attention.api.attention`. Why a wrapper: a Pallas
kernel is an opaque custom call to XLA's partitioner, which gathers its operands onto every
device instead of splitting the work, so a data-parallel run would compute every row's
attention on every GPU. Attention is independent per batch row and per head, so under an
active mesh (layers/sharding.py `use_mesh`) the op runs inside `jax.shard_map`, each device on
its own rows (the "batch" rule's axes) and heads (the "act_heads" rule's axis, when it divides
both the query and the kv heads, so that every device holds whole GQA groups). The xla and
reference implementations are partitioned by XLA as they are and are called directly.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from layers.sharding import active_mesh, spec_for
from pallas_kernels import dispatch
from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.attention.api import OP, attention


def runs_pallas(implementation: str | None) -> bool:
    """Whether `attention(..., implementation=...)` goes to a Pallas kernel first on the
    platform being compiled for."""
    if implementation is not None:
        return implementation in pw.PALLAS
    names = dispatch.available(OP)
    return bool(names) and names[0] in pw.PALLAS


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids, positions,
           kv_segment_ids=None, kv_positions=None, sinks=None, **options) -> jax.Array:
    """`attention(q, k, v, ...)`, per device (shard_map) under a multi-device mesh when it runs
    a Pallas kernel (module docstring). q [B, Tq, H, D], k [B, Tk, K, D], v [B, Tk, K, Dv]."""
    mesh = active_mesh()
    if mesh is None or mesh.size == 1 or not runs_pallas(options.get("implementation")):
        return attention(q, k, v, segment_ids=segment_ids, positions=positions,
                         kv_segment_ids=kv_segment_ids, kv_positions=kv_positions, sinks=sinks,
                         **options)
    b, h, kvh = q.shape[0], q.shape[2], k.shape[2]
    row = spec_for(("batch",), (b,), mesh)[0][0]
    head = spec_for(("act_heads",), (h,), mesh)[0][0]
    if head is not None and spec_for(("act_heads",), (kvh,), mesh)[0][0] != head:
        head = None   # the kv heads do not split alike: keep every head on every device
    heads, ids = P(row, None, head, None), P(row, None)
    arrays = {"q": q, "k": k, "v": v, "segment_ids": segment_ids, "positions": positions,
              "kv_segment_ids": kv_segment_ids, "kv_positions": kv_positions, "sinks": sinks}
    specs = {"q": heads, "k": heads, "v": heads, "sinks": P(head)}
    names = [n for n, a in arrays.items() if a is not None]

    def local(*shards):
        given = dict(zip(names, shards))
        return attention(given.pop("q"), given.pop("k"), given.pop("v"), **given, **options)

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs.get(n, ids) for n in names),
                         out_specs=heads, check_vma=False)(*(arrays[n] for n in names))

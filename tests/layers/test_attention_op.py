"""layers/attention/op.py: the attention op per device (shard_map) under a multi-device mesh.

The test session has 8 CPU devices (tests/conftest.py). The Pallas kernels cannot run here, so
the per-device path is forced on with the xla implementation inside it: values and gradients
must equal the op called without a mesh, whether the heads split (whole GQA groups per device)
or stay whole (kv heads the tensor axis does not divide), with sinks and with a KV cache.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import op
from layers.sharding import use_mesh
from pallas_kernels.attention.api import attention


def _mesh():
    auto = (jax.sharding.AxisType.Auto,) * 3   # as train/mesh.py makes it
    return jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=auto)


def _inputs(h, kvh, b=4, t=40, d=16, seed=0):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kvh, kvh))
    seg = jnp.asarray(np.repeat([[1] * 25 + [2] * 15], b, 0), jnp.int32)
    pos = jnp.asarray(np.repeat([list(range(25)) + list(range(15))], b, 0), jnp.int32)
    sinks = jnp.asarray(r.normal(size=h), jnp.float32)
    return q, k, v, seg, pos, sinks


@pytest.mark.parametrize("h,kvh", [(8, 4), (4, 2)], ids=["heads_split", "heads_whole"])
def test_per_device_equals_the_op(h, kvh, monkeypatch):
    monkeypatch.setattr(op, "runs_pallas", lambda implementation: True)
    q, k, v, seg, pos, sinks = _inputs(h, kvh)
    opts = dict(window=9, implementation="xla", block_q=16, block_k=16)

    def loss(f, q, k, v, sinks):
        o = f(q, k, v, segment_ids=seg, positions=pos, sinks=sinks, **opts)
        return jnp.sum(o * jnp.cos(o)), o

    want = jax.jit(jax.value_and_grad(lambda *a: loss(attention, *a), (0, 1, 2, 3),
                                      has_aux=True))(q, k, v, sinks)
    with use_mesh(_mesh()):
        f = jax.jit(jax.value_and_grad(lambda *a: loss(op.attend, *a), (0, 1, 2, 3),
                                       has_aux=True))
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v, sinks))
        got = f(q, k, v, sinks)
    (_, o), grads = got
    (_, o_want), grads_want = want
    np.testing.assert_allclose(o, o_want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, grads_want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_per_device_decode_from_a_cache(monkeypatch):
    monkeypatch.setattr(op, "runs_pallas", lambda implementation: True)
    q, k, v, seg, pos, sinks = _inputs(8, 4)
    kw = dict(segment_ids=seg[:, -1:], positions=pos[:, -1:], kv_segment_ids=seg,
              kv_positions=pos, sinks=sinks, implementation="xla")
    want = attention(q[:, -1:], k, v, **kw)
    with use_mesh(_mesh()):
        got = jax.jit(lambda q, k, v: op.attend(q, k, v, **kw))(q[:, -1:], k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_xla_is_left_to_the_partitioner():
    """Without a Pallas kernel first (this CPU), attend is the op itself: no shard_map."""
    q, k, v, seg, pos, _ = _inputs(8, 4)
    assert not op.runs_pallas(None) and op.runs_pallas("gpu")
    with use_mesh(_mesh()):
        text = str(jax.make_jaxpr(lambda q: op.attend(q, k, v, segment_ids=seg,
                                                      positions=pos))(q))
    assert "shard_map" not in text

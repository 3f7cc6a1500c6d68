"""The attention op's Pallas implementations, "gpu" (Triton) and "tpu" (Mosaic), on a CPU host.

* Interpret mode against the reference op (whose function test_attention.py checks against a
  numpy loop): outputs and the gradients of q, k, v and the sinks for a random cotangent, on
  packed ragged documents with a padding tail, GQA / MQA, windows, soft-cap, sinks, sigmoid
  scores and Dv != D; positions with gaps (the mask is by position, not by index); bfloat16;
  a KV cache with slots in shuffled order (decode), whose outputs equal the implementation's
  own parallel form; padding queries give exactly 0.
* Dispatch: xla serves on CPU, the Pallas implementations go first on their platforms, a named
  one refuses loudly off its platform.
* Lowering for real targets, forward and backward: the Triton kernels for an H100
  (pallas_kernels/lowering.py) and the Mosaic custom calls for a TPU (jax.export), with the
  score options; and a dense attention layer (gate, sinks, per-head windows) whose training
  step lowers to the op's Triton kernels by default on a GPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.attention.api import OP, attention
from test_attention import Case, make_inputs, make_sinks, run

F32 = jnp.float32
slow = pytest.mark.slow

GPU_CASES = [
    Case("gqa_window_sinks_softcap_dv32", t=200, heads=4, kv_heads=2, window=37, softcap=2.0,
         sinks=True, dv=32, q_gain=2.0),
    Case("mqa_sigmoid_bq32_bk64", t=130, heads=4, kv_heads=1, score="sigmoid",
         sigmoid_bias=-2.0, block_q=32, block_k=64),
    pytest.param(SHORT := Case("single_doc_short", t=7, heads=2, kv_heads=2, layout="single",
                               sinks=True), marks=slow),
]
TPU_CASES = [
    Case("gqa_window_sinks_softcap_dv256", t=200, heads=4, kv_heads=2, window=150, d=128,
         dv=256, softcap=20.0, sinks=True, block_q=128, block_k=128),
    pytest.param(Case("mqa_sigmoid", t=150, heads=2, kv_heads=1, d=128, score="sigmoid",
                      sigmoid_bias=-2.0, block_q=128, block_k=128), marks=slow),
]
def _rows(impl, cases):
    return [pytest.param(impl, *c.values, marks=c.marks) if isinstance(c, type(pytest.param(None)))
            else (impl, c) for c in cases]


ROWS = _rows("gpu", GPU_CASES) + _rows("tpu", TPU_CASES)


def _close(name, got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    err = np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want))))
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


def _forward_and_grads(impl, case, q, k, v, seg, pos, **kw):
    """(out, (dq, dk, dv, dsinks)) for a fixed random cotangent, as one jitted program."""
    sinks = make_sinks(case)
    interpret = {"interpret": True} if impl in pw.PALLAS else {}

    def f(q, k, v, sinks):
        return run(impl, case, q, k, v, seg, pos, sinks=sinks, **kw, **interpret)

    def both(q, k, v, sinks):
        out, vjp = jax.vjp(f, q, k, v, sinks)
        ct = jnp.asarray(np.random.default_rng(3).normal(size=out.shape), out.dtype)
        return out, vjp(ct)

    if sinks is None:
        return jax.jit(lambda q, k, v: both(q, k, v, None))(q, k, v)
    return jax.jit(both)(q, k, v, sinks)


def _check_against_reference(impl, case, q, k, v, seg, pos, tol=2e-5):
    out, grads = _forward_and_grads(impl, case, q, k, v, seg, pos)
    want, want_grads = _forward_and_grads("reference", case, q, k, v, seg, pos)
    _close("out", out, want, tol)
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), grads, want_grads):
        if w is not None:
            _close(name, g, w, 4 * tol)


@pytest.mark.parametrize("impl,case", ROWS)
def test_forward_and_gradients_match_reference(impl, case):
    (q, k, v), seg, pos = make_inputs(case)
    _check_against_reference(impl, case, q, k, v, seg, pos)


@pytest.mark.parametrize("impl,d", [("gpu", 16), pytest.param("tpu", 128, marks=slow)])
def test_mask_is_by_position_not_index(impl, d):
    """Positions 0, 3, 6, ... along each document: a window of 10 positions holds 4 keys, not
    10 as an index window would; the reference (by position) is matched exactly."""
    case = Case("gaps", t=96, heads=2, kv_heads=1, window=10, sinks=True, d=d,
                block_q=32 if impl == "gpu" else 128, block_k=32 if impl == "gpu" else 128)
    (q, k, v), seg, pos = make_inputs(case)
    _check_against_reference(impl, case, q, k, v, seg, pos * 3)


@slow
def test_bfloat16_gpu():
    case = GPU_CASES[0]
    (q, k, v), seg, pos = make_inputs(case, dtype=jnp.bfloat16)
    out = run("gpu", case, q, k, v, seg, pos, interpret=True)
    want = run("reference", case, *(x.astype(F32) for x in (q, k, v)), seg, pos)
    _close("out", out, want, 3e-2)


@pytest.mark.parametrize("impl,d", [("gpu", 16), ("tpu", 128)])
def test_decode_from_a_shuffled_cache_equals_parallel(impl, d):
    """The last 5 tokens of each row attend over a cache holding all tokens in shuffled slots
    (kv ids given, as a ring buffer has them): equal to the same implementation's parallel
    (self-attention) outputs at those tokens, and to the reference."""
    case = Case("decode", t=80, heads=4, kv_heads=2, window=33, sinks=True, d=d,
                dv=d * 2 if impl == "tpu" else 32)
    (q, k, v), seg, pos = make_inputs(case)
    parallel = run(impl, case, q, k, v, seg, pos, interpret=True)
    perm = jnp.asarray(np.random.default_rng(5).permutation(case.t))
    last = slice(case.t - 5, case.t)
    cached = dict(kv_segment_ids=seg[:, perm], kv_positions=pos[:, perm])
    step = run(impl, case, q[:, last], k[:, perm], v[:, perm], seg[:, last], pos[:, last],
               interpret=True, **cached)
    want = run("reference", case, q[:, last], k[:, perm], v[:, perm], seg[:, last],
               pos[:, last], **cached)
    _close("decode vs parallel", step, parallel[:, last], 2e-5)
    _close("decode vs reference", step, want, 2e-5)


def test_padding_queries_are_zero():
    case = Case("pad", t=64, heads=2, kv_heads=1, sinks=True, block_q=32, block_k=32)
    (q, k, v), seg, pos = make_inputs(case)
    seg = seg.at[:, 50:].set(0)
    out = run("gpu", case, q, k, v, seg, pos, interpret=True)
    assert np.all(np.asarray(out[:, 50:]) == 0.0)


# ----------------------------------------------------------------------------- dispatch

def test_pallas_first_on_their_platforms_xla_here():
    assert dispatch.order(OP, "gpu")[:2] == ("gpu", "xla")
    assert dispatch.order(OP, "tpu")[:2] == ("tpu", "xla")
    case = SHORT
    (q, k, v), seg, pos = make_inputs(case)
    run(None, case, q, k, v, seg, pos)
    choice = dispatch.last(OP)
    assert choice.implementation == "xla"
    assert {name for name, _ in choice.skipped} <= {"gpu", "tpu"}


def test_named_pallas_implementation_refuses_loudly_off_its_platform():
    case = SHORT
    (q, k, v), seg, pos = make_inputs(case)
    with pytest.raises(NotImplementedError, match="need a GPU backend"):
        run("gpu", case, q, k, v, seg, pos)
    with pytest.raises(NotImplementedError, match="head dim"):   # D = 16: Mosaic tiles 128
        run("tpu", case, q, k, v, seg, pos, interpret=True)
    with pytest.raises(ValueError, match="interpret=True needs implementation"):
        run("xla", case, q, k, v, seg, pos, interpret=True)


def test_start_up_line_names_the_kernel_for_the_layers_head_dims(monkeypatch):
    from pallas_kernels.attention.api import describe_implementation
    assert describe_implementation(None, ((16, 16),)) == "auto: xla (xla blocked, no Pallas kernel)"
    monkeypatch.setattr(dispatch, "target_platform", lambda: "gpu")
    assert describe_implementation(None, ((64, 128),)) == \
        "auto: gpu (Pallas Triton; xla where it refuses)"
    assert describe_implementation(None, ((192, 64), (576, 512))) == \
        "auto: xla (Pallas Triton refuses head dims 192/64, 576/512)"
    assert describe_implementation("tpu") == "tpu (Pallas Mosaic)"
    monkeypatch.setattr(dispatch, "target_platform", lambda: "tpu")
    assert describe_implementation(None, ((128, 256), (64, 64))) == \
        "auto: tpu (Pallas Mosaic; xla for head dims 64/64)"


# ----------------------------------------------------------------------------- lowering

def _specs(b, t, h, kvh, d, dv, dtype):
    sds = jax.ShapeDtypeStruct
    return (sds((b, t, h, d), dtype), sds((b, t, kvh, d), dtype), sds((b, t, kvh, dv), dtype),
            sds((h,), F32), sds((b, t), jnp.int32))


def _op(impl, **opts):
    """(forward, loss) of the op through `impl` with `opts`; positions are the index."""
    sinks_on = opts.pop("sinks", True)

    def forward(q, k, v, sinks, seg):
        pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), seg.shape)
        return attention(q, k, v, segment_ids=seg, positions=pos, implementation=impl,
                         sinks=sinks if sinks_on else None, **opts)

    def loss(q, k, v, sinks, seg):
        return jnp.sum(forward(q, k, v, sinks, seg).astype(F32) ** 2)
    return forward, loss


@pytest.mark.parametrize("opts", [
    dict(window=200, logit_softcap=30.0),
    dict(score="sigmoid", sigmoid_bias=-5.0, sinks=False),
], ids=["window_sinks_softcap", "sigmoid"])
def test_lowers_to_triton_for_h100(opts):
    from pallas_kernels import lowering
    if lowering.available():
        pytest.skip(lowering.available())
    forward, loss = _op("gpu", block_q=64, block_k=64, **opts)
    specs = _specs(2, 320, 4, 2, 128, 64, jnp.bfloat16)
    names = lambda f: sorted(kn.name for kn in lowering.triton_kernels(f, *specs))
    assert names(forward) == ["block_sparse_attention_fwd"]
    assert names(jax.grad(loss, argnums=(0, 1, 2, 3))) == sorted(
        ["block_sparse_attention_fwd", "block_sparse_attention_dq",
         "block_sparse_attention_dkv"])


@pytest.mark.parametrize("opts", [
    dict(window=200, logit_softcap=30.0),
    pytest.param(dict(score="sigmoid", sigmoid_bias=-5.0, sinks=False), marks=slow),
], ids=["window_sinks_softcap", "sigmoid"])
def test_lowers_to_mosaic_for_tpu(opts, monkeypatch):
    """jax.export(platforms=["tpu"]) runs the Pallas -> Mosaic lowering on this CPU host; the
    platform check alone is lifted (Mosaic's own compilation needs a TPU)."""
    monkeypatch.setattr(pw, "mosaic_platform_refusal", lambda interpret: None)
    forward, loss = _op("tpu", **opts)
    specs = _specs(2, 384, 4, 2, 128, 256, jnp.bfloat16)
    export = lambda f: jax.export.export(jax.jit(f), platforms=["tpu"])(*specs).mlir_module()
    assert export(forward).count("tpu_custom_call") == 1
    assert export(jax.grad(loss, argnums=(0, 1, 2, 3))).count("tpu_custom_call") == 3


def test_dense_layer_trains_through_the_ops_triton_kernels_by_default():
    """An attention layer with a gate, sinks and per-head windows (one local, one global kv
    head) and runtime.attention_impl left at None: on a GPU its training step runs the
    attention op's Pallas Triton kernels (fwd, dq, dkv per window group), lowered here for an
    H100."""
    from flax import nnx
    from layers.attention.config import AttentionConfig
    from layers.attention.mixer import Attention
    from layers.config import RuntimeConfig
    from layers.registry import LayerContext
    from pallas_kernels import lowering
    if lowering.available():
        pytest.skip(lowering.available())
    cfg = AttentionConfig(num_heads=4, num_kv_heads=2, sinks=True, gate="elementwise",
                          head_windows=(128, 0))
    rt = RuntimeConfig(compute_dtype="bfloat16", attention_block_q=64, attention_block_k=64)
    ctx = LayerContext(d_model=256, dtype=jnp.bfloat16, runtime=rt, init_std=0.02,
                       out_std=0.02)
    graphdef, params = nnx.split(Attention(cfg, ctx, rngs=nnx.Rngs(params=0)))
    t = 320
    ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params)(x, positions=ids, segment_ids=jnp.ones_like(ids))
        return jnp.sum(y.astype(F32) ** 2)

    x = jax.ShapeDtypeStruct((1, t, 256), jnp.bfloat16)
    kernels = [kn.name for kn in lowering.triton_kernels(jax.grad(loss), params, x)]
    assert sorted(kernels) == sorted(["block_sparse_attention_fwd", "block_sparse_attention_dq",
                                      "block_sparse_attention_dkv"] * 2), kernels

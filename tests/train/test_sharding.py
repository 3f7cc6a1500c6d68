"""Sharding on 8 simulated CPU devices: the logical-axis rules, where the state lands, and that
data, FSDP, tensor parallelism and their mixes train exactly like one device (to fp32
reduction-order tolerance), including a checkpoint written under one mesh and resumed under
another."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import models
from layers.sharding import spec_for
from train.cli import load_config
from train.config import ConfigError, apply_overrides
from train.loop import run
from train.mesh import create_state, make_mesh, mesh_shape, place_batch
from train.optim import make_optimizer
from train.step import init_state

# heads and kv heads divisible by tensor=2/4; batch 8 splits over up to 8 data-parallel devices
SMALL = ["model.d_model=64", "model.mixers.attn.num_heads=4", "model.mixers.attn.num_kv_heads=2",
         "model.mixers.swa.num_heads=4", "model.mixers.swa.num_kv_heads=2", "model.mixers.swa.window=16",
         "data.seq_len=64", "data.batch_size=8", "optimizer.warmup_steps=0", "optimizer.lr=3e-3",
         # constant lr: runs of 3 and 5 steps then follow the same trajectory
         "optimizer.schedule=constant",
         "train.eval_batches=1", "train.log_every=1", "train.eval_every=0"]
MESHES = {
    "one": ["runtime.mesh_data=1"],
    "dp8": ["runtime.mesh_data=8"],
    "fsdp8": ["runtime.mesh_data=1", "runtime.mesh_fsdp=8"],
    "dp2_fsdp2_tp2": ["runtime.mesh_data=2", "runtime.mesh_fsdp=2", "runtime.mesh_tensor=2"],
    "fsdp2_tp4_accum2": ["runtime.mesh_data=1", "runtime.mesh_fsdp=2", "runtime.mesh_tensor=4", "train.grad_accum=2"],
}


def small(*extra):
    return apply_overrides(load_config("tiny"), SMALL + list(extra))


def losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def test_spec_for_maps_logical_names_and_leaves_indivisible_dims_whole():
    mesh = make_mesh(apply_overrides(load_config("tiny"), MESHES["dp2_fsdp2_tp2"]).runtime)
    assert spec_for(("embed", "heads"), (64, 128), mesh) == (P("fsdp", "tensor"), [])
    # a stacked [layers, ...] param: the extra leading dim is never split
    assert spec_for(("embed", "mlp"), (3, 64, 128), mesh)[0] == P(None, "fsdp", "tensor")
    assert spec_for(("batch", "seq"), (8, 64), mesh)[0] == P(("data", "fsdp"), None)
    spec, notes = spec_for(("embed", "heads"), (64, 3), mesh)
    assert spec == P("fsdp", None) and "heads (size 3)" in notes[0]
    with pytest.raises(KeyError, match="no sharding rule"):
        spec_for(("bogus",), (4,), mesh)


def test_state_is_created_sharded_and_moments_follow_their_params():
    cfg = apply_overrides(small("model.vocab_size=256"), MESHES["dp2_fsdp2_tp2"])
    mesh = make_mesh(cfg.runtime)
    tx, _ = make_optimizer(cfg.optimizer, 10)
    _, state, notes = create_state(lambda: init_state(models.build(cfg.model, cfg.runtime), tx, 0), tx, mesh)
    assert notes == []
    specs = {jax.tree_util.keystr(p): a.sharding.spec for p, a in jax.tree_util.tree_leaves_with_path(state)}
    q = "['stack']['scanned']['blocks'][0]['mixer']['q_proj']['kernel'].value"
    assert specs["['params']" + q] == P(None, "fsdp", "tensor")
    assert specs["['params']['embed']['embedding'].value"] == P("tensor", "fsdp")
    moments = [s for k, s in specs.items() if k.startswith("['opt_state']") and k.endswith(q)]
    assert moments == [P(None, "fsdp", "tensor")] * 2  # adam mu and nu
    assert specs["['step']"] == P()
    # each device holds 1/4 of the q kernel: split by fsdp and tensor, replicated over data
    a = jax.tree_util.tree_leaves(state["params"]["stack"]["scanned"]["blocks"][0]["mixer"]["q_proj"])[0]
    assert a.addressable_shards[0].data.size * 4 == a.size


def test_mesh_shape_resolves_minus_one_and_names_fields_on_errors():
    rt = lambda *o: apply_overrides(load_config("tiny"), list(o)).runtime  # noqa: E731
    assert mesh_shape(rt("runtime.mesh_tensor=2"), 8) == (4, 1, 2)
    assert mesh_shape(rt("runtime.mesh_data=2", "runtime.mesh_fsdp=-1"), 8) == (2, 4, 1)
    with pytest.raises(ConfigError, match="runtime.mesh_tensor=3"):
        mesh_shape(rt("runtime.mesh_tensor=3"), 8)
    with pytest.raises(ConfigError, match="needs 16 devices"):
        mesh_shape(rt("runtime.mesh_data=4", "runtime.mesh_tensor=4"), 8)
    with pytest.raises(ConfigError, match="only one of"):
        rt("runtime.mesh_fsdp=-1")
    with pytest.raises(ConfigError, match="runtime.mesh_tensor must be >= 1 or -1"):
        rt("runtime.mesh_tensor=0")


def test_batch_must_split_over_data_parallel_devices(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batch_size=8 / train.grad_accum=2 = 4 rows .* = 8\)"):
        run(small("train.steps=1", "train.grad_accum=2", "runtime.mesh_data=8"), tmp_path)


def test_place_batch_splits_rows():
    mesh = make_mesh(apply_overrides(load_config("tiny"), MESHES["dp2_fsdp2_tp2"]).runtime)
    batch = place_batch({"inputs": np.arange(8 * 3).reshape(8, 3)}, mesh)
    x = batch["inputs"]
    assert x.sharding.spec == P(("data", "fsdp")) and np.array_equal(np.asarray(x), np.arange(24).reshape(8, 3))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Train losses of 5 steps on one device."""
    d = tmp_path_factory.mktemp("one")
    run(small("train.steps=5", *MESHES["one"]), d)
    return losses(d)


# dp2_fsdp2_tp2 exercises every axis; the others are the slow extras.
@pytest.mark.parametrize("mesh", [pytest.param(m, marks=pytest.mark.slow) if m in ("dp8", "fsdp8", "fsdp2_tp4_accum2") else m
                                  for m in MESHES if m != "one"])
def test_sharded_training_matches_one_device(mesh, reference, tmp_path):
    ref_losses = reference
    run(small("train.steps=3", *MESHES[mesh]), tmp_path)
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [ref_losses[s] for s in (1, 2, 3)], rtol=2e-5)
    assert "mesh data=" in (tmp_path / "train.log").read_text()


@pytest.mark.slow  # ~22 s: two meshes, two runs
def test_checkpoint_written_under_one_mesh_resumes_under_another(reference, tmp_path):
    ref_losses = reference
    a = MESHES["dp2_fsdp2_tp2"]
    b = ["runtime.mesh_data=1", "runtime.mesh_fsdp=4", "runtime.mesh_tensor=2"]
    run(small("train.steps=3", "train.checkpoint_every=3", *a), tmp_path)
    run(small("train.steps=5", "train.checkpoint_every=3", *b), tmp_path)
    split = losses(tmp_path)
    np.testing.assert_allclose([split[s] for s in range(1, 6)], [ref_losses[s] for s in range(1, 6)], rtol=2e-5)
    assert "resumed from checkpoint step 3" in (tmp_path / "train.log").read_text()

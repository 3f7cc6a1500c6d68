"""train.export: the safetensors writer and reader, Chimera's per-layer names, exports that load
back bit for bit (into scanned and unscanned models), --step, and clear errors for bad runs.

Run directories are made without training (`make_run`): a config.json, the byte tokenizer and
orbax checkpoints of random params (norm scales too, so that swapped tensors show), written the
way the train loop writes them. tests/train/test_hf.py uses `make_run` as well.
"""
import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from train.checkpoint import Checkpointer
from train.config import (AttentionConfig, Config, ConfigError, DataConfig, ModelConfig, TrainConfig,
                          to_dict)
from train.data.tokenizer import ByteTokenizer
from train.export import (assign_params, chimera_tensors, export_run, load_chimera_safetensors, load_exported,
                          main, param_refs)
from train.optim import make_optimizer
from train.safetensors_io import SafetensorsReader, TensorOut, plan_shards, write_safetensors
from train.step import init_state

# The default job's architecture (configs/tiny.py: 3 sliding-window : 1 full, GQA, tied), small.
TINY_MODEL = ModelConfig(
    vocab_size=256, d_model=64, num_layers=4, pattern=("swa", "swa", "swa", "attn"),
    mixers={"attn": AttentionConfig(num_heads=4, num_kv_heads=2),
            "swa": AttentionConfig(num_heads=4, num_kv_heads=2, window=16)})


def run_config(model: ModelConfig, name: str = "t") -> Config:
    return Config(name=name, model=model, data=DataConfig(seq_len=32, batch_size=8),
                  train=TrainConfig(steps=100, keep_checkpoints=5))


def random_params(model, seed: int):
    """Fill an (abstract) model with host-side random params: norm scales 1 + N(0, 0.1), all
    else N(0, 0.1), so that no two tensors of a kind are alike (and no jitted init runs)."""
    rng = np.random.default_rng(seed)

    def draw(ref):
        noise = 0.1 * rng.standard_normal(ref.shape, dtype=np.float32)
        return noise + 1 if ref.name.endswith(".scale") else noise
    return assign_params(model, draw)


def make_run(run_dir: Path, cfg: Config, steps=(1, 2)) -> Path:
    """A run directory with checkpoints at `steps`, each holding different params, written as
    the train loop writes them (TrainState with optimizer state, orbax)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    ByteTokenizer().save(run_dir)
    tx, _ = make_optimizer(cfg.optimizer, cfg.train.steps)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=10, async_save=False)
    for s in steps:
        model = random_params(nnx.eval_shape(lambda: models.build(cfg.model, cfg.runtime)), s)
        _, state = init_state(model, tx, cfg.train.seed)
        state["step"] = jnp.asarray(s, jnp.int32)
        ckpt.save(s, state, {})
    ckpt.close()
    return run_dir


def named_params(model) -> dict[str, np.ndarray]:
    return {t.name: t.fetch() for t in chimera_tensors(model)}


def assert_same_params(a, b):
    pa, pb = named_params(a), named_params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype == np.float32, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"), run_config(TINY_MODEL))


# ----------------------------------------------------------------------------- files

def test_writer_streams_shards_that_the_reference_library_reads(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a.w": rng.normal(size=(3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int32),
              "c.scale": rng.normal(size=(11,)).astype(np.float32), "d": np.ones((2, 2, 2), np.float16)}
    fetched = []

    def tensor(name, a):
        return TensorOut(name, a.shape, a.dtype, lambda: fetched.append(name) or a)
    tensors = [tensor(k, v) for k, v in arrays.items()]
    files = write_safetensors(tmp_path, tensors, metadata={"format": "pt"}, max_shard_bytes=64)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert fetched == list(arrays)  # each tensor fetched once, in order
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(arrays)
    reader = SafetensorsReader(tmp_path)
    assert reader.metadata == {"format": "pt"}
    for k, v in arrays.items():
        np.testing.assert_array_equal(reader.get(k), v)
    safetensors = pytest.importorskip("safetensors")
    got = {}
    for f in files:
        with safetensors.safe_open(f, framework="numpy") as st:
            got.update({k: st.get_tensor(k) for k in st.keys()})
    assert sorted(got) == sorted(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)


def test_reader_reads_bfloat16_written_by_the_reference_library(tmp_path):
    flax_st = pytest.importorskip("safetensors.flax")
    x = jnp.linspace(-3, 3, 12, dtype=jnp.bfloat16).reshape(3, 4)
    flax_st.save_file({"x": x, "y": jnp.arange(3.0)}, tmp_path / "model.safetensors")
    got = SafetensorsReader(tmp_path).get("x")
    assert got.shape == (3, 4)
    np.testing.assert_array_equal(got.astype(np.float32), np.asarray(x, np.float32))


def test_shard_plan_is_greedy_in_order():
    def t(n):
        return TensorOut(str(n), (n,), np.dtype(np.float32), lambda: None)
    plan = plan_shards([t(4), t(4), t(10), t(1)], max_bytes=32)
    assert [[x.name for x in s] for s in plan] == [["4", "4"], ["10"], ["1"]]


# ----------------------------------------------------------------------------- names and exports

def test_layer_names_are_in_depth_order_whatever_the_scan():
    cfg = dataclasses.replace(TINY_MODEL, num_layers=6)  # one scanned period + a remainder of 2
    scanned = nnx.eval_shape(lambda: models.build(cfg))
    names = [r.name for r in param_refs(scanned)]
    assert names[0] == "embed.embedding" and names[-1] == "final_norm.scale"
    layers = [int(n.split(".")[1]) for n in names if n.startswith("layers.")]
    assert layers == sorted(layers) and set(layers) == set(range(6))
    assert "layers.5.mixer.q_proj.kernel" in names
    unscanned = nnx.eval_shape(lambda: models.build(dataclasses.replace(cfg, scan=False)))
    assert names == [r.name for r in param_refs(unscanned)]


def test_safetensors_export_loads_back_exactly(run_dir, tmp_path):
    from train.artifacts import load_run
    out = export_run(run_dir, "safetensors", out=tmp_path / "st", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").is_file()  # sharded: ~0.3 MB of params
    assert (out / "tokenizer_byte.json").is_file()
    assert json.loads((out / "chimera_config.json").read_text())["model"] == to_dict(TINY_MODEL)
    ref = load_run(run_dir).model
    cfg, model = load_exported(out)
    assert cfg.model == TINY_MODEL
    assert_same_params(model, ref)
    # the same file into the unscanned layout of the same architecture
    unscanned = nnx.eval_shape(lambda: models.build(dataclasses.replace(TINY_MODEL, scan=False)))
    assert_same_params(load_chimera_safetensors(out, unscanned), ref)


def test_step_selects_the_checkpoint_and_names_the_default_out(run_dir):
    from train.artifacts import load_run
    out = export_run(run_dir, "safetensors", step=1)
    assert out == run_dir / "export" / "safetensors-step1"
    reader = SafetensorsReader(out)
    assert reader.metadata["chimera_step"] == "1"
    first, last = named_params(load_run(run_dir, step=1).model), named_params(load_run(run_dir).model)
    for k in first:
        np.testing.assert_array_equal(reader.get(k), first[k])
    assert not np.array_equal(first["layers.0.mixer_norm.scale"], last["layers.0.mixer_norm.scale"])


def test_load_refuses_a_file_of_another_architecture(run_dir, tmp_path):
    out = export_run(run_dir, "safetensors", out=tmp_path / "st")
    other = nnx.eval_shape(lambda: models.build(dataclasses.replace(TINY_MODEL, num_layers=5)))
    with pytest.raises(ConfigError, match="missing layers.4"):
        load_chimera_safetensors(out, other)
    wider = nnx.eval_shape(lambda: models.build(dataclasses.replace(TINY_MODEL, mlp_hidden=128)))
    with pytest.raises(ConfigError, match=r"layers\.\d\.mlp\.\w+\.kernel: got shape"):
        load_chimera_safetensors(out, wider)


def test_bad_run_dirs_and_steps_are_clear_errors(run_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="no such run directory"):
        export_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a run directory: it has no config.json"):
        export_run(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"--step 7: .* checkpoints at steps \[1, 2\]"):
        export_run(run_dir, step=7)
    assert main([str(tmp_path / "nope"), "--format", "hf"]) == 2
    assert "export error: " in capsys.readouterr().err

"""Fixtures shared by tests/train: small run directories, made once per test session.

`text_run_dir` is trained by `train.loop.run` (config.json, tokenizer, orbax checkpoints,
summary.json) in seconds on a CPU; `mqar_run_dir` holds an untrained checkpoint; `tiny_tfds` is
the data_dir of a tiny array_record TFDS dataset, "chimera_tiny_docs".
"""
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import models
from train.checkpoint import Checkpointer
from train.cli import load_config
from train.config import Config, apply_overrides, to_dict
from train.data import get_tokenizer
from train.loop import resolve, run
from train.optim import make_optimizer
from train.step import init_state

# One device: sharding the tiny batches over the 8 simulated devices only adds compile time.
_ONE_DEVICE = ["runtime.mesh_data=1"]

# The default job's architecture (3 sliding-window : 1 full attention, GQA), small: 4 layers,
# window 16 < seq_len 64, so decoding past 16 tokens wraps the ring buffers.
TEXT_RUN = ["model.d_model=64", "model.mixers.attn.num_heads=2", "model.mixers.swa.num_heads=2",
            "model.mixers.swa.window=16", "data.seq_len=64", "data.batch_size=4", "optimizer.warmup_steps=2",
            "train.steps=30", "train.checkpoint_every=15", "train.eval_batches=2", "train.log_every=10",
            "train.eval_every=0", *_ONE_DEVICE]
MQAR_RUN = ["model.d_model=32", "data.seq_len=32", "data.batch_size=4", "data.mqar.vocab_size=64",
            "data.mqar.num_kv_pairs=4", "data.mqar.num_eval_examples=8", "train.eval_batches=2"]


@pytest.fixture(scope="session")
def text_run_dir(tmp_path_factory):
    """runs/tiny in small: stdlib text, byte tokenizer, checkpoints at steps 15 and 30."""
    path = tmp_path_factory.mktemp("text_run")
    run(apply_overrides(load_config("tiny"), TEXT_RUN), path)
    return path


def write_untrained_run(path: Path, cfg: Config, step: int = 0) -> Path:
    """A run directory as the loop writes it (config.json, tokenizer, one checkpoint), holding
    the freshly initialised model: for tests that need a run but not a trained one, without
    the cost of compiling a train step."""
    cfg = resolve(cfg)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    get_tokenizer(cfg.data).save(path)
    tx, _ = make_optimizer(cfg.optimizer, cfg.train.steps)
    _, state = init_state(models.build(cfg.model, cfg.runtime, seed=cfg.train.seed), tx, cfg.train.seed)
    state["step"] = jnp.asarray(step, jnp.int32)
    ckpt = Checkpointer(path / "checkpoints", keep=1, async_save=False)
    ckpt.save(step, state, {})
    ckpt.close()
    return path


@pytest.fixture(scope="session")
def mqar_run_dir(tmp_path_factory):
    """The mqar preset, small and untrained: token ids for text, vocabulary 64."""
    return write_untrained_run(tmp_path_factory.mktemp("mqar_run"), apply_overrides(load_config("mqar"), MQAR_RUN))


class ChimeraTinyDocs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tiny array_record dataset built into tmp_path; read back by name from its data_dir."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "n": tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 30), "validation": self._generate_examples(100, 6)}

    def _generate_examples(self, start, count):
        for i in range(start, start + count):
            yield i, {"text": f"<{i}> " + "words " * (i % 5), "n": i}


@pytest.fixture(scope="session")
def tiny_tfds(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    ChimeraTinyDocs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)

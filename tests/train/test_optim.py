import jax
import numpy as np
import pytest

import models
from train.config import ModelConfig, OptimizerConfig, RuntimeConfig
from train.optim import _decay_mask, effective_warmup, learning_rate_schedule, make_optimizer
from flax import nnx


@pytest.mark.parametrize("kind, at, want", [
    ("cosine", [0, 5, 10, 55, 100], [0.0, 0.5, 1.0, 0.55, 0.1]),
    ("wsd", [10, 79, 80, 90, 100], [1.0, 1.0, 1.0, 0.55, 0.1]),
    ("constant", [0, 10, 100], [0.0, 1.0, 1.0]),
])
def test_schedules(kind, at, want):
    f = learning_rate_schedule(OptimizerConfig(lr=1.0, schedule=kind, warmup_steps=10, min_lr_ratio=0.1,
                                               decay_fraction=0.2), 100)
    np.testing.assert_allclose([float(f(s)) for s in at], want, atol=1e-6)


def test_warmup_longer_than_the_run_shrinks_to_a_tenth():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=50)
    assert effective_warmup(cfg, 20) == 2
    assert effective_warmup(cfg, 50) == 50 and effective_warmup(cfg, 1000) == 50
    for f in (learning_rate_schedule(cfg, 20), make_optimizer(cfg, 20)[1]):
        np.testing.assert_allclose([float(f(s)) for s in (0, 1, 2)], [0.0, 0.5, 1.0], atol=1e-6)
        assert float(f(3)) < 1.0


def test_weight_decay_only_on_matrices_even_when_stacked():
    m = models.build(ModelConfig(vocab_size=16, d_model=8, num_layers=2, pattern=("attn",)), RuntimeConfig())
    params = nnx.state(m, nnx.Param)
    mask = _decay_mask(params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(mask):
        name = str(path[-1])
        assert leaf == ("kernel" in name or "embedding" in name), name

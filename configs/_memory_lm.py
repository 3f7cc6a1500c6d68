"""The CPU-small language model that the Titans / Miras / TTT presets share: four layers of one
mixer (the `memory` mixer, layers/memory/config.py, or a Titans architecture,
models/titans/config.py), each followed by SwiGLU, d_model 128, byte-level on the Python standard
library's own source, in the shape of `tiny` and `titans_hybrid`. Each preset only states its
mixer; sizes are shrunk to train on a 2-core CPU, so none is a paper reproduction.
"""
from train.config import Config, DataConfig, MixerConfig, ModelConfig, OptimizerConfig, TrainConfig


def memory_lm(name: str, mixer: MixerConfig) -> Config:
    """Every layer `mixer`, named by its kind (so `model.mixers.<kind>.<field>=...` edits it)."""
    return Config(
        name=name,
        model=ModelConfig(d_model=128, num_layers=4, pattern=(mixer.kind,), mixers={mixer.kind: mixer}),
        data=DataConfig(source="stdlib", seq_len=256, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    )

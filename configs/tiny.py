"""The default job: a 3:1 sliding-window : full-attention hybrid (~3M params) on the Python
standard library's own source, byte-level, trained in a few minutes on a 2-core CPU."""
from train.config import AttentionConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def config() -> Config:
    attn = AttentionConfig(num_heads=4, num_kv_heads=2)
    return Config(
        name="tiny",
        model=ModelConfig(
            d_model=256, num_layers=4, pattern=("swa", "swa", "swa", "attn"),
            mixers={"attn": attn, "swa": AttentionConfig(num_heads=4, num_kv_heads=2, window=64)},
        ),
        data=DataConfig(source="stdlib", seq_len=256, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    )

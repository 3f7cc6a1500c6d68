"""A 3:1 Gated Linear Attention : full attention hybrid (~3M params), the shape the hybrid
linear-attention study recommends (ratios 3:1 to 6:1), on the Python standard library's own
source, byte-level; trains on a 2-core CPU in minutes, like `tiny`, which it mirrors except for
its three GLA layers (paper defaults: key width d/2, rank-16 gate, 1/16 gate temperature)."""
from train.config import AttentionConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig
from layers.linear_attention.config import GLAConfig


def config() -> Config:
    return Config(
        name="gla_hybrid",
        model=ModelConfig(
            d_model=256, num_layers=4, pattern=("gla", "gla", "gla", "attn"),
            mixers={"gla": GLAConfig(num_heads=4), "attn": AttentionConfig(num_heads=4, num_kv_heads=2)},
        ),
        data=DataConfig(source="stdlib", seq_len=256, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    )

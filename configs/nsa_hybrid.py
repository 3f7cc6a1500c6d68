"""A 3:1 Native Sparse Attention : full attention hybrid (~3M params) on the Python standard
library's own source, byte-level; trains on a 2-core CPU in minutes, like `tiny` and
`gdn_hybrid`, which it mirrors except for its three NSA layers (compressed, selected and
sliding-window branches with sigmoid gates; GQA with 2 kv heads, so each selection is shared by
2 query heads). CPU scale: blocks of 32 (8 per 256-token row), 4 selected blocks (the own,
previous and first block are forced in, one chosen; paper: 16 blocks of 64), window 64 (paper
512)."""
from train.config import AttentionConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig
from layers.sparse_attention.config import NSAConfig


def config() -> Config:
    return Config(
        name="nsa_hybrid",
        model=ModelConfig(
            d_model=256, num_layers=4, pattern=("nsa", "nsa", "nsa", "attn"),
            mixers={"nsa": NSAConfig(num_heads=4, num_kv_heads=2, block_size=32, num_selected=4, window=64),
                    "attn": AttentionConfig(num_heads=4, num_kv_heads=2)},
        ),
        data=DataConfig(source="stdlib", seq_len=256, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    )

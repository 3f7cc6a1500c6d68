"""A 3:1 MoBA : full attention hybrid (~3M params) on the Python standard library's own source,
byte-level; trains on a 2-core CPU in minutes, like `tiny` and `gdn_hybrid`, which it mirrors
except for its three MoBA layers (paper-faithful: mean-key gate, own block forced, no key
convolution; blocks of 32 so that a 256-token row has 8 blocks and top-3 reads about 3/8 of the
history; the paper's blocks are 512-4096 at 8K-1M tokens). `--set
model.mixers.moba.key_conv_size=3` adds FlashMoBA's key convolution."""
from train.config import AttentionConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig
from layers.sparse_attention.config import MoBAConfig


def config() -> Config:
    return Config(
        name="moba_hybrid",
        model=ModelConfig(
            d_model=256, num_layers=4, pattern=("moba", "moba", "moba", "attn"),
            mixers={"moba": MoBAConfig(num_heads=4, num_kv_heads=2, block_size=32, top_k=3),
                    "attn": AttentionConfig(num_heads=4, num_kv_heads=2)},
        ),
        data=DataConfig(source="stdlib", seq_len=256, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    )

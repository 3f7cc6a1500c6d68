"""A 3:1 Gated DeltaNet : full attention hybrid (~3M params), the shape the hybrid
linear-attention study recommends (ratios 3:1 to 6:1), on the Python standard library's own
source, byte-level; trains on a 2-core CPU in minutes, like `tiny` and `gla_hybrid`, which it
mirrors except for its three Gated DeltaNet layers (paper defaults: short conv 4 + SiLU, L2-normed
q/k, Mamba2 decay, value heads twice as wide as key heads (K = 32, V = 64: powers of two, as the
Pallas GPU kernels need), gated RMSNorm)."""
from train.config import AttentionConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig
from layers.linear_attention.config import GDNConfig


def config() -> Config:
    return Config(
        name="gdn_hybrid",
        model=ModelConfig(
            d_model=256, num_layers=4, pattern=("gdn", "gdn", "gdn", "attn"),
            mixers={"gdn": GDNConfig(num_heads=4, expand_k=0.5, expand_v=1.0),
                    "attn": AttentionConfig(num_heads=4, num_kv_heads=2)},
        ),
        data=DataConfig(source="stdlib", seq_len=256, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    )

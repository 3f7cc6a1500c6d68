"""A 3:1 HGRN2 : full attention hybrid (~3M params), one of the two linear mixers (with Gated
DeltaNet) that the hybrid-linear-attention study recommends at ratios 3:1 to 6:1, on the Python
standard library's own source, byte-level; trains on a 2-core CPU in minutes, like `tiny` and
`gla_hybrid`, which it mirrors except for its three HGRN2 layers. Key width d/2 over 4 heads
(K = 32, V = 64 per head) gives the same recurrent state as `gla_hybrid`'s GLA layers, so the two
compare at equal state; forget-gate lower bound 0 (the paper learns per-layer bounds that rise
with depth; `model.mixers.hgrn2.lower_bound` sets a fixed one)."""
from train.config import AttentionConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig
from layers.linear_attention.config import HGRN2Config


def config() -> Config:
    return Config(
        name="hgrn2_hybrid",
        model=ModelConfig(
            d_model=256, num_layers=4, pattern=("hgrn2", "hgrn2", "hgrn2", "attn"),
            mixers={"hgrn2": HGRN2Config(num_heads=4, expand_k=0.5),
                    "attn": AttentionConfig(num_heads=4, num_kv_heads=2)},
        ),
        data=DataConfig(source="stdlib", seq_len=256, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    )

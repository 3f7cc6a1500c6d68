"""Gated attention (Qiu et al. 2025, G1: an elementwise sigmoid gate from the layer input on
each head's output, before the output projection) in the shape of `tiny`: a 3:1 sliding-window
: full-attention model (~3M params) on the Python standard library's source, byte-level, every
layer gated. Compare with `tiny` (the same model ungated) for the gate's effect, and with
`python -m train.eval RUN --suite diagnostics` for its sink rate (the paper: gating removes the
first-token attention sink)."""
from train.config import AttentionConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def config() -> Config:
    heads = dict(num_heads=4, num_kv_heads=2, gate="elementwise")
    return Config(
        name="gated_attn",
        model=ModelConfig(
            d_model=256, num_layers=4, pattern=("swa", "swa", "swa", "attn"),
            mixers={"attn": AttentionConfig(**heads), "swa": AttentionConfig(**heads, window=64)},
        ),
        data=DataConfig(source="stdlib", seq_len=256, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    )

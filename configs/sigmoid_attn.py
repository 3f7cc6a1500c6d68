"""Sigmoid attention (Ramapuram et al. 2024, FlashSigmoid) in the shape of `tiny`: every layer
weighs keys by sigmoid(q.k / sqrt(D) + b) with no normalisation, b = -ln(256) = -ln(seq_len)
as the paper prescribes, and the stabiliser it pairs with it, hybrid-norm (`model.post_norm`:
an RMSNorm on each branch's output before the residual add). A 3:1 sliding-window : full model
(~3M params) on the Python standard library's source, byte-level."""
from train.config import AttentionConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def config() -> Config:
    heads = dict(num_heads=4, num_kv_heads=2, score="sigmoid", sigmoid_length=256)
    return Config(
        name="sigmoid_attn",
        model=ModelConfig(
            d_model=256, num_layers=4, pattern=("swa", "swa", "swa", "attn"), post_norm=True,
            mixers={"attn": AttentionConfig(**heads), "swa": AttentionConfig(**heads, window=64)},
        ),
        data=DataConfig(source="stdlib", seq_len=256, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    )

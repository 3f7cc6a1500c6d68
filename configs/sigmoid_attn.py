"""Sigmoid attention (Ramapuram et al. 2024, FlashSigmoid) in the shape of `tiny`: every layer
weighs keys by sigmoid(q.k / sqrt(D) + b) with no normalisation, b = -ln n as the paper
prescribes (n = 256, the sequence length, for full attention; 64, the window, for the
sliding-window layers), and the stabiliser it pairs with it, hybrid-norm (`model.post_norm`:
an RMSNorm on each branch's output before the residual add). A 3:1 sliding-window : full model
(~3M params) on the Python standard library's source, byte-level."""
from train.config import AttentionConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def config() -> Config:
    heads = dict(num_heads=4, num_kv_heads=2, score="sigmoid")
    return Config(
        name="sigmoid_attn",
        model=ModelConfig(
            d_model=256, num_layers=4, pattern=("swa", "swa", "swa", "attn"), post_norm=True,
            # b = -ln n with n the keys a query can see: the sequence, or the window
            mixers={"attn": AttentionConfig(**heads, sigmoid_length=256),
                    "swa": AttentionConfig(**heads, window=64, sigmoid_length=64)},
        ),
        data=DataConfig(source="stdlib", seq_len=256, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    )

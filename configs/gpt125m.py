"""~125M-parameter hybrid (3 sliding-window : 1 full attention, GQA) meant for one GPU.

d_model 768, 12 layers, 12 query / 4 kv heads of 64, SwiGLU 3840, byte vocabulary: 125.1M
params. bf16 compute on GPU/TPU ("auto"), fp32 params. Point `data` at a real corpus.
"""
from train.config import AttentionConfig, Config, DataConfig, ModelConfig, OptimizerConfig, RuntimeConfig, TrainConfig


def config() -> Config:
    attn = AttentionConfig(num_heads=12, num_kv_heads=4)
    return Config(
        name="gpt125m",
        model=ModelConfig(
            d_model=768, num_layers=12, pattern=("swa", "swa", "swa", "attn"), mlp_hidden=3840,
            mixers={"attn": attn, "swa": AttentionConfig(num_heads=12, num_kv_heads=4, window=512)},
            z_loss=1e-4,
        ),
        data=DataConfig(source="stdlib", seq_len=1024, batch_size=32),
        optimizer=OptimizerConfig(lr=6e-4, warmup_steps=1000, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=20_000, log_every=50, eval_every=1000, eval_batches=32, checkpoint_every=1000),
        runtime=RuntimeConfig(compute_dtype="auto", remat="dots_no_batch"),
    )

"""Multi-head latent attention (DeepSeek-V2/V3) in the shape of `tiny`: three sliding-window
layers and one MLA layer, whose decode cache is a 256-wide latent plus one 32-wide RoPE key per
token (288 floats) where GQA with 4 heads / 2 kv heads of 64 caches 256 and MHA 512; ~3M
params, on the Python standard library's source, byte-level. MLA's defaults at d_model 256:
4 heads, per-head key 64 + 32 (RoPE) and value 64, kv_lora_rank 4 x 64, no query compression
(as DeepSeek-V2-Lite)."""
from layers.attention.config import MLAConfig
from train.config import AttentionConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def config() -> Config:
    return Config(
        name="mla",
        model=ModelConfig(
            d_model=256, num_layers=4, pattern=("swa", "swa", "swa", "mla"),
            mixers={"mla": MLAConfig(num_heads=4),
                    "swa": AttentionConfig(num_heads=4, num_kv_heads=2, window=64)},
        ),
        data=DataConfig(source="stdlib", seq_len=256, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    )

"""A 3:1 Titans memory : sliding-window attention hybrid, CPU-small (d_model 128), on the Python
standard library's own source, byte-level, in the shape of `tiny` and `gdn_hybrid`.

The memory layers are the mixer's defaults, i.e. Titans' LMM (layers/memory/mixer.py,
layers/memory/config.py): an MLP memory of depth 2 and expansion 4 (GELU) per head, l2
attentional bias, per-token decay and momentum, gradient anchor b = 16, read after write, short
conv 4 + SiLU on q/k/v, L2-normalised q/k, outer-learned W0, per-head RMSNorm and swish output
gate. Four heads of 32 (memory per head: 32 x 128 + 128 x 32 weights). The attention layer is
sliding-window (64), as the Titans MAL / Miras "-H" hybrids pair the memory with SWA. Not a
paper reproduction: sizes are shrunk to train on a 2-core CPU, where a step takes ~2 s (~1k
tokens/s, 2026-11-23), so the 400 steps take ~15 min (loss 2.5 after 30 steps at lr 3e-3).
"""
from train.config import AttentionConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig
from layers.memory.config import MemoryConfig


def config() -> Config:
    return Config(
        name="titans_hybrid",
        model=ModelConfig(
            d_model=128, num_layers=4, pattern=("memory", "memory", "memory", "swa"),
            mixers={"memory": MemoryConfig(num_heads=4),
                    "swa": AttentionConfig(num_heads=4, num_kv_heads=2, window=64)},
        ),
        data=DataConfig(source="stdlib", seq_len=256, batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        train=TrainConfig(steps=400, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100),
    )

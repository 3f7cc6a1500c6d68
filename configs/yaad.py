"""Yaad (Miras, Behrouz et al. 2025, Eq 26): memory z + LN(f(z)) with f a 2-layer MLP
(expansion 4, GELU), coordinate-wise Huber attentional bias with a learned, input-dependent
threshold delta_t, weight decay retention, plain GD. Departure: per-head (not channel-wise
low-rank) gates. CPU-small (configs/_memory_lm.py)."""
from configs._memory_lm import memory_lm
from train.memory_config import MemoryConfig


def config():
    return memory_lm("yaad", MemoryConfig(
        num_heads=4, arch="mlp", residual=True, layernorm=True, bias="huber", retention="decay",
        algorithm="gd"))

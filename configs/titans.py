"""Titans (LMM alone, Behrouz et al. 2024, sec. 3): the memory mixer's defaults, i.e. an MLP
memory of depth 2 (expansion 4, GELU) per head, l2 attentional bias, per-token weight decay and
momentum, gradient anchor b = 16, read after write, per-token gates. CPU-small (configs/_memory_lm.py)."""
from configs._memory_lm import memory_lm
from layers.memory.config import MemoryConfig


def config():
    return memory_lm("titans", MemoryConfig(num_heads=4))

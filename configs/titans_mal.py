"""Titans MAL (memory as layer) in every layer, CPU-small (d_model 128, 4 layers), on the Python
standard library's own source, byte-level, in the shape of `titans_hybrid`.

Each layer is the "titans_mal" mixer (models/titans/mal.py, models/titans/config.py): the
memory's output feeds sliding-window attention (64) with 4 persistent tokens. The memory is the
"memory" mixer's defaults, i.e. Titans' LMM (an MLP of depth 2 and expansion 4 per head, l2
bias, per-token decay and momentum, gradient anchor b = 16, read after write), four heads of 32.
Not a paper reproduction: sizes are shrunk for a 2-core CPU, where a step takes ~2.2 s (~900
tokens/s, machine shared) and the loss falls 5.15 -> 2.82 in 30 steps at lr 3e-3 (2026-11-23).
"""
from configs._memory_lm import memory_lm
from layers.memory.config import MemoryConfig
from models.titans.config import MALConfig


def config():
    return memory_lm("titans_mal", MALConfig(num_heads=4, num_kv_heads=2, num_persistent=4, window=64,
        memory=MemoryConfig(num_heads=4)))

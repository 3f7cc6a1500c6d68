"""Titans MAC (memory as context) in every layer, CPU-small (d_model 128, 4 layers), on the Python
standard library's own source, byte-level, in the shape of `titans_hybrid`.

Each layer is the "titans_mac" mixer (models/titans/mac.py, models/titans/config.py): each row of
256 tokens is four segments of 64; a segment attends causally over [4 persistent | 64 retrieved
| its 64 tokens] and writes its attention output into the memory. The memory is the "memory"
mixer's defaults, i.e. Titans' LMM (an MLP of depth 2 and expansion 4 per head, l2 bias, per-
token decay and momentum, gradient anchor b = 16, read after write), four heads of 32. Not a
paper reproduction: sizes are shrunk for a 2-core CPU, where a step takes ~5 s (~430 tokens/s,
machine shared) and the loss falls 5.46 -> 2.99 in 30 steps at lr 3e-3 (2026-11-23).
"""
from configs._memory_lm import memory_lm
from layers.memory.config import MemoryConfig
from models.titans.config import MACConfig


def config():
    return memory_lm("titans_mac", MACConfig(num_heads=4, num_kv_heads=2, num_persistent=4, segment_size=64,
        memory=MemoryConfig(num_heads=4)))

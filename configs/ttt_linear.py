"""TTT-Linear (Sun et al. 2024): a linear memory read as x + LN(x W), l2 reconstruction of v
(with the residual, the memory fits v - k as TTT's target), no retention, plain GD on
mini-batches of b = 16 tokens (the gradient anchor), read after write. Departures: a
data-dependent per-token learning rate sigmoid(.) * max_lr instead of TTT's learned base rate
over 1/t; the Titans-style conv and output gate of the memory mixer. CPU-small
(configs/_memory_lm.py)."""
from configs._memory_lm import memory_lm
from layers.memory.config import MemoryConfig


def config():
    return memory_lm("ttt_linear", MemoryConfig(
        num_heads=4, arch="linear", residual=True, layernorm=True, bias="l2", retention="none",
        algorithm="gd", chunk_size=16))

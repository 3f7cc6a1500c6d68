"""TTT-MLP (Sun et al. 2024): memory x + LN(f(x)) with f a 2-layer MLP (expansion 4, GELU), l2
reconstruction of v, no retention, plain GD on mini-batches of b = 16 tokens, read after write.
Departures as configs/ttt_linear.py. CPU-small (configs/_memory_lm.py)."""
from configs._memory_lm import memory_lm
from layers.memory.config import MemoryConfig


def config():
    return memory_lm("ttt_mlp", MemoryConfig(
        num_heads=4, arch="mlp", residual=True, layernorm=True, bias="l2", retention="none",
        algorithm="gd", chunk_size=16))

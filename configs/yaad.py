"""Yaad (Miras, Behrouz et al. 2025, Eq 26): memory z + LN(f(z)) with f a 2-layer MLP
(expansion 4, GELU), coordinate-wise Huber attentional bias with a learned, input-dependent
threshold delta_t, weight decay retention, plain GD. Departure: per-head (not channel-wise
low-rank) gates. The decay starts near 1e-3 (decay_bias_init -7, not the default -4): with the
LayerNorm readout, a decay that shrinks M faster than the small writes restore it leaves f(k)
with a variance below the LN's eps, whose second derivative then blew the first gradient up to
~1e7 (measured at -4; 6.5 at -7). CPU-small (configs/_memory_lm.py)."""
from configs._memory_lm import memory_lm
from layers.memory.config import MemoryConfig


def config():
    return memory_lm("yaad", MemoryConfig(
        num_heads=4, arch="mlp", residual=True, layernorm=True, bias="huber", retention="decay",
        algorithm="gd", decay_bias_init=-7.0))

"""Moneta (Miras, Behrouz et al. 2025, Eqs 24-25): memory z + LN(f(z)) with f a 2-layer MLP
(expansion 4, GELU), l_p attentional bias with p = 3, l_q retention with q = 4 (decay on the
state A, weights A / ||A||_q^(q-2)), plain GD. Departures: per-head (not channel-wise low-rank)
gates; the l_q map is applied at every token, where the paper applies it at chunk ends only.
CPU-small (configs/_memory_lm.py)."""
from configs._memory_lm import memory_lm
from layers.memory.config import MemoryConfig


def config():
    return memory_lm("moneta", MemoryConfig(
        num_heads=4, arch="mlp", residual=True, layernorm=True, bias="lp", p=3.0,
        retention="lq_norm", q=4.0, algorithm="gd"))

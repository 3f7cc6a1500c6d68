"""Memora (Miras, Behrouz et al. 2025, Eq 27): memory z + LN(f(z)) with f a 2-layer MLP
(expansion 4, GELU), l2 attentional bias, KL retention (the state holds logits, the weights are
sqrt(d_in) softmax of them over d_in: W_t = c softmax((1 - alpha_t) log W_{t-1} - theta_t grad)),
plain GD. Departures: per-head gates; the softmax step is exact at every token, where the paper
makes it exact only on each chunk's first token. The decay starts near 1e-3 (decay_bias_init
-7): decaying logits flatten the softmax, every output unit of f then carries the same value,
and the LayerNorm readout divides by ~sqrt(eps) (see configs/yaad.py). CPU-small
(configs/_memory_lm.py)."""
from configs._memory_lm import memory_lm
from layers.memory.config import MemoryConfig


def config():
    return memory_lm("memora", MemoryConfig(
        num_heads=4, arch="mlp", residual=True, layernorm=True, bias="l2", retention="kl_softmax",
        algorithm="gd", decay_bias_init=-7.0))

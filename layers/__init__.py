"""Flax NNX layers: the token mixers (one folder per family, each with its config beside its code)
and the shared pieces (norms, RoPE, MLP, convolution, KV cache, sharding).

Importing the package imports nothing else, so that a family's config module (and with it a
whole `Config`) can be imported without jax. `layers.catalog` imports every mixer module, which
registers it in `layers.registry`.
"""

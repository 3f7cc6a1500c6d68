"""Routed block-sparse attention mixers on `pallas_kernels.block_sparse_attention`.

Two mixers, registered as layers/catalog.py imports their modules (configs in layers/sparse_attention/config.py):
moba (Mixture of Block Attention, with FlashMoBA's key convolution as an option) and nsa
(Native Sparse Attention). `routing` holds the routing as pure functions (gates, top-k,
compression, the dense masks of the decode path), `common` the shared plumbing (projections,
RoPE, the full-length KV cache, dense masked attention for decode).
"""

"""Token mixers built on the chunked linear-attention op (pallas_kernels/chunked_linear_attention)
and the delta rule (pallas_kernels/delta_rule).

Nine mixers, registered as layers/catalog.py imports their modules (configs in layers/linear_attention/config.py):
linear, retention, lightning, ssd (Mamba2), gla, hgrn2, mlstm, and on the delta-rule op
(pallas_kernels/delta_rule) deltanet and gdn (Gated DeltaNet). `common` holds the shared
plumbing (base class, caches, projections, norms); each other module is one mixer's math.
"""

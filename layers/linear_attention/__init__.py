"""Token mixers built on the chunked linear-attention op (pallas_kernels/chunked_linear_attention)
and the delta rule (pallas_kernels/delta_rule).

Importing this package registers all nine (configs in train/linear_attention_config.py):
linear, retention, lightning, ssd (Mamba2), gla, hgrn2, mlstm, and on the delta-rule op
(pallas_kernels/delta_rule) deltanet and gdn (Gated DeltaNet). `common` holds the shared
plumbing (base class, caches, projections, norms); each other module is one mixer's math.
"""
from layers.linear_attention import (deltanet, gdn, gla, hgrn2, lightning, linear, mlstm,  # noqa: F401
                                     retention, ssd)

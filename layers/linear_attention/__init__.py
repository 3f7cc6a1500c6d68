"""Token mixers built on the chunked linear-attention op (pallas_kernels/chunked_linear_attention).

Importing this package registers all seven (configs in train/linear_attention_config.py):
linear, retention, lightning, ssd (Mamba2), gla, hgrn2, mlstm. `common` holds the shared
plumbing (base class, caches, projections, norms); each other module is one mixer's math.
"""
from layers.linear_attention import gla, hgrn2, lightning, linear, mlstm, retention, ssd  # noqa: F401

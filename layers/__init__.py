"""Flax NNX layers. Importing this package registers every mixer in `layers.registry`."""
from layers import attention  # noqa: F401
from layers import linear_attention  # noqa: F401
from layers import sparse_attention  # noqa: F401
from layers import memory  # noqa: F401

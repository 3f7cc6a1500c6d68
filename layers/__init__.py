"""Flax NNX layers. Importing this package registers every mixer in `layers.registry`."""
from layers import attention  # noqa: F401

"""Every mixer module of layers/, imported so that each registers itself in `layers.registry`
(models/block.py imports this before it builds a mixer)."""
from layers.attention import mixer as _attention  # noqa: F401
from layers.attention import diff as _diff  # noqa: F401
from layers.linear_attention import (deltanet, gdn, gla, hgrn2, lightning, linear, mlstm,  # noqa: F401
                                     retention, ssd)
from layers.memory import mixer as _memory  # noqa: F401
from layers.sparse_attention import moba, nsa  # noqa: F401
from layers.none import mixer as _none  # noqa: F401
from layers.attention import mla as _mla  # noqa: F401

"""`DataIterator`: an endless Batch iterator whose position is a small JSON-able dict.

The position is grain's own iterator state (the shuffled index of the next document, the slice
of a document split across rows, ...), stored with tuples tagged so that they come back as
tuples: grain compares slices with `!=` against a tuple sentinel, and a JSON list would never
compare equal. The state also records what the iterator was built from (`identity`); restoring
into an iterator built from a different config or seed is an error rather than a silent jump
to unrelated data.
"""
from __future__ import annotations

from typing import Any, Iterator

import grain
import numpy as np

from train.config import ConfigError

__all__ = ["DataIterator", "encode_state", "decode_state", "STATE_FORMAT"]

STATE_FORMAT = 1
_TUPLE = "__tuple__"


def encode_state(obj: Any) -> Any:
    """Python/numpy state -> JSON-able value (tuples become {"__tuple__": [...]})."""
    if isinstance(obj, dict):
        return {str(k): encode_state(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode_state(v) for v in obj]}
    if isinstance(obj, list):
        return [encode_state(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"data iterator state holds a {type(obj).__name__}, which JSON cannot store: {obj!r}")


def decode_state(obj: Any) -> Any:
    """Inverse of `encode_state`."""
    if isinstance(obj, dict):
        if set(obj) == {_TUPLE}:
            return tuple(decode_state(v) for v in obj[_TUPLE])
        return {k: decode_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_state(v) for v in obj]
    return obj


class DataIterator:
    """Endless iterator of Batch dicts (see train.data.pipeline).

    get_state() -> {"format", "identity", "batches", "grain"}: JSON-able; `batches` counts the
    batches drawn so far. set_state(state) continues exactly after the last batch drawn by the
    iterator the state came from.
    """

    def __init__(self, dataset: grain.IterDataset, identity: dict[str, Any]):
        self._it: Iterator = iter(dataset)
        self._identity = dict(identity)
        self.batches = 0

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "identity": encode_state(self._identity), "batches": self.batches,
                "grain": encode_state(self._it.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data iterator state has format {state.get('format')!r}; expected {STATE_FORMAT}")
        theirs, ours = state.get("identity", {}), encode_state(self._identity)
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if differ:
            detail = ", ".join(f"{k}: saved {theirs.get(k)!r} vs now {ours.get(k)!r}" for k in differ)
            raise ConfigError(f"cannot resume the data iterator: the data config or seed changed ({detail})")
        self._it.set_state(decode_state(state["grain"]))
        self.batches = int(state["batches"])

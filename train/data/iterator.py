"""`DataIterator`: an endless Batch iterator whose position is a small JSON-able dict.

The position is grain's own iterator state (the shuffled index of the next document, the slice
of a document split across rows, ...), stored with tuples tagged so that they come back as
tuples: grain compares slices with `!=` against a tuple sentinel, and a JSON list would never
compare equal. The state also records what the iterator was built from (`identity`); restoring
into an iterator built from a different config or seed is an error rather than a silent jump
to unrelated data.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import grain
import numpy as np

from train.config import ConfigError

__all__ = ["DataIterator", "RowIterator", "encode_state", "decode_state", "STATE_FORMAT"]

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

    source_names: tuple[str, ...] = ()  # the sources of a mixture, in the order of their ids (RowIterator)

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

    def close(self) -> None:
        """Stops grain's reader threads and worker processes (also done when collected)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def _check(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data iterator state has format {state.get('format')!r}; expected {STATE_FORMAT}")
        theirs, ours = state.get("identity", {}), encode_state(self._identity)
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if differ:
            detail = ", ".join(f"{k}: saved {theirs.get(k)!r} vs now {ours.get(k)!r}" for k in differ)
            raise ConfigError(f"cannot resume the data iterator: the data config or seed changed ({detail})")

    def set_state(self, state: dict[str, Any]) -> None:
        self._check(state)
        self._it.set_state(decode_state(state["grain"]))
        self.batches = int(state["batches"])


class RowIterator(DataIterator):
    """A DataIterator over batches that are a pure function of their index (shards): batch n is
    element n of `start(0)`, and `start(n)` is the dataset from batch n on.

    Its state is the number of batches drawn (and the identity), nothing about hosts, workers or
    threads: a run resumed on another number of hosts or workers continues with the same global
    batches, each host taking its own rows of them.

    Mixtures: rows carry a "source" id, which is taken out of the batch and counted:
    `local_tokens` [S] are the tokens this host drew per source since `take_local_tokens()`
    last emptied them; `source_tokens` [S] are the run's global counts, which the train loop
    keeps (summing every host's local counts) and which are saved and restored with the state.
    """

    def __init__(self, start: Callable[[int], grain.IterDataset], identity: dict[str, Any],
                 source_names: tuple[str, ...] = ()):
        self._start = start
        self.source_names = tuple(source_names)
        self._identity = dict(identity)
        self.batches = 0
        self._it = None  # started on the first batch (worker processes start once, after any set_state)
        self.local_tokens = np.zeros(max(len(source_names), 1), np.int64)
        self.source_tokens = np.zeros_like(self.local_tokens)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = iter(self._start(self.batches))
        # np.array: rows from worker processes live in shared memory; a copy owns its buffer
        batch = {k: np.array(v) for k, v in next(self._it).items()}
        self.batches += 1
        source = batch.pop("source")
        np.add.at(self.local_tokens, source, (batch["segment_ids"] != 0).sum(1))
        return batch

    def take_local_tokens(self) -> np.ndarray:
        out, self.local_tokens = self.local_tokens, np.zeros_like(self.local_tokens)
        return out

    def get_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "identity": encode_state(self._identity), "batches": self.batches,
                "grain": None, "source_tokens": [int(x) for x in self.source_tokens]}

    def set_state(self, state: dict[str, Any]) -> None:
        self._check(state)
        self.batches = int(state["batches"])
        self.source_tokens = np.asarray(state["source_tokens"], np.int64)
        self.local_tokens[:] = 0
        self.close()
        self._it = None

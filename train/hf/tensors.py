"""How one Hugging Face tensor is made of Chimera params, both ways, exactly.

A `TensorMap` names one HF tensor, the Chimera params it holds (`ours`, in order) and two pure
numpy functions: `to_hf(*ours) -> hf` for export and `from_hf(hf) -> ours` for import. Every
transform here is a permutation, a concatenation or a transposition, so import(export(p)) is
bit-identical; the one exception, `offset` (zero-centred norms), says when it is not.

Conventions: a Chimera Dense kernel is [d_in, d_out]; a torch Linear weight [d_out, d_in]. A
Chimera conv kernel (layers/conv.py) is [W, C] with tap j multiplying x_{t-j}; a torch depthwise
Conv1d weight is [C, 1, W] with tap W-1 multiplying x_t (causal padding W - 1), so the taps are
reversed.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from layers.config import ConfigError


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor `hf` made of the Chimera params `ours` (full names, e.g.
    "layers.3.mixer.q_proj.kernel")."""
    hf: str
    ours: tuple[str, ...]
    to_hf: Callable[..., np.ndarray]
    from_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]

    def hf_shape(self, our_shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        """The HF tensor's shape for params of these shapes (computed on zeros: exact, cheap)."""
        return tuple(self.to_hf(*[np.zeros(s, np.float32) for s in our_shapes]).shape)


def same(hf: str, ours: str) -> TensorMap:
    """Stored as is (embeddings [V, d], norm scales, per-head vectors)."""
    return TensorMap(hf, (ours,), lambda a: a, lambda a: (a,))


def linear(hf: str, ours: str) -> TensorMap:
    """A Dense kernel [d_in, d_out] as a torch Linear weight [d_out, d_in]."""
    return TensorMap(hf, (ours,), lambda a: np.ascontiguousarray(a.T), lambda a: (np.ascontiguousarray(a.T),))


def fused(hf: str, ours: Sequence[str], widths: Sequence[int], groups: int = 1,
          transpose: bool = True) -> TensorMap:
    """One HF Linear weight (or vector, transpose=False) whose output rows are several Chimera
    projections side by side, interleaved by `groups`: rows [g0: ours[0] part, ours[1] part, ...,
    g1: ...], where part i is that param's g-th of `groups` equal slices of its outputs, `widths[i]`
    wide.

    groups=1 is plain concatenation (Mamba2's in_proj: z, x, B|C, dt); groups=H interleaves per
    head (Qwen3-Next's q_proj holds [q_h, gate_h] per head; its in_proj_qkvz [q, k, v, z] per key
    head)."""
    ours, widths = tuple(ours), tuple(widths)
    bounds = np.cumsum(widths)[:-1]

    def to_hf(*parts):
        pieces = [np.split(p, groups, axis=-1) for p in parts]
        out = np.concatenate([pieces[i][g] for g in range(groups) for i in range(len(parts))], axis=-1)
        return np.ascontiguousarray(out.T) if transpose else out

    def from_hf(a):
        a = a.T if transpose else a
        pieces = [np.split(g, bounds, axis=-1) for g in np.split(a, groups, axis=-1)]
        return tuple(np.ascontiguousarray(np.concatenate([pieces[g][i] for g in range(groups)], axis=-1))
                     for i in range(len(ours)))
    return TensorMap(hf, ours, to_hf, from_hf)


def conv(hf: str, ours: str) -> TensorMap:
    """A depthwise causal conv kernel [W, C] as torch's Conv1d weight [C, 1, W] (taps reversed)."""
    return TensorMap(hf, (ours,), lambda a: np.ascontiguousarray(a[::-1].T[:, None, :]),
                     lambda a: (np.ascontiguousarray(a[:, 0, :].T[::-1]),))


def offset(hf: str, ours: str, delta: float) -> TensorMap:
    """Stored as ours + delta: a norm scale w for an architecture whose norm multiplies by
    (1 + w') ("zero-centred", delta = -1). Exact both ways wherever w - 1 is representable
    (1/2 <= w < 2^24, by Sterbenz's lemma, where trained norm scales are in practice); export
    warns about the others (`round_trips`)."""
    d = np.float32(delta)
    return TensorMap(hf, (ours,), lambda a: (a.astype(np.float32) + d), lambda a: (a.astype(np.float32) - d,))


def constant(hf: str, value: np.ndarray, what: str) -> TensorMap:
    """A tensor that holds no Chimera param but must have this value for the architecture to
    compute our function (e.g. a one-expert router, a bias that cancels a built-in +1); import
    refuses any other value, naming `what` it stands for."""
    value = np.asarray(value, np.float32)

    def from_hf(a):
        if a.shape != value.shape or not np.array_equal(a.astype(np.float32), value):
            raise ConfigError(f"{hf} must be {what} for Chimera to compute the checkpoint's function")
        return ()
    return TensorMap(hf, (), lambda: value, from_hf)


def round_trips(m: TensorMap, arrays: Sequence[np.ndarray], hf: np.ndarray | None = None) -> bool:
    """Whether import(export(arrays)) gives back exactly `arrays` (`hf`: their export, if made)."""
    back = m.from_hf(m.to_hf(*arrays) if hf is None else hf)
    return all(np.array_equal(a, b) for a, b in zip(arrays, back))

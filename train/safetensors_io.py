"""Safetensors files: a writer that streams tensors into one file or Hugging Face-style shards,
and a reader that reads one tensor at a time.

Streaming: tensors are written one at a time (each is fetched from the device, one layer's
slice of a stacked param at a time, written, and dropped), so the host never holds more than
one tensor beyond the model itself. This is why the safetensors format is written here and not
with the `safetensors` package, whose writers take a whole file's tensors as one dict. The format
(github.com/huggingface/safetensors): an unsigned little-endian 64-bit header length N, N bytes
of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}
padded with spaces to a multiple of 8, then the tensors' bytes back to back (row-major, little
endian). The reader here memory-maps nothing: it reads one tensor's bytes per `get`, and reads
bfloat16 (the usual dtype of published checkpoints) through ml_dtypes, which numpy lacks.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

from train.config import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorOut:
    """One tensor to write; `fetch` is called once, when its bytes are written."""
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def plan_shards(tensors: Sequence[TensorOut], max_bytes: int) -> list[list[TensorOut]]:
    """Greedy split in order: a shard closes before it would exceed max_bytes (a tensor larger
    than max_bytes gets a shard of its own)."""
    shards: list[list[TensorOut]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: Sequence[TensorOut], metadata: dict[str, str]) -> bytes:
    head: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in tensors:
        head[t.name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors_file(path: Path, tensors: Sequence[TensorOut], metadata: dict[str, str]) -> None:
    """Write one .safetensors file, fetching and writing one tensor at a time."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names in {path.name}")
    with open(path, "wb") as f:
        f.write(_header(tensors, metadata))
        for t in tensors:
            a = np.ascontiguousarray(t.fetch(), dtype=t.dtype)
            if a.shape != t.shape:
                raise ValueError(f"tensor {t.name}: fetched shape {a.shape}, planned {t.shape}")
            f.write(a.reshape(-1).view(np.uint8).data)  # raw bytes, no copy (bfloat16 too)


def write_safetensors(out_dir: Path, tensors: Sequence[TensorOut], *, metadata: dict[str, str] | None = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """model.safetensors, or Hugging Face-style shards plus model.safetensors.index.json.

    Stale files of an earlier export into the same directory are removed first, so that an index
    never meets shards it does not list."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_FILE]:
        old.unlink(missing_ok=True)
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors_file(out_dir / name, shard, metadata or {})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / n for n in names]


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file


class SafetensorsReader:
    """The tensors of a .safetensors file, or of a directory holding model.safetensors or a
    sharded checkpoint with model.safetensors.index.json. `get(name)` reads only that tensor."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            if (path / INDEX_FILE).is_file():
                index = json.loads((path / INDEX_FILE).read_text())
                files = sorted({path / f for f in index["weight_map"].values()})
            elif (path / SINGLE_FILE).is_file():
                files = [path / SINGLE_FILE]
            else:
                files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"{path} holds no safetensors weights ({SINGLE_FILE}, {INDEX_FILE} "
                                  "or *.safetensors)")
        elif path.is_file():
            files = [path]
        else:
            raise ConfigError(f"{path}: no such file or directory")
        self.entries: dict[str, _Entry] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            self._read_header(f)

    def _read_header(self, file: Path) -> None:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            head = json.loads(f.read(n))
        self.metadata.update(head.pop("__metadata__", None) or {})
        for name, e in head.items():
            if e["dtype"] not in DTYPES:
                raise ConfigError(f"{file}: tensor {name} has dtype {e['dtype']}, which is not "
                                  f"supported (supported: {sorted(DTYPES)})")
            if name in self.entries:
                raise ConfigError(f"tensor {name} appears in both {self.entries[name].file.name} "
                                  f"and {file.name}")
            offset = 8 + n + e["data_offsets"][0]
            self.entries[name] = _Entry(file, DTYPES[e["dtype"]], tuple(e["shape"]), offset)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        count = int(np.prod(e.shape, dtype=np.int64))
        a = np.fromfile(e.file, dtype=e.dtype, count=count, offset=e.offset)
        if a.size != count:
            raise ConfigError(f"{e.file} is truncated: tensor {name} needs {count} values, found {a.size}")
        return a.reshape(e.shape)

"""The `files` source: local `.txt` and `.jsonl` files, or directories of them.

Each `data.paths` entry is
  a .txt file        one document (the whole file)
  a .jsonl file      one document per non-blank line, the string in field `data.text_key`
  a directory        every .txt / .jsonl file below it, recursively, sorted by relative path
Documents keep the order of `data.paths`. Each gets a key for the hash split: the file's name
(or its path relative to the listed directory), plus `:line` for JSONL lines.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from train.config import ConfigError

__all__ = ["file_texts", "EXTENSIONS"]

EXTENSIONS = (".txt", ".jsonl")


def _list_files(entry: str, i: int) -> list[tuple[str, Path]]:
    """[(key, path)] for one data.paths entry."""
    path = Path(entry).expanduser()
    if not path.exists():
        raise ConfigError(f"data.paths[{i}]={entry!r} does not exist; give .txt / .jsonl files or directories")
    if path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                       if p.is_file() and p.suffix in EXTENSIONS)
        if not files:
            raise ConfigError(f"data.paths[{i}]={entry!r} is a directory without .txt or .jsonl files")
        return files
    if path.suffix not in EXTENSIONS:
        raise ConfigError(f"data.paths[{i}]={entry!r} has extension {path.suffix!r}; "
                          f"accepted: {list(EXTENSIONS)} files or directories")
    return [(path.name, path)]


def _jsonl_texts(key: str, path: Path, text_key: str) -> list[tuple[str, str]]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data.paths: {where} is not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or text_key not in obj:
                have = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ConfigError(f"data.text_key={text_key!r} is missing at {where}; the line has {have}")
            text = obj[text_key]
            if not isinstance(text, str):
                raise ConfigError(f"data.text_key={text_key!r} at {where} is a {type(text).__name__}, not a string")
            out.append((f"{key}:{lineno}", text))
    return out


def file_texts(paths: Sequence[str], text_key: str) -> list[tuple[str, str]]:
    """[(key, text)] for every document named by `data.paths`."""
    if not paths:
        raise ConfigError("data.source='files' needs data.paths (.txt / .jsonl files or directories)")
    docs: list[tuple[str, str]] = []
    for i, entry in enumerate(paths):
        for key, path in _list_files(entry, i):
            if path.suffix == ".jsonl":
                docs.extend(_jsonl_texts(key, path, text_key))
            else:
                docs.append((key, path.read_text(encoding="utf-8", errors="replace")))
    if not docs:
        raise ConfigError(f"data.paths={list(paths)} hold no documents (only empty .jsonl files?)")
    return docs

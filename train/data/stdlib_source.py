"""The `stdlib` source: the running Python's standard-library `.py` files, one document each.

Always present, no download, about 11 MB of real code (CPython 3.13: ~630 files). Test
packages (`test/`, `tests/`, `idle_test/`) are left out: they would triple the corpus (~33 MB)
and slow start-up without adding a different kind of text. Installed packages
(`site-packages`) are not the standard library. The corpus therefore depends on the Python
version; the split of each file does not (it hashes the file's relative path).
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

__all__ = ["stdlib_dir", "stdlib_texts", "EXCLUDED_DIRS"]

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(root: Path | None = None) -> list[tuple[str, str]]:
    """[(relative posix path, source text)] sorted by path."""
    root = stdlib_dir() if root is None else Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into excluded trees.
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    # A few stdlib files carry stray non-UTF-8 bytes; keep them rather than fail.
    return [(rel, path.read_text(encoding="utf-8", errors="replace")) for rel, path in found]

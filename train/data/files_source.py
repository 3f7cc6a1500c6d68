"""The `files` source: local `.txt`, `.jsonl`, `.parquet` and `.arrow` files, or directories of them.

Each `data.paths` entry is
  a .txt file        one document (the whole file)
  a .jsonl file      one document per non-blank line, the string in field `data.text_key`
  a .parquet file    one document per row, the string column `data.text_key`
  a .arrow file      the same, in Arrow IPC (stream or file) format: what Hugging Face `datasets`
                     writes with `save_to_disk` and keeps in its cache, so a `datasets` dataset is
                     read from its directory without the `datasets` library (point at one split's
                     directory: a DatasetDict's holds one subdirectory per split)
  a directory        every such file below it, recursively, sorted by relative path (leaving
                     out `datasets`' `cache-*.arrow` files of derived tables)
Documents keep the order of `data.paths`. Each gets a key for the hash split: the file's name
(or its path relative to the listed directory), plus `:line` for JSONL lines and `:row` for
Parquet / Arrow rows.

Files are read as UTF-8. One that looks binary (a NUL byte in its first BINARY_SNIFF bytes) is
skipped; one that is not valid UTF-8 is kept with its bad bytes replaced by U+FFFD. Either is
counted and reported in one warning per kind once all files are read.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import NamedTuple, Sequence

from train.config import ConfigError

__all__ = ["file_texts", "list_files", "file_parts", "read_file", "Part", "decode_text", "Problem", "EXTENSIONS", "BINARY_SNIFF"]

log = logging.getLogger("chimera.data")

EXTENSIONS = (".txt", ".jsonl", ".parquet", ".arrow")
TABLES = (".parquet", ".arrow")  # columnar: read with pyarrow, not decoded as text
# Text files never hold NUL bytes; binary formats (and UTF-16 text) almost always do early on.
BINARY_SNIFF = 8192


class Problem(NamedTuple):
    """What was wrong with a file's bytes. kind: "binary" (offset of the first NUL byte) or
    "utf-8" (offset of the first byte that is not valid UTF-8)."""
    kind: str
    offset: int


def decode_text(data: bytes) -> tuple[str | None, Problem | None]:
    """A file's bytes -> (text, problem).

    Binary (a NUL byte in the first BINARY_SNIFF bytes): (None, Problem("binary", offset)).
    Not valid UTF-8: the text with U+FFFD for the bad bytes, Problem("utf-8", offset).
    Line ends are translated as `open()` reads text (\r\n and \r become \n).
    """
    nul = data.find(b"\0", 0, BINARY_SNIFF)
    if nul >= 0:
        return None, Problem("binary", nul)
    problem = None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        text, problem = data.decode("utf-8", errors="replace"), Problem("utf-8", e.start)
    return text.replace("\r\n", "\n").replace("\r", "\n"), problem


def _problem_warnings(problems: list[tuple[Path, Problem]]) -> list[str]:
    """One line per kind of problem: how many files and the first one."""
    lines = []
    bad = [(path, p) for path, p in problems if p.kind == "utf-8"]
    if bad:
        verb = "file is" if len(bad) == 1 else "files are"
        lines.append(f"data.paths: {len(bad)} {verb} not valid UTF-8 (first: {bad[0][0]}, byte {bad[0][1].offset}); "
                     f"bad bytes were replaced with U+FFFD")
    binary = [(path, p) for path, p in problems if p.kind == "binary"]
    if binary:
        noun = "file" if len(binary) == 1 else "files"
        lines.append(f"data.paths: {len(binary)} binary {noun} skipped "
                     f"(first: {binary[0][0]}: NUL byte at offset {binary[0][1].offset})")
    return lines


def _datasets_cache_file(path: Path) -> bool:
    """`cache-*.arrow`: Hugging Face `datasets` keeps the results of .map / .filter beside a
    dataset's own files under that name; they would repeat its documents."""
    return path.suffix == ".arrow" and path.name.startswith("cache-")


def _list_files(entry: str, i: int) -> list[tuple[str, Path]]:
    """[(key, path)] for one data.paths entry."""
    path = Path(entry).expanduser()
    if not path.exists():
        raise ConfigError(f"data.paths[{i}]={entry!r} does not exist; give {'/'.join(EXTENSIONS)} files or directories")
    if path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                       if p.is_file() and p.suffix in EXTENSIONS and not _datasets_cache_file(p))
        if not files:
            raise ConfigError(f"data.paths[{i}]={entry!r} is a directory without {'/'.join(EXTENSIONS)} files")
        return files
    if path.suffix not in EXTENSIONS:
        raise ConfigError(f"data.paths[{i}]={entry!r} has extension {path.suffix!r}; "
                          f"accepted: {list(EXTENSIONS)} files or directories")
    return [(path.name, path)]


def _jsonl_texts(key: str, path: Path, content: str, text_key: str, first_line: int = 1) -> list[tuple[str, str]]:
    """[(key:line, text)] for the non-blank lines of a JSONL file's content (whose first line is
    line `first_line` of the file)."""
    out = []
    # Iterating a StringIO splits on "\n" only, as iterating the open file did: str.splitlines
    # would also split on U+2028 and friends, which JSON strings may hold unescaped.
    for lineno, line in enumerate(io.StringIO(content), first_line):
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


def _table_texts(key: str, path: Path, text_key: str, part: "Part | None" = None) -> list[tuple[str, str]]:
    """[(key:row, text)] for the rows of a Parquet or Arrow (IPC stream or file) table, or of a
    Part's row groups of a Parquet file; only the text column is read (Arrow files are
    memory-mapped)."""
    import pyarrow as pa
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            file = pq.ParquetFile(path)
            if text_key not in file.schema_arrow.names:  # checked first: only that column is read
                raise ConfigError(f"data.text_key={text_key!r} is not a column of {path}; it has "
                                  f"{file.schema_arrow.names}")
            table = (file.read(columns=[text_key]) if part is None else
                     file.read_row_groups(range(part.start, part.stop), columns=[text_key]))
        else:
            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    source.seek(0)
                    table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"data.paths: {path} is not a readable {path.suffix[1:]} table ({str(e)[:200]})") from None
    if text_key not in table.column_names:
        raise ConfigError(f"data.text_key={text_key!r} is not a column of {path}; it has {table.column_names}")
    column = table.column(text_key)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ConfigError(f"data.text_key={text_key!r} in {path} is a {column.type} column, not a string")
    first = part.first if part is not None else 0
    return [(f"{key}:{row}", text) for row, text in enumerate(column.to_pylist(), first) if text is not None]


def list_files(paths: Sequence[str]) -> list[tuple[str, Path]]:
    """[(key, path)] of every input file named by `data.paths`, in order."""
    if not paths:
        raise ConfigError(f"data.source='files' needs data.paths ({' / '.join(EXTENSIONS)} files or directories)")
    return [f for i, entry in enumerate(paths) for f in _list_files(entry, i)]


class Part(NamedTuple):
    """A piece of one large input file, read on its own: bytes [start, stop) of a JSONL file
    (whole lines, the first being line `first`), or row groups [start, stop) of a Parquet file
    (the first row being row `first`). size: its bytes, to group pieces into jobs."""
    kind: str  # "lines" or "row_groups"
    start: int
    stop: int
    first: int
    size: int


def file_parts(path: Path, max_bytes: int) -> list[Part | None]:
    """A JSONL or Parquet file larger than max_bytes cut into Parts of about max_bytes (at line
    ends, at row-group ends); [None] (the whole file) for anything else. Documents and their
    keys are exactly those of reading the whole file."""
    size = path.stat().st_size
    if size <= max_bytes:
        return [None]
    parts: list[Part | None] = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        meta = pq.ParquetFile(path).metadata
        start = row = nbytes = 0
        for g in range(meta.num_row_groups):
            nbytes += meta.row_group(g).total_byte_size
            if nbytes >= max_bytes or g == meta.num_row_groups - 1:
                parts.append(Part("row_groups", start, g + 1, row, nbytes))
                row += sum(meta.row_group(i).num_rows for i in range(start, g + 1))
                start, nbytes = g + 1, 0
        return parts
    if path.suffix != ".jsonl":
        return [None]
    start, line = 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + max_bytes, size))
            f.readline()  # to the end of the line the target falls in
            stop = f.tell()
            f.seek(start)
            data = f.read(stop - start)
            parts.append(Part("lines", start, stop, line, stop - start))
            # lines as decode_text counts them: \r\n and a lone \r are line ends too
            line += data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")
            start = stop
    return parts


def read_file(key: str, path: Path, text_key: str,
              part: Part | None = None) -> tuple[list[tuple[str, str]], Problem | None]:
    """The (key, text) documents of one input file (or of a Part of it, `file_parts`), and what
    was wrong with its bytes."""
    if path.suffix in TABLES:
        return _table_texts(key, path, text_key, part), None
    if part is None:
        data = path.read_bytes()
    else:
        with open(path, "rb") as f:
            f.seek(part.start)
            data = f.read(part.stop - part.start)
    content, problem = decode_text(data)
    if problem is not None and part is not None:
        problem = problem._replace(offset=problem.offset + part.start)
    if content is None:
        return [], problem
    if path.suffix == ".jsonl":
        return _jsonl_texts(key, path, content, text_key, part.first if part else 1), problem
    return [(key, content)], problem


def report_problems(problems: list[tuple[Path, Problem]]) -> None:
    for line in _problem_warnings(problems):
        log.warning(line)


def file_texts(paths: Sequence[str], text_key: str) -> list[tuple[str, str]]:
    """[(key, text)] for every document named by `data.paths`."""
    docs: list[tuple[str, str]] = []
    problems: list[tuple[Path, Problem]] = []
    for key, path in list_files(paths):
        texts, problem = read_file(key, path, text_key)
        if problem is not None:
            problems.append((path, problem))
        docs.extend(texts)
    binary = [(path, p) for path, p in problems if p.kind == "binary"]
    if not docs and binary:
        path, p = binary[0]
        raise ConfigError(f"data.paths={list(paths)} hold no text documents: {len(binary)} binary file(s) "
                          f"skipped (first: {path}: NUL byte at offset {p.offset}); give UTF-8 .txt / .jsonl files")
    if not docs:
        raise ConfigError(f"data.paths={list(paths)} hold no documents (only empty .jsonl files?)")
    report_problems(problems)
    return docs

"""Tokenize a corpus once into ArrayRecord shards, for training runs that should not tokenize at
every start.

    python -m train.prepare_data --out data/stdlib-byte                                   # stdlib, bytes
    python -m train.prepare_data --source files --paths corpus/ --tokenizer tok/tokenizer.json \\
        --out data/corpus-bpe [--docs-per-shard 4096]

Output directory:
    train-00000.array_record, ...        token ids as little-endian uint16 (vocabularies up to
    validation-00000.array_record, ...   65536) or int32; one record per document, or per piece
                                         of `--record-tokens` for longer ones (so that reading
                                         one training row never reads a whole long document)
    train-00000.index.npy, ...           int32 [records, 2]: each record's tokens and whether it
                                         starts a document (1) or continues the one before (0)
    metadata.json                        written last: the plan (below), and per split its shard
                                         files with their document, record and token counts,
                                         and the split's documents, tokens and UTF-8 bytes

The split is the data pipeline's (train/data/documents.py): documents whose name hashes into
`--val-fraction` are validation; when that leaves a side empty (a single document, say), the
last `val_fraction` of each document's tokens is validation instead. Documents keep the
source's order and are cut into shards of `--docs-per-shard`.

The plan (source, paths, text key, split fraction, shard size, the tokenizer's identity with
the SHA-256 of its file, and the SHA-256 of every document's name and text) is written first, to
plan.json. A run killed part way resumes: shards are written to a temporary name and renamed
when complete, so a shard under its final name is whole and is kept; the missing ones are
written. Re-running on the same input writes nothing. An output directory prepared from another
plan is refused, never overwritten. Tokenization runs batched on the tokenizer's own thread
pool (Hugging Face tokenizers encode in parallel in Rust); the corpus text is read into memory
once, the tokens one shard at a time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from train.config import ConfigError, DataConfig

log = logging.getLogger("chimera.data")
FORMAT = "chimera-shards/2"
PLAN_FILE, META_FILE = "plan.json", "metadata.json"
SPLITS = ("train", "validation")
SOURCES = ("stdlib", "files")


def corpus_sha256(docs: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for key, text in docs:
        for part in (key, text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.array_record"


def index_name(shard: str) -> str:
    return shard.removesuffix(".array_record") + ".index.npy"


def records_of(docs: Sequence[np.ndarray], record_tokens: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Documents -> (records of at most `record_tokens` tokens, index int32 [records, 2] of
    (tokens, starts a document))."""
    records, index = [], []
    for d in docs:
        for i in range(0, len(d), record_tokens):
            records.append(d[i:i + record_tokens])
            index.append((len(records[-1]), i == 0))
    return records, np.asarray(index, np.int32).reshape(-1, 2)


def _write_shard(path: Path, records: list[np.ndarray], index: np.ndarray) -> None:
    """The index first, then the shard under its final name: a shard present is whole and has
    its index (a kill leaves at most *.tmp files and an index without its shard)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    idx = path.with_name(index_name(path.name))
    with open(idx.with_name(idx.name + ".tmp"), "wb") as f:
        np.save(f, index)
    idx.with_name(idx.name + ".tmp").rename(idx)
    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    for r in records:
        writer.write(r.tobytes())
    writer.close()
    tmp.rename(path)


def prepare(out: str | Path, source: str = "stdlib", paths: Sequence[str] = (), text_key: str = "text",
            tokenizer: str = "byte", val_fraction: float = DataConfig().val_fraction,
            docs_per_shard: int = 4096, record_tokens: int = 8192, progress: bool = False) -> dict:
    """Write (or finish, or confirm) the shards of `out`; returns the metadata. See the module
    docstring."""
    from train.data.documents import cut_point, source_texts, validation_flags
    from train.data.tokenizer import build_tokenizer, tokenizer_identity
    if docs_per_shard < 1:
        raise ConfigError(f"--docs-per-shard must be >= 1, got {docs_per_shard}")
    if record_tokens < 1:
        raise ConfigError(f"--record-tokens must be >= 1, got {record_tokens}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if source not in SOURCES:
        raise ConfigError(f"--source {source!r} is not accepted; choose one of {list(SOURCES)}")
    out = Path(out)
    # empty texts tokenize to nothing and would only add empty segments: the pipeline drops them too
    docs = [(k, t) for k, t in source_texts(source, paths, text_key) if t]
    tok = build_tokenizer(tokenizer)
    val = validation_flags([k for k, _ in docs], val_fraction)
    mode = "cut" if val is None else "by_name"
    every = list(range(len(docs)))
    train_idx = every if val is None else [i for i in every if not val[i]]
    val_idx = every if val is None else [i for i in every if val[i]]
    plan = {"format": FORMAT, "source": source, "paths": [str(Path(p).absolute()) for p in paths],
            "text_key": text_key, "val_fraction": val_fraction, "docs_per_shard": docs_per_shard,
            "record_tokens": record_tokens,
            "tokenizer": tokenizer_identity(tokenizer), "documents": len(docs), "corpus_sha256": corpus_sha256(docs),
            "split": mode, "dtype": "uint16" if tok.vocab_size <= 2**16 else "int32"}
    for name in (META_FILE, PLAN_FILE):
        if (out / name).is_file():
            old = json.loads((out / name).read_text())
            old = old.get("plan", old)
            if old != plan:
                diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                raise ConfigError(f"--out {out} holds shards prepared from another plan (differs in {', '.join(diff)}); "
                                  "it is never overwritten: choose another --out")
            if name == META_FILE:
                log.info("%s is already prepared from this input: nothing to write", out)
                return json.loads((out / META_FILE).read_text())
    out.mkdir(parents=True, exist_ok=True)
    if not (out / PLAN_FILE).is_file():
        (out / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    for stale in out.glob("*.tmp"):  # a shard or index cut short by a kill: written again below
        stale.unlink()
    dtype = np.dtype(plan["dtype"]).newbyteorder("<")
    meta = {"plan": plan, "splits": {}}
    jobs = [(s, i, idx[i:i + docs_per_shard]) for s, idx in (("train", train_idx), ("validation", val_idx))
            for i in range(0, len(idx), docs_per_shard)]
    from rich.progress import Progress
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"shards of {out}", total=len(jobs))
        stats = {s: {"shards": [], "documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
        for split, start, idx in jobs:
            texts = [docs[j][1] for j in idx]
            tokens = tok.encode_batch(texts)
            sizes = [len(x.encode("utf-8")) for x in texts]
            if mode == "cut":  # the pipeline's cut of each document (documents.cut_point)
                cuts = [cut_point(len(t), b, val_fraction) for t, b in zip(tokens, sizes)]
                if split == "train":
                    tokens, sizes = [t[:c] for t, (c, _) in zip(tokens, cuts)], [b - v for b, (_, v) in zip(sizes, cuts)]
                else:
                    tokens, sizes = [t[c:] for t, (c, _) in zip(tokens, cuts)], [v for _, v in cuts]
            kept = [(t.astype(dtype), b) for t, b in zip(tokens, sizes) if len(t)]  # empty: no segment
            documents = [t for t, _ in kept]
            records, index = records_of(documents, record_tokens)
            nbytes = sum(b for _, b in kept)
            name = shard_name(split, start // docs_per_shard)
            if not (out / name).is_file():
                _write_shard(out / name, records, index)
            n_tokens = int(index[:, 0].sum())
            s = stats[split]
            s["shards"].append({"file": name, "index": index_name(name), "documents": len(documents),
                                "records": len(records), "tokens": n_tokens})
            s["documents"] += len(documents)
            s["tokens"] += n_tokens
            s["bytes"] += int(nbytes)
            bar.advance(task)
    meta["splits"] = stats
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.rename(out / META_FILE)  # last: its presence says every shard is whole
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.prepare_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="stdlib", choices=SOURCES)
    p.add_argument("--paths", nargs="*", default=[], help="files / directories for --source files")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--tokenizer", default="byte", help="as data.tokenizer: byte, a tokenizer.json, .model or directory")
    p.add_argument("--val-fraction", type=float, default=DataConfig().val_fraction)
    p.add_argument("--docs-per-shard", type=int, default=4096)
    p.add_argument("--record-tokens", type=int, default=8192,
                   help="longer documents are stored as several records of at most this many tokens")
    p.add_argument("--out", required=True, help="the shard directory (created; never overwritten)")
    args = p.parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if args.source == "files" and not args.paths:
            raise ConfigError("--source files needs --paths (.txt / .jsonl files or directories)")
        meta = prepare(args.out, args.source, args.paths, args.text_key, args.tokenizer, args.val_fraction,
                       args.docs_per_shard, args.record_tokens, progress=sys.stderr.isatty())
    except ConfigError as e:
        print(f"prepare_data error: {e}", file=sys.stderr)
        return 2
    parts = [f"{s}: {v['documents']:,} documents, {v['tokens']:,} tokens in {len(v['shards'])} shard(s)"
             for s, v in meta["splits"].items()]
    print(f"{args.out} ({meta['plan']['tokenizer']['kind']} tokenizer, {meta['plan']['dtype']}): " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokenize a corpus once into ArrayRecord shards, for training runs that should not tokenize at
every start (data.source=shards reads them).

    python -m train.prepare_data --out data/stdlib-byte                                   # stdlib, bytes
    python -m train.prepare_data --source files --paths corpus/ --tokenizer tok/tokenizer.json \\
        --out data/corpus-bpe [--workers 8] [--shard-mb 64]
    python -m train.prepare_data --source tfds --tfds-name NAME [--tfds-data-dir DIR] --out data/NAME

Sources: `stdlib` (the embedded corpus), `files` (local .txt / .jsonl / .parquet / .arrow files
or directories, train.data.files_source; a Hugging Face `datasets` dataset is read from its
`save_to_disk` directory or its cache's .arrow files, or from its Parquet files), `tfds` (a
prepared TFDS dataset, its own `--train-split` and `--eval-split`).

Output directory:
    train-00000.array_record, ...        token ids as little-endian uint16 (vocabularies up to
    validation-00000.array_record, ...   65536) or int32; one record per document, or per piece
                                         of `--record-tokens` for longer ones (so that reading
                                         one training row never reads a whole long document)
    train-00000.index.npy, ...           int32 [records, 2]: each record's tokens and whether it
                                         starts a document (1) or continues the one before (0)
    done/00000.json, ...                 one per finished job: its shards and counts
    plan.json                            written first: source, paths, settings, the tokenizer's
                                         identity and the SHA-256 of every document's name and text
    metadata.json                        written last: the plan, and per split its shard files
                                         with their document, record and token counts, and the
                                         split's documents, tokens and UTF-8 bytes

The work is cut into jobs, each one shard number: for `files`, consecutive input files of up to
`--shard-mb` MB, a larger JSONL or Parquet file being cut at line or row-group ends into pieces of
about that size (a larger .txt or .arrow file is a job of its own); for `stdlib` and `tfds`,
`--docs-per-shard` documents. Jobs run in `--workers` processes, each reading only its own input. Two passes: the
first reads and hashes every job's documents (the plan, and the split mode below), the second
tokenizes and writes them; memory holds one job's text per worker.

The split is the data pipeline's (train/data/documents.py): documents whose name hashes into
`--val-fraction` are validation; when that leaves a side empty (a single document, say), the
last `val_fraction` of each document's tokens is validation instead. tfds keeps its own splits.

Resumable and idempotent: a job writes its shards under temporary names, renames them, then
writes done/<job>.json; a rerun skips done jobs and writes the rest, and a rerun of a finished
directory writes nothing. An output directory prepared from another plan is refused, never
overwritten; one that another prepare_data is writing is refused too (an flock on --out/.lock,
as training takes on its run directory).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from train.config import ConfigError, DataConfig
from train.data.shards import FORMAT, META_FILE, content_plan
from train.logger import write_atomic
from train.run_lock import RunLock

log = logging.getLogger("chimera.data")
PLAN_FILE, DONE_DIR = "plan.json", "done"
SPLITS = ("train", "validation")
SOURCES = ("stdlib", "files", "tfds")


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


def _write_atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.rename(path)


def _write_shard(path: Path, records: list[np.ndarray], index: np.ndarray) -> None:
    """The index first, then the shard, each renamed from a temporary name when whole."""
    from array_record.python.array_record_module import ArrayRecordWriter
    _write_atomic_npy(path.with_name(index_name(path.name)), index)
    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    for r in records:
        writer.write(r.tobytes())
    writer.close()
    tmp.rename(path)


# ----------------------------------------------------------------------------- jobs

def _jobs(source: str, paths: Sequence[str], shard_mb: float, docs_per_shard: int,
          tfds: dict | None) -> list[dict]:
    """The jobs of a source, in order; each is a small picklable description of its input."""
    if source == "files":
        from train.data.files_source import file_parts, list_files
        jobs, current, size = [], [], 0
        max_bytes = int(shard_mb * 2**20)
        for key, path in list_files(paths):
            for part in file_parts(path, max_bytes):  # a large JSONL / Parquet file: several jobs
                n = part.size if part is not None else path.stat().st_size
                if current and size + n > max_bytes:
                    jobs.append({"files": current})
                    current, size = [], 0
                current.append((key, str(path), part))
                size += n
        return jobs + [{"files": current}]
    if source == "stdlib":
        from train.data.stdlib_source import stdlib_texts
        n = len(stdlib_texts())
        return [{"stdlib": (i, min(i + docs_per_shard, n))} for i in range(0, n, docs_per_shard)]
    out = []
    for split in SPLITS:
        n = len(_tfds_source(tfds, split).records)
        out += [{"tfds": (split, i, min(i + docs_per_shard, n))} for i in range(0, n, docs_per_shard)]
    return out


def _tfds_source(tfds: dict, split: str):
    from train.data.tfds_source import tfds_split
    from train.data.tokenizer import ByteTokenizer
    cfg = DataConfig(source="tfds", tfds_name=tfds["name"], tfds_data_dir=tfds["data_dir"], text_key=tfds["text_key"],
                     train_split=tfds["train_split"], eval_split=tfds["eval_split"])
    return tfds_split(cfg, split, ByteTokenizer())


def _job_docs(job: dict, text_key: str, tfds: dict | None) -> tuple[list[tuple[str, str]], str | None, list]:
    """(key, text) documents of a job (empty texts left out), the split they all belong to (tfds)
    or None (split by name), and the files' byte problems."""
    problems: list = []
    if "files" in job:
        from train.data.files_source import read_file
        docs = []
        for key, path, part in job["files"]:
            texts, problem = read_file(key, Path(path), text_key, part)
            if problem is not None:
                problems.append((path, problem))
            docs += texts
        split = None
    elif "stdlib" in job:
        from train.data.stdlib_source import stdlib_texts
        a, b = job["stdlib"]
        docs, split = stdlib_texts()[a:b], None
    else:
        from train.data.tfds_source import record_text
        split, a, b = job["tfds"]
        records = _tfds_source(tfds, split).records
        docs = [(f"{split}:{i}", record_text(records[i], text_key)) for i in range(a, b)]
    return [(k, t) for k, t in docs if t], split, problems


def _scan(args: tuple) -> dict:
    """First pass over one job: the SHA-256 of its documents, how many, and how many the split
    by name sends to validation (to decide whether documents must be cut instead)."""
    from train.data.documents import is_validation
    job, text_key, val_fraction, tfds = args
    docs, split, problems = _job_docs(job, text_key, tfds)
    h = hashlib.sha256()
    for key, text in docs:
        for part in (key, text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
    n_val = sum(is_validation(k, val_fraction) for k, _ in docs) if split is None else None
    return {"sha256": h.hexdigest(), "documents": len(docs), "validation_by_name": n_val, "problems": problems}


def _write_job(args: tuple) -> dict:
    """Second pass over one job: tokenize, split, write its shards and done/<job>.json."""
    from train.data.documents import cut_point, is_validation
    from train.data.tokenizer import build_tokenizer
    i, job, plan, out, tfds = args
    out = Path(out)
    done = out / DONE_DIR / f"{i:05d}.json"
    if done.is_file():  # finished before, unless a file it lists has gone since: then again
        result = json.loads(done.read_text())
        if all((out / f).is_file() for shard in result.values() for f in (shard["file"], shard["index"])):
            return result
    docs, split, _ = _job_docs(job, plan["text_key"], tfds)
    tok = build_tokenizer(plan["tokenizer"]["spec"])
    texts = [t for _, t in docs]
    tokens = tok.encode_batch(texts) if texts else []
    sizes = [len(t.encode("utf-8")) for t in texts]
    parts = {s: ([], []) for s in SPLITS}  # split -> (token arrays, byte counts)
    for (key, _), t, b in zip(docs, tokens, sizes):
        if plan["split"] == "cut":  # the pipeline's cut of each document (documents.cut_point)
            c, v = cut_point(len(t), b, plan["val_fraction"])
            for s, (piece, nbytes) in (("train", (t[:c], b - v)), ("validation", (t[c:], v))):
                parts[s][0].append(piece)
                parts[s][1].append(nbytes)
        else:
            s = split or ("validation" if is_validation(key, plan["val_fraction"]) else "train")
            parts[s][0].append(t)
            parts[s][1].append(b)
    dtype = np.dtype(plan["dtype"]).newbyteorder("<")
    result = {}
    for s, (toks, nbytes) in parts.items():
        kept = [(t.astype(dtype), b) for t, b in zip(toks, nbytes) if len(t)]  # empty: no segment
        if not kept:
            continue
        records, index = records_of([t for t, _ in kept], plan["record_tokens"])
        name = shard_name(s, i)
        _write_shard(out / name, records, index)
        result[s] = {"file": name, "index": index_name(name), "documents": len(kept), "records": len(records),
                     "tokens": int(index[:, 0].sum()), "bytes": int(sum(b for _, b in kept))}
    write_atomic(done, json.dumps(result) + "\n")
    return result


def _worker_init() -> None:
    # each worker tokenizes one job; the tokenizer's own thread pool would only oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _pool(workers: int, jobs: int):
    """`workers` spawn processes for both passes, or none (in this process) for one worker or job."""
    if workers <= 1 or jobs <= 1:
        return contextlib.nullcontext()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    return ProcessPoolExecutor(min(workers, jobs), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init)


def _map(fn, items: list, pool, progress, task):
    """fn over items in order, in the pool's processes (in this one when pool is None)."""
    for r in (map(fn, items) if pool is None else pool.map(fn, items)):
        yield r
        progress.advance(task)


# ----------------------------------------------------------------------------- prepare

def prepare(out: str | Path, source: str = "stdlib", paths: Sequence[str] = (), text_key: str = "text",
            tokenizer: str = "byte", val_fraction: float = DataConfig().val_fraction,
            docs_per_shard: int = 4096, record_tokens: int = 8192, shard_mb: float = 64.0, workers: int = 1,
            tfds_name: str | None = None, tfds_data_dir: str | None = None, train_split: str = "train",
            eval_split: str = "validation", progress: bool = False) -> dict:
    """Write (or finish, or confirm) the shards of `out`; returns the metadata. See the module
    docstring."""
    from rich.progress import Progress

    from train.data.documents import splits_by_name
    from train.data.files_source import report_problems
    from train.data.tokenizer import build_tokenizer, tokenizer_identity
    for name, ok, accepted in (("docs-per-shard", docs_per_shard >= 1, ">= 1"),
                               ("record-tokens", record_tokens >= 1, ">= 1"),
                               ("shard-mb", shard_mb > 0, "> 0"), ("workers", workers >= 1, ">= 1"),
                               ("val-fraction", 0.0 < val_fraction < 1.0, "in (0, 1)")):
        if not ok:
            raise ConfigError(f"--{name} must be {accepted}, got {locals().get(name.replace('-', '_'))}")
    if source not in SOURCES:
        raise ConfigError(f"--source {source!r} is not accepted; choose one of {list(SOURCES)}")
    if source == "tfds" and not tfds_name:
        raise ConfigError("--source tfds needs --tfds-name")
    out = Path(out)
    tok = build_tokenizer(tokenizer)
    tfds = ({"name": tfds_name, "data_dir": tfds_data_dir, "text_key": text_key, "train_split": train_split,
             "eval_split": eval_split} if source == "tfds" else None)
    jobs = _jobs(source, paths, shard_mb, docs_per_shard, tfds)
    with Progress(disable=not progress, transient=True) as bar, _pool(workers, len(jobs)) as pool:
        task = bar.add_task(f"reading {source}", total=len(jobs))
        scans = list(_map(_scan, [(j, text_key, val_fraction, tfds) for j in jobs], pool, bar, task))
        report_problems([p for s in scans for p in s["problems"]])
        n_docs = sum(s["documents"] for s in scans)
        if n_docs == 0:
            raise ConfigError(f"--source {source} {' '.join(paths)}: no documents with text")
        mode = "tfds" if source == "tfds" else "by_name"
        if source != "tfds":
            n_val = sum(s["validation_by_name"] for s in scans)
            if not splits_by_name(n_val, n_docs, val_fraction):
                mode = "cut"
        corpus = hashlib.sha256("".join(s["sha256"] for s in scans).encode()).hexdigest()
        plan = {"format": FORMAT, "source": source, "paths": [str(Path(p).absolute()) for p in paths],
                "text_key": text_key, "val_fraction": val_fraction, "tfds": tfds, "jobs": len(jobs),
                "shard_mb": shard_mb if source == "files" else None,
                "docs_per_shard": None if source == "files" else docs_per_shard, "record_tokens": record_tokens,
                "tokenizer": tokenizer_identity(tokenizer), "documents": n_docs, "corpus_sha256": corpus,
                "split": mode, "dtype": "uint16" if tok.vocab_size <= 2**16 else "int32"}
        for name in (META_FILE, PLAN_FILE):
            if (out / name).is_file():
                try:
                    old = json.loads((out / name).read_text())
                    old = content_plan(old.get("plan", old))
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise ConfigError(f"{out / name} is not a plan of prepared shards ({type(e).__name__}: {e}); "
                                      "it is never overwritten: choose another --out") from None
                new = content_plan(plan)  # moved inputs or tokenizer file: the same content resumes
                if old != new:
                    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                    raise ConfigError(f"--out {out} holds shards prepared from another plan (differs in "
                                      f"{', '.join(diff)}); it is never overwritten: choose another --out")
                if name == META_FILE:
                    log.info("%s is already prepared from this input: nothing to write", out)
                    return json.loads((out / META_FILE).read_text())
        with RunLock(out, doing="being prepared", instead="use another --out"):  # one writer at a time
            (out / DONE_DIR).mkdir(parents=True, exist_ok=True)
            if not (out / PLAN_FILE).is_file():
                write_atomic(out / PLAN_FILE, json.dumps(plan, indent=2) + "\n")
            for stale in list(out.glob("*.tmp")) + list((out / DONE_DIR).glob("*.tmp")):  # cut short by a kill
                stale.unlink()
            task = bar.add_task(f"tokenizing into {out}", total=len(jobs))
            results = list(_map(_write_job, [(i, j, plan, str(out), tfds) for i, j in enumerate(jobs)], pool,
                                bar, task))
            _write_metadata(out, plan, results)
    return json.loads((out / META_FILE).read_text())


def _write_metadata(out: Path, plan: dict, results: list[dict]) -> None:
    """metadata.json from the jobs' results, written last: its presence says every shard is whole."""
    stats = {s: {"shards": [], "documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    for r in results:
        for s, shard in r.items():
            stats[s]["shards"].append({k: shard[k] for k in ("file", "index", "documents", "records", "tokens")})
            for k in ("documents", "tokens", "bytes"):
                stats[s][k] += shard[k]
    write_atomic(out / META_FILE, json.dumps({"plan": plan, "splits": stats}, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.prepare_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="stdlib", choices=SOURCES)
    p.add_argument("--paths", nargs="*", default=[], help="files / directories for --source files")
    p.add_argument("--text-key", default="text", help="JSONL field, Parquet/Arrow column or tfds feature (default: text)")
    p.add_argument("--tokenizer", default="byte", help="as data.tokenizer: byte, a tokenizer.json, .model or directory")
    p.add_argument("--val-fraction", type=float, default=DataConfig().val_fraction)
    p.add_argument("--shard-mb", type=float, default=64.0, help="files: input MB per shard (default 64)")
    p.add_argument("--docs-per-shard", type=int, default=4096, help="stdlib / tfds: documents per shard")
    p.add_argument("--record-tokens", type=int, default=8192,
                   help="longer documents are stored as several records of at most this many tokens")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one per CPU)")
    p.add_argument("--tfds-name", help="--source tfds: the dataset, prepared as array_record")
    p.add_argument("--tfds-data-dir")
    p.add_argument("--train-split", default="train", help="--source tfds: the split written as train")
    p.add_argument("--eval-split", default="validation", help="--source tfds: the split written as validation")
    p.add_argument("--out", required=True, help="the shard directory (created; never overwritten)")
    args = p.parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if args.source == "files" and not args.paths:
            raise ConfigError("--source files needs --paths (.txt / .jsonl / .parquet / .arrow files or directories)")
        meta = prepare(args.out, args.source, args.paths, args.text_key, args.tokenizer, args.val_fraction,
                       args.docs_per_shard, args.record_tokens, args.shard_mb, args.workers, args.tfds_name,
                       args.tfds_data_dir, args.train_split, args.eval_split, progress=sys.stderr.isatty())
    except ConfigError as e:
        print(f"prepare_data error: {e}", file=sys.stderr)
        return 2
    parts = [f"{s}: {v['documents']:,} documents, {v['tokens']:,} tokens in {len(v['shards'])} shard(s)"
             for s, v in meta["splits"].items()]
    print(f"{args.out} ({meta['plan']['tokenizer']['kind']} tokenizer, {meta['plan']['dtype']}): " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

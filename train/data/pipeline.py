"""The data pipeline: a DataConfig in, Batches out.

A Batch is a dict of numpy arrays, B = data.batch_size rows of T = data.seq_len:
  inputs, targets, segment_ids, positions   int32 [B, T]   (targets = inputs shifted by one)
  loss_mask                                 float32 [B, T] (1 where targets[b, t] is scored)
segment_ids: 1, 2, ... per document piece inside a row, 0 = padding; positions restart at 0
for every piece.

Training: documents of the train split, shuffled (a new order every epoch, from the seed),
tokenized, packed (train.data.packing), batched; endless; resumable through
`DataIterator.get_state / set_state`. In-memory corpora are shuffled as row-sized pieces of
documents, so rows are independent draws from the whole corpus. Evaluation: the validation split
as pieces in one fixed shuffled order, packed the same way, the first `num_batches` batches.

In-memory and tfds sources run in this process and build the global batch on every host (each
host keeps its own rows): their CPU cost is small next to a train step. Only the lazy `tfds`
source reads and tokenizes ahead on grain's reader threads.

Prepared shards (data.source=shards, train.data.shards) are the pretraining path: rows at random
access, shuffled by grain's index shuffle (a new order every epoch), mixed by weight across
directories, each host reading only its own rows of every global batch (`host_rows`), in
`data.workers` grain worker processes. Global batch n is the same rows whatever the number of
hosts or workers, so the iterator's state is just n.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any

import grain
import numpy as np

from train.config import ConfigError, DataConfig
from train.data.documents import Corpus, DocSplit, TokenDocs, TokenPieces, source_texts, tokenized_corpus
from train.data.iterator import DataIterator, RowIterator
from train.data.mqar import MQARExamples
from train.data.packing import EXAMPLE_KEYS, empty_example, pack_documents
from train.data.tokenizer import IdTokenizer, Tokenizer, build_tokenizer

__all__ = ["Batch", "make_train_iterator", "make_eval_batches", "get_tokenizer", "task_vocab_size",
           "unigram_bits_per_byte", "doc_split"]

log = logging.getLogger("chimera.data")

Batch = dict[str, np.ndarray]

# Data already in memory: reader threads would only fight over the GIL.
_IN_MEMORY = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
# tfds records are read from disk and tokenized in the map: a few threads hide that latency.
_LAZY = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)
# unigram_bits_per_byte reads at most this many documents of a lazy (tfds) train split.
UNIGRAM_SAMPLE_DOCS = 5000
# Fixed seed of the validation-piece order: eval rows are spread over the whole split.
_EVAL_ORDER_SEED = 20261123


# ----------------------------------------------------------------------------- tokenizer / vocab

@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str) -> Tokenizer:
    return build_tokenizer(spec)


def get_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer of `data.tokenizer`; for mqar (not text) an IdTokenizer of its vocab."""
    return IdTokenizer(cfg.mqar.vocab_size) if cfg.source == "mqar" else _tokenizer(cfg.tokenizer)


def task_vocab_size(cfg: DataConfig) -> int:
    """Number of token ids the model must cover: the tokenizer's, or data.mqar.vocab_size."""
    return cfg.mqar.vocab_size if cfg.source == "mqar" else _tokenizer(cfg.tokenizer).vocab_size


# ----------------------------------------------------------------------------- shards

@functools.lru_cache(maxsize=16)
def _open_shards(directory: str, split: str, tokenizer: str):
    """One ShardSet per process (train, eval and the unigram baseline all ask for them)."""
    from train.data.shards import open_shard_set
    from train.data.tokenizer import tokenizer_identity
    return open_shard_set(directory, split, tokenizer_identity(tokenizer))


def _shard_sets(cfg: DataConfig, which: str) -> list:
    """The ShardSets of data.paths for "train"; for "validation", those of data.eval_paths read
    whole when given, else each directory's validation split. Checked against data.tokenizer."""
    if which == "validation" and cfg.eval_paths:
        return [_open_shards(d, "all", cfg.tokenizer) for d in cfg.eval_paths]
    return [_open_shards(d, which, cfg.tokenizer) for d in cfg.paths]


def _weights(cfg: DataConfig, sets: list) -> list[float]:
    """data.mixture normalised; without it, the training sets' token shares."""
    w = np.asarray(cfg.mixture if cfg.mixture else [s.num_tokens for s in sets], np.float64)
    return list(w / w.sum())


def _names(sets: list) -> tuple[str, ...]:
    """A short name per source (its directory's name, numbered when names repeat)."""
    names = [s.name for s in sets]
    return tuple(n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names))


def _source_rows(cfg: DataConfig, sets: list, weights: list[float], partial: bool) -> list:
    """[(source id, PackedRows, weight)] of the sets with weight > 0."""
    from train.data.shards import PackedRows
    out = []
    for i, (s, w) in enumerate(zip(sets, weights)):
        if w == 0:
            continue
        rows = PackedRows(s, cfg.seq_len, source_id=i, partial=partial)
        if len(rows) == 0:
            raise ConfigError(f"shard directory {s.directory} has {s.num_tokens} {s.split} tokens: fewer than one row "
                              f"of data.seq_len + 1 = {cfg.seq_len + 1}")
        out.append((i, rows, w))
    return out


def _train_rows(cfg: DataConfig, sets: list, weights: list[float], seed: int) -> grain.MapDataset:
    """Endless MapDataset of training rows: each set's rows in a new shuffled order every epoch,
    mixed by weight (grain's deterministic proportional interleave)."""
    parts = [(grain.MapDataset.source(rows).shuffle(seed=_shuffle_seed(seed, i)).repeat(None), w)
             for i, rows, w in _source_rows(cfg, sets, weights, partial=False)]
    if len(parts) == 1:
        return parts[0][0]
    return grain.MapDataset.mix([d for d, _ in parts], [w for _, w in parts])


def _eval_rows(cfg: DataConfig, sets: list, weights: list[float], want: int) -> list:
    """The first `want` validation rows: source i gives its first ceil(want w_i) rows (or all it
    has) in a fixed shuffled order, interleaved in proportion, so a small source never shortens
    the others (grain's mix of finite datasets stops at the first one exhausted)."""
    picks = []
    for i, rows, w in _source_rows(cfg, sets, weights, partial=True):
        order = grain.MapDataset.source(rows).shuffle(seed=_EVAL_ORDER_SEED + i)
        n = min(len(rows), math.ceil(want * w))
        picks += [((k + 0.5) / n, i, order, k) for k in range(n)]
    picks.sort(key=lambda p: p[:2])
    return [order[k] for _, _, order, k in picks[:want]]


def _shards_unigram_bits_per_byte(cfg: DataConfig, tok: Tokenizer) -> float:
    sets = _shard_sets(cfg, "train")
    counts = np.zeros(tok.vocab_size, np.float64)
    weights = _weights(cfg, sets)
    for s, w in zip(sets, weights):
        if w == 0:
            continue
        n = min(len(s), max(1, UNIGRAM_SAMPLE_DOCS // sum(x > 0 for x in weights)))
        picks = np.unique(np.linspace(0, len(s) - 1, n).astype(np.int64)) if len(s) else []
        c = np.bincount(np.concatenate([s.record(i) for i in picks] + [np.zeros(0, np.int32)]),
                        minlength=tok.vocab_size).astype(np.float64)
        counts += w * c / max(c.sum(), 1.0)
    return _entropy_bits_per_byte(counts, tok.token_bytes)


def _absl_flags_parsed() -> None:
    # grain's worker processes read absl flags, which are parsed only under absl's app.run
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _shards_train_iterator(cfg: DataConfig, seed: int, host_rows: tuple[int, int]) -> RowIterator:
    sets = _shard_sets(cfg, "train")
    weights = _weights(cfg, sets)
    rows = _train_rows(cfg, sets, weights, seed)
    lo, hi = host_rows
    width, B = hi - lo, cfg.batch_size
    # element n of `mine` is rows [n B + lo, n B + hi) of the global stream: this host's part of
    # global batch n (blocks of `width` rows, every (B / width)-th one from block lo / width)
    mine = rows.batch(width)[lo // width::B // width]
    workers = cfg.workers

    def start(n: int) -> grain.IterDataset:
        ds = mine[n:].to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        if workers:
            _absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        return ds

    from train.data.shards import describe
    log.info("train iterator: shards %s; mixture %s; rows of %d tokens, global batch %d, this host rows "
             "[%d, %d), %d worker process(es), seed %d", describe(sets),
             ", ".join(f"{n} {w:.3g}" for n, w in zip(_names(sets), weights)), cfg.seq_len, B, lo, hi, workers, seed)
    ident = {"source": "shards", "seq_len": cfg.seq_len, "batch_size": B, "seed": int(seed),
             "shards": [s.fingerprint for s in sets], "mixture": [round(w, 12) for w in weights]}
    return RowIterator(start, ident, _names(sets))


def _shards_eval_rows(cfg: DataConfig, want: int) -> list:
    """The first `want` validation rows (fewer if the data is short)."""
    sets = _shard_sets(cfg, "validation")
    weights = [1.0 / len(sets)] * len(sets) if cfg.eval_paths else _weights(cfg, _shard_sets(cfg, "train"))
    rows = _eval_rows(cfg, sets, weights, want)
    log.info("eval rows: %d from shards %s", len(rows), "; ".join(f"{s.directory} [{s.split}]" for s in sets))
    return rows


# ----------------------------------------------------------------------------- documents

@functools.lru_cache(maxsize=2)
def _in_memory_corpus(source: str, tokenizer: str, paths: tuple[str, ...], text_key: str,
                      val_fraction: float) -> Corpus:
    """Read and tokenize a stdlib / files corpus once per process (train, eval and the unigram
    baseline all ask for it; loading is the slow part)."""
    texts = source_texts(source, paths, text_key)
    corpus = tokenized_corpus(source, texts, _tokenizer(tokenizer), val_fraction)
    log.info("data source %s (tokenizer %s): %s; %s", source, tokenizer,
             corpus.train.describe(), corpus.validation.describe())
    return corpus


def doc_split(cfg: DataConfig, which: str) -> DocSplit:
    """The "train" or "validation" documents of a text source."""
    if cfg.source in ("stdlib", "files"):
        corpus = _in_memory_corpus(cfg.source, cfg.tokenizer, tuple(cfg.paths), cfg.text_key, cfg.val_fraction)
        return corpus.train if which == "train" else corpus.validation
    if cfg.source == "tfds":
        from train.data.tfds_source import tfds_split  # imports tensorflow_datasets only when used
        split = tfds_split(cfg, which, _tokenizer(cfg.tokenizer))
        log.info("data source %s: %s", cfg.source, split.describe())
        return split
    if cfg.source == "shards":  # the documents of the first directory (of data.eval_paths for validation)
        s = _shard_sets(cfg, which)[0]
        return DocSplit(f"shards:{s.directory}", s.split, s.documents())
    raise ConfigError(f"data.source={cfg.source!r} has no documents; text sources: stdlib, files, tfds, shards")


def _nonempty_split(cfg: DataConfig, which: str) -> DocSplit:
    split = doc_split(cfg, which)
    if len(split) == 0:
        hint = {"stdlib": "data.val_fraction", "files": "data.paths / data.val_fraction",
                "tfds": "data.train_split" if which == "train" else "data.eval_split"}[cfg.source]
        raise ConfigError(f"the {which} split of data.source={cfg.source!r} is empty; check {hint}")
    return split


# ----------------------------------------------------------------------------- train

def _shuffle_seed(seed: int, stream: int = 0) -> int:
    # grain reshuffles epoch e with seed + e, so seeds 0 and 1 would share all epochs but one;
    # hashing the run seed first puts different runs far apart in that sequence. `stream` gives
    # each source of a mixture its own order (stream 0 keeps the single-source seeds unchanged).
    key = [int(seed) & (2**63 - 1), 0x5EED] + ([int(stream)] if stream else [])
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def _identity(cfg: DataConfig, seed: int, num_records: int) -> dict[str, Any]:
    ident = {"source": cfg.source, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
             "seed": int(seed), "train_records": num_records}
    if cfg.source == "mqar":
        ident["mqar"] = dict(vars(cfg.mqar))
    else:
        ident.update(tokenizer=cfg.tokenizer, val_fraction=cfg.val_fraction)
    if cfg.source == "files":
        ident.update(paths=list(cfg.paths), text_key=cfg.text_key)
    if cfg.source == "tfds":
        ident.update(tfds_name=cfg.tfds_name, train_split=cfg.train_split, text_key=cfg.text_key)
    return ident


def _shuffled_records(split: DocSplit, seq_len: int, seed: int) -> grain.MapDataset:
    """Records in a shuffled order. In-memory documents are first cut into row-sized pieces
    (TokenPieces) so that consecutive rows come from unrelated places in the corpus; lazy
    (tfds) records are shuffled whole, since their lengths are unknown until tokenized."""
    records = split.records
    if isinstance(records, TokenDocs):
        records = TokenPieces(records, seq_len + 1)
    return grain.MapDataset.source(records).shuffle(seed=seed)


def _check_host_rows(cfg: DataConfig, host_rows: tuple[int, int] | None) -> tuple[int, int]:
    lo, hi = (0, cfg.batch_size) if host_rows is None else host_rows
    if not (0 <= lo < hi <= cfg.batch_size and cfg.batch_size % (hi - lo) == 0 and lo % (hi - lo) == 0):
        raise ValueError(f"host rows [{lo}, {hi}) are not one of equal blocks of data.batch_size={cfg.batch_size}")
    return lo, hi


def _host_part(lo: int, hi: int):
    def part(batch: Batch) -> Batch:
        return {k: v[lo:hi] for k, v in batch.items()}
    return part


def make_train_iterator(cfg: DataConfig, seed: int, host_rows: tuple[int, int] | None = None) -> DataIterator:
    """Endless iterator of training Batches; each epoch in a new order derived from `seed`.

    host_rows: (lo, hi), the rows of every global batch that this host's devices take (the
    whole batch when None); batches then have hi - lo rows.
    """
    cfg.check()
    lo, hi = _check_host_rows(cfg, host_rows)
    if cfg.source == "shards":
        return _shards_train_iterator(cfg, seed, (lo, hi))
    if cfg.source == "mqar":
        examples = MQARExamples(cfg.mqar, cfg.seq_len, "train")
        if len(examples) == 0:
            raise ConfigError("data.mqar.num_train_examples must be >= 1")
        log.info("data source mqar: %d train examples of %d tokens, %d key/value pairs, vocab %d",
                 len(examples), cfg.seq_len, cfg.mqar.num_kv_pairs, cfg.mqar.vocab_size)
        rows = grain.MapDataset.source(examples).shuffle(seed=_shuffle_seed(seed)).repeat(None)
        ds = rows.to_iter_dataset(_IN_MEMORY)
        num_records = len(examples)
    else:
        split = _nonempty_split(cfg, "train")
        docs = _shuffled_records(split, cfg.seq_len, _shuffle_seed(seed)).repeat(None).map(split.to_tokens)
        ds = pack_documents(docs.to_iter_dataset(_IN_MEMORY if split.num_tokens is not None else _LAZY),
                            cfg.seq_len)
        num_records = len(split)
        log.info("train iterator: %s; rows of %d tokens, batch %d, seed %d",
                 split.describe(), cfg.seq_len, cfg.batch_size, seed)
    ds = ds.batch(cfg.batch_size, drop_remainder=True)
    if (lo, hi) != (0, cfg.batch_size):  # every host builds the global batch and keeps its rows
        ds = ds.map(_host_part(lo, hi))
    return DataIterator(ds, _identity(cfg, seed, num_records))


# ----------------------------------------------------------------------------- eval

def _stack(rows: list[dict[str, np.ndarray]]) -> Batch:
    return {k: np.stack([r[k] for r in rows]) for k in EXAMPLE_KEYS}


def make_eval_batches(cfg: DataConfig, num_batches: int, host_rows: tuple[int, int] | None = None) -> list[Batch]:
    """`num_batches` validation Batches, always the same ones, drawn from all over the split
    (row-sized pieces in a fixed shuffled order), so a few batches are not one file.

    Fewer when the split is small (at least one); the last batch is filled up with all-padding
    rows (loss_mask 0) so every batch has the same shape and nothing recompiles.
    host_rows: as make_train_iterator's; only those rows of each batch are returned.
    """
    cfg.check()
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    lo, hi = _check_host_rows(cfg, host_rows)
    want = num_batches * cfg.batch_size
    if cfg.source == "shards":
        rows = _shards_eval_rows(cfg, want)
    elif cfg.source == "mqar":
        examples = MQARExamples(cfg.mqar, cfg.seq_len, "validation")
        if len(examples) == 0:
            raise ConfigError("data.mqar.num_eval_examples must be >= 1 for evaluation")
        rows = [examples[i] for i in range(min(want, len(examples)))]
    else:
        split = _nonempty_split(cfg, "validation")
        docs = _shuffled_records(split, cfg.seq_len, _EVAL_ORDER_SEED).map(split.to_tokens)
        it = iter(pack_documents(docs.to_iter_dataset(_IN_MEMORY if split.num_tokens is not None else _LAZY),
                                 cfg.seq_len))
        rows = []
        for row in it:
            rows.append(row)
            if len(rows) == want:
                break
    rows += [empty_example(cfg.seq_len)] * (-len(rows) % cfg.batch_size)
    return [_stack(rows[i + lo:i + hi]) for i in range(0, len(rows), cfg.batch_size)]


# ----------------------------------------------------------------------------- unigram baseline

def _entropy_bits_per_byte(counts: np.ndarray, token_bytes: np.ndarray) -> float:
    """Unigram entropy H = -sum p log2 p (bits/token) times tokens per byte.

    Bytes are counted as sum(token_bytes[id]) over the tokens, the same way the train loop turns
    its loss into bits per byte, so the two numbers compare directly.
    """
    total = counts.sum()
    p = counts[counts > 0] / total
    bits_per_token = float(-(p * np.log2(p)).sum())
    nbytes = float((counts * token_bytes[:len(counts)]).sum())
    if nbytes == 0:
        raise ValueError("the training split decodes to zero bytes; cannot compute bits per byte")
    return bits_per_token * float(total) / nbytes


def unigram_bits_per_byte(cfg: DataConfig) -> float | None:
    """Bits per byte of the best context-free model: the train split's unigram distribution.

    A model that learned anything beyond token frequencies scores below this. None for mqar
    (not text). For tfds the first UNIGRAM_SAMPLE_DOCS documents of the split are counted.
    """
    if cfg.source == "mqar":
        return None
    tok = _tokenizer(cfg.tokenizer)
    if cfg.source == "shards":
        return _shards_unigram_bits_per_byte(cfg, tok)
    split = _nonempty_split(cfg, "train")
    if split.num_tokens is not None:
        tokens = split.records.tokens
    else:
        n = min(len(split), UNIGRAM_SAMPLE_DOCS)
        tokens = np.concatenate([split.to_tokens(split.records[i]) for i in range(n)] + [np.zeros(0, np.int32)])
        log.info("unigram baseline from %d of %d %s documents", n, len(split), cfg.source)
    counts = np.bincount(tokens, minlength=tok.vocab_size).astype(np.float64)
    return _entropy_bits_per_byte(counts, tok.token_bytes)

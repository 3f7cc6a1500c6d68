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

Everything runs in this process: grain's worker processes are not used (they start with
`spawn` and trip over absl flags outside `app.run`), and the CPU cost here is small next to a
train step. Only the lazy `tfds` source reads and tokenizes ahead on grain's reader threads.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import grain
import numpy as np

from train.config import ConfigError, DataConfig
from train.data.documents import Corpus, DocSplit, TokenDocs, TokenPieces, source_texts, tokenized_corpus
from train.data.iterator import DataIterator
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
    raise ConfigError(f"data.source={cfg.source!r} has no documents; text sources: stdlib, files, tfds")


def _nonempty_split(cfg: DataConfig, which: str) -> DocSplit:
    split = doc_split(cfg, which)
    if len(split) == 0:
        hint = {"stdlib": "data.val_fraction", "files": "data.paths / data.val_fraction",
                "tfds": "data.train_split" if which == "train" else "data.eval_split"}[cfg.source]
        raise ConfigError(f"the {which} split of data.source={cfg.source!r} is empty; check {hint}")
    return split


# ----------------------------------------------------------------------------- train

def _shuffle_seed(seed: int) -> int:
    # grain reshuffles epoch e with seed + e, so seeds 0 and 1 would share all epochs but one;
    # hashing the run seed first puts different runs far apart in that sequence.
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), 0x5EED]).generate_state(1)[0])


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


def make_train_iterator(cfg: DataConfig, seed: int) -> DataIterator:
    """Endless iterator of training Batches; each epoch in a new order derived from `seed`."""
    cfg.check()
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
    return DataIterator(ds, _identity(cfg, seed, num_records))


# ----------------------------------------------------------------------------- eval

def _stack(rows: list[dict[str, np.ndarray]]) -> Batch:
    return {k: np.stack([r[k] for r in rows]) for k in EXAMPLE_KEYS}


def make_eval_batches(cfg: DataConfig, num_batches: int) -> list[Batch]:
    """`num_batches` validation Batches, always the same ones, drawn from all over the split
    (row-sized pieces in a fixed shuffled order), so a few batches are not one file.

    Fewer when the split is small (at least one); the last batch is filled up with all-padding
    rows (loss_mask 0) so every batch has the same shape and nothing recompiles.
    """
    cfg.check()
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    want = num_batches * cfg.batch_size
    if cfg.source == "mqar":
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
    B = cfg.batch_size
    return [_stack(rows[i:i + B]) for i in range(0, len(rows), B)]


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
    split = _nonempty_split(cfg, "train")
    if split.num_tokens is not None:
        tokens = split.records.tokens
    else:
        n = min(len(split), UNIGRAM_SAMPLE_DOCS)
        tokens = np.concatenate([split.to_tokens(split.records[i]) for i in range(n)] + [np.zeros(0, np.int32)])
        log.info("unigram baseline from %d of %d %s documents", n, len(split), cfg.source)
    counts = np.bincount(tokens, minlength=tok.vocab_size).astype(np.float64)
    return _entropy_bits_per_byte(counts, tok.token_bytes)

"""Data pipeline: tokenizers, document sources (stdlib, files, tfds, mqar), prepared shards
(train.data.shards, made by `python -m train.prepare_data`), packing, batches.

    it = make_train_iterator(cfg.data, seed=cfg.train.seed)   # endless, resumable
    batch = next(it)                                          # dict of [B, T] numpy arrays
    state = it.get_state()                                    # JSON-able; it.set_state(state)
    evals = make_eval_batches(cfg.data, cfg.train.eval_batches)

numpy only: nothing here imports jax.
"""
from train.data.iterator import DataIterator
from train.data.pipeline import (Batch, get_tokenizer, make_eval_batches, make_train_iterator,
                                 task_vocab_size, unigram_bits_per_byte)
from train.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["Batch", "DataIterator", "Tokenizer", "build_tokenizer", "get_tokenizer", "make_eval_batches",
           "make_train_iterator", "task_vocab_size", "unigram_bits_per_byte"]

"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on a corpus and write tokenizer.json.

    python -m train.train_tokenizer --vocab-size 8192 --out tok/tokenizer.json                 # stdlib corpus
    python -m train.train_tokenizer --source files --paths corpus/ --vocab-size 32000 --out tok/tokenizer.json
    python -m train --config tiny data.tokenizer=tok/tokenizer.json model.vocab_size=None

The sources are the training sources (train/data): "stdlib" (the embedded corpus) or "files"
(.txt / .jsonl files or directories, JSONL field --text-key). The tokenizer learns only from the
documents that training uses: documents whose name falls in the validation split (the same
hash split as `data.val_fraction`) are left out, so validation bits per byte are measured on
text the tokenizer never saw. (When that split would leave a side empty, as with a single
document, the data pipeline holds out each document's tail instead; then the last
`val_fraction` of each document's characters is left out here, which approximates the
pipeline's cut in tokens.)

The model is GPT-2's byte-level BPE: every string encodes (the 256 bytes are in the vocabulary
from the start, so there is no unknown token), decode(encode(text)) == text, no special tokens
(documents are separated by segment ids), no prefix space, no normalisation. Training is
deterministic for a given corpus, vocabulary size and min frequency: the same command writes the
same file. The file is usable wherever a tokenizer is named (`data.tokenizer=PATH` for train,
eval, generate, export, ...).

An existing --out is never overwritten (choose another path, or delete it yourself).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

from train.config import ConfigError, DataConfig

log = logging.getLogger("chimera.tokenizer")
BYTES = 256  # the byte-level alphabet every vocabulary starts with
SOURCES = ("stdlib", "files")


def training_texts(source: str, paths: Sequence[str] = (), text_key: str = "text",
                   val_fraction: float = DataConfig().val_fraction) -> list[str]:
    """The texts of `source` that the training split holds, in the source's order."""
    from train.data.documents import source_texts, validation_flags
    if source not in SOURCES:
        raise ConfigError(f"--source {source!r} is not accepted; choose one of {list(SOURCES)}")
    docs = [(k, t) for k, t in source_texts(source, paths, text_key) if t]
    val = validation_flags([k for k, _ in docs], val_fraction)
    if val is None:  # the split by name would leave a side empty: the pipeline cuts tails instead
        return [text[:len(text) - round(len(text) * val_fraction)] for _, text in docs]
    return [text for (_, text), v in zip(docs, val) if not v]


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE `tokenizers.Tokenizer` of `vocab_size` ids (256 bytes + merges) trained
    on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if not isinstance(vocab_size, int) or vocab_size <= BYTES:
        raise ConfigError(f"--vocab-size must be an int > {BYTES} (the byte alphabet plus at least one "
                          f"merge), got {vocab_size!r}")
    if min_frequency < 1:
        raise ConfigError(f"--min-frequency must be >= 1, got {min_frequency}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.train_tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="stdlib", choices=SOURCES, help="stdlib (default) or files")
    p.add_argument("--paths", nargs="*", default=[], help="files / directories for --source files")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--vocab-size", type=int, required=True, help=f"ids in all, > {BYTES}")
    p.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences of a merged pair (default 2)")
    p.add_argument("--val-fraction", type=float, default=DataConfig().val_fraction,
                   help="the data.val_fraction of the runs that will use it (default %(default)s)")
    p.add_argument("--out", required=True, help="the tokenizer.json to write (never overwritten)")
    args = p.parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    out = Path(args.out)
    try:
        if out.exists():
            raise ConfigError(f"--out {out} exists; it is never overwritten (choose another path)")
        if out.suffix != ".json":
            raise ConfigError(f"--out {out} must end in .json (a Hugging Face tokenizer file)")
        if args.source == "files" and not args.paths:
            raise ConfigError("--source files needs --paths (.txt / .jsonl files or directories)")
        start = time.perf_counter()
        texts = training_texts(args.source, args.paths, args.text_key, args.val_fraction)
        tok = train_bpe(texts, args.vocab_size, args.min_frequency)
    except ConfigError as e:
        print(f"train_tokenizer error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    tmp.rename(out)  # never a half-written tokenizer under the final name
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    ntok = sum(len(e.ids) for e in tok.encode_batch(texts[:200]))
    sample_bytes = sum(len(t.encode("utf-8")) for t in texts[:200])
    print(f"wrote {out}: byte-level BPE, {tok.get_vocab_size()} ids, trained on {len(texts)} documents "
          f"({nbytes / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s; "
          f"{sample_bytes / max(ntok, 1):.2f} bytes per token on the first {min(200, len(texts))} documents")
    print(f"use it: data.tokenizer={out} (model.vocab_size=None takes {tok.get_vocab_size()} from it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

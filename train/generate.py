"""Sample text from a checkpoint: prefill the prompt once, then decode token by token.

    python -m train.generate RUN_DIR --prompt "def main(" [--max-tokens 200] [--temperature 0.8]
        [--top-k 40] [--top-p 0.95] [--seed 0] [--step N] [--num-samples 1] [--prompt-file F]

The prompt goes through the model in one call that fills every layer's decode cache (a KV
cache; a ring buffer of `window` slots for sliding-window layers), then each new token is one
call on a [B, 1] input. Both calls are jitted once: the cache has a fixed size (prompt + max
new tokens), so no shape changes between tokens and nothing recompiles. Sampling
(train.sampling) runs inside the jitted call; only the new token ids [B] come back to the host.

Text streams to stdout as it is produced (the prompt first, then the continuation); a header
(checkpoint step, sampling settings) and a timing line go to stderr. With --num-samples N > 1
the N samples are decoded as one batch and printed when done, one after another.

Runs on a synthetic task (mqar) have no text: their prompt is token ids separated by spaces,
e.g. --prompt "12 300 7 401 12", and the output is ids too.

Python use:
    run = load_run("runs/tiny")
    dec = Decoder(run.model, SamplingSettings(temperature=0))
    for ids in dec.generate(prompt_ids, max_tokens=50):   # ids: int32 [num_samples] per step
        ...
"""
from __future__ import annotations

import argparse
import codecs
import functools
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.errors import USER_ERRORS
from train.config import ConfigError
from train.data.tokenizer import Tokenizer
from train.sampling import SamplingSettings, describe, sample

__all__ = ["GenerateError", "Decoder", "encode_prompt", "TextStream", "main"]


class GenerateError(ValueError):
    """A bad argument or prompt; the CLI prints it without a traceback."""


# ----------------------------------------------------------------------------- prompt

def encode_prompt(tokenizer: Tokenizer, text: str, vocab_size: int) -> np.ndarray:
    """Prompt text -> int32 [n] ids, checked non-empty and inside the model's vocabulary."""
    if not text:
        raise GenerateError("the prompt is empty; give some text with --prompt or --prompt-file")
    try:
        ids = np.asarray(tokenizer.encode(text), np.int64).reshape(-1)
    except ValueError as e:  # IdTokenizer: a word that is not an integer
        if tokenizer.kind == "ids":
            raise GenerateError(f"this run's task has no text: the prompt must be token ids separated "
                                f"by spaces, e.g. --prompt '3 300 5 301 3' ({e})") from None
        raise
    if ids.size == 0:
        raise GenerateError(f"the prompt {text!r} encodes to no tokens")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise GenerateError(f"prompt token ids {sorted(set(bad.tolist()))[:8]} are outside the model's "
                            f"vocabulary [0, {vocab_size})")
    return ids.astype(np.int32)


# ----------------------------------------------------------------------------- decoding

def _forward(graphdef, state, tokens, positions, cache):
    """tokens, positions [B, T] -> (logits [B, T, V], cache). One document, no padding."""
    model = nnx.merge(graphdef, state)
    return model(tokens, positions=positions, segment_ids=jnp.ones_like(tokens), cache=cache)


def _prefill(graphdef, settings, state, tokens, cache, key):
    """Run the whole prompt [B, n] through the model; sample the token after it."""
    n = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), tokens.shape)
    logits, cache = _forward(graphdef, state, tokens, positions, cache)
    # The key for the token after position p is fold_in(key, p): every draw gets its own key,
    # and the stream depends only on (seed, prompt length, settings, batch size).
    return sample(jax.random.fold_in(key, n - 1), logits[:, -1], settings), cache


def _step(graphdef, settings, state, token, position, cache, key):
    """Feed token [B] at `position` (int32 scalar); sample the next one."""
    tokens = token[:, None]
    positions = jnp.full(tokens.shape, position, jnp.int32)
    logits, cache = _forward(graphdef, state, tokens, positions, cache)
    return sample(jax.random.fold_in(key, position), logits[:, -1], settings), cache


class Decoder:
    """Jitted prefill and one-token step of `model` for one sampling setting.

    Compiles once per prompt length (prefill) and once per batch and cache size (step); reuse
    one Decoder for many `generate` calls with the same shapes and nothing recompiles.
    """

    def __init__(self, model: nnx.Module, settings: SamplingSettings):
        self.model, self.settings = model, settings
        self.graphdef, self.state = nnx.split(model)
        # The cache is donated: XLA updates it in place instead of copying it every token.
        self._prefill = jax.jit(functools.partial(_prefill, self.graphdef, settings), donate_argnums=(2,))
        self._step = jax.jit(functools.partial(_step, self.graphdef, settings), donate_argnums=(3,))

    def generate(self, prompt_ids: Sequence[int], max_tokens: int, *, seed: int = 0,
                 num_samples: int = 1) -> Iterator[np.ndarray]:
        """Yield the new token ids, int32 [num_samples], one step at a time (max_tokens steps).

        The cache holds prompt + max_tokens positions, enough for every full-attention layer;
        sliding-window layers keep min(window, that) slots as a ring buffer.
        """
        if max_tokens < 1:
            raise GenerateError(f"max_tokens must be >= 1, got {max_tokens}")
        if num_samples < 1:
            raise GenerateError(f"num_samples must be >= 1, got {num_samples}")
        prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
        if prompt.size == 0:
            raise GenerateError("the prompt has no tokens")
        n = int(prompt.size)
        max_len = n + max_tokens
        cache = self.model.init_cache(num_samples, max_len)
        key = jax.random.PRNGKey(seed)
        tokens = jnp.asarray(np.tile(prompt, (num_samples, 1)))
        token, cache = self._prefill(self.state, tokens, cache, key)
        yield np.asarray(token)
        for position in range(n, max_len - 1):  # the last sampled token is never fed back
            token, cache = self._step(self.state, token, jnp.int32(position), cache, key)
            yield np.asarray(token)


# ----------------------------------------------------------------------------- text

class TextStream:
    """Turns token ids, arriving one at a time, into printable pieces of text.

    Byte tokenizer: an incremental UTF-8 decoder, so a character split over several byte tokens
    prints once it is whole. Other tokenizers: decode the growing sequence (prompt included, so
    that tokenizers that drop a leading space at the start of a text still print it) and return
    the new suffix, holding back while the text ends in U+FFFD (an unfinished character).
    `prompt_text` is the prompt as the tokenizer decodes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.ids = [int(i) for i in prompt_ids]
        if tokenizer.kind == "byte":
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self.prompt_text = self._utf8.decode(bytes(self.ids))
        else:
            self._utf8 = None
            self.prompt_text = tokenizer.decode(self.ids)
        self._shown = len(self.prompt_text)

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self.ids.append(token_id)
        if self._utf8 is not None:
            return self._utf8.decode(bytes([token_id]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self._shown = text[self._shown:], len(text)
        return piece

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end)."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self.ids)
        piece, self._shown = text[self._shown:], len(text)
        return piece


# ----------------------------------------------------------------------------- command line

def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train.generate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample from a checkpoint of a run directory. Text goes to stdout, a header and "
                    "timings to stderr. Runs on mqar take prompts of space-separated token ids.")
    p.add_argument("run_dir", help="run directory (holds config.json and checkpoints/)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (mqar runs: token ids separated by spaces)")
    src.add_argument("--prompt-file", help="read the prompt from this file ('-' for stdin)")
    p.add_argument("--max-tokens", type=int, default=200, help="new tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus: the smallest set of tokens with this much probability (default 1: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="samples of the same prompt, decoded as one batch (default 1; >1 prints at the end)")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")
    return p.parse_args(argv)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    path = Path(args.prompt_file)
    if not path.is_file():
        raise GenerateError(f"--prompt-file {path}: no such file")
    return path.read_text(encoding="utf-8")


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def run_cli(args: argparse.Namespace) -> None:
    from train.artifacts import load_run  # after argument errors, which need no checkpoint
    try:
        settings = SamplingSettings(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    if args.max_tokens < 1:
        raise GenerateError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.num_samples < 1:
        raise GenerateError(f"--num-samples must be >= 1, got {args.num_samples}")
    if not Path(args.run_dir).is_dir():
        raise GenerateError(f"{args.run_dir}: no such run directory")
    text = _read_prompt(args)
    if not text:
        raise GenerateError("the prompt is empty; give some text with --prompt or --prompt-file")
    run = load_run(args.run_dir, step=args.step)
    prompt = encode_prompt(run.tokenizer, text, run.cfg.model.vocab_size)
    total = len(prompt) + args.max_tokens
    print(f"[generate] {run.run_dir} checkpoint step {run.step}; prompt {len(prompt)} tokens + "
          f"{args.max_tokens} new; {describe(settings)}; seed {args.seed}; "
          f"{args.num_samples} sample{'s' * (args.num_samples > 1)}", file=sys.stderr)
    if total > run.cfg.data.seq_len:
        print(f"[generate] note: {total} positions is longer than the {run.cfg.data.seq_len} the model "
              "was trained on; quality may drop past that", file=sys.stderr)
    decoder = Decoder(run.model, settings)
    streams = [TextStream(run.tokenizer, prompt) for _ in range(args.num_samples)]
    live = args.num_samples == 1  # one sample streams; a batch prints when done
    texts = [[] if args.no_echo else [s.prompt_text] for s in streams]
    if live:
        _write("".join(texts[0]))
    t0 = time.perf_counter()
    t_first = None
    for ids in decoder.generate(prompt, args.max_tokens, seed=args.seed, num_samples=args.num_samples):
        t_first = t_first or time.perf_counter()
        for s, i, out in zip(streams, ids, texts):
            out.append(s.push(i))
        if live:
            _write(texts[0][-1])
    t_end = time.perf_counter()
    for s, out in zip(streams, texts):
        out.append(s.flush())
    if live:
        _write(texts[0][-1] + "\n")
    else:
        for k, out in enumerate(texts):
            _write(("\n" if k else "") + f"--- sample {k + 1} ---\n" + "".join(out) + "\n")
    steps = args.max_tokens - 1
    rate = f"{steps / (t_end - t_first):.1f}" if steps and t_end > t_first else "-"
    print(f"[generate] {args.max_tokens} tokens x {args.num_samples}: first after {t_first - t0:.2f} s "
          f"(prefill, includes compiling), then {rate} steps/s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        run_cli(args)
    except (GenerateError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

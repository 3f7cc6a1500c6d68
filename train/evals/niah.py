"""The `niah` suite: can the model find a fact stated once in a long context and repeat it?

Three tasks, each over a grid of context lengths x needle depths, in the run's own tokenizer:

  passkey    "The pass key is 71432. Remember it. 71432 is the pass key." inside repeated
             filler sentences (the grass is green, ...), as in Mohtashami & Jaggi (2023)
  needle     "The magic number is 58213." inside held-out text of the run's data (validation
             documents: the model has never seen them, and no download is needed)
  phonebook  PHONEBOOK_ENTRIES lines "Alice's number is 4821." in held-out text; one name is
             asked for (that entry sits at the cell's depth, the others at random depths)

Every prompt is exactly `context_len` tokens: filler, the needle(s) spliced in after
round(depth * filler) filler tokens (depth 0: first, 1: just before the question), then the
question, which ends in the needle's own words: "What is the pass key? The pass key is". A trial
is correct when the greedy continuation, leading spaces dropped, starts with the value and no
further digit follows. A (task, length) whose context cannot hold the needles and question in
their longest form plus MIN_FILLER filler tokens is skipped (listed in results["skipped"]; with
the byte tokenizer the phonebook needs more than 128 tokens).

Default grid: context_len in {T/2, T, 2T} (T = the run's data.seq_len) x depth in DEPTHS, TRIALS
trials per cell; everything is drawn from np.random.default_rng((NIAH_SEED, seed, ...)), so a
seed gives the same prompts on every machine.

Scoring takes a `generate(prompts int32 [B, n], max_new) -> int32 [B, max_new]` callable: the
model's batched greedy decoder by default, an oracle in tests.

Record: results = {"grid": [{task, context_len, depth, correct, trials}], "tasks", "lengths",
"depths", "trials_per_cell", "max_new_tokens", "skipped": [{task, context_len, reason}]};
summary = {"niah/<task>_acc", "niah/<task>_acc@<context_len>" for each task and length,
"niah/acc_mean"}.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from train.config import Config
from train.data.pipeline import doc_split
from train.evals.common import GenerateFn, greedy_generator, make_record, require_text, text_data

__all__ = ["TASKS", "DEPTHS", "TRIALS", "Trial", "check", "default_lengths", "needed_tokens", "splice",
           "haystack_pool", "make_trials", "score_answers", "evaluate", "run"]

TASKS = ("passkey", "needle", "phonebook")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TRIALS = 4
MIN_FILLER = 16
PHONEBOOK_ENTRIES = 3
NIAH_SEED = 0x4E494148  # "NIAH"
# Haystack pool: this many tokens of validation text (or 4 x the longest context), drawn once.
POOL_TOKENS = 1 << 16
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory",
         "Oscar", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter")


@dataclasses.dataclass(frozen=True)
class Trial:
    task: str
    context_len: int
    depth: float
    prompt: np.ndarray  # int32 [context_len]
    value: str          # the digits the continuation must start with


def check(cfg: Config) -> None:
    require_text(cfg, "niah")


def default_lengths(seq_len: int) -> list[int]:
    """{T/2, T, 2T}, sorted, without duplicates."""
    return sorted({max(2, seq_len // 2), seq_len, 2 * seq_len})


# ----------------------------------------------------------------------------- texts

def _draw(task: str, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(values, names) of one trial; the queried fact is the first."""
    if task in ("passkey", "needle"):
        return [str(rng.integers(10000, 100000))], []
    if task == "phonebook":
        names = [NAMES[i] for i in rng.choice(len(NAMES), PHONEBOOK_ENTRIES, replace=False)]
        return [str(x) for x in rng.choice(9000, PHONEBOOK_ENTRIES, replace=False) + 1000], names
    raise ValueError(f"unknown niah task {task!r}; known: {', '.join(TASKS)}")


def _texts(task: str, values: list[str], names: list[str]) -> tuple[list[str], str]:
    """(needle sentences, question) for drawn values (and names). The question ends with the
    queried needle's own words just before its value."""
    if task == "passkey":
        v = values[0]
        return [f"The pass key is {v}. Remember it. {v} is the pass key."], "What is the pass key? The pass key is"
    if task == "needle":
        return [f"The magic number is {values[0]}."], "What is the magic number? The magic number is"
    who = names[0]
    return [f"{n}'s number is {v}." for n, v in zip(names, values)], f"What is {who}'s number? {who}'s number is"


def _encode(tokenizer, sentences: list[str], question: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Each needle on a line of its own; the question on the last line."""
    return [tokenizer.encode(f"\n{s}\n") for s in sentences], tokenizer.encode(f"\n{question}")


def needed_tokens(task: str, tokenizer) -> int:
    """Tokens of needles + question in the longest case (the longest names, 9s for digits):
    a context of L holds the task when L - this >= MIN_FILLER, whatever the draw."""
    if task == "phonebook":
        cost = lambda n: len(tokenizer.encode(f"\n{n}'s number is 9999.\n"))
        names = sorted(NAMES, key=lambda n: (-cost(n), n))[:PHONEBOOK_ENTRIES]
        values = ["9999"] * PHONEBOOK_ENTRIES
        # the question may ask for any of them: charge the longest question too
        extra = max(len(tokenizer.encode(f"\n{_texts(task, values, [n])[1]}")) for n in NAMES)
        needles, _ = _encode(tokenizer, *_texts(task, values, names))
        return sum(len(x) for x in needles) + extra
    needles, q = _encode(tokenizer, *_texts(task, ["99999"], []))
    return sum(len(x) for x in needles) + len(q)


def splice(filler: np.ndarray, needles: list[tuple[np.ndarray, float]], question: np.ndarray) -> np.ndarray:
    """filler [F] with each (needle ids, depth) inserted after round(depth * F) filler tokens
    (ties keep list order), then question -> int32 [F + sum(needles) + len(question)]."""
    F = len(filler)
    cuts = sorted(((int(round(d * F)), i) for i, (_, d) in enumerate(needles)))
    parts, prev = [], 0
    for cut, i in cuts:
        parts += [filler[prev:cut], needles[i][0]]
        prev = cut
    parts += [filler[prev:], question]
    return np.concatenate(parts).astype(np.int32)


def haystack_pool(data, tokenizer, num_tokens: int, seed: int) -> np.ndarray:
    """int32 [>= num_tokens]: validation documents of the run's data in a seeded order, joined
    by newlines (repeated when the split is smaller)."""
    split = doc_split(data, "validation")
    sep = tokenizer.encode("\n\n")
    order = np.random.default_rng((NIAH_SEED, seed, 1)).permutation(len(split))
    parts, have = [], 0
    for i in order:
        toks = np.asarray(split.to_tokens(split.records[int(i)]), np.int32)
        parts += [toks, sep]
        have += len(toks) + len(sep)
        if have >= num_tokens:
            break
    pool = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    if len(pool) == 0:  # a validation split with no text at all: the passkey filler instead
        pool = tokenizer.encode(PASSKEY_FILLER)
    return np.tile(pool, -(-num_tokens // len(pool)))


def _repeated(tokenizer, text: str, num_tokens: int) -> np.ndarray:
    """int32 [num_tokens]: `text` repeated and encoded, cut to num_tokens."""
    reps = num_tokens // max(len(tokenizer.encode(text)), 1) + 2
    ids = tokenizer.encode(text * reps)
    return np.tile(ids, -(-num_tokens // len(ids)))[:num_tokens]


def _cell(task: str, L: int, depth: float, rng: np.random.Generator, trials: int, tokenizer,
          pool: np.ndarray, passkey_filler: np.ndarray) -> list[Trial]:
    """`trials` trials of one cell, each prompt exactly L tokens (the filler takes the rest)."""
    out = []
    for _ in range(trials):
        values, names = _draw(task, rng)
        needles, q = _encode(tokenizer, *_texts(task, values, names))
        F = L - len(q) - sum(len(x) for x in needles)
        assert F >= 0, (task, L, F)  # needed_tokens() bounds this from above
        if task == "passkey":
            filler = passkey_filler[:F]
        else:
            start = int(rng.integers(0, len(pool) - F + 1))
            filler = pool[start:start + F]
        needle_depths = [depth, *rng.uniform(0.0, 1.0, len(needles) - 1)]
        out.append(Trial(task, L, float(depth), splice(filler, list(zip(needles, needle_depths)), q), values[0]))
    return out


def make_trials(tokenizer, pool: np.ndarray, lengths, depths, trials: int, seed: int,
                tasks=TASKS) -> tuple[list[Trial], list[dict]]:
    """All trials of the grid, and the (task, context_len) cells skipped because that length
    cannot hold the needles, the question and MIN_FILLER filler tokens."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown niah tasks {unknown}; known: {', '.join(TASKS)}")
    passkey_filler = _repeated(tokenizer, PASSKEY_FILLER, max(lengths))
    out, skipped = [], []
    for ti, task in enumerate(tasks):
        need = needed_tokens(task, tokenizer)
        for L in lengths:
            if L - need < MIN_FILLER:
                skipped.append({"task": task, "context_len": L,
                                "reason": f"needles and question take up to {need} tokens, plus {MIN_FILLER} of filler"})
                continue
            for di, depth in enumerate(depths):
                rng = np.random.default_rng((NIAH_SEED, seed, ti, L, di))
                out += _cell(task, L, depth, rng, trials, tokenizer, pool, passkey_filler)
    return out, skipped


# ----------------------------------------------------------------------------- scoring

def score_answers(tokenizer, generated: np.ndarray, values: list[str]) -> np.ndarray:
    """generated int [N, m], values [N] digit strings -> bool [N]: the continuation (leading
    whitespace dropped) starts with the value, not followed by another digit. Ids past the
    tokenizer's vocabulary (a model.vocab_size padded above it) end the continuation."""
    ok = np.zeros(len(values), bool)
    for i, (ids, v) in enumerate(zip(generated, values)):
        ids = np.asarray(ids)
        outside = np.flatnonzero((ids < 0) | (ids >= tokenizer.vocab_size))
        text = tokenizer.decode(ids[:outside[0]] if outside.size else ids).lstrip()
        ok[i] = text.startswith(v) and not text[len(v):len(v) + 1].isdigit()
    return ok


def evaluate(generate: GenerateFn, tokenizer, trials: list[Trial]) -> tuple[list[dict], int]:
    """Run every trial (one generate call per context length) -> (grid cells, max_new)."""
    max_new = max((len(tokenizer.encode(f" {t.value}")) for t in trials), default=1) + 1
    correct = np.zeros(len(trials), bool)
    for L in sorted({t.context_len for t in trials}):
        idx = [i for i, t in enumerate(trials) if t.context_len == L]
        prompts = np.stack([trials[i].prompt for i in idx])
        gen = np.asarray(generate(prompts, max_new))
        correct[idx] = score_answers(tokenizer, gen, [trials[i].value for i in idx])
    cells: dict[tuple, dict] = {}
    for t, ok in zip(trials, correct):
        c = cells.setdefault((t.task, t.context_len, t.depth), {"task": t.task, "context_len": t.context_len,
                                                                  "depth": t.depth, "correct": 0, "trials": 0})
        c["correct"] += int(ok)
        c["trials"] += 1
    return list(cells.values()), max_new


def summarize(grid: list[dict], tasks, lengths) -> dict[str, float]:
    def acc(cells):
        n = sum(c["trials"] for c in cells)
        return sum(c["correct"] for c in cells) / n if n else math.nan

    summary = {}
    for task in tasks:
        summary[f"niah/{task}_acc"] = acc([c for c in grid if c["task"] == task])
        for L in lengths:
            summary[f"niah/{task}_acc@{L}"] = acc([c for c in grid if c["task"] == task and c["context_len"] == L])
    summary["niah/acc_mean"] = acc(grid)
    return summary


def run(loaded, *, seed: int = 0, lengths=None, depths=DEPTHS, trials: int = TRIALS, tasks=TASKS,
        generate: GenerateFn | None = None) -> dict:
    """The suite on a LoadedRun. `lengths`, `depths`, `trials`, `tasks` change the grid;
    `generate` replaces the model's greedy decoder (e.g. an oracle)."""
    t0 = time.perf_counter()
    check(loaded.cfg)
    tok = loaded.tokenizer
    lengths = default_lengths(loaded.cfg.data.seq_len) if lengths is None else sorted(set(lengths))
    pool = haystack_pool(text_data(loaded.cfg, loaded.run_dir), tok, max(POOL_TOKENS, 4 * max(lengths)), seed)
    all_trials, skipped = make_trials(tok, pool, lengths, list(depths), trials, seed, tasks)
    generate = generate or greedy_generator(loaded.model)
    grid, max_new = evaluate(generate, tok, all_trials) if all_trials else ([], 0)
    results = {"grid": grid, "tasks": list(tasks), "lengths": list(lengths), "depths": [float(d) for d in depths],
               "trials_per_cell": trials, "max_new_tokens": max_new, "skipped": skipped}
    return make_record("niah", loaded, seed, t0, results, summarize(grid, tasks, lengths))

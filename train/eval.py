"""Evaluate a checkpoint on the run's validation data, or on other data.

    python -m train.eval RUN_DIR [--step N] [--batches N] [--out FILE] [data.key=value ...]
    python -m train.eval RUN_DIR --suite NAME[,NAME] [--step N] [--seed S]

Prints loss, perplexity, accuracy (for mqar: recall accuracy on the answers) and, for text,
bits per byte; writes them as JSON with the checkpoint step and the data config used. Default
file: RUN_DIR/eval/step<N>.json for the run's own data, RUN_DIR/eval/step<N>-<hash>.json
when data.* overrides change it (<hash>: 8 hex digits of the data config), so evaluations on
other data never overwrite the standard one.

With no overrides and the default --batches (the run's train.eval_batches), the batches are
exactly those of the training loop's evals, so the loss equals the final eval in summary.json.
Only `data.*` may be overridden (the model is fixed by the checkpoint), for example
    data.seq_len=1024                        longer rows of the same validation documents
    data.source=files data.paths=a.txt,dir/  other files: only their held-out share (by file
                                             hash, data.val_fraction, or the last share of each
                                             document when that split is empty), or every
                                             document of them with --all-documents
The tokenizer must stay the run's: another vocabulary would make the logits meaningless.

With --suite, the named eval suites (train.evals: mqar, niah, length, diagnostics) run instead
of the standard eval, each writing RUN_DIR/eval/suite-<name>-step<N>.json and printing a short
summary; a suite that does not apply to the run (niah on an mqar model, say) is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

from train.errors import USER_ERRORS
from train.config import Config, ConfigError, DataConfig, apply_overrides, to_dict

__all__ = ["eval_data_config", "check_same_tokenizer", "default_out_path", "evaluate_run", "main"]


def eval_data_config(cfg: Config, overrides: list[str]) -> Config:
    """The run's config with `data.*` overrides applied. Other sections are refused."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key.startswith("data."):
            raise ConfigError(f"override {item!r}: only data.key=value overrides are accepted here "
                              "(the model and its training are fixed by the checkpoint)")
    # grad_accum is a training setting; it must not veto a data.batch_size it does not divide.
    base = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=1))
    new = apply_overrides(base, overrides)
    return dataclasses.replace(new, train=cfg.train)


def check_same_tokenizer(run_tokenizer, data: DataConfig) -> None:
    """Refuse data whose tokenizer (or mqar vocabulary) is not the one the model was trained on."""
    from train.data import get_tokenizer
    tok = get_tokenizer(data)
    what = (f"data.mqar.vocab_size={data.mqar.vocab_size}" if data.source == "mqar"
            else f"data.tokenizer={data.tokenizer!r}")
    if tok.kind != run_tokenizer.kind or tok.vocab_size != run_tokenizer.vocab_size \
            or (tok.token_bytes != run_tokenizer.token_bytes).any():
        raise ConfigError(f"{what} is not the run's tokenizer (it gives {_describe(tok)}; the run was "
                          f"trained with {_describe(run_tokenizer)}): the model only understands its own")


def _describe(tokenizer) -> str:
    return f"the {tokenizer.kind!r} tokenizer, {tokenizer.vocab_size} ids"


def default_out_path(run_dir: Path, step: int, data: dict, run_data: dict) -> Path:
    name = f"step{step}"
    if data != run_data:
        digest = hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
        name += f"-{digest}"
    return Path(run_dir) / "eval" / f"{name}.json"


def all_documents_override() -> str:
    """data.val_fraction just below 1: the hash split (documents.is_validation) then puts every
    document in the validation split, which is what make_eval_batches reads."""
    return f"data.val_fraction={math.nextafter(1.0, 0.0)!r}"


def evaluate_run(run_dir: str | Path, *, step: int | None = None, batches: int | None = None,
                 overrides: list[str] = ()) -> dict:
    """Load the checkpoint, build the eval batches, evaluate. Returns the JSON record."""
    import jax.numpy as jnp
    from flax import nnx

    from train.artifacts import load_config, load_run, load_tokenizer
    from train.data import make_eval_batches
    from train.loop import evaluate
    from train.step import make_eval_step

    run_cfg = load_config(run_dir)
    cfg = eval_data_config(run_cfg, list(overrides))
    data = cfg.data  # as asked for (and recorded)
    if data.source != "mqar" and data.tokenizer == run_cfg.data.tokenizer and data.tokenizer != "byte":
        # The run directory holds a copy of its tokenizer: the original path may have moved.
        data = dataclasses.replace(data, tokenizer=str(run_dir))
    run_tokenizer = load_tokenizer(run_dir)
    check_same_tokenizer(run_tokenizer, data)  # before the (slower) checkpoint restore
    num = cfg.train.eval_batches if batches is None else batches
    if num < 1:
        raise ConfigError(f"--batches must be >= 1, got {num}")
    run = load_run(run_dir, step=step)
    eval_batches = make_eval_batches(data, num)
    graphdef, params = nnx.split(run.model, nnx.Param)
    metrics = evaluate(make_eval_step(graphdef), params, eval_batches, jnp.asarray(run_tokenizer.token_bytes),
                       text=data.source != "mqar")
    return {"run_dir": str(run.run_dir), "step": run.step, "batches": len(eval_batches),
            "overrides": list(overrides), "data": to_dict(cfg.data), "metrics": metrics}


def format_metrics(m: dict) -> str:
    parts = [f"loss {m['loss']:.4f}", f"perplexity {m['perplexity']:.3f}"]
    if "bits_per_byte" in m:
        parts.append(f"bits/byte {m['bits_per_byte']:.4f}")
    parts.append(f"accuracy {m['accuracy']:.4f}")
    return ", ".join(parts) + f" ({int(m['tokens']):,} scored tokens)"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run directory (holds config.json and checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--batches", type=int, default=None,
                   help="eval batches of data.batch_size rows (default: the run's train.eval_batches)")
    p.add_argument("--out", default=None, help="JSON output file (default: RUN_DIR/eval/step<N>[-<hash>].json)")
    p.add_argument("overrides", nargs="*", metavar="data.key=value",
                   help="other data, e.g. data.seq_len=512 or data.source=files data.paths=docs/")
    p.add_argument("--all-documents", action="store_true",
                   help="stdlib / files: evaluate on every document, not only the held-out share "
                        "(for data the run never trained on)")
    p.add_argument("--suite", default=None, metavar="NAME[,NAME]",
                   help="run these eval suites instead (mqar, niah, length, diagnostics); records go to "
                        "RUN_DIR/eval/suite-<name>-step<N>.json")
    p.add_argument("--seed", type=int, default=None, help="--suite only: seed of the suites' draws (default 0)")
    # intermixed: options may come after the data.* overrides
    return p.parse_intermixed_args(argv)


def _run_suites(args: argparse.Namespace) -> int:
    """--suite: check names, options and applicability (before loading anything heavy), run."""
    from train.evals import parse_suites  # light: the suites themselves load lazily
    names = parse_suites(args.suite)
    extra = [flag for flag, on in (("--batches", args.batches is not None), ("--out", args.out is not None),
                                   ("--all-documents", args.all_documents), ("data.* overrides", args.overrides)) if on]
    if extra:
        raise ConfigError(f"--suite takes no {', '.join(extra)}: those are for the standard eval "
                          "(the suites read the run's own data and write RUN_DIR/eval/suite-<name>-step<N>.json)")
    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"{args.run_dir}: no such run directory")
    from train.evals import format_summary, run_suites

    def report(name, record, path):
        print(format_summary(record))
        print(f"wrote {path}", flush=True)

    run_suites(args.run_dir, names, step=args.step, seed=0 if args.seed is None else args.seed, on_record=report)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.suite is not None:
        try:
            return _run_suites(args)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.seed is not None:
        print("error: --seed applies to --suite only (the standard eval has no random draws)", file=sys.stderr)
        return 2
    if args.all_documents:
        args.overrides.append(all_documents_override())
    try:
        if not Path(args.run_dir).is_dir():
            raise ConfigError(f"{args.run_dir}: no such run directory")
        record = evaluate_run(args.run_dir, step=args.step, batches=args.batches, overrides=args.overrides)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from train.artifacts import load_config  # imports jax: after the argument errors
    run_data = to_dict(load_config(args.run_dir).data)
    out = Path(args.out) if args.out else default_out_path(Path(args.run_dir), record["step"],
                                                              record["data"], run_data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    d = record["data"]
    print(f"step {record['step']}, {record['batches']} batches of {d['batch_size']} x {d['seq_len']} "
          f"({d['source']}): {format_metrics(record['metrics'])}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

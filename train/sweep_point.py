"""One point of a sweep, in its own process: train (or resume, or find it finished), measure what
the model costs, run the evaluation suites, write the point's record.

    python -m train.sweep_point CONFIG_JSON RUN_DIR --record FILE [--evals a,b] [--seed S] [--nonce N]

Started by `python -m train.sweep` (one process per point, so a crash or an out-of-memory kill
of one point never takes the sweep down, and every point starts from a clean JAX). Training is
exactly `python -m train --config CONFIG_JSON --run-dir RUN_DIR`, with its exit codes; after a
clean finish the record is written atomically to FILE:

    run, nonce, status ("done", or "failed" with stage "eval" when a suite failed), error,
    train_s, stats_s, eval_s, final (the run's final eval from summary.json), stats
    (models.stats.model_stats), suites {name: summary dict}, evals (the suites asked for)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m train.sweep_point", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("run_dir")
    p.add_argument("--record", required=True)
    p.add_argument("--evals", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nonce", default="")
    return p.parse_args(argv)


def _suites(run_dir: Path, names: list[str], seed: int) -> tuple[dict, dict]:
    """(summaries, errors) of each suite; a suite that does not apply or fails does not stop
    the others. The checkpoint is loaded once for all of them; the full records stay where the
    suites write them, RUN_DIR/eval/suite-<name>-step<N>.json."""
    from train.artifacts import load_config
    from train.errors import USER_ERRORS
    from train.evals import check_suites, run_suites
    summaries, errors, ok = {}, {}, []
    cfg = load_config(run_dir)
    for name in names:
        try:
            check_suites(cfg, [name])
            ok.append(name)
        except USER_ERRORS as e:
            errors[name] = str(e)

    def done(name, record, path):
        summaries[name] = record.get("summary", {})
        print(f"eval suite {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in summaries[name].items()
                                                   if isinstance(v, (int, float))), flush=True)

    try:
        if ok:
            run_suites(run_dir, ok, seed=seed, on_record=done)
    except USER_ERRORS as e:
        errors.update({n: str(e) for n in ok if n not in summaries})
    for name, e in errors.items():
        print(f"eval suite {name} failed: {e}", file=sys.stderr, flush=True)
    return summaries, errors


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from train import cli
    run_dir = Path(args.run_dir)
    t0 = time.perf_counter()
    rc = cli.main(["--config", args.config, "--run-dir", str(run_dir)])
    train_s = time.perf_counter() - t0
    if rc != cli.EXIT_DONE:
        return rc

    from models.stats import model_stats
    from train.artifacts import load_config
    from train.logger import write_atomic
    cfg = load_config(run_dir)  # the resolved config (vocab_size set)
    t1 = time.perf_counter()
    stats = model_stats(cfg.model, cfg.runtime, seq_len=cfg.data.seq_len)
    t2 = time.perf_counter()
    names = [n for n in args.evals.split(",") if n]
    summaries, errors = _suites(run_dir, names, args.seed)
    t3 = time.perf_counter()
    summary_path = run_dir / "summary.json"
    final = json.loads(summary_path.read_text()).get("eval", {}) if summary_path.is_file() else {}
    record = {
        "run": run_dir.name, "nonce": args.nonce,
        "status": "failed" if errors else "done",
        "stage": "eval" if errors else None,
        "error": "; ".join(f"{k}: {v}" for k, v in errors.items()) or None,
        "train_s": train_s, "stats_s": t2 - t1, "eval_s": t3 - t2,
        "final": final, "stats": stats, "suites": summaries,
        "evals": names,
    }
    write_atomic(Path(args.record), json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Eval suites: named studies of a checkpoint beyond its validation loss.

    python -m train.eval RUN_DIR --suite niah,length [--step N] [--seed S]
    records = run_suites("runs/tiny", ["niah", "length"])     # {name: record}

Suites (each a module with `run(loaded, *, seed=0) -> record`, imported only when asked for):

    mqar         recall accuracy over (key/value pairs x length), larger than trained (mqar runs)
    niah         passkey, needle-in-a-haystack and phonebook retrieval by greedy decoding (text runs)
    length       loss / bits per byte per position bucket, decode speed and cache bytes at 1x, 2x,
                 4x the trained length (text runs)
    diagnostics  attention diagnostics (train/evals/diagnostics.py)

A record is a dict with "suite", "step", "seed", "elapsed_s", "results" (the suite's full grid)
and "summary" (flat metric name -> float, for sweep reports). `run_suites` loads the checkpoint
once, runs the suites in order and writes each record to RUN_DIR/eval/suite-<name>-step<N>.json
(atomically) as soon as it is done. A suite that does not apply to the run raises ConfigError
with one line saying why; a module may expose `check(cfg)` so that this is known before the
checkpoint is loaded.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

from train.config import Config, ConfigError

__all__ = ["SUITES", "parse_suites", "suite_module", "check_suites", "record_path", "run_suites", "format_summary"]

SUITES = {
    "mqar": "train.evals.mqar",
    "niah": "train.evals.niah",
    "length": "train.evals.length",
    "diagnostics": "train.evals.diagnostics",
}


def parse_suites(spec: str | list[str]) -> list[str]:
    """"niah,length" (or a list of names) -> ["niah", "length"], without repeats; ConfigError
    naming the accepted suites for an unknown or empty name."""
    items = spec.split(",") if isinstance(spec, str) else [n for s in spec for n in s.split(",")]
    names = [n.strip() for n in items]
    accepted = ", ".join(SUITES)
    for n in names:
        if n not in SUITES:
            what = "an empty suite name" if not n else f"unknown suite {n!r}"
            raise ConfigError(f"--suite: {what}; accepted: {accepted}")
    return list(dict.fromkeys(names))


def suite_module(name: str):
    """The suite's module, imported now (suites pull in jax and their own helpers)."""
    if name not in SUITES:
        raise ConfigError(f"unknown suite {name!r}; accepted: {', '.join(SUITES)}")
    try:
        return importlib.import_module(SUITES[name])
    except ModuleNotFoundError as e:
        if e.name != SUITES[name]:
            raise
        raise ConfigError(f"suite {name!r} is not available in this installation ({SUITES[name]} is missing)") from None


def check_suites(cfg: Config, names: list[str]) -> None:
    """Raise ConfigError for the first suite that does not apply to a run with config `cfg`
    (for suites whose module has a `check`; the others find out in `run`)."""
    for name in names:
        check = getattr(suite_module(name), "check", None)
        if check is not None:
            check(cfg)


def record_path(run_dir: str | Path, name: str, step: int, out_dir: str | Path | None = None) -> Path:
    """RUN_DIR/eval/suite-<name>-step<N>.json (or the same name in out_dir)."""
    folder = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"
    return folder / f"suite-{name}-step{step}.json"


def _write_json(path: Path, record: dict) -> None:
    from train.logger import write_atomic  # a reader never sees half a record
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a NaN that slipped into a record fails here instead of writing invalid JSON.
    write_atomic(path, json.dumps(record, indent=2, allow_nan=False) + "\n")


def run_suites(run_dir: str | Path, names, *, step: int | None = None, seed: int = 0,
               out_dir: str | Path | None = None,
               on_record: Callable[[str, dict, Path], None] | None = None) -> dict[str, dict]:
    """Run suites `names` (a list or "a,b") on checkpoint `step` (default: the newest) of
    run_dir; returns {name: record} and writes each record (see `record_path`). Every suite is
    checked for applicability before the checkpoint is loaded. `on_record(name, record, path)`
    is called as each suite finishes (the CLI prints there)."""
    from train.artifacts import load_config, load_run  # jax: only once the names are known good

    names = parse_suites(names)
    check_suites(load_config(run_dir), names)
    loaded = load_run(run_dir, step=step)
    records = {}
    for name in names:
        record = suite_module(name).run(loaded, seed=seed)
        path = record_path(loaded.run_dir, name, loaded.step, out_dir)
        _write_json(path, record)
        records[name] = record
        if on_record is not None:
            on_record(name, record, path)
    return records


def format_summary(record: dict, per_line: int = 4) -> str:
    """A few lines for people: "<suite> (step N, 12.3 s)" then the summary's metrics."""
    items = list(record["summary"].items())
    prefix = record["suite"] + "/"
    cells = [f"{k[len(prefix):] if k.startswith(prefix) else k} {_fmt(v)}" for k, v in items]
    lines = [f"{record['suite']} (step {record['step']}, seed {record['seed']}, {record['elapsed_s']:.1f} s)"]
    lines += ["  " + ", ".join(cells[i:i + per_line]) for i in range(0, len(cells), per_line)]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if float(v).is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    return f"{v:.4g}"

"""Run a sweep: many ordinary runs from one spec, their evaluations, and a report.

    python -m train.sweep SPEC [--out DIR] [--shard I/N] [--list] [--no-report]

SPEC is a .toml or .py file (train/sweep_spec.py documents the format: a base config, axes to
vary, the ratio shorthand, seeds, evaluation suites). DIR (default sweeps/<spec name>) holds

    sweep.json          the plan: every point's labels, overrides and run
    configs/<run>.json  the resolved config each run was started with
    runs/<run>/         ordinary run directories: resume, eval, export and generate work on them
    records/<run>.json  per run: status (done / failed / interrupted), the error, exit code,
                        times, parameters by mixer, FLOPs/token, decode-state bytes, final eval
                        and every suite's summary
    logs/<run>.log      the point's output (appended at every attempt)
    report/             results.csv, results.md and the PNG figures (train/report.py)

Each run trains in its own process (`python -m train.sweep_point`). Running the same command
again skips finished runs (same config, every suite done), resumes interrupted ones from their
checkpoints and retries failed ones; a failing run is recorded with its error and the sweep
goes on. Ctrl-C (or SIGTERM) is passed on to the run in progress, which saves a checkpoint; the
sweep then stops with exit code 75 and the same command continues it.

--shard I/N (0 <= I < N) runs every N-th run starting at the I-th, so N processes (a SLURM job
array, N hosts on a shared filesystem) split a sweep without overlap; each writes the report of
what is finished so far, and `python -m train.report DIR` redoes it once all are done.

Exit codes: 0 every run of this shard done, 2 a bad spec, 3 some runs failed (see records/),
75 interrupted (run the same command again).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from train.config import ConfigError, to_dict
from train.logger import read_json
from train.sweep_spec import Point, SweepSpec, config_hash, expand, load_spec

__all__ = ["main", "parse_shard", "shard_runs", "plan"]

EXIT_DONE, EXIT_BAD_SPEC, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 75


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ConfigError(f"--shard {text!r}: expected I/N with 0 <= I < N (e.g. 0/4 for the first of four; "
                          "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT in a job array)")
    return int(m[1]), int(m[2])


def shard_runs(points: list[Point], shard: tuple[int, int]) -> list[str]:
    """The distinct runs of the sweep in plan order, every N-th from the I-th."""
    runs = list(dict.fromkeys(p.run for p in points))
    i, n = shard
    return runs[i::n]


def plan(spec_path: str | Path) -> tuple[SweepSpec, list[Point]]:
    from train.cli import load_config
    from train.evals import parse_suites
    spec = load_spec(spec_path)
    try:
        parse_suites(list(spec.evals))
    except ConfigError as e:
        raise ConfigError(f"{spec.source}: evals: {e}") from None
    return spec, expand(spec, load_config)


def _write_json(path: Path, obj) -> None:
    from train.logger import write_atomic
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def _manifest(spec: SweepSpec, points: list[Point]) -> dict:
    return {"name": spec.name, "spec": spec.source, "base": spec.base, "overrides": list(spec.overrides),
            "evals": list(spec.evals),
            "axes": [{"name": a.name, "labels": list(a.labels)} for a in spec.axes],
            "points": [{"name": p.name, "labels": p.labels, "extra": p.extra, "run": p.run,
                        "overrides": p.overrides} for p in points]}


def _is_finished(record: dict | None, chash: str, evals: tuple[str, ...]) -> bool:
    return bool(record) and record.get("status") == "done" and record.get("config_hash") == chash \
        and set(evals) <= set(record.get("evals", []))


def _last_line(log: Path, offset: int) -> str:
    """The last non-empty line the attempt wrote to its log (its error message)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class _Signals:
    """While a point runs: SIGINT / SIGTERM to the sweep are passed on to the point's process
    (which saves a checkpoint and exits 75) and stop the sweep after it."""

    def __init__(self):
        self.received: int | None = None
        self.child: subprocess.Popen | None = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        self.received = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def _run_point(out: Path, run: str, cfg_json: Path, evals: tuple[str, ...], seed: int, sig: _Signals) -> dict:
    """Train + evaluate one run in a child process; its record (written by the child on success,
    here otherwise)."""
    record_path, log = out / "records" / f"{run}.json", out / "logs" / f"{run}.log"
    nonce = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "train.sweep_point", str(cfg_json), str(out / "runs" / run),
           "--record", str(record_path), "--evals", ",".join(evals), "--seed", str(seed), "--nonce", nonce]
    offset = log.stat().st_size if log.exists() else 0
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        f.flush()
        # Its own session: a terminal's Ctrl-C reaches the sweep only, which passes on exactly one.
        sig.child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        rc = sig.child.wait()
        sig.child = None
    wall = time.perf_counter() - t0
    record = read_json(record_path) if rc == 0 else None
    if record is None or record.get("nonce") != nonce:
        status = "interrupted" if rc == 75 else "failed"
        record = {"run": run, "status": status, "stage": "train" if rc else "record",
                  "error": _last_line(log, offset) or f"exit code {rc}", "exit_code": rc}
    record.update(exit_code=rc, wall_s=wall,
                  overhead_s=wall - sum(record.get(k, 0.0) for k in ("train_s", "stats_s", "eval_s"))
                  if record.get("status") == "done" else None)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="sweep spec (.toml or .py)")
    p.add_argument("--out", default=None, help="sweep directory (default: sweeps/<spec name>)")
    p.add_argument("--shard", default=None, help="I/N: run every N-th run from the I-th (0-based)")
    p.add_argument("--list", action="store_true", help="print the plan and the state of each run; run nothing")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        shard = parse_shard(args.shard)
        spec, points = plan(args.spec)
    except ConfigError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return EXIT_BAD_SPEC
    out = Path(args.out or Path("sweeps") / spec.name)
    mine = shard_runs(points, shard)
    by_run = {}
    for pt in points:
        by_run.setdefault(pt.run, []).append(pt)
    hashes = {run: config_hash(pts[0].cfg) for run, pts in by_run.items()}

    if args.list:
        for run in mine:
            rec = read_json(out / "records" / f"{run}.json")
            state = "done" if _is_finished(rec, hashes[run], spec.evals) else (rec or {}).get("status", "to do")
            print(f"{state:12s} {run}  ({len(by_run[run])} point(s)): {' '.join(by_run[run][0].overrides)}")
        print(f"{len(mine)} of {len(by_run)} runs ({len(points)} points) in this shard; directory {out}")
        return EXIT_DONE

    for sub in ("configs", "records", "logs", "runs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _write_json(out / "sweep.json", _manifest(spec, points))
    failed, interrupted = [], False
    print(f"sweep {spec.name}: {len(points)} points, {len(by_run)} runs, {len(mine)} in shard "
          f"{shard[0]}/{shard[1]}; directory {out}", flush=True)
    with _Signals() as sig:
        for k, run in enumerate(mine, 1):
            record_path = out / "records" / f"{run}.json"
            if _is_finished(read_json(record_path), hashes[run], spec.evals):
                print(f"[{k}/{len(mine)}] {run}: done before, skipped", flush=True)
                continue
            cfg = by_run[run][0].cfg
            cfg_json = out / "configs" / f"{run}.json"
            _write_json(cfg_json, to_dict(cfg))
            print(f"[{k}/{len(mine)}] {run}: training {cfg.train.steps} steps, then {', '.join(spec.evals) or 'no evals'}",
                  flush=True)
            record = _run_point(out, run, cfg_json, spec.evals, cfg.train.seed, sig)
            record["config_hash"] = hashes[run]
            record["points"] = [pt.name for pt in by_run[run]]
            _write_json(record_path, record)
            if record["status"] == "done":
                final = record.get("final", {})
                shown = {"loss": final.get("loss"), **{k2: v for s in record.get("suites", {}).values()
                                                      for k2, v in list(s.items())[:2]}}
                print(f"    done in {record['wall_s']:.0f} s: " + ", ".join(
                    f"{k2} {v:.4g}" for k2, v in shown.items() if isinstance(v, (int, float))), flush=True)
            else:
                print(f"    {record['status']} (exit {record['exit_code']}): {record['error']}", flush=True)
                if record["status"] == "interrupted" or sig.received is not None:
                    interrupted = True
                else:
                    failed.append(run)
            if sig.received is not None:
                interrupted = True
            if interrupted:
                break
    if not args.no_report and not interrupted:
        from train.report import write_report
        try:
            written = write_report(out)
            print(f"report: {', '.join(str(w) for w in written)}")
        except Exception as e:  # the runs are safe on disk; a report can be redone
            print(f"report failed ({type(e).__name__}: {e}); run `python -m train.report {out}`", file=sys.stderr)
    if interrupted:
        print(f"interrupted: run the same command to continue ({out})", file=sys.stderr)
        return EXIT_INTERRUPTED
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (errors in {out}/records/, logs in {out}/logs/)",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())

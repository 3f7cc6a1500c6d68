"""Run logging: JSONL (metrics.jsonl), TensorBoard (tb/), and a console progress bar with ETA.

The progress bar (rich) is drawn only on a terminal; elsewhere (CI, redirected output) every
`log_every` step prints one plain line, so logs stay readable in files.

A resumed run replays the steps after its checkpoint: opening the logger at `start_step` drops
the records of later steps from metrics.jsonl (and a line cut short by a kill), and tells
TensorBoard to discard its events from step start_step + 1 on (tensorboardX's `purge_step`),
so both hold each step once.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tensorboardX import SummaryWriter

log = logging.getLogger("chimera.train")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader (or a kill) sees the old file or the new, never half."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers (sweep shards) never share one
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path):
    """The JSON in `path`, or None when it is missing or unreadable (a record not written yet,
    or cut short by a kill: the callers treat both as "not there")."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step (those the checkpoint covers); drop later ones
    and any line that does not parse (a write cut short by a kill). Rewritten atomically."""
    if not path.exists():
        return
    text = path.read_text(errors="replace")
    if not text:
        return
    keep, dropped = [], 0
    for line in text.splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
                continue
        except (ValueError, KeyError, TypeError):
            pass
        dropped += 1
    if dropped or not text.endswith("\n"):  # (a last line without its newline would be joined)
        write_atomic(path, "".join(line + "\n" for line in keep))
    if dropped:
        log.info("metrics.jsonl: dropped %d record(s) after step %d (replayed from the checkpoint)", dropped, last_step)


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, *, tensorboard: bool = True,
                 main: bool = True):
        """main=False (the other processes of a multi-host run) writes and prints nothing."""
        self.main = main
        if main:
            truncate_metrics(run_dir / "metrics.jsonl", start_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1) if main else None
        self.text = open(run_dir / "train.log", "a", buffering=1) if main else None  # progress lines
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1) if tensorboard and main else None
        self.total = total_steps
        self.console = Console(stderr=True)
        self.interactive = self.console.is_terminal and main
        self.progress = None
        self._t0, self._s0 = time.perf_counter(), start_step
        if self.interactive:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                     TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def write(self, kind: str, step: int, metrics: dict) -> None:
        """Append one record to metrics.jsonl and TensorBoard under `kind/` (train, eval, ...)."""
        if not self.main:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def restart_clock(self, step: int) -> None:
        """Measure the ETA from here (after the compiling first step)."""
        self._t0, self._s0 = time.perf_counter(), step

    def eta_seconds(self, step: int) -> float:
        done = step - self._s0
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self._t0) / done * (self.total - step)

    def console_line(self, kind: str, step: int, metrics: dict, keys: tuple[str, ...]) -> None:
        if not self.main:
            return
        text = " ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics)
        self.text.write(f"{time.strftime('%H:%M:%S')} [{kind} {step}/{self.total}] {text}\n")
        if kind == "train" and self.progress is not None:  # the bar has room for the essentials
            short = " ".join(f"{k}={_fmt(metrics[k])}" for k in ("loss", "tokens_per_s") if k in metrics)
            self.progress.update(self.task, completed=step, status=short)
            return
        eta = self.eta_seconds(step) if kind == "train" else float("nan")
        eta_s = f" eta={eta:.0f}s" if eta == eta else ""
        line = f"[{kind} {step}/{self.total}] {text}{eta_s}"
        if self.progress is not None:  # plain text: "[eval 5/10]" is not rich markup
            self.progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        if self.main:
            self.jsonl.close()
            self.text.close()

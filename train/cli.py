"""Command line: python -m train [--config NAME_OR_PATH] [--run-dir DIR] [--from-scratch] [key.path=value ...]

--config is a preset name from configs/ (tiny, gpt125m, ...), a path to a Python file defining
`config() -> Config`, or a config.json written into a run directory (which then is the default
--run-dir: that run continues).

Exit codes (for schedulers and `train && export` wrappers):
  0   finished (train.steps reached), or already finished before this start
  1   an unexpected error (a Python traceback)
  2   refused: bad config, data or checkpoint, or the run directory is in use
  3   stopped: the loss, gradients or parameters became non-finite (last good checkpoint kept)
  4   stopped: a checkpoint could not be written (disk full, ...); resumable once fixed
  75  stopped by SIGTERM / SIGINT before the last step, after saving a checkpoint (or
      interrupted before training began, or by a second Ctrl-C, saving nothing new): run the
      same command again to resume (EX_TEMPFAIL, "try again", as requeue scripts expect)
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

import configs
from train.config import Config, ConfigError, apply_overrides, read_config_json

EXIT_DONE, EXIT_REFUSED, EXIT_NON_FINITE, EXIT_SAVE_FAILED, EXIT_STOPPED = 0, 2, 3, 4, 75  # 1: a traceback


def preset_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if not m.name.startswith("_"))


def load_config(spec: str) -> Config:
    path = Path(spec)
    if spec.endswith(".json"):
        if not path.exists():
            raise ConfigError(f"--config {spec}: no such file")
        return read_config_json(path)
    if spec.endswith(".py"):
        if not path.exists():
            raise ConfigError(f"--config {spec}: no such file")
        module_spec = importlib.util.spec_from_file_location(f"chimera_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if spec not in preset_names():
            import difflib
            close = difflib.get_close_matches(spec, preset_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--config {spec!r} is not a preset{hint}; presets: {preset_names()}, "
                              "or give a path to a .py or config.json file")
        module = importlib.import_module(f"configs.{spec}")
    if not hasattr(module, "config"):
        raise ConfigError(f"--config {spec}: the file must define config() -> Config")
    cfg = module.config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"--config {spec}: config() returned {type(cfg).__name__}, not Config")
    return cfg


def default_run_dir(spec: str, cfg: Config) -> Path:
    """runs/<config name>, except for the config.json of a run directory (one that holds
    checkpoints/ or train.log beside it): that directory, so the run continues."""
    path = Path(spec)
    if path.name == "config.json" and ((path.parent / "checkpoints").is_dir() or (path.parent / "train.log").is_file()):
        return path.parent
    return Path("runs") / cfg.name


def parse_args(argv: list[str]) -> tuple[Config, Path, bool]:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset name, .py file or config.json (default: tiny)")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>, or the directory "
                   "of --config .../config.json); an existing one with checkpoints is resumed")
    p.add_argument("--from-scratch", action="store_true",
                   help="when no checkpoint of the run directory can be read, move them to corrupt_checkpoints/ "
                        "and train from step 0 (without this flag the run stops)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="e.g. train.steps=100 model.pattern=swa,swa,swa,attn model.mixers.swa.window=64")
    args = p.parse_args(argv)
    cfg = apply_overrides(load_config(args.config), args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config, cfg)
    return cfg, run_dir, args.from_scratch


def _silence_shutdown_noise() -> None:
    """After a failed save, orbax's abandoned read/write coroutines are collected at interpreter
    exit and print "Exception ignored in <coroutine ...>" and tracemalloc hints below our one-line
    error. The failure is already reported (and the run directory checked), so that noise is
    dropped rather than left as the last thing the user reads."""
    import warnings
    sys.unraisablehook = lambda unraisable: None
    warnings.simplefilter("ignore")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, run_dir, from_scratch = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:  # before importing jax: argument errors come back at once
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    from train.hardware import tune_host_allocator
    tune_host_allocator()  # before jax starts its threads (train/hardware.py says why)
    from train.errors import CheckpointError, CheckpointSaveError
    from train.loop import NonFiniteError, run
    try:
        summary = run(cfg, run_dir, from_scratch=from_scratch)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except CheckpointSaveError as e:
        print(f"training stopped: {e}. Free space (or fix the cause) and run the same command to resume",
              file=sys.stderr)
        _silence_shutdown_noise()
        return EXIT_SAVE_FAILED
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except NonFiniteError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except KeyboardInterrupt:  # before the loop installs its handler, or a second Ctrl-C
        print(f"interrupted: no new checkpoint was written; run the same command to resume from the last one "
              f"in {run_dir}", file=sys.stderr)
        return EXIT_STOPPED
    if summary.get("already_finished"):
        print(f"{run_dir} is already finished at step {summary['step']} (train.steps={cfg.train.steps}): nothing "
              "to train; raise train.steps to continue it, or use another --run-dir")
    elif "eval" in summary:
        ev = summary["eval"]
        base = summary.get("unigram_bits_per_byte")
        bpb = ""
        if "bits_per_byte" in ev:
            bpb = f", bits/byte {ev['bits_per_byte']:.4f}" + (f" (unigram baseline {base:.3f})" if base else "")
        print(f"done: step {summary['step']}, validation loss {ev['loss']:.4f}{bpb}, "
              f"accuracy {ev['accuracy']:.4f}; run dir {run_dir}")
    else:
        print(f"stopped at step {summary['step']} (signal {summary['stopped_by_signal']}); run the same command "
              f"to resume (exit code {EXIT_STOPPED})", file=sys.stderr)
        return EXIT_STOPPED
    return EXIT_DONE

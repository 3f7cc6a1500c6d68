"""Command line: python -m train [--config NAME_OR_PATH] [--run-dir DIR] [key.path=value ...]

--config is a preset name from configs/ (tiny, gpt125m, ...), a path to a Python file defining
`config() -> Config`, or a config.json written into a run directory.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pkgutil
import sys
from pathlib import Path

import configs
from train.config import Config, ConfigError, apply_overrides, from_dict


def preset_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if not m.name.startswith("_"))


def load_config(spec: str) -> Config:
    path = Path(spec)
    if spec.endswith(".json"):
        if not path.exists():
            raise ConfigError(f"--config {spec}: no such file")
        return from_dict(Config, json.loads(path.read_text()))
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


def parse_args(argv: list[str]) -> tuple[Config, Path]:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset name, .py file or config.json (default: tiny)")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>); "
                   "an existing one with checkpoints is resumed")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="e.g. train.steps=100 model.pattern=swa,swa,swa,attn model.mixers.swa.window=64")
    args = p.parse_args(argv)
    cfg = apply_overrides(load_config(args.config), args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    return cfg, run_dir


def main(argv: list[str] | None = None) -> int:
    from train.loop import NonFiniteError, run  # after argument errors, which need no jax
    try:
        cfg, run_dir = parse_args(sys.argv[1:] if argv is None else argv)
        summary = run(cfg, run_dir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    if "eval" in summary:
        ev = summary["eval"]
        base = summary.get("unigram_bits_per_byte")
        bpb = ""
        if "bits_per_byte" in ev:
            bpb = f", bits/byte {ev['bits_per_byte']:.4f}" + (f" (unigram baseline {base:.3f})" if base else "")
        print(f"done: step {summary['step']}, validation loss {ev['loss']:.4f}{bpb}, "
              f"accuracy {ev['accuracy']:.4f}; run dir {run_dir}")
    else:
        print(f"stopped at step {summary['step']}; run again with the same --run-dir to resume")
    return 0

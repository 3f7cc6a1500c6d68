"""Reading a finished (or running) run directory back: its config, tokenizer and checkpoints.

    run = load_run("runs/tiny")              # newest readable checkpoint
    run = load_run("runs/tiny", step=200)    # a given step
    logits, _ = run.model(tokens, positions=..., segment_ids=...)

Used by the export, generate and eval commands. Only the params are returned; the optimizer
state is restored alongside them (orbax restores the saved tree whole) and dropped. Reading is
safe beside a job still training in the directory: checkpoints are opened read-only (nothing is
created, moved or cleaned), every restore is verified against the checkpoint's fingerprint, and
a step the running job deletes while it is read is skipped.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx

import models
from train.checkpoint import Checkpointer, abstract_like
from train.config import Config, ConfigError, RuntimeConfig, read_config_json
from train.data import Tokenizer, build_tokenizer
from train.data.tokenizer import SAVED_FILES
from train.optim import make_optimizer
from train.step import init_state


@dataclasses.dataclass
class LoadedRun:
    run_dir: Path
    cfg: Config          # the resolved config the run was trained with (model.vocab_size set)
    model: models.LM     # params from the checkpoint at `step`
    step: int
    tokenizer: Tokenizer


def load_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: it has no config.json "
                          "(written by `python -m train` when a run starts)")
    return read_config_json(path)


def load_tokenizer(run_dir: str | Path) -> Tokenizer:
    """The copy of its tokenizer that a run saved into its directory."""
    if not any((Path(run_dir) / n).is_file() for n in SAVED_FILES):
        raise ConfigError(f"{run_dir} has no tokenizer file (one of {', '.join(SAVED_FILES)}), which the run wrote when it "
                          "started; copy the run's data.tokenizer file back into it")
    return build_tokenizer(str(run_dir))


def load_run(run_dir: str | Path, step: int | None = None, runtime: RuntimeConfig | None = None) -> LoadedRun:
    """Rebuild the model of `run_dir` and load the params of checkpoint `step` (default: the
    newest readable one). `runtime` replaces the run's runtime section (e.g. another
    attention implementation or compute dtype for inference)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    if runtime is not None:
        cfg = dataclasses.replace(cfg, runtime=runtime)
    if cfg.model.vocab_size is None:
        raise ConfigError(f"{run_dir}/config.json has model.vocab_size=None; it was not written by a run")
    ckpt_dir = run_dir / "checkpoints"
    tokenizer = load_tokenizer(run_dir)
    if not ckpt_dir.is_dir():
        raise ConfigError(f"{run_dir} has no checkpoints yet (looked in {ckpt_dir})")
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    try:
        steps = ckpt.steps()
        if not steps:
            raise ConfigError(f"{run_dir} has no checkpoints yet (looked in {ckpt_dir})")
        # Abstract state only: nothing is allocated until orbax restores into it.
        tx, _ = make_optimizer(cfg.optimizer, cfg.train.steps)
        graphdef, abstract = nnx.eval_shape(lambda: _split(cfg, tx))
        abstract = abstract_like(abstract)
        if step is None:
            got, _ = ckpt.restore_latest(abstract)
            if got is None:  # the running job deleted them all meanwhile
                raise ConfigError(f"{run_dir} has no checkpoints left (looked in {ckpt_dir})")
            step, state, _ = got
        else:
            if step not in steps:
                raise ConfigError(f"--step {step}: {run_dir} has checkpoints at steps {steps}")
            step, state, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    model = nnx.merge(graphdef, state["params"])
    return LoadedRun(run_dir=run_dir, cfg=cfg, model=model, step=int(step), tokenizer=tokenizer)


def _split(cfg: Config, tx):
    graphdef, state = init_state(models.build(cfg.model, cfg.runtime, seed=cfg.train.seed), tx, cfg.train.seed)
    return graphdef, state

"""The pretraining loop: build everything from a Config, resume, train, evaluate, checkpoint.

    summary = run(cfg, run_dir)

The run directory holds config.json (the resolved config), train.log, metrics.jsonl, tb/
(TensorBoard), checkpoints/<step>/, the tokenizer and summary.json. Starting again on the same
directory resumes from the newest readable checkpoint, restoring params, optimizer state, step,
RNG and the data iterator, so the loss trajectory continues exactly as if never interrupted (on
CPU). One process trains in a directory at a time (train/run_lock.py), nothing is written there
before the run is known to be valid, and no error deletes or replaces a readable checkpoint
(train/checkpoint.py says what happens to unreadable ones).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import logging.handlers
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from layers.sharding import use_mesh
from train.checkpoint import Checkpointer, NoReadableCheckpoint, abstract_like
from train.config import Config, ConfigError, read_config_json, to_dict
from train.data import (get_tokenizer, make_eval_batches, make_train_iterator, task_vocab_size,
                        unigram_bits_per_byte)
from train.logger import RunLogger, write_atomic
from train.mesh import (check_batch, create_state, describe as describe_mesh, host_rows, init_distributed, make_mesh,
                        place_batch)
from train import hardware
from train.metrics import Throughput, peak_flops
from train.optim import effective_warmup, learning_rate_schedule, make_optimizer
from train.run_lock import RunLock
from train.step import make_eval_step, make_train_step, init_state

log = logging.getLogger("chimera.train")
_LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


class NonFiniteError(RuntimeError):
    """The loss, the gradient norm or the updated parameters stopped being finite; the run was
    stopped without applying that update."""


def resolve(cfg: Config) -> Config:
    """Fill what the config leaves to the data (model.vocab_size) and check they agree."""
    vocab = task_vocab_size(cfg.data)
    if cfg.model.vocab_size is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    if cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's "
                          f"vocabulary ({vocab}, from data.tokenizer / data.source); raise it or leave it None")
    return cfg


def _check_resume_config(run_dir: Path, cfg: Config) -> Config | None:
    """The config the run directory was trained with (None for a new run), after checking that
    `cfg` may resume it: other train/runtime settings are fine, another model, data or optimizer
    is not (that would silently train something else from the checkpoint)."""
    path = run_dir / "config.json"
    if not path.exists():
        return None
    old = read_config_json(path)
    for section in ("model", "data", "optimizer"):
        a, b = to_dict(getattr(old, section)), to_dict(getattr(cfg, section))
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise ConfigError(f"{run_dir} holds a run with a different {section} config "
                              f"(fields {', '.join(f'{section}.{k}' for k in diff)}); "
                              "use another --run-dir or the same settings")
    return old


def _setup_logging(main: bool = True) -> logging.handlers.MemoryHandler | None:
    """INFO to stderr, and (main process) to a buffer that `_log_to_file` hands to
    RUN_DIR/train.log once the run is known to be valid: nothing is written before. Other
    processes of a multi-host run log warnings only, to stderr, so the run directory has one log."""
    root = logging.getLogger("chimera")
    root.setLevel(logging.INFO if main else logging.WARNING)
    for h in list(root.handlers):
        if getattr(h, "_chimera", False):
            root.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    handlers[0].setFormatter(_LOG_FORMAT)
    buffer = None
    if main:  # flushLevel above CRITICAL: nothing leaves the buffer before it has a target
        buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        handlers.append(buffer)
    for h in handlers:
        h._chimera = True
        root.addHandler(h)
    root.propagate = False
    return buffer


def _log_to_file(run_dir: Path, buffer: logging.handlers.MemoryHandler | None) -> None:
    if buffer is None:
        return
    fh = logging.FileHandler(run_dir / "train.log")
    fh.setFormatter(_LOG_FORMAT)
    fh._chimera = True
    buffer.setTarget(fh)
    buffer.flush()
    root = logging.getLogger("chimera")
    root.removeHandler(buffer)
    root.addHandler(fh)


def _drop_log_buffer(buffer: logging.handlers.MemoryHandler | None) -> None:
    """A refused run never hands its buffered start-up log to a file: let it go."""
    root = logging.getLogger("chimera")
    if buffer is not None and buffer in root.handlers:
        root.removeHandler(buffer)
        buffer.close()


def evaluate(eval_step, params, batches, token_bytes, *, text: bool = True) -> dict[str, float]:
    """Loss, perplexity, next-token accuracy (for MQAR: recall accuracy on the answers) and,
    for text, bits per byte."""
    sums = {"ce_sum": 0.0, "tokens": 0.0, "correct": 0.0, "bytes": 0.0}
    for batch in batches:
        out = jax.device_get(eval_step(params, batch, token_bytes))
        for k in sums:
            sums[k] += float(out[k])
    tokens = max(sums["tokens"], 1.0)
    loss = sums["ce_sum"] / tokens
    ev = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": sums["correct"] / tokens,
          "tokens": sums["tokens"]}
    if text:
        ev["bits_per_byte"] = sums["ce_sum"] / math.log(2) / max(sums["bytes"], 1.0)
    return ev


def _warm_start(hf_dir: str, graphdef, params):
    """Params of the Hugging Face checkpoint in `hf_dir`, laid out like `params` (train.init_from)."""
    from train.hf import import_params  # transformers-free, but only needed for warm starts
    log.info("warm start: loading weights from %s (train.init_from)", hf_dir)
    model = import_params(hf_dir, nnx.merge(graphdef, jax.device_get(params)))
    return jax.device_put(nnx.state(model, nnx.Param), jax.tree.map(lambda a: a.sharding, params))


class _StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits at the next step."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _agreed_signal(stop: _StopSignal, step: int, every: int) -> int | None:
    """The signal to stop on, once every process knows of it. A signal may reach only some
    processes of a multi-host run, and saving is collective: one process saving alone would wait
    for the others forever. So processes compare their flags every `every` steps (train.log_every)
    and all stop if any received one; a single process acts at the next step."""
    if jax.process_count() == 1:
        return stop.received
    if step % every:
        return None
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([stop.received or 0], np.int32))
    return int(np.max(flags)) or None


def _restore(ckpt: Checkpointer, abstract_state, train_iter, *, from_scratch: bool):
    """(step, state, steps to set aside): the newest usable checkpoint (step and state None when
    there is none), its data position set on `train_iter`, and the corrupt steps newer than it
    (they will be written again). When none is readable the run stops, unless `from_scratch`
    (then all are to be set aside). Moves nothing itself: the caller does, once the run is accepted."""
    try:
        restored, corrupt = ckpt.restore_latest(abstract_state, train_iter.set_state)
    except NoReadableCheckpoint as e:
        if not from_scratch:
            raise NoReadableCheckpoint(f"{e}. To train from step 0 anyway, run again with --from-scratch (the "
                                       "unreadable checkpoints are moved to corrupt_checkpoints/), or use another "
                                       "--run-dir") from None
        return None, None, ckpt.steps()
    if restored is None:
        return None, None, []
    return restored[0], restored[1], [s for s, _ in corrupt]


def _set_aside(ckpt: Checkpointer, steps: list[int], main: bool) -> None:
    """The main process moves the steps; the others wait for it and re-list the directory."""
    if main:
        ckpt.set_aside(steps)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("chimera_set_aside_checkpoints")
        if not main:
            ckpt.manager.reload()


def _schedule_change_warning(old: Config | None, cfg: Config, step: int) -> None:
    """Warn when a resume with another train.steps moves the learning rate under the run (the
    schedule's horizon is train.steps)."""
    if old is None or old.train.steps == cfg.train.steps:
        return
    before = float(learning_rate_schedule(old.optimizer, old.train.steps)(step))
    after = float(learning_rate_schedule(cfg.optimizer, cfg.train.steps)(step))
    if not math.isclose(before, after, rel_tol=1e-6, abs_tol=1e-12):
        log.warning("train.steps changed from %d to %d: the %s schedule spans train.steps, so the learning rate "
                    "at step %d moves from %.3g to %.3g and follows the new horizon from here",
                    old.train.steps, cfg.train.steps, cfg.optimizer.schedule, step, before, after)


def run(cfg: Config, run_dir: str | Path, *, from_scratch: bool = False) -> dict:
    """Train `cfg` in `run_dir` (resuming it when it holds checkpoints); returns the summary.

    Everything that can be checked is checked before the run directory is touched: the config
    against the one the directory holds, the mesh, the data (sources, splits, first batches),
    the model, and the checkpoint to resume from (after taking the directory's lock). Only then
    are config.json, the tokenizer and the logs written.
    from_scratch: when no checkpoint of the directory can be read, set them aside and start
    from step 0 (without it, the run stops with NoReadableCheckpoint).
    """
    init_distributed(cfg.runtime)
    main = jax.process_index() == 0  # the process that writes logs, config and summary
    run_dir = Path(run_dir)
    log_buffer = _setup_logging(main)
    cfg = resolve(cfg)
    old_cfg = _check_resume_config(run_dir, cfg)
    tc = cfg.train
    mesh = make_mesh(cfg.runtime)
    check_batch(cfg.data.batch_size, tc.grad_accum, mesh)
    log.info("run %s in %s on %s, jax %s, %d process(es), mesh %s", cfg.name, run_dir.absolute(),
             jax.devices()[0].device_kind, jax.__version__, jax.process_count(), describe_mesh(mesh))
    warmup = effective_warmup(cfg.optimizer, tc.steps)
    if warmup != cfg.optimizer.warmup_steps:
        log.warning("optimizer.warmup_steps=%d is longer than train.steps=%d: warming up over %d steps "
                    "(train.steps // 10) instead", cfg.optimizer.warmup_steps, tc.steps, warmup)

    # The data first: a bad path or an empty split fails here, before seconds of model building.
    tokenizer = get_tokenizer(cfg.data)
    rows = host_rows(mesh, cfg.data.batch_size)  # each process reads only its own rows of a batch
    train_iter = make_train_iterator(cfg.data, seed=tc.seed, host_rows=rows)
    host_eval_batches = make_eval_batches(cfg.data, tc.eval_batches, host_rows=rows)
    unigram = unigram_bits_per_byte(cfg.data)

    tx, schedule = make_optimizer(cfg.optimizer, tc.steps)

    def build_state():
        return create_state(
            lambda: init_state(models.build(cfg.model, cfg.runtime, seed=tc.seed), tx, tc.seed), tx, mesh)

    graphdef, state, notes = build_state()
    for note in notes:
        log.info("sharding: %s", note)
    model = nnx.merge(graphdef, state["params"])  # for describing the layers; shares the arrays
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    log.info("model: %s params, d_model=%d, %d layers, pattern %s, compute dtype %s",
             f"{n_params:,}", cfg.model.d_model, cfg.model.num_layers, "/".join(cfg.model.pattern),
             jnp.dtype(model.dtype).name)
    for i, block in enumerate(model.layers()):
        log.info("  layer %2d %-8s %s", i, block.name, block.mixer.describe())
    flops = models.flops_per_token(cfg.model, cfg.data.seq_len)
    flops_total = sum(flops.values())
    log.info("training FLOPs/token: %.3g (%s)", flops_total,
             ", ".join(f"{k} {v / flops_total:.0%}" for k, v in flops.items()))
    del model
    abstract_state = abstract_like(state)

    try:
        with RunLock(run_dir) if main else contextlib.nullcontext():
            ckpt = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpoints)
            try:
                if ckpt.steps():
                    state = None  # the restore allocates the checkpoint's copy: do not hold two
                step, restored, aside = _restore(ckpt, abstract_state, train_iter, from_scratch=from_scratch)
                if step is not None and step >= tc.steps:
                    if step > tc.steps:
                        raise ConfigError(f"{run_dir} is already trained to step {step}, past train.steps="
                                          f"{tc.steps}: for a shorter run use another --run-dir; to continue, "
                                          "raise train.steps")
                    log.info("%s is finished (step %d of train.steps=%d): nothing to train", run_dir, step, tc.steps)
                    return {"step": step, "already_finished": True}

                # The run is accepted: from here on the run directory is written.
                _set_aside(ckpt, aside, main)
                if step is not None:
                    state = restored
                    log.info("resumed from checkpoint step %d", step)
                    _schedule_change_warning(old_cfg, cfg, step)
                else:
                    if state is None:  # every checkpoint was unreadable and --from-scratch was given
                        graphdef, state, _ = build_state()
                        train_iter = make_train_iterator(cfg.data, seed=tc.seed, host_rows=rows)
                    if tc.init_from:
                        state["params"] = _warm_start(tc.init_from, graphdef, state["params"])
                if main:
                    _log_to_file(run_dir, log_buffer)
                    write_atomic(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
                    tokenizer.save(run_dir)
                return _train(cfg, run_dir, ckpt, state, graphdef, tx, schedule, train_iter, host_eval_batches,
                              mesh, tokenizer=tokenizer, unigram=unigram, restored=step is not None, main=main,
                              n_params=n_params, flops_total=flops_total)
            finally:
                ckpt.close()  # (_train closed it already, before its logger; closing twice is a no-op)
    finally:
        _drop_log_buffer(log_buffer)


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
    """Sum of an int64 [n] array (values < 2**62) over processes, exactly: jax gathers int32
    unless x64 is on, so each value travels as two 31-bit words."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils
    words = np.stack([x >> 31, x & (2**31 - 1)]).astype(np.int32)
    hi, lo = np.asarray(multihost_utils.process_allgather(words)).astype(np.int64).sum(0)
    return (hi << 31) + lo


def _train(cfg, run_dir, ckpt, state, graphdef, tx, schedule, train_iter, host_eval_batches, mesh, *,
           tokenizer, unigram, restored, main, n_params, flops_total) -> dict:
    """The training loop proper, from the state's step to train.steps; closes `ckpt` (waiting
    for its last save) before the logger, so a logging failure never skips a pending save."""
    tc = cfg.train
    step = start_step = int(state["step"])
    B = cfg.data.batch_size
    eval_batches = [place_batch(b, mesh, B) for b in host_eval_batches]
    if unigram is not None:
        log.info("baseline: the training split's unigram entropy is %.3f bits/byte", unigram)
    is_text = cfg.data.source != "mqar"
    token_bytes = jnp.asarray(tokenizer.token_bytes)
    train_step = make_train_step(graphdef, tx, schedule, grad_accum=tc.grad_accum, z_loss=cfg.model.z_loss,
                                 state_shardings=jax.tree.map(lambda a: a.sharding, state))
    eval_step = make_eval_step(graphdef)
    diagnose = None
    if tc.diagnostics_every:  # imported and compiled only when asked for
        from train.evals.diagnostics import make_diagnostics
        diagnose = make_diagnostics(graphdef, cfg.model)
    peak, peak_src = peak_flops(models.resolve_dtype(cfg.runtime))
    log.info("MFU peak: %.3g FLOP/s per device (%s)", peak, peak_src)
    log.info("host allocator: %s", hardware.HOST_ALLOCATOR)
    # Simulated CPU devices share the host's cores: the CPU peak is the whole host's, per process.
    meter = Throughput(flops_total, peak, jax.process_count() if jax.default_backend() == "cpu" else mesh.size)
    logger = None
    last_saved = step if restored else None
    summary: dict = {}

    mixture = train_iter.source_names if len(train_iter.source_names) > 1 else ()
    lo, hi = host_rows(mesh, B)
    replicas = jax.process_count() * (hi - lo) // B  # processes holding the same rows (tensor axis across hosts)

    def count_sources() -> dict[str, float]:
        """The mixture's tokens per source so far, summed over processes (all call it together)."""
        if not mixture:
            return {}
        seen = _sum_over_processes(train_iter.take_local_tokens()) // replicas
        train_iter.source_tokens = train_iter.source_tokens + seen
        return {f"tokens/{n}": float(t) for n, t in zip(mixture, train_iter.source_tokens)}

    def save(at: int) -> None:
        nonlocal last_saved
        if last_saved != at:
            count_sources()  # the saved data state carries the counts up to this step
            ckpt.save(at, state, train_iter.get_state())
            last_saved = at

    try:
        logger = RunLogger(run_dir, tc.steps, step, main=main)
        with _StopSignal() as stop, use_mesh(mesh):
            t_start = time.perf_counter()
            while step < tc.steps:
                batch = place_batch(next(train_iter), mesh, B)
                state, m = train_step(state, batch)
                m = jax.device_get(m)
                ckpt.poll()  # a failed background save stops the run here, one step after it failed
                if not bool(m["finite"]):
                    ckpt.wait()
                    good = ckpt.steps()
                    loss, gnorm = float(m["loss"]), float(m["grad_norm"])
                    if math.isfinite(loss) and math.isfinite(gnorm):  # then the update broke the params
                        what = (f"the update made the parameters non-finite (loss={loss:.4g}, grad_norm={gnorm:.4g}, "
                                f"lr={float(m['lr']):.3g})")
                    else:
                        what = f"loss={loss} grad_norm={gnorm} is not finite"
                    raise NonFiniteError(
                        f"step {step + 1}: {what}; the run stopped without applying this update. Last good "
                        f"checkpoint: {f'step {good[-1]} in {ckpt.directory}' if good else 'none'}. Lower "
                        "optimizer.lr, set optimizer.grad_clip, or use runtime.compute_dtype=float32.")
                step += 1
                meter.add(int(batch["inputs"].size))
                first = step == start_step + 1
                if first or step % tc.log_every == 0 or step == tc.steps:
                    rec = {k: float(m[k]) for k in ("loss", "ce", "accuracy", "grad_norm", "lr")}
                    rec.update(count_sources())
                    if first:  # this step compiled: report that, not a throughput
                        rec["compile_and_step_s"] = time.perf_counter() - t_start
                        meter.restart()
                        logger.restart_clock(step)
                    else:
                        rec.update(meter.report())
                    logger.write("train", step, rec)
                    logger.console_line("train", step, rec, ("loss", "grad_norm", "lr", "tokens_per_s", "mfu",
                                                             "compile_and_step_s"))
                else:
                    logger.advance(step)
                if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                    ev = evaluate(eval_step, state["params"], eval_batches, token_bytes, text=is_text)
                    logger.write("eval", step, ev)
                    logger.console_line("eval", step, ev, ("loss", "bits_per_byte", "perplexity", "accuracy"))
                    meter.restart()
                if diagnose is not None and step % tc.diagnostics_every == 0:
                    # Logged as kind "diagnostics" with the summary's names less their
                    # "diagnostics/" prefix: TensorBoard shows them as diagnostics/<name>.
                    _, diag = diagnose(state["params"], eval_batches)
                    diag = {k.removeprefix("diagnostics/"): v for k, v in diag.items()}
                    logger.write("diagnostics", step, diag)
                    logger.console_line("diagnostics", step, diag, ("sink_rate_mean", "entropy_mean",
                                                                     "max_activation"))
                    meter.restart()
                if step % tc.checkpoint_every == 0:
                    save(step)
                received = _agreed_signal(stop, step, tc.log_every)
                if received is not None and step < tc.steps:  # at the last step: finish instead
                    log.info("signal %d received: saving checkpoint at step %d and exiting", received, step)
                    save(step)
                    ckpt.wait()
                    summary = {"stopped_by_signal": int(received), "step": step}
                    return summary
            train_time = time.perf_counter() - t_start
            save(step)
            ev = evaluate(eval_step, state["params"], eval_batches, token_bytes, text=is_text)
            ckpt.wait()  # the final checkpoint is on disk before the run reports success
            logger.write("eval", step, ev)
            logger.console_line("eval", step, ev, ("loss", "bits_per_byte", "perplexity", "accuracy"))
            summary = {"step": step, "eval": ev, "unigram_bits_per_byte": unigram, "train_seconds": train_time,
                       "params": n_params, "flops_per_token": flops_total}
            if main:
                write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            return summary
    finally:
        try:
            ckpt.close()
        finally:
            train_iter.close()  # its reader threads and worker processes
            if logger is not None:
                logger.close()

"""Orbax checkpoints of the TrainState plus the data iterator state, verified on every restore.

Layout: RUN_DIR/checkpoints/<step>/{state, data, meta}. `state` is the TrainState (orbax
StandardSave), `data` the data iterator's position (JSON), `meta` a fingerprint of every array
of `state` (JSON, below). Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it
when complete, so only whole checkpoints are ever listed: a run killed mid-save resumes from the
previous one.

What can go wrong, and what happens (nothing here ever deletes or replaces a readable checkpoint):

- Incompatible (`CheckpointMismatch`, a ConfigError): the checkpoint holds another state tree
  (other param names, shapes or dtypes: a different model or optimizer) or a data state that
  belongs to other data. The error names the differences and nothing is moved.
- Corrupt: unreadable files, a fingerprint that does not match (bit rot), or a malformed data
  state. The step is reported in one line and the next older one is tried. The train loop sets
  aside (moves to RUN_DIR/corrupt_checkpoints/) only corrupt steps newer than the one it
  resumes from, since it will write those steps again. When no readable checkpoint is left,
  `CheckpointError` is raised and nothing is moved; starting over is the user's decision.
- A failure of the reader rather than of the files (out of memory, a denied permission, a
  storage service that is down): `CheckpointError` at once; no step is skipped or moved.
- A failed save (full disk, ...): `CheckpointSaveError` naming the step and the cause in one
  line, reported by the first `poll()` after the background write fails; the partial temporary
  directory is removed.
- A checkpoint written before fingerprints were recorded (no `meta`) is restored unverified,
  with a warning.

Fingerprint: per array, two sums over its 32-bit words w_i with odd weights, modulo 2^32
(sum w_i (2i + 1) and sum rotl(w_i, 13) (i * 0x9E3779B1 | 1)), computed on device at save and
again after restore. Changing any single word changes the first sum, so a flipped bit anywhere
in the data files is caught even when the file still decodes; it does not depend on how the
array is sharded, so a checkpoint restored under another mesh verifies too. Orbax itself
verifies nothing of the values it reads.
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from train.config import ConfigError
from train.errors import CheckpointError, CheckpointSaveError

log = logging.getLogger("chimera.checkpoint")

META_FORMAT = 1
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointMismatch(ConfigError):
    """The checkpoint is readable but belongs to another model, optimizer or data config."""


class NoReadableCheckpoint(CheckpointError):
    """Checkpoints exist, but every one of them is corrupt."""


class _Corrupt(Exception):
    """One checkpoint step cannot be used; restore_latest tries an older one."""


# Failures of the reader, not of the files: out of memory, no permission, a storage service that
# is down or slow. Such a step is not corrupt; the restore stops instead of skipping it.
_NOT_THE_FILES = ("RESOURCE_EXHAUSTED", "Out of memory", "UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED",
                  "Permission denied")


def _not_the_files(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, PermissionError)) or any(t in str(e) for t in _NOT_THE_FILES)


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    # tensorstore / orbax messages put the root cause (e.g. "File too large") last.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [""]
    msg = lines[0] if len(lines[0]) <= limit else "..." + lines[0][-limit:]
    return f"{type(e).__name__}: {msg}"


# ----------------------------------------------------------------------------- tree helpers

def _path_name(path) -> str:
    """'opt_state/1/0/mu/embed/embedding/value' for a jax key path; orbax's metadata tree
    (dicts with string keys) and the live state (nnx State, optax tuples) give the same name."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _named_leaves(tree: Any) -> dict[str, Any]:
    return {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words, in x's own shape (plus a trailing 2 for 8-byte types):
    elementwise, so a sharded array stays sharded."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """uint32 row-major position of every element (mod 2^32), built from per-axis iotas rather
    than a reshape, which would gather a sharded array onto every device."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


@jax.jit
def _fingerprint_arrays(arrays: list[jax.Array]) -> jax.Array:
    out = []
    for x in arrays:
        w = _words(x)
        i = _flat_index(w.shape)
        rot = (w << 13) | (w >> 19)
        out.append(jnp.stack([jnp.sum(w * (2 * i + 1), dtype=jnp.uint32),
                              jnp.sum(rot * ((i * jnp.uint32(0x9E3779B1)) | 1), dtype=jnp.uint32)]))
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(tree: Any) -> dict[str, list[int]]:
    """{leaf name: [h1, h2]} of every array in `tree` (see the module docstring)."""
    named = _named_leaves(tree)
    sums = np.asarray(jax.device_get(_fingerprint_arrays([jnp.asarray(x) for x in named.values()])))
    return {name: [int(a), int(b)] for name, (a, b) in zip(named, sums)}


def tree_differences(saved: dict[str, Any], wanted: dict[str, Any], limit: int = 4) -> list[str]:
    """Human-readable differences between two {name: array-like with shape/dtype} maps."""
    out = []
    for name in sorted(set(saved) | set(wanted), key=lambda n: (not n.startswith("params"), n)):
        a, b = saved.get(name), wanted.get(name)
        if a is None:
            out.append(f"{name} is new (not in the checkpoint)")
        elif b is None:
            out.append(f"{name} is in the checkpoint but not in this model")
        elif tuple(a.shape) != tuple(b.shape):
            out.append(f"{name} shape {tuple(a.shape)} in the checkpoint vs {tuple(b.shape)} now")
        elif jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
            out.append(f"{name} dtype {jnp.dtype(a.dtype).name} in the checkpoint vs {jnp.dtype(b.dtype).name} now")
    if len(out) > limit:
        out = out[:limit] + [f"{len(out) - limit} more"]
    return out


# ----------------------------------------------------------------------------- checkpointer

class _QuietFailedSaves(logging.Filter):
    """A failed save is logged by orbax from each of its threads with a full traceback, and by
    asyncio for each abandoned write future (hundreds of lines for one full disk). `poll`
    reports it in one line naming the step and the cause, so records about a save's temporary
    directory are dropped; so are orbax's notices that a reader's directory is read only, which
    the reader asked for. Everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        if _TMP_SUFFIX in text:
            return False
        return not ("orbax" in record.pathname and "read only" in text)


_QUIET = _QuietFailedSaves()


def _quiet_failed_saves() -> None:
    """Install _QUIET (once), and drop the unraisable "Event loop is closed" errors that
    tensorstore's callbacks for the writes still in flight raise against orbax's closed event
    loop after a failed save (Python prints each with a traceback)."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_QUIET)  # the same object: added once
    previous = sys.unraisablehook
    if getattr(previous, "_chimera", False):
        return

    def hook(unraisable):
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._chimera = True
    sys.unraisablehook = hook


class Checkpointer:
    """Saves and restores checkpoints in `directory`.

    read_only: a reader (eval, export, generate) beside a run that may still be going: it
    never creates, deletes, moves or cleans anything, and a step that the running job deletes
    while it is being read is skipped.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        _quiet_failed_saves()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, create=not read_only, read_only=read_only,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save and not read_only,
            # The writer holds the run directory's lock, so a temporary directory it finds was
            # left by a killed process: orbax removes it.
            cleanup_tmp_directories=not read_only)
        # Handlers named up front, so that a new manager can read a step's metadata before any restore.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = _listing(lambda: ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers))
        self._pending: int | None = None  # step of a save that may still be writing
        self._closed = False

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- saving

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Start saving; returns once the arrays are copied off the device. A failure of an
        earlier save is raised here (CheckpointError), before anything new is written."""
        self.poll(block=True)
        meta = {"format": META_FORMAT, "fingerprint": fingerprint(state)}
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001 - a synchronous write failed (disk full, ...)
            self._failed(step, e)
        self._pending = step

    def poll(self, block: bool = False) -> None:
        """Raise CheckpointError if the last save failed. Without `block`, returns at once
        while it is still writing (the train loop calls this every step)."""
        if self._pending is None:
            return
        if not block and self.manager.is_saving_in_progress():
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the background write failed
            self._failed(step, e)

    def _failed(self, step: int, e: Exception):
        for tmp in self.directory.glob(f"{step}{_TMP_SUFFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)  # the partial write of this one step
        self.manager.reload()
        good = [s for s in self.steps() if s != step]
        raise CheckpointSaveError(
            f"saving checkpoint step {step} in {self.directory} failed ({_first_line(e)}); the partial files were "
            f"removed. Last good checkpoint: {f'step {good[-1]}' if good else 'none'}") from e

    def wait(self) -> None:
        self.poll(block=True)

    def close(self) -> None:
        """Wait for a pending save (raising CheckpointError if it failed), then release orbax.
        Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.poll(block=True)
        finally:
            self.manager.close()

    # -- restoring

    def restore(self, step: int, abstract_state: Any,
                check_data: Callable[[dict], None] | None = None) -> tuple[int, Any, dict]:
        """(step, state, data_state) of checkpoint `step`, verified against its fingerprint.

        abstract_state: a pytree of jax.ShapeDtypeStruct (from jax.eval_shape of the initial
        state). Their shardings decide where the arrays land, so a checkpoint written under one
        mesh restores under another (orbax reshards on read).
        check_data: called with the data state; a ConfigError there means another data config
        (CheckpointMismatch), any other exception a malformed state (corrupt).
        Raises CheckpointMismatch, or CheckpointError when the step cannot be read.
        """
        try:
            return self._restore(step, abstract_state, check_data)
        except _Corrupt as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read ({e})") from None

    def _read_failure(self, step: int, e: Exception, what: str = "") -> Exception:
        """The exception for a failed read: _Corrupt when the files are at fault, else a
        CheckpointError that stops the restore (out of memory, no permission, ...)."""
        if _not_the_files(e):
            return CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read now "
                                   f"({_first_line(e)}); nothing was moved")
        return _Corrupt(what + _first_line(e))

    def _restore(self, step, abstract_state, check_data):
        try:
            saved = self.manager.item_metadata(step)["state"]
            saved = getattr(saved, "tree", saved)
        except Exception as e:  # noqa: BLE001 - unreadable metadata is a corrupt step
            raise self._read_failure(step, e, "metadata: ") from None
        if saved is None:
            raise _Corrupt("its state metadata is missing")
        diff = tree_differences(_named_leaves(saved), _named_leaves(abstract_state))
        if diff:
            raise CheckpointMismatch(
                f"checkpoint step {step} in {self.directory} holds another model or optimizer ({'; '.join(diff)}); "
                "use the run's own settings (its config.json) or another --run-dir")
        # Checkpoints written before fingerprints existed have no `meta`: read, but unverified.
        verified = (self.directory / str(step) / "meta").is_dir()
        items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
        if verified:
            items["meta"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - unreadable files
            raise self._read_failure(step, e) from None
        state, data = restored["state"], restored["data"]
        if verified:
            meta = restored["meta"]
            if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
                raise _Corrupt("its fingerprint record (meta) is malformed")
            want, got = meta.get("fingerprint", {}), fingerprint(state)
            bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            if bad:
                raise _Corrupt(f"fingerprint mismatch in {len(bad)} array(s), first {bad[0]}: the files changed "
                               "after they were written")
        else:
            log.warning("checkpoint step %d in %s has no fingerprint (written before Chimera recorded them): "
                        "restored unverified", step, self.directory)
        if check_data is not None:
            try:
                check_data(data)
            except ConfigError as e:
                raise CheckpointMismatch(f"checkpoint step {step} in {self.directory}: {e}") from None
            except Exception as e:  # noqa: BLE001 - a malformed data state
                raise _Corrupt(f"data iterator state: {_first_line(e)}") from None
        return step, state, data

    def restore_latest(self, abstract_state: Any, check_data: Callable[[dict], None] | None = None,
                       ) -> tuple[tuple[int, Any, dict] | None, list[tuple[int, str]]]:
        """(restore of the newest usable checkpoint or None when there is none, [(corrupt step,
        why)] of the newer steps that were skipped). Raises CheckpointMismatch at the first
        incompatible step, NoReadableCheckpoint when steps exist but none is readable, and
        CheckpointError when one cannot be read for a reason that is not its files; moves nothing.
        """
        corrupt: list[tuple[int, str]] = []
        seen: set[int] = set()
        while True:
            todo = [s for s in reversed(self.steps()) if s not in seen]
            if not todo:
                break
            step = todo[0]
            seen.add(step)
            try:
                return self._restore(step, abstract_state, check_data), corrupt
            except _Corrupt as e:
                if self.read_only:
                    _listing(self.manager.reload)
                    if step not in self.steps():  # deleted by the running job while we read it
                        continue
                log.warning("checkpoint step %d in %s cannot be used (%s); trying an older one",
                            step, self.directory, e)
                corrupt.append((step, str(e)))
        if corrupt:
            detail = "; ".join(f"step {s}: {why}" for s, why in corrupt)
            raise NoReadableCheckpoint(f"no checkpoint in {self.directory} can be read ({detail}); nothing was moved")
        return None, []

    def set_aside(self, steps: list[int]) -> list[Path]:
        """Move these step directories to RUN_DIR/corrupt_checkpoints/<step>-<time> (kept for
        inspection, out of the way of the steps that will be written again)."""
        assert not self.read_only
        if not steps:
            return []
        moved = []
        for step in steps:
            aside = self.directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), aside)
            log.warning("moved unreadable checkpoint step %d to %s", step, aside)
            moved.append(aside)
        self.manager.reload()
        return moved


def _listing(fn: Callable[[], Any], tries: int = 5) -> Any:
    """Run `fn`, which lists the checkpoints (orbax stats each step directory), again when a
    step vanishes in between: a running job deletes its old steps while a reader lists them."""
    for attempt in range(tries):
        try:
            return fn()
        except FileNotFoundError:
            if attempt == tries - 1:
                raise
            time.sleep(0.05)


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)

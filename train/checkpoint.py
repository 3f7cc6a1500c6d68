"""Orbax checkpoints of the TrainState plus the data iterator state.

Layout: RUN_DIR/checkpoints/<step>/{state, data}. Saves are asynchronous (the train loop goes on
while files are written), the newest `keep` are kept, and orbax only ever lists checkpoints
that finished writing, so a run killed mid-save resumes from the previous one. A checkpoint that
is listed but cannot be read (corrupt, truncated) is reported, moved to RUN_DIR/corrupt_checkpoints/
(kept for inspection, and out of the way of the step that will be saved again), and the next older
one is tried.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("chimera.checkpoint")


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Start saving; returns once the arrays are copied off the device."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[int, Any, dict]:
        """(step, state, data_state) of checkpoint `step`; raises if it cannot be read.

        abstract_state: a pytree of jax.ShapeDtypeStruct (from jax.eval_shape of the initial
        state). Their shardings decide where the arrays land, so a checkpoint written under one
        mesh restores under another (orbax reshards on read).
        """
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, restored["state"], restored["data"]

    def restore_latest(self, abstract_state: Any, *, move_corrupt: bool = True) -> tuple[int, Any, dict] | None:
        """`restore` of the newest readable checkpoint, or None if there is none.

        move_corrupt: move an unreadable checkpoint aside (the train loop, which will write that
        step again) or leave it where it is (readers such as export, which must not touch a run
        that may still be going).
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                return self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any read failure means: try an older one
                why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                if not move_corrupt:
                    log.warning("checkpoint %s/%d cannot be restored (%s); trying an older one",
                                self.directory, step, why)
                    continue
                aside = self.directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
                aside.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(self.directory / str(step)), aside)
                self.manager.reload()
                log.warning("checkpoint %s/%d cannot be restored (%s); moved it to %s and trying an "
                            "older one", self.directory, step, why, aside)
        if steps:
            raise RuntimeError(f"none of the checkpoints {steps} in {self.directory} could be restored; "
                               "move the directory away to start from scratch")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)

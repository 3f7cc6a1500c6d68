"""Errors that the commands (train, eval, export, generate) print as one line, without a
traceback. Kept free of heavy imports so that a command can catch them before importing jax.

    ConfigError (train.config)   bad config, data, tokenizer or arguments; also a checkpoint of
                                 another model (CheckpointMismatch) and a busy run directory
    CheckpointError              a checkpoint cannot be read (corrupt, bit rot, ...)
    CheckpointSaveError          a checkpoint cannot be written (disk full, ...)
"""
from __future__ import annotations

from train.config import ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or written; the message is one line for the user."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed; the run must stop (it can no longer promise a checkpoint)."""


USER_ERRORS = (ConfigError, CheckpointError)

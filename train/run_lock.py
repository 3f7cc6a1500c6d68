"""One writer per run directory: an exclusive lock on RUN_DIR/.lock held while training.

    with RunLock(run_dir):      # raises RunDirBusy naming the holder's pid and host
        ...

The lock is an advisory `flock` on the file, which the kernel releases when its holder exits in
any way (a crash or `kill -9` included), so a stale lock never blocks a restart; the file only
records who holds it (pid, host, start time) for the message a second writer gets. A holder that
ended without releasing is reported when the next one takes over. Network file systems differ in
how they honour flock (NFSv4 maps it to byte-range locks, which work across hosts; some older
mounts do not lock at all): keep one sweep point per run directory there too.

Readers (eval, export, generate) never take the lock: they open checkpoints read-only.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from train.config import ConfigError

log = logging.getLogger("chimera.train")

LOCK_FILE = ".lock"


class RunDirBusy(ConfigError):
    """Another process is training in this run directory."""


class RunLock:
    """doing / instead: how a second writer's error names the holder's work and the way out
    (also used by `python -m train.prepare_data` on its --out)."""

    def __init__(self, run_dir: str | Path, doing: str = "being trained", instead: str = "use another --run-dir"):
        self.path = Path(run_dir) / LOCK_FILE
        self.doing, self.instead = doing, instead
        self._fd: int | None = None

    def _read_holder(self) -> dict:
        try:
            return json.loads(os.pread(self._fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # The holder writes its record right after taking the lock: a start that races it
            # can find the file still empty, so give it a moment before naming no one.
            holder = self._read_holder()
            for _ in range(40):
                if holder:
                    break
                time.sleep(0.05)
                holder = self._read_holder()
            os.close(self._fd)
            self._fd = None
            who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"
                   if holder else "another process")
            raise RunDirBusy(f"{self.path.parent} is {self.doing} by {who}; wait for it to finish, stop it, "
                             f"or {self.instead}") from None
        stale = self._read_holder()
        if stale:
            log.warning("run directory lock: the previous holder (pid %s on host %s, since %s) ended without "
                        "releasing it (killed or crashed); taking over", stale.get("pid"), stale.get("host"),
                        stale.get("since"))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        record = json.dumps(me).encode()
        os.pwrite(self._fd, record, 0)  # then cut what is left of a longer stale record:
        os.ftruncate(self._fd, len(record))  # the file is never empty while held
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file: released cleanly
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

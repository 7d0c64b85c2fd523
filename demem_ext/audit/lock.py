"""Per-model locks of an audit folder: two processes on the same shard must not train the same shadow
model (both would append every epoch to its metrics.jsonl)."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator

LOCK_NAME = "lock"


@contextlib.contextmanager
def model_lock(folder: Path) -> Iterator[bool]:
    """Hold an exclusive flock on folder/lock for the body; yields False at once (holding nothing) when
    another process holds it. The lock goes with the process, so a killed trainer leaves none behind."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

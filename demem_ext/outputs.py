"""Output locations of the commands: checked before any work is done, and an output folder a failed
command created is removed again while it is still empty."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def output_folder(path: Path, flag: str = "--out") -> Iterator[Path]:
    """Create the folder `path` (and its missing parents) now, as a clear error where that is impossible
    (a file in the way, no permission); if the body fails, remove the folders created here that are empty."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot create the folder: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder is not writable")
    try:
        yield path
    except BaseException:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only empty folders go
        raise


def check_output_file(path: Path, flag: str) -> None:
    """A file to be written at the end of a command: its folder must exist and be writable now."""
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder, not a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {folder} is not writable")

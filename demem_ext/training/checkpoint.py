"""Atomic run files: checkpoints (loaded with weights_only=True) and text files, written to a temp file and
renamed; JSON files read back with errors naming the file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import torch


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """write(fh) into a temp file next to path, then rename: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write payload to path atomically: a reader sees the old file or the new one, never half of one."""
    _atomic_write(path, lambda fh: torch.save(payload, fh))


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write a text file (UTF-8) atomically, like save_checkpoint."""
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in the file at path; a file that is not valid JSON is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): restore or delete it") from None


def load_checkpoint(path: str | os.PathLike, expected_format: Optional[str] = None) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True; a missing, corrupt or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors, or objects weights_only refuses
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or not a demem-ext checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError(f"checkpoint {str(path)!r} is not a demem-ext checkpoint (no 'format' entry)")
    if expected_format is not None and payload["format"] != expected_format:
        raise ValueError(f"checkpoint {str(path)!r} has format {payload['format']!r}, expected {expected_format!r}")
    return payload

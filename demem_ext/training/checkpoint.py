"""Atomic run files: checkpoints (loaded with weights_only=True, with a checksum) and text files, written to
a temp file and renamed; JSON files read back with errors naming the file."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import torch

CHECKSUM_KEY = "sha256"  # of the rest of the payload (payload_digest); absent from older checkpoints


def _umask() -> int:
    """The process's umask (from /proc where it is there: setting it to read it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """write(fh) into a temp file next to path, then rename: a reader sees the old file or the new one.

    The file gets the mode an ordinary open() would (0o666 less the umask, not mkstemp's 0o600); temp files of
    path left by a killed writer are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def payload_digest(payload: Any) -> str:
    """SHA-256 of a payload: every tensor's bytes, dtype and shape and every other value's type and repr, with
    their places in the nesting, in the payload's own order (kept by saving and loading)."""
    digest = hashlib.sha256()
    _feed(digest, payload, "")
    return digest.hexdigest()


def _feed(digest: Any, value: Any, where: str) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{where}:{tensor.dtype}:{tuple(value.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        for key, item in value.items():
            _feed(digest, item, f"{where}/{key!r}")
    elif isinstance(value, (list, tuple)):
        digest.update(f"{where}:{type(value).__name__}:{len(value)}\n".encode())
        for i, item in enumerate(value):
            _feed(digest, item, f"{where}[{i}]")
    else:
        digest.update(f"{where}={type(value).__name__}:{value!r}\n".encode())


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write payload and its checksum to path atomically: a reader sees the old file or the new one, never half
    of one."""
    stamped = {**payload, CHECKSUM_KEY: payload_digest(payload)}
    _atomic_write(path, lambda fh: torch.save(stamped, fh))


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
    """Load a checkpoint with weights_only=True and verify its checksum (where it has one, i.e. was written by
    save_checkpoint); a missing, corrupt, changed or foreign file is a clear error."""
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
    stored = payload.pop(CHECKSUM_KEY, None)
    if stored is not None and stored != payload_digest(payload):
        raise ValueError(f"checkpoint {str(path)!r} fails its checksum: it was changed or damaged after it was "
                         f"written")
    return payload

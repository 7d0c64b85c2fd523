"""metrics.jsonl, a run's per-epoch log: one JSON object a line, appended after each epoch.

An append is not atomic: a kill while writing can leave a torn last line. Readers drop such a line
with a warning naming the file; any other bad line is an error naming the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from demem_ext.training.checkpoint import write_text_atomic


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one epoch's metrics as a line."""
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def read_rows(path: Path, warn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The file's rows; a last line that is not valid JSON (torn by a kill) is dropped with warn(message)."""
    lines = [(number, line) for number, line in enumerate(path.read_text(errors="replace").split("\n"), 1)
             if line.strip()]
    rows = []
    for position, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if position == len(lines) - 1:
                warn(f"warning: {path}: dropping its torn last line {number} (a run killed while writing it)")
                break
            raise ValueError(f"{path}, line {number}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {line[:40]!r}")
        rows.append(row)
    return rows


def trim_rows(path: Path, epochs_done: int, warn: Callable[[str], None] = print) -> None:
    """Keep the rows of epochs up to epochs_done (a run killed between its metrics line and its checkpoint
    wrote one more) and drop a torn last line; rewritten atomically where anything changes."""
    if not path.exists():
        return
    rows = read_rows(path, warn)
    kept = [row for row in rows if _epoch(row, path) <= epochs_done]
    text = "".join(json.dumps(row) + "\n" for row in kept)
    if text != path.read_text(errors="replace"):
        write_text_atomic(text, path)


def _epoch(row: dict[str, Any], path: Path) -> int:
    epoch = row.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise ValueError(f"{path}: a row without an integer 'epoch': {json.dumps(row)[:60]}")
    return epoch

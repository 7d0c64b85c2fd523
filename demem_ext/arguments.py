"""argparse value types of the commands' flags: numbers and devices checked while parsing, so that a bad
value is a usage error naming its flag (``demem train: error: argument --threads: ...``)."""

from __future__ import annotations

import argparse
import math
from typing import Any


def _at_least(value: float, low: int, text: str, kind: str) -> Any:
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {kind} >= {low}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _at_least(_int(text), 1, text, "an integer")


def ensemble_size(text: str) -> int | str:
    """"auto" or an integer >= 1 (a number of models trained at once)."""
    return "auto" if text == "auto" else _at_least(_int(text), 1, text, "'auto' or an integer")


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _at_least(_int(text), 0, text, "an integer")


def finite_float(text: str) -> float:
    """A finite number (no inf or nan)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    return _at_least(finite_float(text), 0, text, "a finite number")


def device_available(name: str) -> bool:
    """Whether the device `name` (cpu, cuda, cuda:N) exists on this machine."""
    import torch

    try:
        parsed = torch.device(name)
    except RuntimeError:
        return False
    if parsed.type != "cuda":
        return parsed.type == "cpu"
    return torch.cuda.is_available() and (parsed.index or 0) < torch.cuda.device_count()


def device(text: str) -> str:
    """"cpu", "cuda" or "cuda:N" where that device exists here."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"device(s), numbered from 0")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None

"""Training precision and memory format: bf16 autocast where the hardware computes bf16 natively.

Only training (the attack and the training loss) runs under autocast; evaluation and the audit's
scoring pass stay in fp32. Parameters, gradients and optimizer state are fp32 in both precisions.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: str) -> tuple[bool, str]:
    """Whether `device` computes bf16 natively, and why (the CPU flags or the CUDA capability)."""
    if device.startswith("cuda"):
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "CUDA device with bf16" if ok else "CUDA device without bf16"
    found = [flag for flag in _NATIVE_BF16_FLAGS if flag in _cpu_flags()]
    if found:
        return True, f"CPU has native bf16 ({', '.join(found)})"
    return False, "CPU has no native bf16 (neither amx_bf16 nor avx512_bf16)"


def resolve_precision(requested: str, device: str) -> tuple[str, str]:
    """("fp32" | "bf16", reason) for a requested precision ("auto" picks bf16 where it is native)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {requested!r}")
    native, why = native_bf16(device)
    if requested == "auto":
        return ("bf16" if native else "fp32"), f"auto: {why}"
    if requested == "bf16" and not native:
        raise ValueError(f"precision 'bf16' is not supported here: {why}; use --precision fp32 or auto")
    return requested, f"requested ({why})"


def resolve_memory_format(requested: str) -> str:
    """"channels_last" or "contiguous": "auto" is channels_last (every model here is a CNN on images;
    oneDNN's convolutions run faster on it in fp32 and bf16 alike)."""
    if requested not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {list(MEMORY_FORMATS)}, got {requested!r}")
    return "channels_last" if requested == "auto" else requested


def autocast(precision: str, device: str) -> ContextManager:
    """The autocast context of a training step: bf16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def to_memory_format(t: torch.Tensor, memory_format: str) -> torch.Tensor:
    """A 4-d batch in channels_last when asked (other tensors unchanged)."""
    if memory_format == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def model_to_memory_format(model: nn.Module, memory_format: str) -> nn.Module:
    """The model's 4-d weights in channels_last when asked (in place)."""
    if memory_format == "channels_last":
        model.to(memory_format=torch.channels_last)
    return model

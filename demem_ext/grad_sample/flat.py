"""The flat [B, P] matrix of per-sample gradients that both engines fill, reused between calls."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def flat_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype all per-sample gradients are flattened to: the promotion of the parameter dtypes."""
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


class FlatBuffer:
    """A [rows, P] matrix reused from call to call for flattened per-sample gradients.

    Memory that stays allocated costs no page faults, which dominate a fresh matrix of a large model's
    per-sample gradients (docs/benchmarks.md). `release()` frees it.
    """

    def __init__(self) -> None:
        self._matrix: Optional[torch.Tensor] = None

    def rows(self, n: int, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous [n, size] view of the buffer (reallocated when too small or of another kind)."""
        m = self._matrix
        if m is None or m.shape[0] < n or m.shape[1] != size or m.dtype != dtype or m.device != device:
            del m
            self._matrix = None  # free the old one before allocating the new one
            self._matrix = torch.empty(n, size, dtype=dtype, device=device)
        return self._matrix[:n]

    def release(self) -> None:
        self._matrix = None


def flatten_into(pieces: Sequence[torch.Tensor], batch: int, dtype: torch.dtype,
                 out: Optional[FlatBuffer]) -> torch.Tensor:
    """[batch, P]: each piece [batch, ...] flattened and concatenated (into `out` when given)."""
    rows = [piece.reshape(batch, -1).to(dtype) for piece in pieces]
    if out is None:
        return torch.cat(rows, dim=1)
    flat = out.rows(batch, sum(r.shape[1] for r in rows), dtype, rows[0].device)
    return torch.cat(rows, dim=1, out=flat)

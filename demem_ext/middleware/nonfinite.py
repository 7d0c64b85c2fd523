"""The non-finite policy: `nonfinite="error"` stops at a bad sample, `"skip"` drops it."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from demem_ext.ops import NonFiniteError

NONFINITE_MODES = ("error", "skip")


class NonFinitePolicy:
    """Which samples to keep. Under torch.distributed an error waits in `deferred` for the step, which
    raises it on every rank (raising on one rank alone would leave the others waiting in a collective)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.deferred: Optional[str] = None

    def keep(self, ok: torch.Tensor, problem: str, positions: Optional[torch.Tensor] = None,
             defer: bool = False) -> torch.Tensor:
        """The mask of samples to keep (`ok`); raises with mode "error" when some are not ok."""
        if self.mode == "error" and not bool(ok.all()):
            bad = torch.nonzero(~ok).flatten()
            if positions is not None:
                bad = positions[bad]
            message = f"{problem} for samples at batch positions {bad[:8].tolist()}"
            if defer:
                self.deferred = self.deferred or message
                return ok
            raise NonFiniteError(f"{message} (nonfinite='skip' drops such samples)")
        return ok

    def reset(self) -> None:
        self.deferred = None


def grads_finite(params: Sequence[torch.Tensor]) -> bool:
    """Whether every `.grad` of `params` is finite (one reduction per tensor, one host sync)."""
    peaks = [p.grad.detach().abs().amax() for p in params if p.grad is not None and p.grad.numel() > 0]
    return not peaks or bool(torch.isfinite(torch.stack(peaks)).all())

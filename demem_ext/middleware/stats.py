"""DeMemStats: what DeMem did since the last optimizer step, merged over the backward calls."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from demem_ext.config import DeMemConfig
from demem_ext.ops import rule


@dataclass(frozen=True)
class DeMemStats:
    """What DeMem did since the last optimizer step (after a step: in that step).

    weights, risk: w_i and r_i of the samples used; norms: per-sample gradient norms ‖g_i‖₂ and
    clip_fraction: fraction of samples with c_i < 1 (both None on the weighting path);
    num_samples: samples used; num_skipped: samples dropped as non-finite (nonfinite="skip");
    steps: optimizer steps taken through DeMem so far.
    """

    weights: torch.Tensor
    risk: torch.Tensor
    high_risk_fraction: float
    norms: Optional[torch.Tensor]
    clip_fraction: Optional[float]
    num_samples: int
    num_skipped: int
    steps: int


class StatsRecorder:
    """Merges each backward call's per-sample quantities into the stats of the coming step."""

    def __init__(self, config: DeMemConfig) -> None:
        self.config = config
        self.stats: Optional[DeMemStats] = None
        self._open = False  # the stats merge the backward calls since the last step

    def record(self, weights: torch.Tensor, risk: torch.Tensor, norms: Optional[torch.Tensor], skipped: int,
               steps: int) -> None:
        """Add one backward call's samples."""
        prev = self.stats if self._open else None
        if prev is not None:
            weights, risk = torch.cat([prev.weights, weights]), torch.cat([prev.risk, risk])
            norms = None if norms is None else torch.cat([prev.norms, norms])
            skipped += prev.num_skipped
        n = weights.numel()
        clip_fraction = None
        if norms is not None:
            cfg = self.config
            clip = rule.clip_factors(norms, risk, cfg.max_grad_norm, cfg.clip_scope)
            clip_fraction = float((clip < 1).double().mean()) if n else 0.0
        self.stats = DeMemStats(
            weights=weights, risk=risk,
            high_risk_fraction=float((risk > 0.5).double().mean()) if n else 0.0,
            norms=norms, clip_fraction=clip_fraction, num_samples=n, num_skipped=skipped, steps=steps)
        self._open = True

    def close_step(self, steps: int) -> None:
        """The step was taken: the stats now describe it, and the next backward call starts afresh."""
        if self.stats is not None:
            self.stats = dataclasses.replace(self.stats, steps=steps)
        self._open = False

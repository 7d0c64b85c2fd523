"""The class-relative threshold (threshold="class"): τ per class from running moments of its scores, so that a
sample is high-risk when its score is high for its own class, not for the batch."""

from __future__ import annotations

from typing import Optional

import torch

from demem_ext.config import DeMemConfig
from demem_ext.middleware.process_group import ProcessGroup
from demem_ext.ops.rule import accumulation_dtype


class ClassThresholds:
    """Exponentially decayed per-class moments of the scores, and the thresholds τ_c = μ_c + k·σ_c they give.

    Each step's samples enter as n_c ← β·n_c + Σ 1, S_c ← β·S_c + Σ s_i, Q_c ← β·Q_c + Σ s_i² over the
    samples of class c (β = class_decay; every class decays every step). μ_c = S_c/n_c and
    σ_c² = max(Q_c/n_c − μ_c², 0), in float64. A batch is scored against the moments that already include it
    (as the batch rule "mean" includes the batch), and committed after its backward, like the loss trace.
    The rule then reads the margins s_i − τ_{y_i} with τ fixed at 0, which gives the same r_i for hard and
    soft selection. With any other threshold it holds nothing and passes the scores through.
    """

    def __init__(self, config: DeMemConfig, num_classes: Optional[int]) -> None:
        self.enabled = config.threshold == "class"
        self.decay, self.k = config.class_decay, config.k
        self.moments = torch.zeros(num_classes if self.enabled else 0, 3, dtype=torch.float64)  # n, S, Q

    def _updated(self, scores: torch.Tensor, labels: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        """The moments after this batch (of every rank under torch.distributed), on the CPU."""
        pairs = torch.stack([labels.to(scores.device, torch.float64), scores.detach().to(torch.float64)], dim=1)
        parts = group.gather_rows(pairs) if group.collective else [pairs]
        batch = torch.zeros_like(self.moments)
        for part in parts:
            part = part.cpu()
            s = part[:, 1]
            batch.index_add_(0, part[:, 0].to(torch.int64), torch.stack([torch.ones_like(s), s, s * s], dim=1))
        return self.decay * self.moments + batch

    def margins(self, scores: torch.Tensor, labels: Optional[torch.Tensor], config: DeMemConfig,
                group: ProcessGroup) -> tuple[torch.Tensor, DeMemConfig]:
        """(s_i − τ_{y_i}, the rule fixed at τ = 0) with threshold="class", else (scores, config). The margins are
        computed in float64 and returned in the accumulation dtype (float32, or float64 for float64 scores)."""
        if not self.enabled:
            return scores, config
        moments = self._updated(scores, labels, group)
        count = moments[:, 0].clamp(min=torch.finfo(torch.float64).tiny)
        mean = moments[:, 1] / count
        std = (moments[:, 2] / count - mean * mean).clamp(min=0.0).sqrt()
        tau = (mean + self.k * std).to(scores.device)
        margins = scores.detach().to(torch.float64) - tau[labels.to(scores.device)]
        return margins.to(accumulation_dtype(scores.dtype)), config.replace(threshold="fixed", tau=0.0)

    def commit(self, scores: torch.Tensor, labels: Optional[torch.Tensor], group: ProcessGroup) -> None:
        """Record this batch's scores (under torch.distributed: every rank's, on every rank)."""
        if self.enabled:
            self.moments = self._updated(scores, labels, group)

"""The memorization proxy s_i: the loss itself, or the per-sample loss trace (an EMA across visits)."""

from __future__ import annotations

from typing import Optional

import torch

from demem_ext.config import DeMemConfig
from demem_ext.middleware.process_group import ProcessGroup


class LossTrace:
    """m_i ← β·m_i + (1−β)·ℓ_i per dataset index (ℓ_i on the first visit), for proxy="trace".

    With proxy="loss" it holds nothing and the scores are the losses.
    """

    def __init__(self, config: DeMemConfig, num_samples: Optional[int]) -> None:
        self.enabled = config.proxy == "trace"
        self.decay = config.trace_decay
        size = num_samples if self.enabled else 0
        self.values = torch.zeros(size, dtype=torch.float64)
        self.visited = torch.zeros(size, dtype=torch.bool)

    def _updated(self, losses: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """m_i after this visit (float64, CPU)."""
        loss = losses.detach().to("cpu", torch.float64)
        beta = self.decay
        return torch.where(self.visited[idx], beta * self.values[idx] + (1 - beta) * loss, loss)

    def scores(self, losses: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
        """s_i for finite, detached losses (the trace is not changed)."""
        if not self.enabled:
            return losses
        return self._updated(losses, idx).to(device=losses.device, dtype=losses.dtype)

    def commit(self, losses: torch.Tensor, idx: Optional[torch.Tensor], group: ProcessGroup) -> None:
        """Record this visit. Under torch.distributed every rank's (index, loss) pairs are committed, rank
        after rank (a sample that DistributedSampler's padding puts on two ranks is visited twice)."""
        if not self.enabled:
            return
        if not group.collective:
            self.values[idx] = self._updated(losses, idx)
            self.visited[idx] = True
            return
        pairs = torch.stack([idx.to(losses.device, torch.float64), losses.to(torch.float64)], dim=1)
        for part in group.gather_pairs(pairs):
            part_idx, part_losses = part[:, 0].cpu().to(torch.int64), part[:, 1].cpu()
            self.values[part_idx] = self._updated(part_losses, part_idx)
            self.visited[part_idx] = True

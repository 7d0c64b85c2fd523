"""The memorization proxy s_i: the loss itself, or a per-sample trace across visits (an EMA of the loss or of
its z-score within its batch, or the interquartile range of its recent losses)."""

from __future__ import annotations

from typing import Optional

import torch

from demem_ext.config import TRACED_PROXIES, DeMemConfig
from demem_ext.middleware.process_group import ProcessGroup


def z_scores(values: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """(v_i − mean)/std with the mean and population std of `batch` (float64); 0 where the std is 0."""
    if batch.numel() == 0:
        return values
    std = batch.std(correction=0)
    return (values - batch.mean()) / std if float(std) > 0 else torch.zeros_like(values)


class LossTrace:
    """Per dataset index, m_i ← β·m_i + (1−β)·x_i (x_i on the first visit) for proxy="trace" (x_i = ℓ_i) and
    proxy="ztrace" (x_i = ℓ_i's z-score in its batch, every rank's samples under torch.distributed); for
    proxy="iqr", the last W losses (`values` [N, W], oldest first, NaN before W visits) and s_i their
    interquartile range (torch.nanquantile's linear interpolation).

    With proxy="loss" it holds nothing and the scores are the losses.
    """

    def __init__(self, config: DeMemConfig, num_samples: Optional[int]) -> None:
        self.enabled = config.proxy in TRACED_PROXIES
        self.standardized = config.proxy == "ztrace"
        self.windowed = config.proxy == "iqr"
        self.decay = config.trace_decay
        size = num_samples if self.enabled else 0
        if self.windowed:
            self.values = torch.full((size, config.trace_window), torch.nan, dtype=torch.float64)
        else:
            self.values = torch.zeros(size, dtype=torch.float64)
        self.visited = torch.zeros(size, dtype=torch.bool)

    def _updated(self, inputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """m_i (the window of proxy="iqr") after this visit (float64, CPU)."""
        if self.windowed:
            return torch.cat([self.values[idx, 1:], inputs[:, None]], dim=1)
        beta = self.decay
        return torch.where(self.visited[idx], beta * self.values[idx] + (1 - beta) * inputs, inputs)

    def _score(self, updated: torch.Tensor) -> torch.Tensor:
        """s_i from m_i after this visit."""
        if not self.windowed:
            return updated
        if updated.shape[0] == 0:
            return updated[:, 0]
        return torch.nanquantile(updated, 0.75, dim=1) - torch.nanquantile(updated, 0.25, dim=1)

    def _visit(self, losses: torch.Tensor, group: ProcessGroup) -> list[torch.Tensor]:
        """Every rank's x_i of this visit, in rank order (float64, CPU; this rank's alone on one process)."""
        parts = [part.cpu() for part in group.gather_rows(losses.detach().to(torch.float64))]
        if self.standardized:
            batch = torch.cat(parts)
            parts = [z_scores(part, batch) for part in parts]
        return parts

    def scores(self, losses: torch.Tensor, idx: Optional[torch.Tensor], group: ProcessGroup) -> torch.Tensor:
        """s_i for finite, detached losses (the trace is not changed)."""
        if not self.enabled:
            return losses
        inputs = self._visit(losses, group)[group.rank] if self.standardized else losses.detach().to("cpu", torch.float64)
        return self._score(self._updated(inputs, idx)).to(device=losses.device, dtype=losses.dtype)

    def commit(self, losses: torch.Tensor, idx: Optional[torch.Tensor], group: ProcessGroup) -> None:
        """Record this visit. Under torch.distributed every rank's (index, x) pairs are committed, rank
        after rank (a sample that DistributedSampler's padding puts on two ranks is visited twice)."""
        if not self.enabled:
            return
        for part_idx, inputs in zip(group.gather_rows(idx), self._visit(losses, group)):
            part_idx = part_idx.cpu()
            self.values[part_idx] = self._updated(inputs, part_idx)
            self.visited[part_idx] = True

"""What the risk rule reads: the memorization proxy s_i (the loss or a trace), and with threshold="class" its
margin over the threshold of the sample's class."""

from __future__ import annotations

from typing import Optional

import torch

from demem_ext.config import DeMemConfig
from demem_ext.middleware.class_threshold import ClassThresholds
from demem_ext.middleware.process_group import ProcessGroup
from demem_ext.middleware.trace import LossTrace


class RiskScores:
    """The loss trace (`trace`) and the per-class moments (`classes`) of one DeMem block."""

    def __init__(self, config: DeMemConfig, num_samples: Optional[int], num_classes: Optional[int]) -> None:
        self.trace = LossTrace(config, num_samples)
        self.classes = ClassThresholds(config, num_classes)

    def scores(self, source: torch.Tensor, idx: Optional[torch.Tensor], labels: Optional[torch.Tensor],
               config: DeMemConfig, group: ProcessGroup) -> tuple[torch.Tensor, DeMemConfig]:
        """The scores and the rule to weight them with, for finite, detached `source` values (losses or the
        caller's scores) of the kept samples; nothing is recorded."""
        return self.classes.margins(self.trace.scores(source, idx, group), labels, config, group)

    def commit(self, source: torch.Tensor, idx: Optional[torch.Tensor], labels: Optional[torch.Tensor],
               group: ProcessGroup) -> None:
        """Record the kept samples of a backward call that was taken (both parts, under torch.distributed
        every rank's samples)."""
        if self.classes.enabled:
            self.classes.commit(self.trace.scores(source, idx, group), labels, group)
        self.trace.commit(source, idx, group)

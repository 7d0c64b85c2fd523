"""The weighting path: an ordinary backward of (1/D)·Σ w_i·ℓ_i (no per-sample gradients), with τ and D of the
global batch under torch.distributed, the risk scores (loss trace, class thresholds), and the check that its
gradient is finite."""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch
from torch import nn

from demem_ext.config import DeMemConfig
from demem_ext.grad_sample.opacus_hooks import OpacusEngine
from demem_ext.middleware import checks
from demem_ext.middleware.accumulation import PendingSum
from demem_ext.middleware.nonfinite import NonFinitePolicy, grads_finite
from demem_ext.middleware.process_group import ProcessGroup
from demem_ext.middleware.stats import StatsRecorder
from demem_ext.middleware.risk_scores import RiskScores
from demem_ext.ops import NonFiniteError, demem_weights
from demem_ext.ops.autograd import weighted_mean


class Weighed(NamedTuple):
    """One weighting-path call: its loss (None: nothing to differentiate) and the samples behind it."""

    loss: Optional[torch.Tensor]
    keep: torch.Tensor  # bool [B]
    kept: torch.Tensor  # detached scores of the kept samples (their losses unless scores were given)
    idx: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]  # of the kept samples
    weights: torch.Tensor
    risk: torch.Tensor

    def dropped(self) -> "Weighed":
        """The call with all its samples dropped (a non-finite gradient under nonfinite="skip")."""
        return Weighed(None, torch.zeros_like(self.keep), self.kept[:0], None if self.idx is None else self.idx[:0],
                       None if self.labels is None else self.labels[:0], self.weights[:0], self.risk[:0])



class WeightingPath:
    """`dm.backward` and `dm.weighted_loss` of one DeMem block (its parts are the block's own)."""

    def __init__(self, config: DeMemConfig, module: nn.Module, risk_scores: RiskScores, policy: NonFinitePolicy,
                 pending: PendingSum, recorder: StatsRecorder) -> None:
        self.config, self.module, self.risk_scores, self.policy = config, module, risk_scores, policy
        self.pending, self.recorder = pending, recorder
        self.opacus: Optional[OpacusEngine] = None  # engine="opacus": its hooks run, their output is unused

    def backward(self, losses: torch.Tensor, idx: Optional[torch.Tensor], group: ProcessGroup, steps: int,
                 scores: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> None:
        """Backward of (1/D)·Σ w_i·ℓ_i over the kept samples, then the gradient check."""
        weighed = self.weigh(losses, idx, group, scores, labels)
        if weighed.loss is not None and not self._backward_finite(weighed.loss):
            weighed = weighed.dropped()  # nonfinite="skip": the call's samples are dropped
        self.commit(weighed, group, steps)

    def loss(self, losses: torch.Tensor, idx: Optional[torch.Tensor], group: ProcessGroup, steps: int,
             scores: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The scalar loss for the caller's own backward; its gradient is checked at the step (`check_grads`)."""
        weighed = self.weigh(losses, idx, group, scores, labels)
        self.commit(weighed, group, steps)
        self.pending.check_grads_at_step = True
        return weighed.loss if weighed.loss is not None else losses.sum() * 0.0

    def weigh(self, losses: torch.Tensor, idx: Optional[torch.Tensor], group: ProcessGroup,
              scores: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> Weighed:
        """τ, the weights and the loss (1/D)·Σ w_i·ℓ_i of the kept samples (τ and D of the global batch, and the
        loss scaled by the world size so that DDP's average is that, under torch.distributed). `scores`: the
        values the risk rule reads in place of the losses (the proxy's input; None: the losses); `labels`:
        the classes of threshold="class"."""
        cfg = self.config
        if self.pending.path == "weighting" and cfg.expected_batch_size is None:
            raise ValueError("a second weighting-path call before optimizer.step() (gradient accumulation) needs "
                             "expected_batch_size, the number of samples per step: each call divides by D, "
                             "and with D = its own B the step would get the sum of the calls' means "
                             "(docs/design.md, 'Gradient accumulation')")
        detached = losses.detach()
        finite = torch.isfinite(detached)
        problem = "per_sample_losses has non-finite values"
        if scores is not None and not bool(torch.isfinite(scores).all()):
            problem = ("per_sample_losses and scores have non-finite values" if not bool(finite.all())
                       else "scores has non-finite values")
            finite = finite & torch.isfinite(scores)
        keep = group.finite(self.policy, finite, problem)
        idx = None if idx is None else idx[keep.cpu()]
        labels = None if labels is None else labels[keep.to(labels.device)]
        kept = losses if bool(keep.all()) else losses[keep]
        source = kept.detach() if scores is None else scores[keep].to(kept.dtype)
        scores, rule = self.risk_scores.scores(source, idx, labels, cfg, group)
        rule, total = group.rule_for(rule, scores, keep, problem, self.policy, fix_tau=False)
        weights = risk = detached.new_zeros(0)
        loss = None
        if kept.numel() > 0:
            weights, risk = demem_weights(scores, rule)
            loss = weighted_mean(kept, weights, float(cfg.expected_batch_size or total)) * group.world
        elif total > 0:  # other ranks have samples: take part in DDP's all-reduce with zero gradients
            loss = sum((p * 0).sum() for _, p in checks.trainable(self.module, None))
        return Weighed(loss, keep, source, idx, labels, weights, risk)

    def commit(self, weighed: Weighed, group: ProcessGroup, steps: int) -> None:
        """The call's samples into the loss trace, the class moments and the stats."""
        if weighed.kept.numel() > 0 or group.collective:
            self.risk_scores.commit(weighed.kept, weighed.idx, weighed.labels, group)
        self.pending.path = "weighting"
        self.recorder.record(weighed.weights, weighed.risk, None, int((~weighed.keep).sum()), steps)

    def check_grads(self) -> None:
        """Non-finite `.grad` after weighted_loss: NonFiniteError before the update ("error"), or the
        step's gradient dropped ("skip")."""
        params = [p for _, p in checks.trainable(self.module, None)]
        if grads_finite(params):
            return
        if self.policy.mode == "error":
            raise NonFiniteError("the gradient of dm.weighted_loss has non-finite values although the losses are "
                                 "finite; the optimizer step was not taken (nonfinite='skip' drops such a step)")
        for p in params:
            p.grad = None

    def _backward_finite(self, loss: torch.Tensor) -> bool:
        """loss.backward(), then the check of the gradient: non-finite entries restore `.grad` as it was and
        raise NonFiniteError (nonfinite="error") or return False ("skip"); the same on every rank under DDP."""
        params = [p for _, p in checks.trainable(self.module, None)]
        before = [None if p.grad is None else p.grad.clone() for p in params]
        with OpacusEngine.quiet() if self.opacus is not None else contextlib.nullcontext():
            loss.backward()
        if self.opacus is not None:
            for p in self.module.parameters():  # the hooks ran; the weighting path does not use them
                p.grad_sample = None
        if grads_finite(params):
            return True
        for p, grad in zip(params, before):
            p.grad = grad
        if self.policy.mode == "error":
            raise NonFiniteError("dm.backward: the gradient of the weighted loss has non-finite values although "
                                 "the losses are finite; .grad and the loss trace are unchanged "
                                 "(nonfinite='skip' drops such a batch)")
        return False

"""The per-sample path's sums: Σ w_i·c_i·g_i of each backward call (in chunks of bounded memory),
pending until the optimizer step, which adds the noise once, divides by D and writes `.grad`."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from demem_ext.config import DeMemConfig
from demem_ext.grad_sample import LossModule, check_loss_shape, flat_dtype
from demem_ext.middleware.noise import NoiseSource
from demem_ext.middleware.nonfinite import NonFinitePolicy
from demem_ext.middleware.process_group import ProcessGroup
from demem_ext.middleware.risk_scores import RiskScores
from demem_ext.ops import FusedResult, NonFiniteError, fused_step
from demem_ext.ops.rule import accumulation_dtype

# Default chunks of the torch.func engine: a quarter of the batch (at least CHUNK_MIN_ROWS rows), so that
# the per-sample gradients held at once stay well below one [B, P] matrix, and at most
# CHUNK_BUDGET_BYTES of them (chunk·P·itemsize <= this) for large models.
CHUNK_BUDGET_BYTES = 256 * 2**20
CHUNK_MIN_ROWS = 8
CHUNKS_PER_BATCH = 4

GradsOf = Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def default_chunk_rows(batch_size: int, row_bytes: int) -> int:
    """Rows per chunk when chunk_size is None: ⌈B/4⌉, at least CHUNK_MIN_ROWS, at most the budget."""
    by_budget = max(1, CHUNK_BUDGET_BYTES // max(1, row_bytes))
    return min(by_budget, max(CHUNK_MIN_ROWS, -(-batch_size // CHUNKS_PER_BATCH)))


class BatchSum(NamedTuple):
    """One backward_per_sample call: Σ w_i·c_i·g_i over the kept samples (None if none is kept)."""

    total: Optional[torch.Tensor]  # [P]
    parts: list[FusedResult]  # one per chunk with kept samples
    keep: torch.Tensor  # bool [B]
    losses: torch.Tensor  # [B], detached
    labels: Optional[torch.Tensor]  # [B] classes (threshold="class")


class BatchSummer:
    """Σ w_i·c_i·g_i of one batch by the fused op (noise and the division by D wait for the step)."""

    def __init__(self, config: DeMemConfig, risk_scores: RiskScores, policy: NonFinitePolicy,
                 group: ProcessGroup) -> None:
        self.sum_config = config.replace(noise_multiplier=0.0, expected_batch_size=1)
        self.risk_scores, self.policy, self.group = risk_scores, policy, group

    def _batch_rule(self, losses: torch.Tensor, idx: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                    fix_tau: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DeMemConfig]:
        """The samples kept (finite losses), their positions, their scores and the rule to sum them with."""
        problem = "loss_fn returned non-finite losses"
        keep = self.group.finite(self.policy, torch.isfinite(losses), problem)
        positions = keep.nonzero().flatten()
        scores, config = self.risk_scores.scores(
            losses[keep], None if idx is None else idx[positions.cpu()],
            None if labels is None else labels[positions.to(labels.device)], self.sum_config, self.group)
        config, _ = self.group.rule_for(config, scores, keep, problem, self.policy, fix_tau)
        return keep, positions, scores, config

    def one_chunk(self, grads_of: GradsOf, batch: Sequence[torch.Tensor],
                  idx: Optional[torch.Tensor], labels: Optional[torch.Tensor]) -> BatchSum:
        """The batch in one chunk: scores are the per-sample losses from grad_and_value; rows with
        non-finite gradients leave the sum (on one process, before τ: the fused op finds it)."""
        grads, losses = grads_of(batch)
        keep, positions, scores, config = self._batch_rule(losses, idx, labels, fix_tau=False)
        if positions.numel() == 0:
            return BatchSum(None, [], keep, losses, labels)
        result, ok = self._sum_finite_rows(grads if bool(keep.all()) else grads[keep], scores, config, positions)
        keep[positions[~ok]] = False
        return BatchSum(None if result is None else result.grad, [] if result is None else [result], keep, losses,
                        labels)

    def chunks(self, loss_module: LossModule, grads_of: GradsOf, batch: Sequence[torch.Tensor],
               idx: Optional[torch.Tensor], labels: Optional[torch.Tensor], rows: int) -> BatchSum:
        """Several chunks: the batch-level threshold comes from one batched forward, then each chunk
        is summed with threshold "fixed" at that τ, which gives every sample its batch-level risk."""
        with torch.no_grad():
            losses = loss_module(*batch)
        check_loss_shape(losses, batch[0].shape[0])
        losses = losses.detach()
        keep, positions, scores, chunk_config = self._batch_rule(losses, idx, labels, fix_tau=True)
        if positions.numel() == 0:
            return BatchSum(None, [], keep, losses, labels)
        total, parts = None, []
        for start in range(0, positions.numel(), rows):
            pos = positions[start:start + rows]
            grads, _ = grads_of([x[pos] for x in batch])
            result, ok = self._sum_finite_rows(grads, scores[start:start + rows], chunk_config, pos)
            keep[pos[~ok]] = False
            if result is not None:
                total = result.grad if total is None else total.add_(result.grad)  # the op's fresh output
                parts.append(result)
        return BatchSum(total, parts, keep, losses, labels)

    def _sum_finite_rows(self, grads: torch.Tensor, scores: torch.Tensor, config: DeMemConfig,
                         positions: torch.Tensor) -> tuple[Optional[FusedResult], torch.Tensor]:
        """The fused sum over the rows of `grads` whose entries are all finite, and the mask of those rows.

        The fused op's norms reveal a non-finite row, so the usual all-finite batch costs no extra pass
        over the per-sample gradients; only when a norm is not finite is every row checked (and the
        rows with non-finite entries dropped, or reported with nonfinite="error").
        """
        try:
            return fused_step(grads, scores, config), torch.ones_like(scores, dtype=torch.bool)
        except NonFiniteError:
            pass
        ok = self.policy.keep(torch.isfinite(grads).all(dim=1), "non-finite per-sample gradients", positions,
                              defer=self.group.collective)
        if not bool(ok.any()):
            return None, ok
        return fused_step(grads[ok], scores[ok], config), ok


class PendingSum:
    """Σ w_i·c_i·g_i and the sample count since the last step, and the path that produced them."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.path: Optional[str] = None  # "weighting" | "per_sample" since the last step
        self.total: Optional[torch.Tensor] = None
        self.count = 0
        self.params: Optional[list[nn.Parameter]] = None
        self.check_grads_at_step = False  # dm.weighted_loss: the caller ran backward, checked at the step

    def check_path(self, path: str) -> None:
        if self.path is not None and self.path != path:
            raise RuntimeError("cannot mix dm.backward and dm.backward_per_sample before one "
                               "optimizer.step(): use one path per step")

    def add(self, batch_sum: BatchSum, params: list[nn.Parameter], idx: Optional[torch.Tensor],
            risk_scores: RiskScores, group: ProcessGroup) -> None:
        """Add one backward call's sum, and commit its samples to the loss trace and the class moments."""
        total, _, keep, losses, labels = batch_sum
        if total is not None:
            self.total = total if self.total is None else self.total.add_(total)
            self.count += int(keep.sum())
        if total is not None or group.collective:  # under torch.distributed every rank takes part
            risk_scores.commit(losses[keep], None if idx is None else idx[keep.cpu()],
                               None if labels is None else labels[keep.to(labels.device)], group)
        self.add_empty(params)

    def add_empty(self, params: list[nn.Parameter]) -> None:
        """A call with no sample (an empty Poisson batch): the step still adds its noise."""
        self.params = params
        self.path = "per_sample"

    def write_grads(self, config: DeMemConfig, noise: NoiseSource, group: ProcessGroup,
                    policy: NonFinitePolicy) -> Optional[int]:
        """.grad <- (Σ w_i·c_i·g_i + σ·C·ξ) / D for every trainable parameter (noise once per step).

        A step without samples is a noise-only step (D = expected_batch_size); without noise it
        leaves `.grad` alone. Returns the number of samples of a noisy step (for the accountant), else None.
        """
        total, count = group.reduce(self.total, self.count, self.params, policy)
        noisy = config.noise_multiplier > 0
        if count == 0 and not noisy:
            return None
        denom = config.expected_batch_size or count
        if not denom:
            raise ValueError("a step without samples (an empty batch) is a noise-only step, which divides by "
                             "expected_batch_size: set it (q·N with Poisson sampling), or pass the "
                             "PoissonBatchSampler as DeMem(..., sampling=sampler)")
        if total is None:
            dtype = accumulation_dtype(flat_dtype(self.params))
            total = torch.zeros(sum(p.numel() for p in self.params), dtype=dtype, device=self.params[0].device)
        if noisy:
            noise.add_to(total, config.noise_std, group)  # total is this step's own sum: updated in place
        grad = total.div_(denom)
        for p, g in zip(self.params, grad.split([p.numel() for p in self.params])):
            new = torch.empty_like(p)
            new.copy_(g.view(p.shape))
            p.grad = new
        return count if noisy else None

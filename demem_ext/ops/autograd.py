"""demem_loss: the DeMem-weighted mean of per-sample losses as an autograd function."""

from __future__ import annotations

from typing import Any, Optional

import torch

from demem_ext.config import DeMemConfig
from demem_ext.ops.functional import NonFiniteError, demem_weights


class _WeightedMean(torch.autograd.Function):
    """forward: Σ_i w_i·ℓ_i / D; backward: grad_out·w_i / D to each ℓ_i (weights are constants)."""

    @staticmethod
    def forward(ctx: Any, losses: torch.Tensor, weights: torch.Tensor, denom: float) -> torch.Tensor:
        scaled = weights.to(losses.dtype) / denom
        ctx.save_for_backward(scaled)
        return (losses * scaled).sum()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (scaled,) = ctx.saved_tensors
        return grad_out * scaled, None, None


def demem_loss(per_sample_losses: torch.Tensor, config: Optional[DeMemConfig] = None,
               scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scalar L = (1/D)·Σ_i w_i·ℓ_i; its backward gives w_i / D to each per-sample loss.

    scores: memorization proxy s_i (default: the detached losses themselves).
    D is config.expected_batch_size or B.
    """
    config = config if config is not None else DeMemConfig()
    if not isinstance(per_sample_losses, torch.Tensor) or per_sample_losses.dim() != 1:
        shape = tuple(per_sample_losses.shape) if isinstance(per_sample_losses, torch.Tensor) else None
        raise ValueError(f"per_sample_losses must be a 1-D tensor [B], got shape {shape}")
    if per_sample_losses.numel() == 0:
        raise ValueError("per_sample_losses is empty (B = 0)")
    if not bool(torch.isfinite(per_sample_losses.detach()).all()):
        raise NonFiniteError("per_sample_losses has non-finite values")
    if scores is None:
        scores = per_sample_losses.detach()
    elif scores.shape != per_sample_losses.shape:
        raise ValueError(f"scores must have shape {tuple(per_sample_losses.shape)}, got {tuple(scores.shape)}")
    weights, _ = demem_weights(scores, config)
    return weighted_mean(per_sample_losses, weights, float(config.expected_batch_size or per_sample_losses.shape[0]))


def weighted_mean(per_sample_losses: torch.Tensor, weights: torch.Tensor, denom: float) -> torch.Tensor:
    """Scalar Σ_i w_i·ℓ_i / D for weights already computed (constants: only ℓ_i is differentiated)."""
    return _WeightedMean.apply(per_sample_losses, weights.detach().to(per_sample_losses.device), denom)

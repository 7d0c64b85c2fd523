"""The parts of the DeMem rule that production code and the reference share: τ, clip factors, dtypes.

Conventions the kernels (csrc/) mirror: τ and the clip factors are computed in float64; outputs are
float64 for float64 input and float32 otherwise (the accumulation dtype).
"""

from __future__ import annotations

from typing import Optional

import torch

CLIP_EPS = 1e-6  # c_i = min(1, C / (‖g_i‖ + CLIP_EPS))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def threshold(scores: torch.Tensor, rule: str, k: float, quantile: float, tau: float) -> float:
    """The risk threshold τ of the rule (docs/design.md, "The rule"), in float64."""
    s = scores.detach().to(torch.float64)
    if rule == "mean":
        std = s.std(correction=0) if s.numel() > 1 else s.new_zeros(())
        return float(s.mean() + k * std)
    if rule == "quantile":
        return float(torch.quantile(s, quantile, interpolation="linear"))
    if rule == "fixed":
        return float(tau)
    raise ValueError(f"threshold must be 'mean', 'quantile' or 'fixed', got {rule!r}")


def clip_factors(norms: torch.Tensor, risk: torch.Tensor, max_grad_norm: Optional[float],
                 clip_scope: str) -> torch.Tensor:
    """c_i in float64: min(1, C/(n_i + ε)), only for the high-risk share with clip_scope="high_risk"."""
    if max_grad_norm is None:
        return torch.ones_like(norms, dtype=torch.float64)
    clip = torch.clamp(max_grad_norm / (norms.to(torch.float64) + CLIP_EPS), max=1.0)
    if clip_scope == "high_risk":
        r = risk.to(torch.float64)
        clip = 1.0 - r + r * clip
    return clip

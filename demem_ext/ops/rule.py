"""The parts of the DeMem rule that production code and the reference share: τ, clip factors, dtypes.

Conventions the kernels (csrc/) mirror: τ and the clip factors are computed in float64; outputs are
float64 for float64 input and float32 otherwise (the accumulation dtype).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

CLIP_EPS = 1e-6  # c_i = min(1, C / (‖g_i‖ + CLIP_EPS))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def moment_scale(s: torch.Tensor) -> float:
    """The power of two 2^e with max|s| < 2^e: mean and std of s/2^e cannot overflow, and scaling by a power of
    two changes no rounding, so τ = 2^e·τ(s/2^e) equals the unscaled τ wherever that one is finite."""
    top = float(s.abs().max()) if s.numel() else 0.0
    return math.ldexp(1.0, math.frexp(top)[1]) if 0.0 < top < math.inf else 1.0


def threshold(scores: torch.Tensor, rule: str, k: float, quantile: float, tau: float) -> float:
    """The risk threshold τ of the rule (docs/design.md, "The rule"), in float64."""
    s = scores.detach().to(torch.float64)
    if rule == "mean":
        scale = moment_scale(s)
        s = s / scale
        std = s.std(correction=0) if s.numel() > 1 else s.new_zeros(())
        return float(s.mean() + k * std) * scale
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

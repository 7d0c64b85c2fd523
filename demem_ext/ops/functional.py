"""The public functional API: validated entry points to `torch.ops.demem.*` (docs/design.md, "The API")."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from demem_ext.config import DeMemConfig
from demem_ext.ops.loader import to_signed64

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_OFFSET = 1 << 62


class FusedResult(NamedTuple):
    """Output of `fused_step`: the update and the per-sample quantities behind it."""

    grad: torch.Tensor  # [P]
    weights: torch.Tensor  # [B] w_i
    risk: torch.Tensor  # [B] r_i
    norms: torch.Tensor  # [B] ‖g_i‖₂
    coeff: torch.Tensor  # [B] w_i·c_i


class NonFiniteError(ValueError):
    """Non-finite losses or gradients (a ValueError, so callers that catch bad input still do)."""


def _check_scores(scores: torch.Tensor, name: str = "scores") -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty (B = 0)")
    if scores.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor, got {scores.dtype}")
    if not bool(torch.isfinite(scores).all()):
        bad = torch.nonzero(~torch.isfinite(scores)).flatten()[:8].tolist()
        raise NonFiniteError(f"{name} has non-finite values at indices {bad}")


def _check_config(config: DeMemConfig) -> None:
    if not isinstance(config, DeMemConfig):
        raise TypeError(f"config must be a DeMemConfig, got {type(config).__name__}")


def _check_seed_offset(seed: int, offset: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < (1 << 64):
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
        raise ValueError(f"offset must be an int in [0, 2**62], got {offset!r}")


def _rule(config: DeMemConfig) -> tuple:
    if config.threshold == "class":
        raise ValueError("threshold='class' needs the labels and the running per-class moments that a DeMem block "
                         "holds (DeMem(..., num_classes=C), labels=y); with the functional ops pass the margins "
                         "s_i - tau_{y_i} as scores with threshold='fixed', tau=0")
    return (config.lam, config.selection, config.threshold, config.k, config.quantile, config.tau,
            config.temperature)


def demem_weights(scores: torch.Tensor, config: DeMemConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """De-memorization weights w_i = 1 − λ·r_i and risks r_i for memorization scores [B]."""
    _check_config(config)
    _check_scores(scores)
    return torch.ops.demem.weights(scores.detach(), *_rule(config))


def philox_normal(n: int, seed: int, offset: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n standard normals from Philox4x32-10 (same stream on CPU, CUDA and the reference).

    Element j uses counter offset + j//4; advance offset by ceil(n/4) per draw.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    _check_seed_offset(seed, offset)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    device = torch.device(device)
    return torch.ops.demem.philox_normal(n, to_signed64(seed), offset, device).to(dtype)


def fused_step(per_sample_grads: torch.Tensor, scores: torch.Tensor, config: DeMemConfig,
               seed: int = 0, offset: int = 0, weights: Optional[torch.Tensor] = None) -> FusedResult:
    """The DeMem update over per-sample gradients [B, P]: (Σ w_i·c_i·g_i + σ·C·ξ) / D.

    `weights`, if given, replaces the w_i computed from `scores` (the risk still comes from them).
    Raises ValueError naming the argument on bad shapes, dtypes, devices or non-finite values.
    """
    _check_config(config)
    g = per_sample_grads
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"per_sample_grads must be a torch.Tensor, got {type(g).__name__}")
    if g.dim() != 2:
        raise ValueError(f"per_sample_grads must be 2-D [B, P], got shape {tuple(g.shape)}")
    if g.shape[0] == 0:
        raise ValueError("per_sample_grads is empty (B = 0)")
    if g.dtype not in FLOAT_DTYPES:
        raise ValueError(f"per_sample_grads must be float16/bfloat16/float32/float64, got {g.dtype}")
    _check_scores(scores)
    if scores.shape[0] != g.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} entries but per_sample_grads has B = {g.shape[0]} rows")
    if scores.device != g.device:
        raise ValueError(f"scores is on {scores.device} but per_sample_grads is on {g.device}")
    if weights is not None:
        _check_scores(weights, "weights")
        if weights.shape != scores.shape or weights.device != g.device:
            raise ValueError(f"weights must have shape {tuple(scores.shape)} on {g.device}, "
                             f"got {tuple(weights.shape)} on {weights.device}")
        weights = weights.detach()
    _check_seed_offset(seed, offset)
    g = g.detach().contiguous()
    denom = float(config.expected_batch_size or g.shape[0])

    def run(grads: torch.Tensor, scale: float) -> FusedResult:
        """The op on grads = scale·g, with C (or σ without clipping) scaled alike: the same update, ×scale."""
        clip = None if config.max_grad_norm is None else config.max_grad_norm * scale
        sigma = config.noise_multiplier * (scale if clip is None else 1.0)
        return FusedResult(*torch.ops.demem.fused_step(
            grads, scores.detach(), weights, *_rule(config), clip, sigma, config.clip_scope, denom,
            to_signed64(seed), offset))

    result = run(g, 1.0)
    if bool(torch.isfinite(result.norms).all()) and bool(torch.isfinite(result.grad).all()):
        return result
    finite_rows = torch.isfinite(g).all(dim=1)
    if not bool(finite_rows.all()):
        bad = torch.nonzero(~finite_rows).flatten()[:8].tolist()
        raise NonFiniteError(f"per_sample_grads has non-finite values in rows {bad}")
    return _rescaled(g, run)


def _rescaled(g: torch.Tensor, run: Callable[[torch.Tensor, float], FusedResult]) -> FusedResult:
    """The update of finite gradients whose squared norms or sum overflow: computed on g·2^-e (max|g·2^-e| < 1,
    exact), then scaled back; a result outside the dtype's range is an error, never a silent inf."""
    exponent = math.frexp(float(g.abs().max()))[1]
    scale = math.ldexp(1.0, -exponent)
    small = run(g * scale, scale)
    result = small._replace(grad=small.grad / scale, norms=small.norms / scale)
    for name in ("grad", "norms"):
        value = getattr(result, name)
        if not bool(torch.isfinite(value).all()):
            what = "the update" if name == "grad" else "a per-sample gradient norm"
            raise ValueError(f"per_sample_grads: {what} exceeds the range of {value.dtype} (largest entry "
                             f"{float(g.abs().max()):.3g}); scale the loss down or use float64 gradients")
    return result

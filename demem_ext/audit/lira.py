"""The likelihood-ratio attack LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles").

The attack statistic is the logit-scaled confidence phi = log(p_y / (1 - p_y)) of the true class, which
is close to Gaussian across retrained models. For each example, Gaussians are fitted to the statistics
of shadow models that trained on it (IN) and that did not (OUT); a target model's statistic is scored
against them. Every score is "higher = more likely member".

Estimates and fallbacks (per side, IN or OUT, and per query):
- mean: the sample mean of the example's shadow statistics. An example with no model on one side gets
  the other side's mean shifted by the average IN - OUT gap over the examples that have both (0 if none).
- std: the example's own sample std (ddof = 1) when it has >= 2 models on that side and a non-zero spread;
  otherwise, and for every example with `fixed_variance=True`, the side's pooled within-example std
  (sum of squared deviations from each example's mean over the pooled degrees of freedom); if that side
  has no degrees of freedom, the other side's pooled std; if neither has, the std of all shadow
  statistics; never below 1e-12. Scores are therefore finite for any finite input with M >= 1 shadow.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from demem_ext.audit.metric_attacks import as_logits_labels

_MIN_STD = 1e-12

Array = torch.Tensor | np.ndarray


def logit_confidence(logits: Array, labels: Array) -> torch.Tensor:
    """phi = log(p_y / (1 - p_y)) = z_y - logsumexp_{k != y} z_k in float64, for logits [..., K].

    Labels broadcast against logits.shape[:-1] (logits [M, N, K] take labels [N]); no softmax is formed,
    so phi stays finite for huge logits. NaN/inf logits raise ValueError.
    """
    logits, labels = as_logits_labels(logits, labels)
    is_label = torch.nn.functional.one_hot(labels, logits.shape[-1]).bool()
    z_y = logits[is_label].reshape(labels.shape)
    return z_y - torch.logsumexp(logits.masked_fill(is_label, -math.inf), dim=-1)


def _as_stats(x: Array, name: str, device: torch.device | None = None) -> torch.Tensor:
    x = torch.as_tensor(x, device=device)
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {x.dtype}")
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _as_mask(x: Array, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(x, device=device)
    if x.dtype != torch.bool:
        raise ValueError(f"{name} must be a boolean membership mask, got dtype {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (models x examples), got {tuple(x.shape)}")
    return x


def _std_all(stats: torch.Tensor) -> torch.Tensor:
    return stats.std(correction=0) if stats.numel() else stats.new_zeros(())


def _fit(shadow: torch.Tensor, member: torch.Tensor, fixed_variance: bool) -> dict[str, torch.Tensor]:
    """Means and stds [N, A] of the IN and OUT shadow statistics (module docstring: estimates, fallbacks)."""
    fit: dict[str, torch.Tensor] = {}
    pooled: dict[str, torch.Tensor] = {}
    for side, mask in (("in", member), ("out", ~member)):
        w = mask.unsqueeze(-1).to(shadow.dtype)                      # [M, N, 1]
        count = w.sum(0)                                              # [N, 1]
        mean = (w * shadow).sum(0) / count.clamp_min(1)               # [N, A]
        sq = (w * (shadow - mean) ** 2).sum(0)                        # [N, A]
        df = (count - 1).clamp_min(0).expand_as(sq)
        own = (sq / df.clamp_min(1)).sqrt()
        fit[side + "_count"], fit[side + "_mean"] = count.expand_as(mean), mean
        fit[side + "_std"] = torch.where((count >= 2) & (own > _MIN_STD), own, math.nan)
        pooled[side] = (sq.sum() / df.sum()).sqrt() if df.sum() > 0 else shadow.new_tensor(math.nan)
    fallback = _std_all(shadow)
    for side, other in (("in", "out"), ("out", "in")):
        global_std = pooled[side]
        for candidate in (pooled[other], fallback):
            usable = torch.isfinite(global_std) & (global_std > _MIN_STD)
            global_std = torch.where(usable, global_std, candidate)
        global_std = global_std.clamp_min(_MIN_STD)
        own = fit[side + "_std"]
        usable = ~own.isnan() & (not fixed_variance)
        fit[side + "_std"] = torch.where(usable, own, global_std)
    both = (fit["in_count"] > 0) & (fit["out_count"] > 0)
    gap = (fit["in_mean"] - fit["out_mean"])[both].mean() if bool(both.any()) else shadow.new_zeros(())
    fit["in_mean"] = torch.where(fit["in_count"] > 0, fit["in_mean"], fit["out_mean"] + gap)
    fit["out_mean"] = torch.where(fit["out_count"] > 0, fit["out_mean"], fit["in_mean"] - gap)
    return fit


def _log_normal(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std) up to the constant -log(2 pi)/2, which cancels in a likelihood ratio."""
    return -0.5 * ((x - mean) / std) ** 2 - std.log()


def score(target_stats: Array, shadow_stats: Array, shadow_in: Array, online: bool = True,
          fixed_variance: bool = False) -> torch.Tensor:
    """LiRA membership scores [N] of a target model (higher = more likely member), float64.

    target_stats [N] (or [N, A] for A queries per example), shadow_stats [M, N] (or [M, N, A]),
    shadow_in [M, N] bool: whether shadow model m trained on example n.
    online: log N(t; mu_in, s_in) - log N(t; mu_out, s_out).
    offline: log P[Z <= t] with Z ~ N(mu_out, s_out) (one-sided: a more confident target scores higher).
    With A queries the per-query scores are averaged. fixed_variance: one global std per side.
    """
    target = _as_stats(target_stats, "target_stats")
    shadow = _as_stats(shadow_stats, "shadow_stats", target.device)
    if target.dim() not in (1, 2):
        raise ValueError(f"target_stats must have shape [N] or [N, A], got {tuple(target.shape)}")
    if shadow.dim() != target.dim() + 1 or shadow.shape[1:] != target.shape:
        raise ValueError(f"shadow_stats must have shape [M, {', '.join(map(str, target.shape))}] to match "
                         f"target_stats {tuple(target.shape)}, got {tuple(shadow.shape)}")
    if shadow.shape[0] < 1:
        raise ValueError("shadow_stats must hold at least one shadow model (M >= 1)")
    member = _as_mask(shadow_in, "shadow_in", shadow.shape[:2], target.device)
    if target.dim() == 1:
        target, shadow = target.unsqueeze(-1), shadow.unsqueeze(-1)
    fit = _fit(shadow, member, fixed_variance)
    if online:
        per_query = (_log_normal(target, fit["in_mean"], fit["in_std"])
                     - _log_normal(target, fit["out_mean"], fit["out_std"]))
    else:
        per_query = torch.special.log_ndtr((target - fit["out_mean"]) / fit["out_std"])
    return per_query.mean(-1)


def leave_one_out(stats: Array, keep: Array, online: bool = True,
                  fixed_variance: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """LiRA with each of M models in turn as the target and the other M - 1 as its shadows.

    stats [M, N] (or [M, N, A]), keep [M, N] bool. Returns (scores [M, N] float64, labels = keep [M, N]),
    ready for a ROC over all (model, example) pairs.
    """
    stats = _as_stats(stats, "stats")
    if stats.dim() not in (2, 3):
        raise ValueError(f"stats must have shape [M, N] or [M, N, A], got {tuple(stats.shape)}")
    if stats.shape[0] < 2:
        raise ValueError(f"leave-one-out needs M >= 2 models in stats, got {stats.shape[0]}")
    keep = _as_mask(keep, "keep", stats.shape[:2], stats.device)
    models = torch.arange(stats.shape[0], device=stats.device)
    scores = torch.stack([score(stats[m], stats[models != m], keep[models != m], online, fixed_variance)
                          for m in range(stats.shape[0])])
    return scores, keep.clone()

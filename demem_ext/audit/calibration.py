"""Checks that the audit is calibrated and has power.

- Null check: the same models scored against inclusion masks they never trained on (independent
  mask seeds). Membership is then independent of every statistic, so each attack should give TPR ~ FPR.
  The M (model, sample) pairs of one sample are not independent (leave-one-out LiRA scores each pair
  with the labels of the sample's other pairs), so one draw spreads wider than a binomial; `null_check`
  therefore averages TPR over several fake-mask seeds and requires the mean to lie in the binomial 99%
  interval of one draw, Binomial(members, FPR) / members. It also reports each draw and a t-interval
  of the mean across draws.
- Known answer: K canaries (population samples with a wrong, random label) are the most memorized
  samples there can be. `canary_power` is the TPR over canary (model, sample) member pairs at the
  threshold whose FPR on the ordinary non-member pairs is `fpr`. Canaries are a power check only:
  the population figures of an audit leave them out.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import stats as scipy_stats

from demem_ext.audit import metrics
from demem_ext.audit.attacks import FPRS, run_attacks
from demem_ext.audit.shadow import inclusion_masks

NULL_LEVEL = 0.99


def binomial_interval(num_members: int, fpr: float, level: float = NULL_LEVEL) -> tuple[float, float]:
    """The central `level` interval of Binomial(num_members, fpr) / num_members: where TPR lies at chance."""
    if num_members < 1:
        raise ValueError(f"num_members must be >= 1, got {num_members}")
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr!r}")
    low, high = scipy_stats.binom.interval(level, num_members, fpr)
    return float(low) / num_members, float(high) / num_members


def null_check(stats: Mapping[str, Any], seeds: Sequence[int], fprs: Sequence[float] = FPRS) -> dict[str, Any]:
    """Every attack on `stats` with keep replaced by independent masks inclusion_masks(M, N, seed), per seed.

    Returns {"seeds", "level", "num_members", "passed", "attacks": {name: {"tpr_at_fpr_<f>" (mean over
    seeds), "draws_<f>", "binomial_<f>" (99% interval of one draw), "t_interval_<f>", "within_<f>"}}}.
    """
    keep = stats["keep"]
    if len(seeds) < 2:
        raise ValueError(f"seeds must hold at least two fake-mask seeds, got {list(seeds)}")
    draws: dict[str, list[list[float]]] = {}
    members = []
    for seed in seeds:
        fake = inclusion_masks(keep.shape[0], keep.shape[1], seed)
        if torch.equal(fake, keep):
            raise ValueError(f"seed {seed} draws the audit's own inclusion masks; choose other seeds")
        members.append(int(fake.sum()))
        for name, (scores, is_member) in run_attacks({**stats, "keep": fake}).items():
            fpr_curve, tpr_curve, _ = metrics.roc(scores, is_member)
            draws.setdefault(name, []).append([float(tpr_curve[np.where(fpr_curve <= f)[0][-1]]) for f in fprs])
    n = int(np.mean(members))
    t = scipy_stats.t.ppf((1 + NULL_LEVEL) / 2, len(seeds) - 1)
    out: dict[str, Any] = {"seeds": list(seeds), "level": NULL_LEVEL, "num_members": n, "attacks": {}}
    for name, values in draws.items():
        v = np.asarray(values)  # [seeds, fprs]
        row: dict[str, Any] = {}
        for k, f in enumerate(fprs):
            mean, half = float(v[:, k].mean()), float(t * v[:, k].std(ddof=1) / np.sqrt(len(seeds)))
            low, high = binomial_interval(n, f)
            row.update({f"tpr_at_fpr_{f:g}": mean, f"draws_{f:g}": v[:, k].tolist(),
                        f"binomial_{f:g}": [low, high], f"t_interval_{f:g}": [mean - half, mean + half],
                        f"within_{f:g}": low <= mean <= high})
        out["attacks"][name] = row
    out["passed"] = all(r[f"within_{f:g}"] for r in out["attacks"].values() for f in fprs)
    return out


def inject_canaries(labels: torch.Tensor, num_canaries: int, num_classes: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels with `num_canaries` random samples given another random class, the canaries' indices sorted)."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)}, {labels.dtype}")
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or not 1 <= num_canaries <= len(labels):
        raise ValueError(f"num_canaries must be an int in [1, {len(labels)}], got {num_canaries!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(labels), generator=generator)[:num_canaries].sort().values
    shift = torch.randint(1, num_classes, (num_canaries,), generator=generator)
    out = labels.clone().to(torch.int64)
    out[index] = (out[index] + shift) % num_classes
    return out, index


def canary_power(scores: torch.Tensor, is_member: torch.Tensor, canaries: torch.Tensor,
                 fprs: Sequence[float] = FPRS) -> dict[str, Any]:
    """TPR over canary member pairs at thresholds set on the ordinary (non-canary) non-member pairs."""
    scores, is_member = torch.as_tensor(scores), torch.as_tensor(is_member)
    is_canary = torch.zeros(scores.shape[1], dtype=torch.bool)
    is_canary[torch.as_tensor(canaries)] = True
    is_canary = is_canary.expand_as(is_member)
    positives, negatives = is_member & is_canary, ~is_member & ~is_canary
    if not bool(positives.any()):
        raise ValueError("no canary is a member of any model: more canaries or models are needed")
    s = torch.cat([scores[positives], scores[negatives]])
    y = torch.cat([torch.ones(int(positives.sum()), dtype=torch.bool), torch.zeros(int(negatives.sum()), dtype=torch.bool)])
    summary = metrics.summary(s, y, fprs)
    return {"num_canaries": int(torch.as_tensor(canaries).numel()), "num_canary_members": int(positives.sum()),
            **{k: v for k, v in summary.items() if k.startswith("tpr_at_fpr_") or k == "auc"},
            **{f"times_chance_{f:g}": summary[f"tpr_at_fpr_{f:g}"] / f for f in fprs}}

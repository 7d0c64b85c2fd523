"""Screening of memorization proxies: how well each proxy, computed from the shadow models' own training
losses, ranks the population by its vulnerability to the primary attack (no extra training).

A proxy is what DeMem could see while training: for a model, a sample's loss record over the epochs in
which it was a member. Each proxy gives a value per (model, member sample); a sample's proxy is the mean
over the models it trained. Its vulnerability is the primary attack's mean score over the models it
trained minus the mean over the models it did not (the membership signal the attack extracts). A good
proxy puts the vulnerable samples on top: Spearman ρ against the vulnerability, and the precision at
the top 5% (the share of the proxy's top 5% that is in the vulnerability's top 5%; chance: 5%).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import spearmanr

TOP_FRACTION = 0.05
HIGH_RISK_Z = 1.0  # DeMem's default hard rule: a sample is high-risk above mean + 1·std
TRACE_DECAY = 0.9  # DeMemConfig.trace_decay's default


def _z(values: torch.Tensor) -> torch.Tensor:
    """z-scores over the members (NaN elsewhere) along the last dimension."""
    mean = torch.nanmean(values, dim=-1, keepdim=True)
    std = torch.sqrt(torch.nanmean((values - mean) ** 2, dim=-1, keepdim=True))
    return (values - mean) / std.clamp_min(1e-12)


def _flagged(z: torch.Tensor) -> torch.Tensor:
    """Fraction of epochs in which a member is high-risk under the hard rule, [M, N] (NaN for non-members)."""
    flags = torch.where(torch.isnan(z), torch.nan, (z > HIGH_RISK_Z).double())
    return torch.nanmean(flags, dim=1)


def _ema(values: torch.Tensor) -> torch.Tensor:
    """The loss trace over epochs (dimension 1): EMA with DeMem's default decay, started at the first value."""
    out = values.clone()
    for e in range(1, values.shape[1]):
        out[:, e] = TRACE_DECAY * out[:, e - 1] + (1 - TRACE_DECAY) * values[:, e]
    return out


def _class_z(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z-scores within each class (a class-relative threshold)."""
    z = torch.full_like(values, torch.nan)
    for c in labels.unique():
        columns = labels == c
        z[..., columns] = _z(values[..., columns])
    return z


def proxies(record: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: proxy [M, N]} from the training-loss record [M, E, N, 2] (adversarial, natural; NaN for OUT)."""
    record = record.double()
    adversarial, natural = record[..., 0], record[..., 1]
    q75, q25 = (torch.nanquantile(adversarial, q, dim=1) for q in (0.75, 0.25))
    table: dict[str, Callable[[], torch.Tensor]] = {
        "loss (share of epochs high-risk)": lambda: _flagged(_z(adversarial)),
        "loss (mean z-score)": lambda: torch.nanmean(_z(adversarial), dim=1),
        "EMA loss trace (share of epochs high-risk)": lambda: _flagged(_z(_ema(adversarial))),
        "loss-trace IQR (LT-IQR)": lambda: q75 - q25,
        "natural loss (share of epochs high-risk)": lambda: _flagged(_z(natural)),
        "class-relative loss (share of epochs high-risk)": lambda: _flagged(_class_z(adversarial, labels)),
    }
    return {name: make() for name, make in table.items()}


def vulnerability(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per sample: mean attack score over the models it trained minus over the others, [N] (NaN if either is empty)."""
    scores = scores.double()
    inside = torch.where(keep, scores, torch.nan).nanmean(dim=0)
    outside = torch.where(~keep, scores, torch.nan).nanmean(dim=0)
    return inside - outside


def _top(values: np.ndarray, count: int) -> set[int]:
    return set(np.argsort(-values, kind="stable")[:count].tolist())


def screen(record: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, scores: torch.Tensor,
           columns: torch.Tensor) -> dict[str, Any]:
    """Spearman ρ and precision at the top 5% of every proxy against the vulnerability (over `columns`)."""
    vuln = vulnerability(scores, keep)
    out: dict[str, Any] = {"top_fraction": TOP_FRACTION, "chance_precision": TOP_FRACTION, "proxies": {}}
    for name, per_model in proxies(record, labels).items():
        proxy = torch.where(keep, per_model, torch.nan).nanmean(dim=0)
        valid = (columns & torch.isfinite(proxy) & torch.isfinite(vuln)).numpy()
        p, v = proxy.numpy()[valid], vuln.numpy()[valid]
        count = max(1, int(round(TOP_FRACTION * len(v))))
        rho = float(spearmanr(p, v).statistic)
        precision = len(_top(p, count) & _top(v, count)) / count
        out["proxies"][name] = {"spearman_rho": rho, "precision_at_top": precision, "num_samples": int(valid.sum())}
    return out


def format_screening(screening: dict[str, Any]) -> list[str]:
    """Lines of a table: one per proxy."""
    top = 100 * screening["top_fraction"]
    lines = [f"{'memorization proxy (vs primary-attack vulnerability)':<56} {'Spearman ρ':>10} "
             f"{f'prec@{top:g}%':>9}"]
    for name, s in screening["proxies"].items():
        lines.append(f"{name:<56} {s['spearman_rho']:>10.3f} {100 * s['precision_at_top']:>8.1f}%")
    lines.append(f"(precision by chance: {top:g}%)")
    return lines

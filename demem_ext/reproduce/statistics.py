"""Uncertainty of the reproduction's privacy numbers (the primary attack's TPR at 0.1% and 1% FPR).

- Within one replicate: a bootstrap over the population samples (all M pairs of a sample kept
  together) of each row's TPR and, paired on the same resamples, of its change from the family's
  baseline (PGD-AT or TRADES). It covers the sampling of the audited samples, not training randomness.
- Across R replicates (independent inclusion-mask seeds): per replicate the paired change against the
  family baseline, then the mean with a 95% t-interval over the R replicates; and, since a t-interval
  over two or three replicates is too wide to decide anything, the change of the mean TPR with a paired
  bootstrap over samples pooled over the replicates (each replicate resampled on its own).

A relative change is undefined (None) when the baseline's TPR is 0 (0/0 or x/0); the difference in
points is always defined.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from scipy import stats as scipy_stats

from demem_ext.audit import metrics
from demem_ext.reproduce.configs import FAMILY_BASELINE

BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 200, 0
FPRS = (0.001, 0.01)


def relative_change(value: float, base: float) -> Optional[float]:
    """value / base - 1, or None when base is 0 (undefined, including 0/0)."""
    return None if base <= 0 else value / base - 1


def _percentiles(x: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(x, [2.5, 97.5])]


def add_bootstrap(rows: Sequence[dict[str, Any]], pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> None:
    """Adds to each row with scores in `pairs` (slug -> primary attack scores, is_member):
    primary["tpr_at_fpr_<f>_ci95"] and vs_baseline[<f>] = {baseline, difference, difference_ci95,
    relative, relative_ci95} (relative None where undefined: a resample with a zero baseline TPR)."""
    if not pairs:
        return
    slugs = list(pairs)
    by_slug = {r["slug"]: r for r in rows}
    for f in FPRS:
        draws = metrics.bootstrap_tpr_at_fpr([pairs[s] for s in slugs], f, resamples=resamples, seed=seed)
        column = {s: draws[:, k] for k, s in enumerate(slugs)}
        key = f"tpr_at_fpr_{f:g}"
        for s in slugs:
            r = by_slug[s]
            r["primary"][key + "_ci95"] = _percentiles(column[s])
            base = FAMILY_BASELINE[r["family"]]
            if base == s or base not in column:
                continue
            mine, theirs = column[s], column[base]
            point, base_point = r["primary"][key], by_slug[base]["primary"][key]
            defined = theirs > 0
            r.setdefault("vs_baseline", {"baseline": base})[f"{f:g}"] = {
                "difference": point - base_point, "difference_ci95": _percentiles(mine - theirs),
                "relative": relative_change(point, base_point),
                "relative_ci95": (_percentiles(mine[defined] / theirs[defined] - 1)
                                  if defined.mean() >= 0.975 and base_point > 0 else None)}


def t_interval(values: Sequence[float], level: float = 0.95) -> Optional[list[float]]:
    """The `level` t-interval of the mean of the values (None for fewer than two)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return None
    half = scipy_stats.t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return [float(v.mean() - half), float(v.mean() + half)]


Pair = tuple[torch.Tensor, torch.Tensor]  # the primary attack's (scores [M, N], is_member [M, N])


def pooled_change(replicates: Sequence[tuple[Pair, Pair]], points: Sequence[tuple[float, float]], fpr: float,
                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """The change of the mean TPR at `fpr` over replicates from the baseline's, with a paired bootstrap:
    each replicate's samples are resampled on their own (its configuration and baseline on the same
    resamples), and the resampled TPRs are averaged over replicates. replicates: (configuration, baseline)
    pairs; points: their (TPR, baseline TPR) on all samples."""
    draws = [metrics.bootstrap_tpr_at_fpr([mine, base], fpr, resamples=resamples, seed=seed + r)
             for r, (mine, base) in enumerate(replicates)]
    mine, theirs = np.mean([d[:, 0] for d in draws], axis=0), np.mean([d[:, 1] for d in draws], axis=0)
    point, base_point = float(np.mean([p for p, _ in points])), float(np.mean([b for _, b in points]))
    defined = theirs > 0
    return {"difference": point - base_point, "difference_ci95": _percentiles(mine - theirs),
            "relative": relative_change(point, base_point),
            "relative_ci95": (_percentiles(mine[defined] / theirs[defined] - 1)
                              if defined.mean() >= 0.975 and base_point > 0 else None)}


def replicate_table(summaries: Mapping[int, Mapping[str, Any]],
                    pairs: Optional[Mapping[int, Mapping[str, Pair]]] = None) -> list[dict[str, Any]]:
    """Per configuration present (status ok) in every replicate (keep seed -> summary): the primary
    attack's TPR at each FPR and its paired change from the family baseline per replicate, with the
    mean and the 95% t-interval over replicates. pairs (keep seed -> slug -> primary scores): also the
    pooled paired bootstrap of the change (`pooled_change`)."""
    seeds = list(summaries)
    rows = {s: {r["slug"]: r for r in summaries[s]["rows"] if r["status"] == "ok"} for s in seeds}
    common = [slug for slug in rows[seeds[0]] if all(slug in rows[s] for s in seeds)]
    out = []
    for slug in common:
        first = rows[seeds[0]][slug]
        entry: dict[str, Any] = {"slug": slug, "name": first["name"], "family": first["family"],
                                 "seeds": seeds, "attack": first["primary"]["attack"]}
        base = FAMILY_BASELINE[first["family"]]
        for f in FPRS:
            key = f"tpr_at_fpr_{f:g}"
            values = [rows[s][slug]["primary"][key] for s in seeds]
            cell: dict[str, Any] = {"values": values, "mean": float(np.mean(values)), "ci95": t_interval(values)}
            if base != slug and base in common:
                bases = [rows[s][base]["primary"][key] for s in seeds]
                diffs = [v - b for v, b in zip(values, bases)]
                rel = [relative_change(v, b) for v, b in zip(values, bases)]
                cell["difference"] = {"values": diffs, "mean": float(np.mean(diffs)), "ci95": t_interval(diffs)}
                cell["relative"] = ({"values": rel, "mean": float(np.mean(rel)), "ci95": t_interval(rel)}
                                    if None not in rel else None)
                if pairs is not None and all(slug in pairs[s] and base in pairs[s] for s in seeds):
                    cell["pooled"] = pooled_change([(pairs[s][slug], pairs[s][base]) for s in seeds],
                                                   list(zip(values, bases)), f)
            entry[f"{f:g}"] = cell
        out.append(entry)
    return out

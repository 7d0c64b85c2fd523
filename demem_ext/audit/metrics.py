"""ROC evaluation of membership-inference scores (higher score = predicted member): AUC, TPR at low FPR,
balanced accuracy, JSON-friendly summaries and log-log ROC plots."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from sklearn import metrics as skm

Array = torch.Tensor | np.ndarray | Sequence[float]


def _numpy(x: Array) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()  # numpy has no bfloat16
    return np.asarray(x)


def _prepare(scores: Array, is_member: Array) -> tuple[np.ndarray, np.ndarray]:
    """Validated flat float64 scores and bool labels."""
    s, y = _numpy(scores), _numpy(is_member)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and is_member {y.shape} must have the same shape")
    if not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64).ravel()
    if np.isnan(s).any() or np.isinf(s).any():
        raise ValueError("scores contain NaN or inf")
    if y.dtype != np.bool_:
        if not (np.issubdtype(y.dtype, np.number) and np.isin(y, (0, 1)).all()):
            raise ValueError("is_member must be boolean (or 0/1)")
        y = y.astype(bool)
    y = y.ravel()
    if y.all() or not y.any():
        raise ValueError(f"is_member must contain both members and non-members, got {int(y.sum())} "
                         f"members out of {y.size}")
    return s, y


def _roc(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, float(skm.auc(fpr, tpr))


def roc(scores: Array, is_member: Array) -> tuple[np.ndarray, np.ndarray, float]:
    """(fpr, tpr, auc) over all thresholds of the flattened scores (sklearn, no points dropped)."""
    return _roc(*_prepare(scores, is_member))


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    if not 0 <= target <= 1:
        raise ValueError(f"fpr must be in [0, 1], got {target!r}")
    return float(tpr[np.where(fpr <= target)[0][-1]])


def _balanced_accuracy(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.max(1 - (fpr + (1 - tpr)) / 2))


def tpr_at_fpr(scores: Array, is_member: Array, fpr: float) -> float:
    """The highest TPR over thresholds whose FPR is <= `fpr` (the LiRA convention)."""
    curve_fpr, curve_tpr, _ = roc(scores, is_member)
    return _tpr_at(curve_fpr, curve_tpr, fpr)


def balanced_accuracy(scores: Array, is_member: Array) -> float:
    """Membership accuracy on a balanced set at the best threshold: max 1 - (FPR + FNR) / 2."""
    fpr, tpr, _ = roc(scores, is_member)
    return _balanced_accuracy(fpr, tpr)


def summary(scores: Array, is_member: Array, fprs: Sequence[float] = (0.001, 0.01, 0.1)) -> dict[str, float | int]:
    """{"auc", "balanced_accuracy", "tpr_at_fpr_<f>" for f in fprs (e.g. "tpr_at_fpr_0.001"),
    "num_members", "num_nonmembers"}: plain floats and ints, ready for JSON."""
    s, y = _prepare(scores, is_member)
    fpr, tpr, auc = _roc(s, y)
    out: dict[str, float | int] = {"auc": auc, "balanced_accuracy": _balanced_accuracy(fpr, tpr)}
    out.update({f"tpr_at_fpr_{f:g}": _tpr_at(fpr, tpr, f) for f in fprs})
    out.update(num_members=int(y.sum()), num_nonmembers=int((~y).sum()))
    return out


def bootstrap_tpr_at_fpr(curves: Sequence[tuple[Array, Array]], fpr: float, resamples: int = 200,
                         seed: int = 0) -> np.ndarray:
    """TPR at `fpr` of each (scores [M, N], is_member [M, N]) pair on bootstrap resamples of the N samples.

    A resample draws N sample indices (columns) with replacement and keeps all M (model, sample)
    pairs of each, since one sample's pairs are correlated; every pair of `curves` is evaluated on the
    same resamples, so that differences between them are paired. Returns an array [resamples, len(curves)].
    """
    arrays = [(_numpy(s).astype(np.float64), _numpy(y).astype(bool)) for s, y in curves]
    if not arrays or any(s.ndim != 2 or s.shape != y.shape or s.shape[1] != arrays[0][0].shape[1]
                         for s, y in arrays):
        raise ValueError("curves must be (scores, is_member) pairs of shape [M, N] with one N")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    rng = np.random.default_rng(seed)
    n = arrays[0][0].shape[1]
    out = np.empty((resamples, len(arrays)))
    for r in range(resamples):
        cols = rng.integers(0, n, n)
        for k, (s, y) in enumerate(arrays):
            curve_fpr, curve_tpr, _ = _roc(s[:, cols].ravel(), y[:, cols].ravel())
            out[r, k] = _tpr_at(curve_fpr, curve_tpr, fpr)
    return out


def plot_roc(curves: Mapping[str, tuple[np.ndarray, ...]], path: str | Path,
             title: Optional[str] = None) -> Path:
    """Log-log ROC curves to a PNG; `curves` maps a name to (fpr, tpr) or (fpr, tpr, auc) as `roc` returns.

    The legend gives each curve's AUC and TPR at 0.1% FPR; the FPR axis runs from the smallest non-zero
    FPR of the curves (at least 1e-5) to 1, with the chance line.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    fig = Figure(figsize=(6, 6.5 + 0.22 * len(curves)))
    ax = fig.add_subplot()
    smallest = 1.0
    for i, (name, curve) in enumerate(curves.items()):
        fpr, tpr = np.asarray(curve[0], dtype=np.float64), np.asarray(curve[1], dtype=np.float64)
        if fpr.shape != tpr.shape or fpr.ndim != 1 or fpr.size == 0:
            raise ValueError(f"curves[{name!r}] must be (fpr, tpr) 1-D arrays of one length")
        auc = float(curve[2]) if len(curve) > 2 else float(skm.auc(fpr, tpr))
        ax.plot(fpr, tpr, "-" if i < 10 else "--", label=f"{name} (AUC {auc:.3f}, TPR@0.1% {100 * _tpr_at(fpr, tpr, 1e-3):.2f}%)")
        if (fpr > 0).any():
            smallest = min(smallest, float(fpr[fpr > 0].min()))
    low = max(smallest, 1e-5) if smallest < 1 else 1e-5
    ax.plot([low, 1], [low, 1], "k--", linewidth=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(low, 1), ylim=(low, 1),
           xlabel="false positive rate", ylabel="true positive rate", title=title or "ROC")
    ax.set_aspect("equal")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize="small", frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path

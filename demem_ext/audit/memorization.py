"""Feldman's memorization scores from the shadow models of an audit, and accuracy per memorization bin.

mem_i = mean correctness of the models that trained on example i - mean correctness of those that did
not (Feldman 2020; Feldman & Zhang 2020). It lies in [-1, 1] for 0/1 correctness: ~0 for typical
examples that every model gets right (or wrong), ~1 for atypical ones that are right only when memorized.
Accuracy per memorization bin is how the DeMem paper shows that DP hurts low-memorization samples most.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

Array = torch.Tensor | np.ndarray

# [-1, 0.1) holds the typical (low-memorization) examples; the last bin is closed at 1.
DEFAULT_BIN_EDGES = (-1.0, 0.1, 0.3, 0.5, 1.0)


def _as_values(x: Array, name: str, allow_nan: bool = False) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.is_complex():
        raise ValueError(f"{name} must be real or boolean, got dtype {x.dtype}")
    x = x.to(torch.float64)
    if not bool((torch.isfinite(x) | (allow_nan & x.isnan())).all()):
        raise ValueError(f"{name} contains {'inf' if allow_nan else 'NaN or inf'}")
    return x


def scores(correct: Array, keep: Array) -> torch.Tensor:
    """Memorization scores [N] (float64) from correct[M, N] (bool or real) and keep[M, N] (bool).

    NaN for an example that no model trained on, or that every model trained on (no OUT estimate).
    """
    correct = _as_values(correct, "correct")
    keep = torch.as_tensor(keep, device=correct.device)
    if keep.dtype != torch.bool:
        raise ValueError(f"keep must be a boolean membership mask, got dtype {keep.dtype}")
    if correct.dim() != 2 or keep.shape != correct.shape:
        raise ValueError(f"correct and keep must both have shape [M, N], got {tuple(correct.shape)} "
                         f"and {tuple(keep.shape)}")
    w_in, w_out = keep.double(), (~keep).double()
    mean_in = (w_in * correct).sum(0) / w_in.sum(0)      # 0/0 = NaN where no IN model
    mean_out = (w_out * correct).sum(0) / w_out.sum(0)
    return mean_in - mean_out


def histogram(mem_scores: Array, path: str | Path, bins: int = 20, title: Optional[str] = None) -> Path:
    """PNG histogram of the memorization scores (NaN scores are left out and counted in the title)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    values = _as_values(mem_scores, "mem_scores", allow_nan=True).flatten().cpu().numpy()
    finite = values[~np.isnan(values)]
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    span = (min(-1.0, float(finite.min(initial=-1))), max(1.0, float(finite.max(initial=1))))
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(finite, bins=bins, range=span, color="tab:blue", edgecolor="white")
    ax.set(yscale="log" if finite.size else "linear", xlabel="memorization score", ylabel="examples",
           title=title or f"memorization scores (n = {finite.size}, {values.size - finite.size} undefined)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def accuracy_by_bin(mem_scores: Array, correct_target: Array,
                    bins: Sequence[float] | int = DEFAULT_BIN_EDGES) -> list[dict[str, Optional[float] | int]]:
    """Accuracy of a model per memorization-score bin: [{low, high, count, accuracy}, ...].

    bins: increasing edges (bins are [low, high), the last one [low, high]) or an int q for q quantile
    bins of the defined scores (equal edges merged). correct_target [N] is bool or real in [0, 1] (e.g.
    mean correctness over models); examples whose score or correctness is NaN, or whose score lies
    outside the edges, are not counted. An empty bin has accuracy None.
    """
    mem = _as_values(mem_scores, "mem_scores", allow_nan=True).flatten().cpu().numpy()
    correct = _as_values(correct_target, "correct_target", allow_nan=True).flatten().cpu().numpy()
    if mem.shape != correct.shape:
        raise ValueError(f"mem_scores ({mem.size}) and correct_target ({correct.size}) must have one entry "
                         "per example")
    defined = ~(np.isnan(mem) | np.isnan(correct))
    mem, correct = mem[defined], correct[defined]
    if isinstance(bins, int) and not isinstance(bins, bool):
        if bins < 1 or mem.size == 0:
            raise ValueError(f"quantile bins need bins >= 1 and defined scores, got bins={bins}, "
                             f"{mem.size} defined scores")
        edges = np.unique(np.quantile(mem, np.linspace(0, 1, bins + 1)))
        edges = edges if edges.size > 1 else np.repeat(edges, 2)
    else:
        edges = np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2 or not np.isfinite(edges).all() or (np.diff(edges) <= 0).any():
            raise ValueError(f"bins must be at least two finite, strictly increasing edges, got {bins!r}")
    out = []
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == edges.size - 2
        inside = (mem >= low) & ((mem <= high) if last else (mem < high))
        count = int(inside.sum())
        out.append({"low": float(low), "high": float(high), "count": count,
                    "accuracy": float(correct[inside].mean()) if count else None})
    return out

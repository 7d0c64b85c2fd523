"""Threshold-free metric membership-inference scores from logits and labels (higher = more likely member).

Every score is computed in float64 from `log_softmax`, so it stays finite for huge logits. The scores
need no shadow models: thresholding them globally gives the classic loss / confidence / entropy attacks
(Yeom et al. 2018; Song & Mittal 2021).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

# log of the smallest positive float64: the floor of log(1 - p) when p rounds to 1
_LOG_TINY = math.log(torch.finfo(torch.float64).tiny)


def as_logits_labels(logits: torch.Tensor | np.ndarray,
                     labels: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate logits [..., K] (finite, K >= 2) and integer labels broadcastable to logits.shape[:-1].

    Labels broadcast with the usual trailing alignment: logits [M, N, K] take labels [N] or [M, N].
    Returns (float64 logits, int64 labels expanded to logits.shape[:-1]).
    """
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels, device=logits.device)
    if logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have shape [..., K] with K >= 2 classes, got {tuple(logits.shape)}")
    if not (logits.is_floating_point() or logits.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"logits must be real-valued, got dtype {logits.dtype}")
    logits = logits.to(torch.float64)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or inf")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    batch = logits.shape[:-1]
    try:
        if torch.broadcast_shapes(labels.shape, batch) != batch:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not broadcast to logits.shape[:-1] "
                         f"= {tuple(batch)}") from None
    labels = labels.to(torch.int64).expand(batch)
    num_classes = logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return logits, labels


def _log_probs(logits: torch.Tensor | np.ndarray,
               labels: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 log-probabilities [..., K], one-hot mask of the label [..., K])."""
    logits, labels = as_logits_labels(logits, labels)
    is_label = torch.nn.functional.one_hot(labels, logits.shape[-1]).bool()
    return torch.log_softmax(logits, dim=-1), is_label


def loss_score(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Negative cross-entropy log p_y [...] (Yeom et al.'s loss attack)."""
    log_p, is_label = _log_probs(logits, labels)
    return log_p[is_label].reshape(log_p.shape[:-1])


def confidence_score(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Confidence in the true class p_y [...]."""
    return loss_score(logits, labels).exp()


def entropy_score(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Negative prediction entropy sum_k p_k log p_k [...] (labels are validated, not used)."""
    log_p, _ = _log_probs(logits, labels)
    p = log_p.exp()
    return torch.where(p > 0, p * log_p, 0.0).sum(-1)


def modified_entropy_score(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """-Mentr, with Mentr = -(1 - p_y) log p_y - sum_{k != y} p_k log(1 - p_k) (Song & Mittal 2021).

    log(1 - p_k) is computed as log(-expm1(log p_k)) and floored at log(float64 tiny) ~ -708 where p_k
    rounds to 1, so the score stays finite.
    """
    log_p, is_label = _log_probs(logits, labels)
    log_py = log_p[is_label].reshape(log_p.shape[:-1])
    log_1m_p = torch.log(-torch.expm1(log_p)).clamp_min(_LOG_TINY)
    others = torch.where(is_label, 0.0, log_p.exp() * log_1m_p).sum(-1)
    return -torch.expm1(log_py) * log_py + others


METRIC_ATTACKS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "loss": loss_score,
    "confidence": confidence_score,
    "entropy": entropy_score,
    "modified_entropy": modified_entropy_score,
}

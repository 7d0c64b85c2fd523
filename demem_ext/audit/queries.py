"""LiRA's query augmentations: several transformed copies of each sample are queried (Carlini et al. 2022).

Digits get small pixel shifts (no flips: a flipped digit is another digit), CIFAR shifts and a
horizontal flip, SVHN shifts only. The first transform of every set is the identity, so the
augmented statistics of query 0 equal the plain ones. Shifts fill the vacated border with zeros
(the background of digits; black for the colour datasets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from demem_ext.adversarial import eval_mode, pgd

SHIFTS = ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))  # (rows, columns): identity and one pixel each way
FLIP_DATASETS = ("cifar10", "cifar100")
QUERY_STEPS = 10  # PGD steps of an adversarial query (step size 2.5 eps / steps)


@dataclass(frozen=True)
class QueryTransform:
    """A shift by (dy, dx) pixels, optionally after a horizontal flip; the identity is (0, 0, False)."""

    dy: int = 0
    dx: int = 0
    flip: bool = False

    @property
    def name(self) -> str:
        parts = (["flip"] if self.flip else []) + ([f"shift({self.dy:+d},{self.dx:+d})"] if self.dy or self.dx else [])
        return " + ".join(parts) or "identity"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> the transformed batch (same shape, zeros shifted in)."""
        if x.dim() != 4:
            raise ValueError(f"x must be a batch of images [B, C, H, W], got shape {tuple(x.shape)}")
        if self.flip:
            x = x.flip(-1)
        if not (self.dy or self.dx):
            return x
        out = torch.zeros_like(x)
        h, w = x.shape[-2:]
        if abs(self.dy) >= h or abs(self.dx) >= w:
            return out
        src_y, dst_y = slice(max(-self.dy, 0), h - max(self.dy, 0)), slice(max(self.dy, 0), h - max(-self.dy, 0))
        src_x, dst_x = slice(max(-self.dx, 0), w - max(self.dx, 0)), slice(max(self.dx, 0), w - max(-self.dx, 0))
        out[..., dst_y, dst_x] = x[..., src_y, src_x]
        return out


def query_transforms(dataset: str) -> tuple[QueryTransform, ...]:
    """The query set for a dataset: the identity first, then one-pixel shifts (and flips where they suit)."""
    shifts = tuple(QueryTransform(dy, dx) for dy, dx in SHIFTS)
    if dataset in FLIP_DATASETS:
        return shifts + tuple(QueryTransform(dy, dx, flip=True) for dy, dx in SHIFTS)
    return shifts


def _batches(dataset: Dataset, batch_size: int):
    """(x, y) batches of a dataset of (x, y) or (x, y, index) items."""
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        if len(batch) not in (2, 3):
            raise ValueError(f"population items must be (x, y) or (x, y, index), got {len(batch)} fields")
        yield batch[0], batch[1]


@torch.no_grad()
def query_logits(model: nn.Module, dataset: Dataset, transforms: Sequence[QueryTransform], device: str = "cpu",
                 attack: Optional[tuple[float, tuple[float, float]]] = None, seed: int = 0,
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, A, K] under each of the A transforms, labels [N]) of `model` (in eval mode).

    attack: (eps, clamp) for adversarial queries, L-inf PGD-QUERY_STEPS after the transform; None: natural.
    """
    if not transforms:
        raise ValueError("transforms must hold at least one query transform")
    torch.manual_seed(seed)
    outs, labels = [], []
    for x, y in _batches(dataset, batch_size):
        x, y = x.to(device), y.to(device)
        per_query = []
        for transform in transforms:
            xq = transform(x)
            if attack is not None:
                eps, clamp = attack
                xq = pgd(model, xq, y, eps, 2.5 * eps / QUERY_STEPS, QUERY_STEPS, clamp=clamp)
            with eval_mode(model):
                per_query.append(model(xq).float().cpu())
        outs.append(torch.stack(per_query, 1))
        labels.append(y.cpu())
    return torch.cat(outs), torch.cat(labels)

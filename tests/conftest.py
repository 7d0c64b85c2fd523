"""Shared test helpers and fixtures: the repository root, a small model and batch, the per-sample loss,
and the per-sample loop reference (plain autograd, independent of torch.func and Opacus).

Test files import the helpers (`from conftest import ...`) where they build on them in their own helpers;
tests can also take them as fixtures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
B = 8


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 4 → 5 → 3 tanh MLP with seeded weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def make_data(n: int = B, seed: int = 1, dtype: torch.dtype = torch.float32):
    """(x [n, 4], y [n]) for `make_model`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy [B]: the `loss_fn(model, *batch)` that backward_per_sample takes."""
    return F.cross_entropy(model(x), y, reduction="none")


def flat(model: nn.Module) -> torch.Tensor:
    """The trainable parameters, flattened and concatenated."""
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def per_sample_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fn=loss_fn):
    """Per-sample gradients [B, P] and losses [B] by a plain autograd loop (independent of torch.func)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows, losses = [], []
    for i in range(x.shape[0]):
        loss = fn(model, x[i:i + 1], y[i:i + 1])[0]
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        losses.append(loss.detach())
    return torch.stack(rows), torch.stack(losses)


@pytest.fixture
def small_model() -> nn.Module:
    return make_model()


@pytest.fixture
def small_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return make_data()


@pytest.fixture
def per_sample_loss() -> Callable[..., torch.Tensor]:
    return loss_fn


@pytest.fixture
def per_sample_loop() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return per_sample_reference

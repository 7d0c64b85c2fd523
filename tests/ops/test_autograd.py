"""demem_loss: forward value, backward w_i / D, gradcheck, validation."""

from __future__ import annotations

import pytest
import torch

import demem_ext as dx
from demem_ext.ops import reference
from demem_ext.config import DeMemConfig


def reference_weights(scores: torch.Tensor, cfg: DeMemConfig) -> torch.Tensor:
    return reference.demem_weights(scores, cfg.lam, cfg.selection, cfg.threshold, cfg.k, cfg.quantile,
                                   cfg.tau, cfg.temperature)[0]


@pytest.mark.parametrize("cfg", [
    DeMemConfig(lam=0.5),
    DeMemConfig(lam=1.0, threshold="quantile", quantile=0.5),
    DeMemConfig(lam=2.0, selection="soft", temperature=0.3, expected_batch_size=10),
    DeMemConfig(lam=0.0),
])
def test_forward_and_backward(cfg):
    losses = torch.tensor([0.1, 2.5, 0.7, 1.2, 3.0, 0.2], requires_grad=True)
    weights = reference_weights(losses.detach(), cfg)
    denom = cfg.expected_batch_size or losses.numel()
    loss = dx.demem_loss(losses, cfg)
    torch.testing.assert_close(loss, (weights * losses.detach()).sum() / denom)
    loss.backward()
    torch.testing.assert_close(losses.grad, weights / denom)


def test_lam_zero_is_the_mean():
    losses = torch.rand(7, requires_grad=True)
    torch.testing.assert_close(dx.demem_loss(losses, DeMemConfig(lam=0.0)), losses.mean())


def test_explicit_scores_set_the_weights():
    cfg = DeMemConfig(lam=1.0, threshold="fixed", tau=0.5)
    losses = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    dx.demem_loss(losses, cfg, scores=torch.tensor([0.0, 1.0, 0.2])).backward()
    torch.testing.assert_close(losses.grad, torch.tensor([1.0, 0.0, 1.0]) / 3)


def test_gradcheck_float64():
    cfg = DeMemConfig(lam=0.7, selection="soft")
    scores = torch.tensor([0.3, 1.2, 0.8, 2.0], dtype=torch.float64)  # fixed: weights are constants
    losses = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: dx.demem_loss(l, cfg, scores=scores), (losses,))
    assert torch.autograd.gradgradcheck(lambda l: dx.demem_loss(l, cfg, scores=scores), (losses,))


def test_default_config():
    losses = torch.tensor([0.1, 0.2, 5.0], requires_grad=True)
    torch.testing.assert_close(dx.demem_loss(losses), dx.demem_loss(losses, DeMemConfig()))


def test_validation():
    cfg = DeMemConfig()
    with pytest.raises(ValueError, match="per_sample_losses"):
        dx.demem_loss(torch.rand(2, 3), cfg)
    with pytest.raises(ValueError, match="per_sample_losses"):
        dx.demem_loss(torch.zeros(0), cfg)
    with pytest.raises(ValueError, match="per_sample_losses"):
        dx.demem_loss(torch.tensor([1.0, float("nan")]), cfg)
    with pytest.raises(ValueError, match="per_sample_losses"):
        dx.demem_loss([1.0, 2.0], cfg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scores"):
        dx.demem_loss(torch.rand(3), cfg, scores=torch.rand(4))
    with pytest.raises(ValueError, match="scores"):
        dx.demem_loss(torch.rand(3), cfg, scores=torch.tensor([1.0, float("inf"), 0.0]))
    with pytest.raises(TypeError, match="config"):
        dx.demem_loss(torch.rand(3), {"lam": 0.5})  # type: ignore[arg-type]

"""dm.backward(losses, scores=...): the risk rule reads the scores, the gradient stays that of the losses."""

from __future__ import annotations

import pytest
import torch

import demem_ext as dx
from demem_ext.config import DeMemConfig
from demem_ext.ops import reference
from conftest import flat, loss_fn, make_data, make_model

CFG = DeMemConfig(lam=0.8)


def _grad(scores=None, cfg: DeMemConfig = CFG) -> tuple[torch.Tensor, torch.Tensor]:
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = flat(model)
    with dx.DeMem(model, opt, cfg) as dm:
        losses = loss_fn(model, x, y)
        dm.backward(losses, scores=scores)
        opt.step()
    return before - flat(model), losses.detach()


def test_scores_choose_the_weights_and_the_losses_the_gradient() -> None:
    model, (x, y) = make_model(), make_data()
    torch.manual_seed(7)
    scores = torch.randn(x.shape[0])
    got, _ = _grad(scores)
    weights, _ = reference.demem_weights(scores.double(), CFG.lam, CFG.selection, CFG.threshold, CFG.k,
                                         CFG.quantile, CFG.tau, CFG.temperature)
    params = list(model.parameters())
    losses = loss_fn(model, x, y)
    expected = torch.autograd.grad((weights.float() * losses).sum() / x.shape[0], params)
    torch.testing.assert_close(got, torch.cat([g.flatten() for g in expected]), rtol=1e-5, atol=1e-6)


def test_scores_equal_to_the_losses_change_nothing() -> None:
    without, losses = _grad()
    with_scores, _ = _grad(losses.clone())
    torch.testing.assert_close(with_scores, without, rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [(torch.zeros(3), "scores must be a floating tensor of the losses' shape"),
                                        (torch.zeros(8, dtype=torch.int64), "scores must be a floating tensor"),
                                        ([0.0] * 8, "scores must be a torch.Tensor")])
def test_bad_scores_are_refused(bad, match: str) -> None:
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with dx.DeMem(model, opt, CFG) as dm:
        with pytest.raises((ValueError, TypeError), match=match):
            dm.backward(loss_fn(model, x, y), scores=bad)


def test_non_finite_scores_are_named() -> None:
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scores = torch.zeros(x.shape[0])
    scores[3] = float("nan")
    with dx.DeMem(model, opt, CFG) as dm:
        with pytest.raises(ValueError, match="scores has non-finite values"):
            dm.backward(loss_fn(model, x, y), scores=scores)

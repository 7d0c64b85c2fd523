"""Objectives: per-sample losses batched == under vmap, TRADES/MART formulas, attacks, factory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from demem_ext.adversarial import MART, OBJECTIVES, PGDAT, TRADES, PlainObjective, make_objective
from demem_ext.training.data import load_digits
from demem_ext.training.models import SmallCNN

ALL = [PlainObjective(steps=2), PGDAT(steps=2), TRADES(steps=2), MART(steps=2, beta=3.0)]


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    train, _, _ = load_digits(seed=0)
    return train.inputs[:6], train.targets[:6]


@pytest.fixture()
def model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(norm="group").train()


@pytest.mark.parametrize("objective", ALL, ids=lambda o: o.name)
def test_batched_equals_vmap_per_sample(model, batch, objective):
    x, y = batch
    torch.manual_seed(1)
    x_adv = objective.adversarial(model, x, y)
    batched = objective.per_sample_loss(model, x, x_adv, y)
    assert batched.shape == (len(y),)

    params = {k: v.detach() for k, v in model.named_parameters()}

    def single(p, xi, xai, yi):
        net = lambda inp: functional_call(model, p, (inp,))  # noqa: E731
        return objective.per_sample_loss(net, xi[None], xai[None], yi[None])[0]

    values = vmap(single, in_dims=(None, 0, 0, 0))(params, x, x_adv, y)
    torch.testing.assert_close(values, batched, rtol=1e-5, atol=1e-6)

    grads = vmap(grad(single), in_dims=(None, 0, 0, 0))(params, x, x_adv, y)
    for i in (0, len(y) - 1):
        model.zero_grad()
        objective.per_sample_loss(model, x[i:i + 1], x_adv[i:i + 1], y[i:i + 1]).sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-6)


def _probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(x).double(), dim=1)


def test_trades_formula(model, batch):
    x, y = batch
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    obj = TRADES(beta=6.0)
    got = obj.per_sample_loss(model, x, x_adv, y)
    p_nat, p_adv = _probs(model, x), _probs(model, x_adv)
    for i in range(len(y)):
        ce = -math.log(p_nat[i, y[i]])
        kl = sum(p_nat[i, k] * (math.log(p_nat[i, k]) - math.log(p_adv[i, k])) for k in range(10))
        assert got[i].item() == pytest.approx(ce + 6.0 * float(kl), rel=1e-4, abs=1e-5)


def test_mart_formula(model, batch):
    x, y = batch
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    obj = MART(beta=6.0)
    got = obj.per_sample_loss(model, x, x_adv, y)
    p_nat, p_adv = _probs(model, x), _probs(model, x_adv)
    for i in range(len(y)):
        yi = int(y[i])
        runner_up = max(float(p_adv[i, k]) for k in range(10) if k != yi)
        bce = -math.log(p_adv[i, yi]) - math.log(1.0 - runner_up)
        kl = sum(p_nat[i, k] * (math.log(p_nat[i, k]) - math.log(p_adv[i, k])) for k in range(10))
        expected = bce + 6.0 * float(kl) * (1.0 - float(p_nat[i, yi]))
        assert got[i].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_mart_confident_runner_up_stays_finite():
    logits_adv = torch.tensor([[0.0, 60.0, -5.0]])  # p_adv[runner-up] rounds to 1 in float32
    net = lambda inp: logits_adv if inp.sum() > 0 else torch.zeros(1, 3)  # noqa: E731
    loss = MART().per_sample_loss(net, torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([0]))
    # -log p[0] = 60; 1 - p[1] = p[0] + p[2], so -log(1 - p[1]) = 60 - log1p(e^-5); p_nat is uniform.
    bce = 60.0 + 60.0 - math.log1p(math.exp(-5.0))
    kl = (60.0 + 0.0 + 65.0) / 3 - math.log(3)
    assert loss.item() == pytest.approx(bce + 6.0 * kl * (2 / 3), rel=1e-5)


def test_plain_and_pgdat_losses(model, batch):
    x, y = batch
    x_adv = (x + 0.05).clamp(0, 1)
    torch.testing.assert_close(PlainObjective().per_sample_loss(model, x, x_adv, y),
                               F.cross_entropy(model(x), y, reduction="none"))
    torch.testing.assert_close(PGDAT().per_sample_loss(model, x, x_adv, y),
                               F.cross_entropy(model(x_adv), y, reduction="none"))
    assert torch.equal(PlainObjective().adversarial(model, x, y), x)


@pytest.mark.parametrize("objective", ALL, ids=lambda o: o.name)
def test_loss_and_logits(model, batch, objective):
    """The losses of per_sample_loss and the logits on the trained-on input, from the same forward."""
    x, y = batch
    x_adv = (x + 0.05).clamp(0, 1)
    losses, logits = objective.loss_and_logits(model, x, x_adv, y)
    torch.testing.assert_close(losses, objective.per_sample_loss(model, x, x_adv, y))
    trained_on = x if isinstance(objective, PlainObjective) else x_adv
    torch.testing.assert_close(logits, model(trained_on))
    assert logits.requires_grad


@pytest.mark.parametrize("objective", ALL[1:], ids=lambda o: o.name)
def test_attacks_stay_in_budget_and_restore_mode(model, batch, objective):
    x, y = batch
    x_adv = objective.adversarial(model, x, y)
    assert (x_adv - x).abs().max() <= objective.eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training and all(p.grad is None for p in model.parameters())


def test_trades_attack_increases_kl(model, batch):
    x, y = batch
    obj = TRADES(steps=5)
    x_adv = obj.adversarial(model, x, y)
    with torch.no_grad():
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.log_softmax(model(x), 1),
                      reduction="none", log_target=True).sum(1)
    assert kl.mean() > 1e-4


def test_factory():
    assert set(OBJECTIVES) == {"none", "pgd", "trades", "mart", "relaxloss"}
    obj = make_objective("trades", eps=0.2, beta=1.0)
    assert isinstance(obj, TRADES) and obj.eps == 0.2 and obj.beta == 1.0 and obj.name == "trades"
    assert isinstance(make_objective("mart"), MART)
    pgd_at = make_objective("pgd")
    assert (pgd_at.eps, pgd_at.alpha, pgd_at.steps, pgd_at.name) == (0.1, 0.025, 10, "pgd")
    assert make_objective("none").name == "none"
    with pytest.raises(ValueError, match="choose one of.*mart.*none.*pgd.*relaxloss.*trades"):
        make_objective("fgsm")
    with pytest.raises(ValueError, match="beta"):
        make_objective("mart", beta=-1.0)
    with pytest.raises(ValueError, match="eps"):
        make_objective("pgd", eps=-0.5)
    with pytest.raises(ValueError, match="norm"):
        make_objective("trades", norm="l0")


def _relaxloss_reference(logits: torch.Tensor, y: torch.Tensor, alpha: float, upper: float, epoch: int):
    """RelaxLoss's batch loss, written out as in the official code (Chen, Yu & Fritz 2022)."""
    ce_full = F.cross_entropy(logits, y, reduction="none")
    ce = ce_full.mean()
    if epoch % 2 == 0:
        return (ce - alpha).abs()
    if ce > alpha:
        return ce
    k = logits.shape[1]
    correct = (logits.argmax(1) == y).float()
    p_true = F.softmax(logits, dim=1)[torch.arange(len(y)), y].clamp(min=0.0, max=upper)
    p_else = (1.0 - p_true) / (k - 1)
    onehot = F.one_hot(y, k).float()
    soft = onehot * p_true.unsqueeze(1) + (1 - onehot) * p_else.unsqueeze(1)
    soft_ce = -(soft * F.log_softmax(logits, dim=1)).sum(-1)
    return ((1 - correct) * soft_ce - ce_full).mean()


@pytest.mark.parametrize("epoch, alpha", [(0, 0.01), (0, 50.0), (1, 0.01), (1, 50.0)],
                         ids=["even-descent", "even-ascent", "odd-descent", "odd-flattening"])
def test_relaxloss_has_the_official_gradient(model, batch, epoch: int, alpha: float) -> None:
    x, y = batch
    objective = make_objective("relaxloss", steps=2, relax_alpha=alpha, upper=0.9).for_epoch(epoch)
    x_adv = objective.adversarial(model, x, y)
    params = dict(model.named_parameters())

    def ours(p):
        return functional_call(model, p, (x_adv,))

    losses, _ = objective.loss_and_logits(model, x, x_adv, y)
    got = torch.autograd.grad(losses.mean(), list(params.values()))
    expected = torch.autograd.grad(_relaxloss_reference(ours(params), y, alpha, 0.9, epoch), list(params.values()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_relaxloss_refuses_bad_levels_and_the_per_sample_path() -> None:
    from demem_ext.training import TrainConfig

    with pytest.raises(ValueError, match="relax_alpha must be >= 0"):
        make_objective("relaxloss", relax_alpha=-1.0)
    with pytest.raises(ValueError, match="no per-sample form"):
        TrainConfig(at="relaxloss", demem={"max_grad_norm": 1.0})

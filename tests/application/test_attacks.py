"""PGD / FGSM: budget, valid range, effect on the loss, and no side effects on the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from demem_ext.adversarial import eval_mode, fgsm, pgd
from demem_ext.training.data import load_digits

EPS = 0.1


@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    train, test, _ = load_digits(seed=0)
    return test.inputs[:64], test.targets[:64]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A small MLP with BatchNorm and dropout, trained briefly on digits (train mode left on)."""
    torch.manual_seed(0)
    train, _, _ = load_digits(seed=0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                        nn.Dropout(0.1), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(train.inputs), train.targets).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return net


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with eval_mode(model), torch.no_grad():
        return F.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_perturbation_within_budget_and_range(model, digits_batch, norm):
    x, y = digits_batch
    eps = EPS if norm == "linf" else 1.0
    x_adv = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=10, norm=norm)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-5
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert not x_adv.requires_grad and x_adv.shape == x.shape and x_adv.dtype == x.dtype


def test_custom_clamp_range(model, digits_batch):
    x, y = digits_batch
    x = x * 2 - 1
    x_adv = pgd(model, x, y, eps=0.5, alpha=0.2, steps=3, clamp=(-1.0, 1.0))
    assert x_adv.min() >= -1.0 and x_adv.max() <= 1.0
    assert x_adv.min() < 0.0  # not clamped to the default [0, 1]


@pytest.mark.parametrize("attack", ["linf", "l2", "fgsm"])
def test_attack_increases_loss(model, digits_batch, attack):
    x, y = digits_batch
    torch.manual_seed(1)
    if attack == "fgsm":
        x_adv = fgsm(model, x, y, eps=EPS)
    else:
        eps = EPS if attack == "linf" else 1.0
        x_adv = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=10, norm=attack)
    assert _ce(model, x_adv, y) > _ce(model, x, y) + 0.1


def test_more_steps_stronger(model, digits_batch):
    x, y = digits_batch
    weak = fgsm(model, x, y, eps=0.05)
    strong = pgd(model, x, y, eps=0.05, alpha=0.0125, steps=20, random_start=False)
    assert _ce(model, strong, y) >= _ce(model, weak, y)


def test_targeted_moves_toward_target(model, digits_batch):
    x, y = digits_batch
    target = (y + 1) % 10
    x_adv = pgd(model, x, target, eps=0.3, alpha=0.05, steps=20, targeted=True)
    assert _ce(model, x_adv, target) < _ce(model, x, target) - 0.5
    with eval_mode(model), torch.no_grad():
        hit_clean = (model(x).argmax(1) == target).float().mean()
        hit_adv = (model(x_adv).argmax(1) == target).float().mean()
    assert hit_adv > hit_clean + 0.2


def test_no_side_effects_on_model(model, digits_batch):
    x, y = digits_batch
    model.train()
    model[4].eval()  # mixed modes must come back exactly
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)
    grad_before = params[0].grad
    bn = model[2]
    stats = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
    weights = [p.detach().clone() for p in params]

    pgd(model, x, y, eps=EPS, alpha=0.025, steps=3)
    fgsm(model, x, y, eps=EPS)

    assert params[0].grad is grad_before and torch.all(grad_before == 0.5)
    assert all(p.grad is None for p in params[1:])
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert [m.training for m in model.modules()] == [True, True, True, True, True, False, True]
    params[0].grad = None
    model.train()


def test_mode_restored_on_error(model, digits_batch):
    x, _ = digits_batch
    model.train()

    def bad_loss(logits, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, x, x, eps=EPS, alpha=0.01, steps=1, loss_fn=bad_loss)
    assert model.training


def test_works_under_no_grad(model, digits_batch):
    x, y = digits_batch
    with torch.no_grad():
        x_adv = pgd(model, x, y, eps=EPS, alpha=0.05, steps=2, random_start=False)
    assert not torch.equal(x_adv, x)


def test_degenerate_budgets(model, digits_batch):
    x, y = digits_batch
    assert torch.equal(pgd(model, x, y, eps=0.0, alpha=0.1, steps=3), x)
    assert torch.equal(pgd(model, x, y, eps=EPS, alpha=0.1, steps=0, random_start=False), x)
    start = pgd(model, x, y, eps=EPS, alpha=0.1, steps=0)  # the random start alone
    assert (start - x).abs().max() <= EPS + 1e-6


def test_explicit_start_is_projected(model, digits_batch):
    x, y = digits_batch
    x_adv = pgd(model, x, y, eps=EPS, alpha=0.1, steps=0, start=x + 1.0)
    assert torch.allclose(x_adv, (x + EPS).clamp(0, 1))
    with pytest.raises(ValueError, match="start"):
        pgd(model, x, y, eps=EPS, alpha=0.1, steps=1, start=x[:1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"eps": -0.1}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"alpha": -1.0}, "alpha"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"norm": "l1"}, "norm"),
        ({"clamp": (1.0, 0.0)}, "clamp"),
    ],
)
def test_bad_arguments(model, digits_batch, kwargs, name):
    x, y = digits_batch
    args = {"eps": EPS, "alpha": 0.01, "steps": 1} | kwargs
    with pytest.raises(ValueError, match=name):
        pgd(model, x, y, **args)
    if "eps" in kwargs:
        with pytest.raises(ValueError, match="eps"):
            fgsm(model, x, y, eps=kwargs["eps"])

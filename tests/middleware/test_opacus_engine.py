"""DeMem(..., engine="opacus"): Opacus's per-sample gradients give the torch.func engine's update."""

from __future__ import annotations

import builtins
from typing import Callable

import pytest
import torch
from torch import nn

import demem_ext as dx
from demem_ext.adversarial.attacks import pgd

pytest.importorskip("opacus")

CE = nn.CrossEntropyLoss(reduction="none")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _batch(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return CE(model(x), y)


def _train(engine: str, steps: int = 3, use_backward: bool = False, chunk_size=None, **config) -> list[torch.Tensor]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch()
    idx = torch.arange(x.shape[0])
    with dx.DeMem(model, opt, num_samples=x.shape[0], seed=7, engine=engine, chunk_size=chunk_size, **config) as dm:
        for _ in range(steps):
            opt.zero_grad()
            if use_backward:
                dm.backward(_loss(model, x, y), indices=idx)
            else:
                dm.backward_per_sample(_loss, x, y, indices=idx)
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("config", [
    dict(lam=0.5, max_grad_norm=0.5),
    dict(lam=0.75, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=12),
    dict(lam=1.0, max_grad_norm=0.3, clip_scope="high_risk", proxy="trace"),
    dict(lam=0.5, selection="soft", threshold="quantile", quantile=0.7),
], ids=["clip", "clip-noise", "high-risk-trace", "soft-no-clip"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_backward_per_sample_matches_torch_func(config: dict, chunk_size) -> None:
    expected = _train("torch.func", chunk_size=chunk_size, **config)
    got = _train("opacus", chunk_size=chunk_size, **config)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [dict(lam=0.5, max_grad_norm=0.5, noise_multiplier=0.5), dict(lam=0.5)],
                         ids=["clip-noise", "weighting"])
def test_backward_of_model_losses_matches_torch_func(config: dict) -> None:
    """dm.backward(per_sample_losses) clips with engine="opacus" (the weighting path is unchanged)."""
    expected = _train("torch.func", **config, use_backward=config.get("max_grad_norm") is None)
    got = _train("opacus", use_backward=True, **config)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _two_steps(engine: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float,
               attack: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters after two DeMem steps (λ = 0.5, C = 0.5) with `engine`, and each step's norms;
    attack: train on a PGD example of the batch (eval-mode forwards and input gradients)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    norms = []
    with dx.DeMem(model, opt, engine=engine, lam=0.5, max_grad_norm=0.5) as dm:
        for _ in range(2):
            inputs = x
            if attack:
                torch.manual_seed(3)
                inputs = pgd(model, x, y, 0.1, 0.025, 3, clamp=(-5.0, 5.0))
            if engine == "opacus":
                dm.backward(_loss(model, inputs, y))
            else:
                dm.backward_per_sample(_loss, inputs, y)
            opt.step()
            norms.append(dm.stats.norms)
    return [p.detach().clone() for p in model.parameters()], norms


def _assert_engines_agree(make_model: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, lr: float,
                          attack: bool = False) -> list[torch.Tensor]:
    """Both engines give the same norms and parameters; returns the parameters."""
    expected, expected_norms = _two_steps("torch.func", make_model(), x, y, lr, attack)
    got, got_norms = _two_steps("opacus", make_model(), x, y, lr, attack)
    for a, b in zip(expected + expected_norms, got + got_norms):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    return got


def test_attack_passes_in_eval_mode_are_ignored() -> None:
    """A PGD attack (eval mode, gradients w.r.t. the input) between steps records nothing."""
    x, y = _batch()
    _assert_engines_agree(_model, x, y, lr=0.1, attack=True)


def test_hooks_and_attributes_are_removed_on_exit() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    with dx.DeMem(model, opt, engine="opacus", lam=0.5, max_grad_norm=0.5) as dm:
        dm.backward(_loss(model, x, y))
        opt.step()
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "_forward_counter") for p in model.parameters())
    assert not any(hasattr(m, "activations") for m in model.modules())
    assert "step" not in vars(opt)


def test_losses_from_an_eval_mode_forward_are_a_clear_error() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    with dx.DeMem(model, opt, engine="opacus", lam=0.5, max_grad_norm=0.5) as dm:
        model.eval()
        with pytest.raises(ValueError, match="recorded no per-sample gradients.*train mode"):
            dm.backward(_loss(model, x, y))


def test_bad_engine_and_missing_opacus_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="engine must be one of 'torch.func', 'opacus'"):
        dx.DeMem(model, opt, engine="functorch")
    real_import = builtins.__import__

    def no_opacus(name, *args, **kwargs):
        if name == "opacus" or name.startswith("opacus."):
            raise ImportError("No module named 'opacus'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_opacus)
    dm = dx.DeMem(model, opt, engine="opacus", max_grad_norm=1.0)
    with pytest.raises(ValueError, match="engine='opacus' needs Opacus"):
        dm.__enter__()
    assert "step" not in vars(opt)  # nothing was patched


def test_clipping_config_without_opacus_engine_still_points_to_the_engines() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    with dx.DeMem(model, opt, max_grad_norm=1.0) as dm:
        with pytest.raises(ValueError, match="backward_per_sample.*engine='opacus'"):
            dm.backward(_loss(model, x, y))


class _TwiceAndUnused(nn.Module):
    """A layer called twice per forward, and a layer the loss never reaches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.head, self.unused = nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_layer_called_twice_and_unreached_parameters_match_torch_func() -> None:
    x, y = torch.randn(10, 6, generator=torch.Generator().manual_seed(2)), torch.arange(10) % 3
    params = _assert_engines_agree(_TwiceAndUnused, x, y, lr=0.5)
    assert torch.equal(params[4], _TwiceAndUnused().unused.weight)  # zero rows: never moved


def test_losses_of_part_of_a_forward_are_a_clear_error() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    with dx.DeMem(model, opt, engine="opacus", lam=0.5, max_grad_norm=0.5) as dm:
        with pytest.raises(ValueError, match="for 12 samples but per_sample_losses has 5"):
            dm.backward(_loss(model, x, y)[:5])
        dm.backward(_loss(model, x, y))  # nothing of the failed call is left behind
        opt.step()
    expected = _train("torch.func", steps=1, lam=0.5, max_grad_norm=0.5)
    for a, b in zip(expected, model.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=1e-5, atol=1e-6)


def test_a_forward_left_out_of_the_losses_is_a_clear_error_and_forgotten() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    with dx.DeMem(model, opt, engine="opacus", lam=0.5, max_grad_norm=0.5) as dm:
        model(x)  # train mode, grad enabled, never backpropagated
        with pytest.raises(ValueError, match="not part of these losses"):
            dm.backward(_loss(model, x, y))
        dm.backward(_loss(model, x, y))  # the stale forward is forgotten
        opt.step()
    expected = _train("torch.func", steps=1, lam=0.5, max_grad_norm=0.5)
    for a, b in zip(expected, model.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=1e-5, atol=1e-6)

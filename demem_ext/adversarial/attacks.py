"""Gradient attacks on the input: PGD (L-inf and L2) and FGSM.

The attacks differentiate with respect to the input only (``torch.autograd.grad``), so parameter
``.grad`` buffers are never touched; they run the model in eval mode (BatchNorm running statistics
stay as they are, dropout is off) and restore every module's previous mode afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]
NORMS = ("linf", "l2")
_TINY = 1e-12


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy, the default attack loss."""
    return F.cross_entropy(logits, y, reduction="none")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block; restore each submodule's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample of ``t``, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    factor = (eps / (_per_sample_norm(delta) + _TINY)).clamp(max=1.0)
    return delta * factor


def _random_delta(x: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps)
    direction = torch.randn_like(x)
    direction = direction / (_per_sample_norm(direction) + _TINY)
    radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
    return direction * radius * eps


def check_attack_args(eps: float, alpha: float, steps: int, norm: str, clamp: tuple[float, float]) -> None:
    """Raise ``ValueError`` naming the first invalid attack argument."""
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if len(clamp) != 2 or not clamp[0] < clamp[1]:
        raise ValueError(f"clamp must be (low, high) with low < high, got {clamp!r}")


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    targeted: bool = False,
    clamp: tuple[float, float] = (0.0, 1.0),
    loss_fn: LossFn | None = None,
    start: Tensor | None = None,
) -> Tensor:
    """Projected gradient descent attack; returns detached adversarial inputs.

    Untargeted attacks ascend ``loss_fn(model(x_adv), y)`` (summed over the batch; default
    cross-entropy), targeted ones descend it with ``y`` the target labels; ``y`` reaches
    ``loss_fn`` as is (TRADES passes the natural log-probabilities). Each step moves by
    ``alpha`` along the gradient's sign (L-inf) or its per-sample unit direction (L2), then projects
    onto the ``eps``-ball around ``x`` and into the ``clamp`` range. ``start`` (e.g. TRADES'
    ``x + 0.001 * randn``) replaces the random start when given.
    """
    check_attack_args(eps, alpha, steps, norm, clamp)
    if start is not None and start.shape != x.shape:
        raise ValueError(f"start must have the shape of x {tuple(x.shape)}, got {tuple(start.shape)}")
    loss_fn = loss_fn or cross_entropy
    low, high = clamp
    x = x.detach()
    if start is not None:
        delta = start.detach() - x
    elif random_start:
        delta = _random_delta(x, eps, norm)
    else:
        delta = torch.zeros_like(x)
    x_adv = (x + _project(delta, eps, norm)).clamp(low, high)
    direction = -1.0 if targeted else 1.0
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv), y).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / (_per_sample_norm(grad) + _TINY)
            x_adv = x_adv.detach() + direction * alpha * step
            x_adv = (x + _project(x_adv - x, eps, norm)).clamp(low, high)
    return x_adv.detach()


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    clamp: tuple[float, float] = (0.0, 1.0),
    targeted: bool = False,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Fast gradient sign method: one L-inf step of size ``eps`` from ``x``."""
    return pgd(model, x, y, eps=eps, alpha=eps, steps=1, norm="linf", random_start=False,
               targeted=targeted, clamp=clamp, loss_fn=loss_fn)

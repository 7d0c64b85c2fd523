"""Adversarial-training objectives with per-sample losses: plain, PGD-AT, TRADES, MART, PGD-AT + RelaxLoss.

``adversarial(model, x, y)`` runs the objective's attack (eval mode, no parameter gradients) from the
random start ``random_start(x)`` draws (or from a ``start`` passed in: an ensemble draws each model's own);
``per_sample_loss(model, x, x_adv, y)`` returns one loss per sample, shape ``[B]``, and
``loss_and_logits`` the same losses with the logits on the trained-on input (a training loop logs
its accuracy from them without another forward pass). The losses use
only out-of-place tensor operations without data-dependent Python control flow, so they also work
for a single sample under ``torch.func.vmap(torch.func.grad(...))``; RelaxLoss, whose loss depends on
the batch's mean, is the exception (no per-sample/DP form).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from demem_ext.adversarial.attacks import _random_delta, check_attack_args, eval_mode, pgd

TRADES_START_STD = 0.001  # the TRADES/MART attacks start at x + 0.001 * randn (official code)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-sample KL(p || q) = sum_k p_k (log p_k - log q_k) from log-probabilities ``[B, K]``."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def _kl_from_logits(logits_adv: Tensor, log_p_nat: Tensor) -> Tensor:
    """TRADES attack loss: per-sample KL(p_nat || softmax(logits_adv))."""
    return _kl(log_p_nat, F.log_softmax(logits_adv, dim=1))


def _true_class_mask(y: Tensor, num_classes: int) -> Tensor:
    """Boolean ``[B, K]`` mask of each sample's label (vmap-safe one-hot)."""
    return torch.arange(num_classes, device=y.device) == y.unsqueeze(1)


class Terms(NamedTuple):
    """One forward of an objective: the per-sample loss, the logits on the trained-on input and the loss's
    cross-entropy part (a separate memorization score for DeMem: the loss itself for PGD-AT)."""

    loss: Tensor
    logits: Tensor
    cross_entropy: Tensor


@dataclass(frozen=True)
class Objective(ABC):
    """Base objective: the attack parameters, an attack and a per-sample loss."""

    eps: float = 0.1
    alpha: float = 0.025
    steps: int = 10
    norm: str = "linf"
    clamp: tuple[float, float] = (0.0, 1.0)
    name: ClassVar[str]

    def __post_init__(self) -> None:
        check_attack_args(self.eps, self.alpha, self.steps, self.norm, self.clamp)

    @abstractmethod
    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, start: Optional[Tensor] = None) -> Tensor:
        """The (detached) inputs the loss is trained on; the attack starts at ``start`` (None: its own draw)."""

    def random_start(self, x: Tensor) -> Optional[Tensor]:
        """The attack's random start for ``x``, drawn from torch's global generator as ``adversarial`` draws it
        (None: no attack, nothing drawn)."""
        return None

    @abstractmethod
    def terms(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Terms:
        """Per-sample training loss ``[B]``, the logits ``[B, K]`` on ``x_adv`` (on ``x`` for plain training)
        and the loss's cross-entropy part ``[B]``."""

    def loss_and_logits(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample training loss ``[B]`` and the logits ``[B, K]`` on ``x_adv`` (on ``x`` for plain training)."""
        loss, logits, _ = self.terms(model, x, x_adv, y)
        return loss, logits

    def per_sample_loss(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        """Per-sample training loss ``[B]``."""
        return self.loss_and_logits(model, x, x_adv, y)[0]

    def for_epoch(self, epoch: int) -> "Objective":
        """The objective of training epoch ``epoch`` (0-based): itself, except for epoch-dependent ones."""
        return self


@dataclass(frozen=True)
class PlainObjective(Objective):
    """Standard (non-adversarial) training: cross-entropy on the clean input."""

    name: ClassVar[str] = "none"

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, start: Optional[Tensor] = None) -> Tensor:
        """No attack: returns ``x`` (detached)."""
        return x.detach()

    def terms(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Terms:
        """CE(f(x), y), f(x) and CE again; ``x_adv`` is ignored."""
        logits = model(x)
        ce = F.cross_entropy(logits, y, reduction="none")
        return Terms(ce, logits, ce)


@dataclass(frozen=True)
class PGDAT(Objective):
    """Madry et al. PGD adversarial training: cross-entropy on the PGD example."""

    name: ClassVar[str] = "pgd"

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, start: Optional[Tensor] = None) -> Tensor:
        """PGD with a uniform random start, maximising cross-entropy."""
        return pgd(model, x, y, self.eps, self.alpha, self.steps, norm=self.norm, clamp=self.clamp, start=start)

    def random_start(self, x: Tensor) -> Tensor:
        """``x`` plus PGD's uniform draw in the ε-ball."""
        return x.detach() + _random_delta(x.detach(), self.eps, self.norm)

    def terms(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Terms:
        """CE(f(x_adv), y), f(x_adv) and CE again."""
        logits = model(x_adv)
        ce = F.cross_entropy(logits, y, reduction="none")
        return Terms(ce, logits, ce)


@dataclass(frozen=True)
class _BetaObjective(Objective):
    beta: float = 6.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")

    def random_start(self, x: Tensor) -> Tensor:
        """``x + 0.001 * randn`` (the official TRADES and MART code)."""
        return x.detach() + TRADES_START_STD * torch.randn_like(x)


@dataclass(frozen=True)
class TRADES(_BetaObjective):
    """Zhang et al. 2019: CE(f(x), y) + beta * KL(p_nat || p_adv)."""

    name: ClassVar[str] = "trades"

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, start: Optional[Tensor] = None) -> Tensor:
        """PGD maximising KL(p_nat || p_adv), started at ``x + 0.001 * randn``."""
        with eval_mode(model), torch.no_grad():
            log_p_nat = F.log_softmax(model(x), dim=1)
        return pgd(model, x, log_p_nat, self.eps, self.alpha, self.steps, norm=self.norm, clamp=self.clamp,
                   loss_fn=_kl_from_logits, start=self.random_start(x) if start is None else start)

    def terms(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Terms:
        """CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv)), f(x_adv) and CE(f(x), y)."""
        logits_nat, logits_adv = model(x), model(x_adv)
        log_p_nat = F.log_softmax(logits_nat, dim=1)
        log_p_adv = F.log_softmax(logits_adv, dim=1)
        ce = F.cross_entropy(logits_nat, y, reduction="none")
        return Terms(ce + self.beta * _kl(log_p_nat, log_p_adv), logits_adv, ce)


@dataclass(frozen=True)
class MART(_BetaObjective):
    """Wang et al. 2020: boosted CE on x_adv + beta * KL(p_nat || p_adv) * (1 - p_nat[y])."""

    name: ClassVar[str] = "mart"

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, start: Optional[Tensor] = None) -> Tensor:
        """PGD maximising cross-entropy, started at ``x + 0.001 * randn`` (official MART code)."""
        return pgd(model, x, y, self.eps, self.alpha, self.steps, norm=self.norm, clamp=self.clamp,
                   start=self.random_start(x) if start is None else start)

    def terms(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Terms:
        """-log p_adv[y] - log(1 - max_{k != y} p_adv[k]) + beta * KL(p_nat || p_adv) * (1 - p_nat[y]),
        f(x_adv) and the boosted cross-entropy (the first two terms)."""
        logits_nat, logits_adv = model(x), model(x_adv)
        log_p_nat = F.log_softmax(logits_nat, dim=1)
        log_p_adv = F.log_softmax(logits_adv, dim=1)
        is_true = _true_class_mask(y, log_p_adv.shape[1])
        ce_adv = -(log_p_adv * is_true).sum(dim=1)
        # log(1 - p_j) for j = argmax_{k != y} p_k, as logsumexp over the other classes (stable).
        runner_up = log_p_adv.masked_fill(is_true, float("-inf")).argmax(dim=1, keepdim=True)
        is_runner_up = torch.arange(log_p_adv.shape[1], device=y.device) == runner_up
        log_not_runner_up = torch.logsumexp(log_p_adv.masked_fill(is_runner_up, float("-inf")), dim=1)
        p_nat_true = (log_p_nat.exp() * is_true).sum(dim=1)
        kl = _kl(log_p_nat, log_p_adv)
        boosted_ce = ce_adv - log_not_runner_up
        return Terms(boosted_ce + self.beta * kl * (1.0 - p_nat_true), logits_adv, boosted_ce)


@dataclass(frozen=True)
class RelaxLossAT(PGDAT):
    """PGD-AT with RelaxLoss (Chen, Yu & Fritz, ICLR 2022) on the PGD example, as in the official code.

    With ℓ̄ the batch's mean cross-entropy: in even epochs the loss is |ℓ̄ − α| (gradient ascent once ℓ̄
    is below the target level α); in odd epochs it is ℓ̄ while ℓ̄ > α, else posterior flattening: the
    cross-entropy against soft labels (the true class's probability clamped at ``upper``, the rest spread
    evenly over the other classes) on the misclassified samples, minus ℓ (the soft labels are not
    detached, as in the official code). The per-sample losses returned have the batch mean of that
    loss's gradient; they depend on the whole batch, so RelaxLoss has no per-sample (DP) form.
    """

    relax_alpha: float = 1.0
    upper: float = 1.0
    epoch: int = 0
    name: ClassVar[str] = "relaxloss"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.relax_alpha >= 0:
            raise ValueError(f"relax_alpha must be >= 0, got {self.relax_alpha}")
        if not 0 < self.upper <= 1:
            raise ValueError(f"upper must be in (0, 1], got {self.upper}")

    def for_epoch(self, epoch: int) -> "RelaxLossAT":
        return dataclasses.replace(self, epoch=epoch)

    def terms(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Terms:
        """The per-sample RelaxLoss terms on f(x_adv) (see the class), f(x_adv) and CE(f(x_adv), y)."""
        logits = model(x_adv)
        ce = F.cross_entropy(logits, y, reduction="none")
        mean = ce.detach().float().mean()
        if self.epoch % 2 == 0:  # |ℓ̄ − α|: descent above α, ascent below
            return Terms(torch.sign(mean - self.relax_alpha).to(ce.dtype) * ce, logits, ce)
        if mean > self.relax_alpha:
            return Terms(ce, logits, ce)
        probs = F.softmax(logits, dim=1)
        is_true = _true_class_mask(y, logits.shape[1])
        p_true = (probs * is_true).sum(dim=1).clamp(max=self.upper)
        p_else = (1.0 - p_true) / (logits.shape[1] - 1)
        soft = torch.where(is_true, p_true.unsqueeze(1), p_else.unsqueeze(1))
        soft_ce = -(soft * F.log_softmax(logits, dim=1)).sum(dim=1)
        wrong = (logits.argmax(dim=1) != y).to(ce.dtype)
        return Terms(wrong * soft_ce - ce, logits, ce)


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (PlainObjective, PGDAT, TRADES, MART, RelaxLossAT)
}


def make_objective(name: str, **kwargs: Any) -> Objective:
    """Build an objective by name: "none", "pgd", "trades", "mart" or "relaxloss" (PGD-AT + RelaxLoss);
    kwargs go to its constructor."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)

"""Robustness evaluation: natural accuracy, PGD robust accuracy, AutoAttack through torchattacks."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from demem_ext.adversarial.attacks import eval_mode, pgd

AUTOATTACK_VERSIONS = ("standard", "fast", "none")
INSTALL_HINT = "pip install torchattacks"


def check_autoattack(version: str, flag: str = "--autoattack") -> None:
    """Before any work: a clear error when AutoAttack `version` (not "none") needs torchattacks and it is
    not installed, naming the install command and the flag that turns AutoAttack off."""
    if version == "none":
        return
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        raise ValueError(f"{flag} {version} needs torchattacks, which is not installed: {INSTALL_HINT}, "
                         f"or pass {flag} none") from None


def _batches(dataset: Dataset, batch_size: int, device: str | torch.device, limit: Optional[int]):
    seen = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x, y = batch[0], batch[1]
        if limit is not None:
            if seen >= limit:
                return
            x, y = x[: limit - seen], y[: limit - seen]
        seen += len(y)
        yield x.to(device), y.to(device)


def _accuracy(model: nn.Module, dataset: Dataset, attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              batch_size: int, device: str | torch.device, limit: Optional[int],
              progress: Optional[str] = None) -> float:
    """Accuracy on attack(x, y); progress: the description of a progress bar with an ETA (None: no bar)."""
    from tqdm import tqdm

    correct = total = 0
    count = min(len(dataset), limit if limit is not None else len(dataset))
    batches = tqdm(_batches(dataset, batch_size, device, limit), total=math.ceil(count / batch_size),
                   desc=progress, disable=progress is None, leave=False, unit="batch")
    for x, y in batches:
        x_eval = attack(x, y)
        with eval_mode(model), torch.no_grad():
            correct += int((model(x_eval).argmax(1) == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("dataset is empty")
    return correct / total


def natural_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                     device: str | torch.device = "cpu", limit: Optional[int] = None, progress: bool = False) -> float:
    """Accuracy on clean inputs (progress: a progress bar with an ETA on stderr)."""
    return _accuracy(model, dataset, lambda x, y: x, batch_size, device, limit, "natural" if progress else None)


def pgd_accuracy(model: nn.Module, dataset: Dataset, eps: float, steps: int = 20,
                 alpha: Optional[float] = None, norm: str = "linf", clamp: tuple[float, float] = (0.0, 1.0),
                 batch_size: int = 256, device: str | torch.device = "cpu", limit: Optional[int] = None,
                 progress: bool = False) -> float:
    """Accuracy under PGD-`steps` with a random start (alpha defaults to 2.5·eps/steps)."""
    alpha = 2.5 * eps / max(steps, 1) if alpha is None else alpha
    return _accuracy(model, dataset,
                     lambda x, y: pgd(model, x, y, eps, alpha, steps, norm=norm, clamp=clamp),
                     batch_size, device, limit, f"PGD-{steps}" if progress else None)


def autoattack_accuracy(model: nn.Module, dataset: Dataset, eps: float, num_classes: int,
                        norm: str = "linf", version: str = "standard", batch_size: int = 256,
                        device: str | torch.device = "cpu", limit: Optional[int] = None, seed: int = 0,
                        progress: bool = False) -> float:
    """Accuracy under AutoAttack from torchattacks (an implementation independent of ours).

    version "standard": APGD-CE, APGD-T, FAB-T and Square (Croce & Hein 2020);
    "fast": APGD-CE and APGD-T only (the two that decide nearly all cases, much quicker on CPU).
    """
    try:
        import torchattacks
    except ImportError as exc:
        raise ImportError(f"AutoAttack needs torchattacks: {INSTALL_HINT}") from exc
    if version not in AUTOATTACK_VERSIONS[:2]:
        raise ValueError(f"version must be 'standard' or 'fast', got {version!r}")
    ta_norm = {"linf": "Linf", "l2": "L2"}[norm]
    if version == "standard":
        attack = torchattacks.AutoAttack(model, norm=ta_norm, eps=eps, version="standard",
                                         n_classes=num_classes, seed=seed)
    else:
        attack = torchattacks.MultiAttack([
            torchattacks.APGD(model, norm=ta_norm, eps=eps, steps=100, seed=seed, loss="ce"),
            torchattacks.APGDT(model, norm=ta_norm, eps=eps, steps=100, seed=seed, n_classes=num_classes),
        ])

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with eval_mode(model):
            return attack(x, y)

    return _accuracy(model, dataset, run, batch_size, device, limit, f"AutoAttack {version}" if progress else None)


def evaluate(model: nn.Module, dataset: Dataset, eps: float, num_classes: int, norm: str = "linf",
             clamp: tuple[float, float] = (0.0, 1.0), pgd_steps: int = 20, autoattack: str = "standard",
             batch_size: int = 256, device: str | torch.device = "cpu", limit: Optional[int] = None,
             seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Natural, PGD-`pgd_steps` and AutoAttack accuracy of `model` on `dataset` (progress: a bar with an ETA
    per attack, on stderr)."""
    if autoattack not in AUTOATTACK_VERSIONS:
        raise ValueError(f"autoattack must be one of {list(AUTOATTACK_VERSIONS)}, got {autoattack!r}")
    torch.manual_seed(seed)
    result: dict[str, Any] = {
        "natural_acc": natural_accuracy(model, dataset, batch_size, device, limit, progress),
        f"pgd{pgd_steps}_acc": pgd_accuracy(model, dataset, eps, pgd_steps, norm=norm, clamp=clamp,
                                            batch_size=batch_size, device=device, limit=limit, progress=progress),
        "eps": eps, "norm": norm, "num_samples": min(len(dataset), limit or len(dataset)),
    }
    if autoattack != "none":
        result["autoattack_acc"] = autoattack_accuracy(model, dataset, eps, num_classes, norm, autoattack,
                                                       batch_size, device, limit, seed, progress)
        result["autoattack_version"] = autoattack
    return result

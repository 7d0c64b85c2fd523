"""Adversarial attacks (PGD, FGSM) and adversarial-training objectives (PGD-AT, TRADES, MART, RelaxLoss)."""

from demem_ext.adversarial.attacks import eval_mode, fgsm, pgd
from demem_ext.adversarial.objectives import (
    MART,
    OBJECTIVES,
    PGDAT,
    TRADES,
    Objective,
    PlainObjective,
    RelaxLossAT,
    Terms,
    make_objective,
)

__all__ = [
    "MART",
    "OBJECTIVES",
    "PGDAT",
    "TRADES",
    "Objective",
    "PlainObjective",
    "RelaxLossAT",
    "Terms",
    "eval_mode",
    "fgsm",
    "make_objective",
    "pgd",
]

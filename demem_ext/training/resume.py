"""Resuming a run with more epochs than it was started with: allowed only where that is exact."""

from __future__ import annotations

import os
from typing import Any

from demem_ext.training.validate import check_config


def extended_payload(payload: dict[str, Any], epochs: int, path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint payload with its run's epoch count raised to `epochs`.

    Exact (the same result as a run started with `epochs`) only when nothing depends on the epoch
    count: no learning-rate schedule, no noise calibrated to a target ε, no per-epoch loss record.
    Anything else is refused with the reason, as is shortening a run.
    """
    stored = check_config(payload.get("config"), str(path))
    if epochs == stored.epochs:
        return payload
    if epochs < stored.epochs:
        raise ValueError(f"--epochs {epochs} is fewer than the {stored.epochs} epochs of the run in {path}: "
                         f"a run cannot be shortened")
    reasons = []
    if stored.schedule != "none":
        reasons.append(f"its {stored.schedule} learning-rate schedule is laid out over {stored.epochs} epochs")
    if stored.target_epsilon is not None:
        reasons.append(f"its noise is calibrated to target_epsilon over {stored.epochs} epochs")
    if stored.record_losses:
        reasons.append(f"its loss record holds {stored.epochs} epochs")
    if reasons:
        raise ValueError(f"cannot extend the run in {path} from {stored.epochs} to {epochs} epochs exactly: "
                         f"{'; '.join(reasons)}. Start a new run with --epochs {epochs} instead")
    return {**payload, "config": {**payload["config"], "epochs": epochs}}

"""The random state of a training run: seeding, and the snapshot a checkpoint stores (torch, CUDA, NumPy,
Python), so that a resumed run draws what the uninterrupted one would have."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator's state, as tensors, numbers and strings (weights_only loads)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]),
            "python": json.dumps(random.getstate())}


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))
    version, internal, gauss = json.loads(rng["python"])
    random.setstate((version, tuple(internal), gauss))

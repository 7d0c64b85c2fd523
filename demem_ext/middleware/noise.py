"""The step's Gaussian noise: a seeded Philox stream (seed, offset), or a fresh OS seed per step."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from demem_ext.middleware.process_group import ProcessGroup
from demem_ext.ops import philox_normal


def random_seed() -> int:
    """A 63-bit seed from torch's global generator (reproducible under torch.manual_seed)."""
    return int(torch.randint(0, 2**63 - 1, ()).item())


class NoiseSource:
    """Draws ξ ~ N(0, I) for each noisy step; the seeded stream advances its offset by ⌈P/4⌉ a draw."""

    def __init__(self, seed: Optional[int], secure: bool) -> None:
        self.secure = secure
        self.seed = 0 if secure else (seed if seed is not None else random_seed())
        self.offset = 0

    def add_to(self, total: torch.Tensor, std: float, group: ProcessGroup) -> None:
        """total += std·ξ in place (one draw for the whole process group)."""
        if self.secure:
            seed, offset = group.broadcast_seed(int.from_bytes(os.urandom(8), "little")), 0
        else:
            seed, offset = self.seed, self.offset
            self.offset += math.ceil(total.numel() / 4)
        total.add_(philox_normal(total.numel(), seed, offset, total.device, total.dtype), alpha=std)

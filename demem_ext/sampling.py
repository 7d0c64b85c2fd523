"""How batches are drawn, which decides what ε a noisy run earns.

`PoissonBatchSampler` includes each sample in each batch independently with probability q (batches vary
in size and may be empty), the sampling that the subsampled-Gaussian accountant assumes. Shuffled
fixed-size batches ("shuffle") are what an ordinary DataLoader draws; no ε is reported for them.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

SAMPLINGS = ("poisson", "shuffle")


def check_sample_rate(sample_rate: float) -> float:
    """q must be a real number in (0, 1]."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not (
            math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


class PoissonBatchSampler:
    """Batches of dataset indices, each sample in each batch with probability `sample_rate`.

    For `DataLoader(dataset, batch_sampler=PoissonBatchSampler(len(dataset), q))`. An epoch is `steps`
    batches (default ⌈1/q⌉, one pass in expectation); a batch may be empty, which a DeMem block turns
    into a noise-only step. `expected_batch_size` = q·N is the D that DP-SGD divides by.
    """

    def __init__(self, num_samples: int, sample_rate: float, *, steps: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.sample_rate = check_sample_rate(sample_rate)
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
            raise ValueError(f"steps must be a positive int or None, got {steps!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.num_samples = num_samples
        self.steps = steps if steps is not None else math.ceil(1 / self.sample_rate)
        self.generator = generator

    @property
    def expected_batch_size(self) -> float:
        """q·N, the expected number of samples in a batch."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            draws = torch.rand(self.num_samples, generator=self.generator)
            yield torch.nonzero(draws < self.sample_rate).flatten().tolist()

"""How batches are drawn, which decides what ε a noisy run earns.

`PoissonBatchSampler` includes each sample in each batch independently with probability q (batches vary
in size and may be empty), the sampling that the subsampled-Gaussian accountant assumes. Shuffled
fixed-size batches ("shuffle") are what an ordinary DataLoader draws; no ε is reported for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch.utils.data import default_collate

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


def collate_allowing_empty(dataset: Any) -> Callable[[list[Any]], Any]:
    """A `collate_fn` for Poisson batches: `default_collate`, and for an empty batch the same structure
    with 0 rows (the shapes and dtypes of `dataset[0]`), which a DeMem block turns into a noise-only step."""

    def collate(samples: list[Any]) -> Any:
        if samples:
            return default_collate(samples)
        return _map_tensors(default_collate([dataset[0]]), lambda t: t[:0])

    return collate


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Sampling:
    """How a DeMem block's batches are drawn: "poisson" (with the rate q when a sampler gave it) or "shuffle"."""

    kind: str
    sample_rate: Optional[float] = None
    num_samples: Optional[int] = None

    @classmethod
    def of(cls, sampling: Union[str, PoissonBatchSampler, "Sampling"]) -> "Sampling":
        """From DeMem's `sampling` argument: "poisson", "shuffle" or a PoissonBatchSampler."""
        if isinstance(sampling, Sampling):
            return sampling
        if isinstance(sampling, PoissonBatchSampler):
            return cls("poisson", sampling.sample_rate, sampling.num_samples)
        if isinstance(sampling, str) and sampling in SAMPLINGS:
            return cls(sampling)
        raise ValueError(f"sampling must be 'poisson', 'shuffle' or a PoissonBatchSampler, got {sampling!r}")

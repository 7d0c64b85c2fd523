"""Where DeMem's batch lives: in one process, or spread over the ranks of torch.distributed.

`DeMem` asks its process group, never a world size, for the few things that differ: how the batch-level
rule (τ, D) is found, when a bad sample stops the run, how the pending sum becomes the step's, the noise
seed, and how the loss trace is updated. `SingleProcess` does each locally; `TorchDistributed` makes each
a collective (`demem_ext.middleware.collectives`), called by every rank in the same order, so that the
update equals that of one process holding every rank's samples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from demem_ext.config import DeMemConfig
from demem_ext.grad_sample import flat_dtype
from demem_ext.middleware import collectives
from demem_ext.middleware.nonfinite import NonFinitePolicy
from demem_ext.ops import NonFiniteError, rule
from demem_ext.ops.rule import accumulation_dtype


def fixed_at(config: DeMemConfig, tau: float) -> DeMemConfig:
    """`config` with threshold "fixed" at τ (every sample then gets its risk against that τ)."""
    return config.replace(threshold="fixed", tau=tau)


class SingleProcess:
    """The whole batch is in this process: nothing to exchange."""

    world = 1
    rank = 0
    collective = False  # whether every rank must take part in each call, even with no sample

    def join(self, model: nn.Module, config: DeMemConfig, options: dict[str, Any], seed: int,
             secure_noise: bool) -> int:
        """The noise seed to use (this process's own)."""
        return seed

    def finite(self, policy: NonFinitePolicy, ok: torch.Tensor, problem: str) -> torch.Tensor:
        """The mask of samples with finite losses; raises at once under nonfinite="error"."""
        return policy.keep(ok, problem)

    def rule_for(self, config: DeMemConfig, scores: torch.Tensor, keep: torch.Tensor, problem: str,
                 policy: NonFinitePolicy, fix_tau: bool) -> tuple[DeMemConfig, int]:
        """The rule to weight the kept `scores` with, and the number of samples D counts.

        fix_tau: the batch is summed in chunks, so τ is fixed at the whole batch's value first.
        """
        if fix_tau and scores.numel() > 0:
            config = fixed_at(config, rule.threshold(scores, config.threshold, config.k, config.quantile,
                                                     config.tau))
        return config, scores.numel()

    def reduce(self, total: Optional[torch.Tensor], count: int, params: Sequence[nn.Parameter],
               policy: NonFinitePolicy) -> tuple[Optional[torch.Tensor], int]:
        """The step's Σ w_i·c_i·g_i and its number of samples."""
        return total, count

    def broadcast_seed(self, seed: int) -> int:
        return seed

    def gather_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The rows (e.g. (index, loss) pairs) of every process, in rank order."""
        return [rows]


class TorchDistributed:
    """torch.distributed with more than one rank: τ and D of the global batch, one update for all."""

    collective = True

    def __init__(self) -> None:
        self.world = collectives.world_size()
        self.rank = collectives.rank()

    def join(self, model: nn.Module, config: DeMemConfig, options: dict[str, Any], seed: int,
             secure_noise: bool) -> int:
        """Checks the same configuration and a DDP model on every rank; returns rank 0's seed."""
        ddp = collectives.is_ddp(model)
        collectives.check_same_config({**dataclasses.asdict(config), **options,
                                       "model wrapped in DistributedDataParallel": ddp})
        if not ddp:
            raise ValueError(
                f"under torch.distributed (world size {self.world}) DeMem needs the "
                f"DistributedDataParallel-wrapped model, got {type(model).__name__}: wrap as "
                f"{collectives.WRAPPER_ORDER}")
        return seed if secure_noise else collectives.broadcast_seed(seed)

    def finite(self, policy: NonFinitePolicy, ok: torch.Tensor, problem: str) -> torch.Tensor:
        """The mask of samples with finite losses; the error waits for `rule_for`, on every rank."""
        return ok

    def rule_for(self, config: DeMemConfig, scores: torch.Tensor, keep: torch.Tensor, problem: str,
                 policy: NonFinitePolicy, fix_tau: bool) -> tuple[DeMemConfig, int]:
        """`config` fixed at τ of all ranks' kept scores, and their number.

        Every rank gathers every rank's scores (NaN where `keep` is False), so that with
        nonfinite="error" a bad sample on one rank stops all of them here, together.
        """
        full = torch.full(keep.shape, math.nan, dtype=torch.float64, device=scores.device)
        full[keep] = scores.to(torch.float64)
        parts = collectives.all_gather_padded(full)
        if policy.mode == "error":
            me = collectives.rank()
            for r in [me] + [r for r in range(len(parts)) if r != me]:
                bad = torch.nonzero(~torch.isfinite(parts[r])).flatten()[:8].tolist()
                if bad and r == me:
                    raise NonFiniteError(f"{problem} for samples at batch positions {bad} "
                                         "(nonfinite='skip' drops such samples)")
                if bad:
                    raise NonFiniteError(
                        f"rank {r} has non-finite losses or per-sample gradients at batch positions {bad}, "
                        "so every rank stops (nonfinite='skip' drops such samples)")
        scores_all = torch.cat([p[torch.isfinite(p)] for p in parts])
        if scores_all.numel() == 0:
            return config, 0
        tau = rule.threshold(scores_all, config.threshold, config.k, config.quantile, config.tau)
        return fixed_at(config, tau), scores_all.numel()

    def reduce(self, total: Optional[torch.Tensor], count: int, params: Sequence[nn.Parameter],
               policy: NonFinitePolicy) -> tuple[Optional[torch.Tensor], int]:
        """Σ w_i·c_i·g_i and the number of samples over all ranks (the same on every rank).

        Raises on every rank the non-finite gradient error that a rank deferred to the step.
        """
        if total is None:
            dtype = accumulation_dtype(flat_dtype(params))
            total = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
        flags = torch.tensor([count, int(policy.deferred is not None)], dtype=torch.int64)
        total = collectives.all_reduce_sum(total)
        count, errors = collectives.all_reduce_sum(flags).tolist()
        if errors:
            message = policy.deferred or f"non-finite per-sample gradients on {errors} other rank(s)"
            raise NonFiniteError(f"{message}; every rank stops at the step (nonfinite='skip' drops such samples)")
        return total, count

    def broadcast_seed(self, seed: int) -> int:
        return collectives.broadcast_seed(seed)

    def gather_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return collectives.all_gather_padded(rows)


ProcessGroup = SingleProcess | TorchDistributed


def current_group() -> ProcessGroup:
    """TorchDistributed when torch.distributed is initialised with more than one rank, else SingleProcess."""
    return TorchDistributed() if collectives.is_distributed() else SingleProcess()

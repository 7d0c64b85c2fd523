"""torch.distributed helpers for DeMem: one update for the global batch, whatever the ranks hold.

DeMem calls these only when a process group is initialised with world size > 1 (`is_distributed`);
otherwise nothing here runs. Every helper is a collective: all ranks must call it, in the same order.
Tensors travel on CUDA under NCCL and on the CPU otherwise (gloo, mpi).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

WRAPPER_ORDER = "DeMem(DistributedDataParallel(model), optimizer): DDP inside, DeMem outside"


def is_distributed() -> bool:
    """Whether torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of ranks (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_ddp(model: nn.Module) -> bool:
    """Whether `model` is wrapped in DistributedDataParallel."""
    return isinstance(model, DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (the model itself when it is not wrapped)."""
    return model.module if is_ddp(model) else model


def comm_device() -> torch.device:
    """Where collective tensors live: the current CUDA device under NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_padded(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (leading dimensions may differ, even be 0), as a list indexed by rank.

    Gathers the sizes first, pads each tensor to the largest, gathers, and trims the padding.
    Returned tensors are on `tensor`'s device.
    """
    device = comm_device()
    local = tensor.detach().to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64, device=device))
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded = local.new_zeros((longest,) + tuple(local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    if longest > 0:
        dist.all_gather(parts, padded)
    return [p[:n].to(tensor.device) for p, n in zip(parts, counts)]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks (a new tensor on `tensor`'s device; identical on every rank)."""
    reduced = tensor.detach().to(comm_device(), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def broadcast_seed(seed: int, src: int = 0) -> int:
    """Rank `src`'s 64-bit seed on every rank."""
    halves = torch.tensor([seed & 0xFFFFFFFF, seed >> 32], dtype=torch.int64, device=comm_device())
    dist.broadcast(halves, src=src)
    return int(halves[0]) | (int(halves[1]) << 32)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_same_config(fingerprint: dict[str, Any], what: str = "DeMem configuration") -> None:
    """Raise the same ValueError on every rank when `fingerprint` differs between ranks.

    fingerprint: picklable, comparable values by name (e.g. the DeMemConfig fields). The error names
    each differing field with its value on every rank.
    """
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, fingerprint)
    names = sorted(set().union(*(g.keys() for g in gathered)))
    differing = [name for name in names if any(g.get(name) != gathered[0].get(name) for g in gathered[1:])]
    if differing:
        details = "; ".join(
            f"{name}: " + ", ".join(f"rank {r}: {g.get(name)!r}" for r, g in enumerate(gathered))
            for name in differing)
        raise ValueError(f"{what} differs across ranks in {', '.join(differing)} ({details}); "
                         "every rank must use the same one")

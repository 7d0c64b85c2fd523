"""How many models to train at once: `--ensemble auto` is the fastest measured K that fits a memory budget.

The rule follows the measurements in docs/benchmarks.md ("Shadow models per hour"): on a CPU, 1 in fp32
(ensembles gained nothing), at most CPU_MAX_ENSEMBLE in bf16 (larger ensembles were slower); on a GPU, as
many models as the memory budget holds. The budget is half the memory available now (CUDA: free device
memory; CPU: MemAvailable), shared by the processes that train at once."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from demem_ext.training.config import TrainConfig
from demem_ext.training.data import dataset_info
from demem_ext.training.ensemble import sequential_reason
from demem_ext.training.models import build_model

AUTO = "auto"
CPU_MAX_ENSEMBLE = 8
BUDGET_FRACTION = 0.5
# a model's activations are held for backward, then their gradients; TRADES and MART keep a natural and an
# adversarial graph at once: four times the forward's outputs bounds what one training step holds
ACTIVATION_FACTOR = 4
# parameters, their gradients, the optimizer's momentum and the stacked copy of an ensemble step
PARAMETER_COPIES = 4


def check_ensemble(value: object, num_models: int) -> int | str:
    """`value` if it is "auto" or an integer in [1, num_models]; a ValueError naming `ensemble` otherwise."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_models:
        raise ValueError(f"ensemble must be 'auto' or an integer in [1, {num_models}] (the number of models), "
                         f"got {value!r}")
    return value


def available_bytes(device: str) -> int:
    """Memory free for training now: the CUDA device's free memory, or the machine's MemAvailable."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def peak_memory_mib(device: str) -> float:
    """This process's peak memory so far, in MiB: the CUDA allocator's peak on a GPU, peak RSS on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def member_bytes(cfg: TrainConfig) -> int:
    """An upper estimate of what one more model adds to an ensemble's training step: its parameter copies
    and ACTIVATION_FACTOR times the fp32 outputs of its layers on one batch (counted on a zero batch)."""
    info = dataset_info(cfg.dataset)
    model = build_model(cfg.model, info.num_classes, info.input_shape[0], cfg.norm)
    outputs = [0]

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            outputs[0] += output.numel() * 4

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(cfg.batch_size, *info.input_shape))
    finally:
        for h in hooks:
            h.remove()
    parameters = sum(p.numel() * 4 for p in model.parameters())
    return PARAMETER_COPIES * parameters + ACTIVATION_FACTOR * outputs[0]


def resolve_ensemble(requested: int | str, num_models: int, cfg: TrainConfig, processes: int = 1,
                     budget_bytes: Optional[int] = None) -> tuple[int, str]:
    """(K, why): the requested K, or for "auto" the fastest measured K that fits the memory budget of
    `processes` processes training at once (budget_bytes: the whole budget; default BUDGET_FRACTION of
    what is available now)."""
    requested = check_ensemble(requested, num_models)
    if requested != AUTO:
        return requested, "requested"
    sequential = sequential_reason(cfg)
    if sequential is not None:
        return 1, f"auto: {sequential}"
    precision, _ = cfg.with_resolved_precision()
    on_cuda = cfg.device.startswith("cuda")
    if not on_cuda and precision.precision == "fp32":
        return 1, "auto: on the CPU in fp32 ensembles measured no faster than one model at a time"
    budget = int(BUDGET_FRACTION * available_bytes(cfg.device)) if budget_bytes is None else budget_bytes
    per_process, per_model = budget // max(1, processes), member_bytes(cfg)
    cap = num_models if on_cuda else min(num_models, CPU_MAX_ENSEMBLE)
    k = max(1, min(cap, per_process // per_model))
    limit = "the memory budget" if k < cap else ("the models" if cap == num_models else "the CPU's measured best")
    return k, (f"auto: {k} at a time, limited by {limit} ({per_process / 2**20:.0f} MiB per process, "
               f"about {per_model / 2**20:.1f} MiB per model)")

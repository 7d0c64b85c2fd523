"""The known-answer audit: `demem audit --canaries K` trains the configuration's shadow models on a
population in which K samples carry a wrong label, and reports how often the primary attack finds
them (`demem_ext.audit.calibration.canary_power`); the population numbers leave the canaries out."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from demem_ext.audit.api import TrainFn, audit_train_fn
from demem_ext.audit.calibration import inject_canaries
from demem_ext.audit.queries import query_transforms
from demem_ext.training import TrainConfig, build, train_epoch
from demem_ext.training.data import load_dataset
from demem_ext.training.loop import SubsetWithLocalIndex


class Relabeled(Dataset):
    """A dataset of (x, y, index) items with the labels replaced."""

    def __init__(self, base: Dataset, labels: torch.Tensor) -> None:
        if len(labels) != len(base):
            raise ValueError(f"labels must have one entry per sample ({len(base)}), got {len(labels)}")
        self.base, self.labels = base, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor, int]:
        x, _, _ = self.base[index]
        return x, self.labels[index], index


def config_train_fn(cfg: TrainConfig, population: Dataset) -> TrainFn:
    """train_fn(indices, seed): the `demem train` loop of cfg (seed replaced) on those samples of `population`."""
    def train_fn(train_indices: torch.Tensor, seed: int) -> nn.Module:
        state = build(dataclasses.replace(cfg, seed=seed), train_indices)
        state.train_set = SubsetWithLocalIndex(population, train_indices)
        with state.demem if state.demem is not None else contextlib.nullcontext():
            while state.epoch < cfg.epochs:
                train_epoch(state, progress=False)
                state.epoch += 1
        return state.model
    return train_fn


def audit_with_canaries(cfg: TrainConfig, out_dir: str | Path, num_canaries: int, num_models: int = 16,
                        keep_seed: int = 0, canary_seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """The audit of cfg with num_canaries mislabeled samples (seeded by canary_seed) in the population."""
    population, _, info = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, augment=False, seed=cfg.split_seed)
    labels = torch.as_tensor([int(population[i][1]) for i in range(len(population))])
    noisy, canaries = inject_canaries(labels, num_canaries, info.num_classes, canary_seed)
    relabeled = Relabeled(population, noisy)
    return audit_train_fn(config_train_fn(cfg, relabeled), relabeled, out_dir, num_models=num_models,
                          keep_seed=keep_seed, seed=cfg.seed, transforms=query_transforms(cfg.dataset), eps=cfg.eps,
                          clamp=info.input_range, device=cfg.device, canaries=canaries, progress=progress,
                          title=f"membership inference with {num_canaries} canaries")
